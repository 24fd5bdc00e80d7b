"""Turn the ranks' raw timings into one record per scenario, the terminal
table, and the throughput plot. Every figure that compares is a ratio of
medians (or per-round ratios) taken in the same run."""

from __future__ import annotations

import statistics

import numpy as np
from _bench_scenarios import Scenario

KINDS = ("disagg", "raw", "zmq")
MEMORY_TARGET_PCT = 5.0


def _describe(sc: Scenario) -> dict:
    return {"name": sc.name, "group": sc.group, "tokens": sc.tokens, "hidden": sc.hidden,
            "block_size": sc.block, "rooms": sc.rooms, "sequential": sc.sequential,
            "language_tp": sc.tp, "recv_into": sc.recv_into, "alloc_tokens": sc.alloc_tokens,
            "manual_resume": sc.manual_resume, "pool_allocs": sc.pool_allocs}


def summarise(sc: Scenario, per_rank: list[dict | None]) -> dict:
    """One JSON record from every rank's output for this scenario."""
    rec = _describe(sc)
    langs = [per_rank[r] for r in range(1, sc.world)]
    rec["failures"] = sum(int(p["stats"]["failures"]) for p in per_rank if p)
    if sc.is_memory:
        rss = {f"rank{r}": per_rank[r]["rss_kb"] for r in range(sc.world)}
        growth = {k: 100.0 * (v[-1] - v[0]) / v[0] for k, v in rss.items()}
        rec["memory"] = {"checkpoints_rooms": list(sc.memory_checkpoints), "rss_kib": rss,
                         "growth_pct": growth, "target_pct": MEMORY_TARGET_PCT,
                         "within_target": all(g <= MEMORY_TARGET_PCT for g in growth.values()),
                         "rooms_live_at_end": [p["stats"]["rooms_live"] for p in langs]}
        return rec
    # One clock for all ranks (CLOCK_MONOTONIC, one host): a segment starts when
    # its first rank leaves the barrier, a room ends when its last Language rank
    # has every byte; a round lasts the sum of its segments.
    rounds = len(langs[0]["rounds"]["disagg"])
    nbytes = sc.round_bytes
    rec.update(bytes=nbytes, room_bytes=sc.room_bytes, rounds=rounds)
    t: dict[str, list[float]] = {}
    for k in KINDS:
        t[k], lat = [], []
        for i in range(rounds):
            segs = [p["rounds"][k][i] for p in per_rank if p]  # per rank: [(start, ends)]
            total = 0.0
            for j in range(len(segs[0])):
                start = min(seg[j][0] for seg in segs)
                ends = np.max([seg[j][1] for seg in segs if seg[j][1]], axis=0) - start
                lat += ends.tolist()
                total += float(ends.max())
            t[k].append(total)
        med, lat_ms = statistics.median(t[k]), np.array(lat) * 1e3
        faults = [f for p in langs for f in p["minor_faults"][k]]
        rec[k] = {"median_s": med, "min_s": min(t[k]), "max_s": max(t[k]),
                  "gbps": nbytes / med / 1e9, "rounds_s": t[k],
                  "p50_ms": float(np.percentile(lat_ms, 50)),
                  "p99_ms": float(np.percentile(lat_ms, 99)),
                  "minor_faults_per_room": statistics.median(faults) / sc.rooms}
    for base in ("raw", "zmq"):
        per_round = [b / d for b, d in zip(t[base], t["disagg"], strict=True)]
        rec[f"ratio_disagg_{base}"] = rec[base]["median_s"] / rec["disagg"]["median_s"]
        rec[f"noise_disagg_{base}"] = [min(per_round), max(per_round)]
    st, n = langs[0]["stats"], langs[0]["disagg_rooms"]
    rec["chunks_per_room"] = st["chunks"] / n
    rec["resumes_per_room"] = st["resumes"] / n
    return rec


def print_table(records: list[dict]) -> None:
    timed = [r for r in records if "memory" not in r]
    if timed:
        print(f"{'scenario':26} {'MiB':>7} {'ch':>4} {'disagg':>7} {'raw':>7} {'zmq':>7} "
              f"{'d/raw':>6} {'d/zmq':>6} {'p50 ms':>7} {'p99 ms':>7} {'faults':>6} {'raw p99':>7} "
              f"{'noise d/raw':>11} {'noise d/zmq':>11}")
        print(f"{'':26} {'':>7} {'':>4} {'GB/s':>7} {'GB/s':>7} {'GB/s':>7}"
              f"{'':>14} {'(disagg, per room)':>22}")
        for r in timed:
            nr, nz = r["noise_disagg_raw"], r["noise_disagg_zmq"]
            print(f"{r['name']:26} {r['bytes'] / 2**20:7.2f} {r['chunks_per_room']:4.1f} "
                  f"{r['disagg']['gbps']:7.3f} {r['raw']['gbps']:7.3f} {r['zmq']['gbps']:7.3f} "
                  f"{r['ratio_disagg_raw']:6.2f} {r['ratio_disagg_zmq']:6.2f} "
                  f"{r['disagg']['p50_ms']:7.2f} {r['disagg']['p99_ms']:7.2f} "
                  f"{r['disagg']['minor_faults_per_room']:6.0f} {r['raw']['p99_ms']:7.2f} "
                  f"{nr[0]:5.2f}-{nr[1]:<5.2f} {nz[0]:5.2f}-{nz[1]:<5.2f}")
        fresh = timed[0].get("baseline_destinations") == "fresh"
        print("MiB: per round, to every Language rank. ch: chunks per room. d/raw, d/zmq: "
              "throughput ratios of medians (>1: disagg faster);\nnoise: min-max of per-round "
              "ratios. faults: minor page faults per room on a Language rank (median). raw "
              "and zmq land in " + ("fresh tensors per room." if fresh else
                                    "touched, preallocated tensors."))
    for r in records:
        if "memory" in r:
            m = r["memory"]
            a, b = m["checkpoints_rooms"][0], m["checkpoints_rooms"][-1]
            for rank, rss in m["rss_kib"].items():
                g = m["growth_pct"][rank]
                print(f"{r['name']}: {rank} RSS {rss[0] / 1024:.1f} MiB after {a} rooms, "
                      f"{rss[-1] / 1024:.1f} MiB after {b}: {g:+.2f}% "
                      f"({'within' if g <= m['target_pct'] else 'ABOVE'} the "
                      f"{m['target_pct']:g}% target)")
    failed = sum(r["failures"] for r in records)
    if failed:
        print(f"disagg reported {failed} failed room(s): see ctx.stats()")


def plot(records: list[dict], path: str) -> bool:
    """Throughput vs size per kind, as a PNG at `path`. False: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "memory" not in r]
    if not timed:
        return False
    # the sweep (one room, one chunk, growing size) when it ran, else whatever did
    pts = sorted([r for r in timed if r["group"] == "sweep"] or timed, key=lambda r: r["bytes"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind in KINDS:
        ax.plot([r["bytes"] / 2**20 for r in pts], [r[kind]["gbps"] for r in pts], "o-",
                label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("MiB per round" + ("" if pts[0]["group"] == "sweep" else " (all scenarios)"))
    ax.set_ylabel("GB/s (median of interleaved rounds)")
    ax.set_title("disagg vs raw torch.distributed send/recv vs ZeroMQ (Gloo, 127.0.0.1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
