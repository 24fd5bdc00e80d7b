"""Turn the ranks' raw timings into one record per scenario, the terminal
tables, the targets summary and the throughput plot. Every figure that
compares was taken in the same run, rounds interleaved: a ratio is the median
of the per-round ratios (with their min-max), latencies are per room."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from _bench_scenarios import (
    BASELINES,
    KNOWN_LEN,
    MEMORY_TARGET_PCT,
    SERVING_WORK_S,
    TARGETS,
    Scenario,
    Target,
    parse_mode,
)


def _describe(sc: Scenario) -> dict:
    return {"name": sc.name, "group": sc.group, "tokens": sc.tokens, "hidden": sc.hidden,
            "block_size": sc.block, "rooms": sc.rooms, "sequential": sc.sequential,
            "language_tp": sc.tp, "recv_into": sc.recv_into, "alloc_tokens": sc.alloc_tokens,
            "manual_resume": sc.manual_resume, "pool_allocs": sc.pool_allocs,
            "alloc_first": sc.alloc_first}


def merge_runs(runs: list[list[dict | None]]) -> list[dict | None]:
    """One scenario's per-rank outputs of several runs (--repeat) as if one run
    had made all their rounds."""
    if len(runs) == 1:
        return runs[0]
    out: list[dict | None] = []
    for parts in zip(*runs, strict=True):
        if parts[0] is None:
            out.append(None)
            continue
        m = {"rounds": {k: [s for p in parts for s in p["rounds"][k]] for k in parts[0]["rounds"]},
             "minor_faults": {k: [f for p in parts for f in p["minor_faults"][k]]
                              for k in parts[0]["minor_faults"]},
             "stats": {k: sum(p["stats"][k] for p in parts) for k in parts[0]["stats"]},
             "disagg_rooms": sum(p["disagg_rooms"] for p in parts)}
        out.append(m)
    return out


def _times(sc: Scenario, per_rank: list[dict | None], kind: str,
           rounds: int) -> tuple[list[float], list[float]]:
    """Per round, the round's duration; and every room's latency (seconds).
    One clock for all ranks (CLOCK_MONOTONIC, one host): a segment starts when
    its first rank leaves the barrier, a room ends when its last Language rank
    has every byte; a round lasts the sum of its segments."""
    t, lat = [], []
    for i in range(rounds):
        segs = [p["rounds"][kind][i] for p in per_rank if p]  # per rank: [(start, ends)]
        total = 0.0
        for j in range(len(segs[0])):
            start = min(seg[j][0] for seg in segs)
            ends = np.max([seg[j][1] for seg in segs if seg[j][1]], axis=0) - start
            lat += ends.tolist()
            total += float(ends.max())
        t.append(total)
    return t, lat


def _ratio(base: list[float], mine: list[float]) -> tuple[float, list[float]]:
    """Throughput ratio mine/base per round (base time / my time): median, [min, max]."""
    r = [b / m for b, m in zip(base, mine, strict=True)]
    return statistics.median(r), [min(r), max(r)]


def _memory_record(sc: Scenario, rec: dict, per_rank: list[dict | None],
                   mode: str) -> dict:
    langs = [per_rank[r] for r in range(1, sc.world)]
    rss = {f"rank{r}": per_rank[r]["rss_kb"] for r in range(sc.world)}
    growth = {k: 100.0 * (v[-1] - v[0]) / v[0] for k, v in rss.items()}
    rec["mode"] = mode
    rec["memory"] = {"checkpoints_rooms": list(sc.memory_checkpoints), "rss_kib": rss,
                     "growth_pct": growth, "target_pct": MEMORY_TARGET_PCT,
                     "within_target": all(g <= MEMORY_TARGET_PCT for g in growth.values()),
                     "rooms_live_at_end": [p["stats"]["rooms_live"] for p in langs]}
    return rec


def summarise(sc: Scenario, per_rank: list[dict | None], modes: list[str]) -> dict:
    """One JSON record from every rank's output for this scenario (one run, or
    several merged by merge_runs)."""
    rec = _describe(sc)
    rec["failures"] = sum(int(p["stats"]["failures"]) for p in per_rank if p)
    if sc.is_memory:
        return _memory_record(sc, rec, per_rank, modes[0])
    langs = [per_rank[r] for r in range(1, sc.world)]
    rounds = len(langs[0]["rounds"][BASELINES[0]])
    nbytes = sc.round_bytes
    rec.update(bytes=nbytes, room_bytes=sc.room_bytes, rounds=rounds, mode_names=list(modes))
    t: dict[str, list[float]] = {}
    kinds: dict[str, dict] = {}
    for k in (*BASELINES, *modes):
        t[k], lat = _times(sc, per_rank, k, rounds)
        med, lat_ms = statistics.median(t[k]), np.array(lat) * 1e3
        faults = [f for p in langs for f in p["minor_faults"][k]]
        kinds[k] = {"median_s": med, "min_s": min(t[k]), "max_s": max(t[k]),
                    "gbps": nbytes / med / 1e9, "rounds_s": t[k],
                    "p50_ms": float(np.percentile(lat_ms, 50)),
                    "p99_ms": float(np.percentile(lat_ms, 99)),
                    "minor_faults_per_room": statistics.median(faults) / sc.rooms,
                    "minor_faults_per_room_mean": statistics.mean(faults) / sc.rooms,
                    "minor_faults_per_room_range": [min(faults) / sc.rooms,
                                                    max(faults) / sc.rooms]}
    for b in BASELINES:
        rec[b] = kinds[b]
    rec["modes"] = {}
    for m in modes:
        d = kinds[m]
        for b in BASELINES:
            d[f"ratio_{b}"], d[f"range_{b}"] = _ratio(t[b], t[m])
            d[f"ratio_of_medians_{b}"] = kinds[b]["median_s"] / d["median_s"]
        d["added_p50_ms"] = d["p50_ms"] - kinds["raw"]["p50_ms"]
        d["added_p99_ms"] = d["p99_ms"] - kinds["raw"]["p99_ms"]
        caller, known = parse_mode(m)
        ref = "wait" + (KNOWN_LEN if known else "")
        if caller != "wait" and ref in t:  # throughput lost against the blocking caller
            r, (lo, hi) = _ratio(t[ref], t[m])
            d["vs_wait_loss_pct"], d["vs_wait_loss_range_pct"] = 100 * (1 - r), [
                100 * (1 - hi), 100 * (1 - lo)]
        rec["modes"][m] = d
    # the first mode under the names one-mode runs used
    first = rec["modes"][modes[0]]
    rec["disagg"] = {k: first[k] for k in kinds[modes[0]] if k in kinds["raw"]}
    for b in BASELINES:
        rec[f"ratio_disagg_{b}"] = first[f"ratio_{b}"]
        rec[f"noise_disagg_{b}"] = first[f"range_{b}"]
    st, n = langs[0]["stats"], langs[0]["disagg_rooms"]
    rec["chunks_per_room"] = st["chunks"] / n
    rec["resumes_per_room"] = st["resumes"] / n
    return rec


def summarise_runs(sc: Scenario, runs: list[list[dict | None]], modes: list[str]) -> dict:
    """The record of every run's rounds pooled, plus each run's own medians
    (`runs`: the min-max over runs is what --repeat is for)."""
    if sc.is_memory:
        recs = [summarise(sc, r, modes) for r in runs]
        worst = max(recs, key=lambda r: max(r["memory"]["growth_pct"].values()))
        worst["memory"]["growth_pct_by_run"] = [r["memory"]["growth_pct"] for r in recs]
        worst["failures"] = sum(r["failures"] for r in recs)
        worst["runs"] = len(runs)
        return worst
    rec = summarise(sc, merge_runs(runs), modes)
    rec["runs"] = len(runs)
    if len(runs) > 1:
        for one in (summarise(sc, r, modes) for r in runs):
            for m, d in rec["modes"].items():
                o = one["modes"][m]
                for f in ("ratio_raw", "ratio_zmq", "p50_ms", "p99_ms", "vs_wait_loss_pct"):
                    if f in o:
                        d.setdefault(f"{f}_by_run", []).append(o[f])
    return rec


# ------------------------------------------------------------------ targets

def _range(d: dict, f: str) -> str:
    """A ratio ("ratio_raw" or "ratio_zmq") with its min-max: over runs where
    there are several, else over rounds."""
    by_run = d.get(f"{f}_by_run")
    lo, hi = (min(by_run), max(by_run)) if by_run else d[f.replace("ratio_", "range_")]
    return f"{d[f]:.2f} ({lo:.2f}-{hi:.2f})"


def _target(t: Target, by_name: dict[str, dict]) -> dict:
    out: dict[str, Any] = {"key": t.key, "text": t.text, "scenario": t.scenario,
                           "bar": t.bar, "status": "not run", "figure": "", "values": {}}
    if t.kind == "spin_loss":
        losses = {(name, m): d["vs_wait_loss_pct"] for name, r in by_name.items()
                  for m, d in r.get("modes", {}).items()
                  if parse_mode(m)[0] == "spin" and "vs_wait_loss_pct" in d}
        if not losses:
            return out
        (name, m), worst = max(losses.items(), key=lambda kv: kv[1])
        out["values"] = {f"{n}/{mm}": v for (n, mm), v in losses.items()}
        out["figure"] = (f"worst {worst:+.1f} % ({name}, {m}) over {len(losses)} "
                         f"scenario-modes; median {statistics.median(losses.values()):+.1f} %")
        out["status"] = "met" if worst <= t.bar else "MISSED"
        return out
    rec = by_name.get(t.scenario or "")
    if rec is None:
        return out
    if t.kind == "memory":
        g = rec["memory"]["growth_pct"]
        out["values"] = g
        worst = max(g.values())
        a, b = rec["memory"]["checkpoints_rooms"][0], rec["memory"]["checkpoints_rooms"][-1]
        out["figure"] = f"{worst:+.2f} % worst rank, {a} -> {b} rooms"
        out["status"] = "met" if worst <= t.bar else "MISSED"
        return out
    modes = rec["modes"]
    if t.kind == "serving_p50":
        serving = t.modes[0]
        wait = "wait" + (KNOWN_LEN if parse_mode(serving)[1] else "")
        if serving not in modes or wait not in modes:
            return out
        it = SERVING_WORK_S * 1e3
        p50 = modes[serving]["p50_ms"]
        diff = p50 - modes[wait]["p50_ms"]
        floor = p50 - rec["rawloop"]["p50_ms"]
        out["values"] = {"serving_p50_ms": p50, "wait_p50_ms": modes[wait]["p50_ms"],
                         "rawloop_p50_ms": rec["rawloop"]["p50_ms"], "diff_ms": diff,
                         "diff_iterations": diff / it, "over_rawloop_iterations": floor / it}
        out["figure"] = (f"{p50:.1f} vs {modes[wait]['p50_ms']:.1f} ms: {diff / it:+.2f} "
                         f"iterations of {it:g} ms (raw in the same loop "
                         f"{rec['rawloop']['p50_ms']:.1f} ms: {floor / it:+.2f})")
        out["status"] = ("no bar" if t.bar is None else
                         "met" if diff / it <= t.bar else "MISSED")
        return out
    have = [m for m in t.modes if m in modes]
    if not have:
        return out
    f = f"ratio_{t.base}"
    out["values"] = {m: modes[m][f] for m in have}
    out["figure"] = ", ".join(f"{m} {_range(modes[m], f)}" for m in have)
    judged = [m for m in t.judged if m in modes] or have
    out["status"] = ("no bar" if t.bar is None else
                     "met" if all(modes[m][f] >= t.bar for m in judged) else "MISSED")
    return out


def targets(records: list[dict]) -> list[dict]:
    """Each target with its figure and met/MISSED ("no bar": the figure is
    reported without a limit; "not run": its scenario or modes did not)."""
    by_name = {r["name"]: r for r in records}
    return [_target(t, by_name) for t in TARGETS]


def print_targets(results: list[dict], runs: int) -> None:
    where = f"min-max over {runs} runs" if runs > 1 else "min-max over rounds"
    print(f"\ntargets (x raw unless said: median of per-round ratios, {where})")
    for r in results:
        print(f"  {r['text']:66} {r['status']:8} {r['figure'] or '-'}")


# ------------------------------------------------------------------ tables

def _row(name: str, kind: str, k: dict, extra: str = "") -> str:
    return (f"{name:26} {kind:11} {k['gbps']:7.3f} {k['p50_ms']:8.2f} {k['p99_ms']:8.2f} "
            f"{k['minor_faults_per_room']:6.0f}{extra}")


def print_table(records: list[dict]) -> None:
    timed = [r for r in records if "memory" not in r]
    if timed:
        many = any(r.get("runs", 1) > 1 for r in timed)
        print(f"{'scenario':26} {'kind':11} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'faults':>6} {'x raw (min-max)':>18} {'x zmq (min-max)':>18} "
              f"{'+p50 ms':>8} {'+p99 ms':>8} {'vs wait':>8}" + (f" {'x raw runs':>11}"
                                                                 if many else ""))
        for r in timed:
            print(f"{r['name']} ({r['bytes'] / 2**20:.2f} MiB a round, "
                  f"{r['chunks_per_room']:.1f} chunks a room)")
            for b in BASELINES:
                print(_row("", b, r[b]))
            for m, d in r["modes"].items():
                nr, nz = d["range_raw"], d["range_zmq"]
                loss = (f"{d['vs_wait_loss_pct']:+7.1f}%" if "vs_wait_loss_pct" in d
                        else f"{'':8}")
                runs = ""
                if many and "ratio_raw_by_run" in d:
                    runs = f" {min(d['ratio_raw_by_run']):5.2f}-{max(d['ratio_raw_by_run']):<5.2f}"
                print(_row("", m, d, f" {d['ratio_raw']:5.2f} ({nr[0]:4.2f}-{nr[1]:<4.2f}) "
                                     f"{d['ratio_zmq']:5.2f} ({nz[0]:4.2f}-{nz[1]:<4.2f}) "
                                     f"{d['added_p50_ms']:+8.2f} {d['added_p99_ms']:+8.2f} "
                                     f"{loss}{runs}").rstrip())
        fresh = timed[0].get("baseline_destinations") == "fresh"
        recycle = timed[0].get("disagg_recycle", True)
        print("kinds: raw/zmq the baselines (always blocking); wait/spin/serving: disagg's "
              "callers block in wait(), spin on poll(),\nor run "
              f"{SERVING_WORK_S * 1e3:g} ms of Python between polls; +len: the receiver "
              "passes seq_len= (ALLOC carries it). GB/s: median round.\np50/p99: per room. "
              "x raw, x zmq: throughput ratios (>1: disagg faster), median of per-round "
              "ratios (min-max). +p50/+p99: minus raw's.\nvs wait: throughput lost against "
              "the blocking caller, per-round median. faults: minor page faults per room on "
              "a Language rank.\nraw and zmq land in "
              + ("fresh tensors per room" if fresh else "touched, preallocated tensors")
              + "; disagg in " + ("results handed back each round (recycle)."
                                  if recycle else "new results (--no-recycle)."))
    for r in records:
        if "memory" in r:
            m = r["memory"]
            a, b = m["checkpoints_rooms"][0], m["checkpoints_rooms"][-1]
            for rank, rss in m["rss_kib"].items():
                g = m["growth_pct"][rank]
                print(f"{r['name']} ({r['mode']}): {rank} RSS {rss[0] / 1024:.1f} MiB after "
                      f"{a} rooms, {rss[-1] / 1024:.1f} MiB after {b}: {g:+.2f}% "
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
    kinds = [*BASELINES, *dict.fromkeys(m for r in pts for m in r["modes"])]
    for kind in kinds:
        xs = [(r["bytes"] / 2**20, (r[kind] if kind in BASELINES else r["modes"][kind])["gbps"])
              for r in pts if kind in BASELINES or kind in r["modes"]]
        ax.plot([x for x, _ in xs], [y for _, y in xs], "o-",
                label=kind if kind in BASELINES else f"disagg, {kind}")
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
