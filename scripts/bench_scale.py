"""Fleet scale: what this machine can measure, and a model fitted to it.

    python scripts/bench_scale.py [--embedding 4] [--language 16] [--store-seconds 1]

Measured here (marked "measured"):
- the rendezvous store (a `TCPStore`, one libuv server thread) from one
  client: ops/s of `add` (a lease bump), `check`, `get`, and `multi_get` of
  256 keys (its cost per key against single `get`s);
- a world-mode deployment of --embedding x --language ranks (TP 1, Gloo on
  127.0.0.1, as many processes as the cores allow) with --max-pairs below the
  peers of either role (pairs on demand, as at fleet size), twice: full mesh (every
  Language rank asks one room of every Embedding rank) and affinity (each asks
  the k = 2 Embedding ranks `disagg.affinity` names for it). Per rank:
  start-up (`disagg.init`), time to its first rooms, pair groups made and
  live (pairs are made on demand, at most `max_pairs`), heartbeats per
  second (only open pairs are watched), control sockets.

Modelled (marked "model") at (8, 32), (32, 128) and (128, 1024) Embedding x
Language ranks with k = 2: pairs per rank from `disagg.affinity` itself over
that many instances (the busiest Embedding rank), heartbeats and control
sockets from the pairs, jobs mode's store load from its read schedule
(disagg/jobs.py), and start-up, which no longer depends on the fleet.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLEETS = ((8, 32), (32, 128), (128, 1024))
K = 2
POLL_S = 0.25  # jobs mode's roster cycle (disagg/roster.py)
EPOCH_EVERY_S = 0.5  # its epoch reads (disagg/jobs.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_rates(seconds: float) -> dict[str, float]:
    """Ops per second of one client against a fresh TCPStore (measured)."""
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True,
                           timeout=timedelta(seconds=10))
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False,
                           timeout=timedelta(seconds=10))
    keys = [f"k/{i}" for i in range(256)]
    for k in keys:
        client.set(k, "x" * 16)

    def rate(fn: Any) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - t0)

    out = {"add": rate(lambda: client.add("lease", 1)),
           "check": rate(lambda: client.check([keys[0]])),
           "get": rate(lambda: client.get(keys[0])),
           "multi_get_256": rate(lambda: client.multi_get(keys))}
    out["multi_get_per_key_vs_get"] = out["get"] / (out["multi_get_256"] * 256)
    # a new client (`clone`): what a pair formed while another forms pays once
    # (disagg/pairing.py keeps them); on hosts whose DNS does not answer, c10d's
    # lookup of the client socket's address can take the resolver's timeout
    took = []
    for _ in range(16):
        t0 = time.perf_counter()
        client.clone()
        took.append(time.perf_counter() - t0)
    out["clone_p50_ms"] = statistics.median(took) * 1e3
    out["clone_max_ms"] = max(took) * 1e3
    return out


def _wants(lang: int, e: int, k: int | None) -> list[int]:
    """The Embedding ranks Language rank `lang` asks rooms of."""
    import disagg
    peers = list(range(e))
    return peers if k is None else disagg.affinity(f"instance-{lang}", peers, k)


def _rank(rank: int, world: int, port: int, e: int, k: int | None, max_pairs: int,
          out: Any) -> None:
    import torch

    import disagg
    torch.set_num_threads(1)
    cfg = disagg.DisaggConfig(num_embedding_ranks=e, hidden_size=64, block_size=16,
                              num_blocks=64, peer_timeout=10.0, slow_room_s=None,
                              max_pairs=max_pairs)
    t0 = time.monotonic()
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    startup = time.monotonic() - t0
    res: dict[str, Any] = {"role": ctx.role, "startup_s": startup,
                           "pairs_at_start": ctx.stats()["pairs_live"]}
    try:
        t1 = time.monotonic()
        if ctx.role == "embedding":  # one tiny room to each Language rank that asks
            senders = [ctx.embedding.sender(1000 * rank + lang) for lang in range(e, world)
                       if rank in _wants(lang, e, k)]
            for s in senders:
                s.send(torch.zeros(16, 64, dtype=torch.bfloat16),
                       torch.zeros(16, dtype=torch.int32), torch.zeros(3, 16, dtype=torch.int32))
            for s in senders:
                assert s.wait(120).name == "SUCCESS", s.failure
        else:
            rs = [ctx.language.receiver(1000 * src + rank, src_rank=src)
                  for src in _wants(rank, e, k)]
            for r in rs:
                assert r.init(seq_len=16)
            for r in rs:
                assert r.wait(120).name == "SUCCESS", r.failure
        res["first_rooms_s"] = time.monotonic() - t1
        st = ctx.stats()
        res["pairs_live"], res["pairs_created"] = st["pairs_live"], st["pairs_created"]
        lv = ctx._engine().liveness
        # heartbeats this rank sends: a Language rank one per watched Embedding rank
        # per interval; an Embedding rank answers each (liveness.py)
        res["heartbeats_per_s"] = len(lv.active) / lv.heartbeat_interval
        control = ctx._control
        res["control_sockets"] = (len(control._dealers) if ctx.role == "language"
                                  else 1) if control is not None else 0
        # every rank done before any shuts down: rank 0 hosts the world's store,
        # in which pairs made on demand meet
        import torch.distributed as dist
        store = dist.distributed_c10d._get_default_store()
        store.add("bench/done", 1)
        while store.add("bench/done", 0) < world:
            time.sleep(0.01)
    finally:
        ctx.shutdown()
    out.put((rank, res))


def world_run(e: int, lang: int, k: int | None, max_pairs: int) -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, e + lang, port, e, k, max_pairs, out))
             for r in range(e + lang)]
    for p in procs:
        p.start()
    try:
        return dict(out.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def model(e: int, lang: int, k: int, max_pairs: int = 24,
          peer_timeout: float = 10.0) -> dict[str, float]:
    """Figures at (e, lang) with rooms routed by `disagg.affinity` to k Embedding
    ranks per Language rank (model): pairs exist only where rooms go."""
    import collections

    import disagg
    peers = list(range(e))
    load = collections.Counter(p for i in range(lang)
                               for p in disagg.affinity(f"instance-{i}", peers, k))
    hb = min(1.0, peer_timeout / 4)
    rescan = peer_timeout / 4
    # jobs mode, per rank and second (disagg/jobs.py): an epoch read every 0.5 s,
    # a lease bump every peer_timeout / 8, and a rescan every peer_timeout / 4 of
    # three ops (the id counter, the departures log's counter, one multi_get of
    # the leases); joins and leaves add a few ops each, once
    lease_every = max(POLL_S, peer_timeout / 8)
    store = (e + lang) * (1 / EPOCH_EVERY_S + 1 / lease_every + 3 / rescan)
    return {"pairs_per_embedding_rank": min(max(load.values()), max_pairs),
            "pairs_wanted_per_embedding_rank": max(load.values()),
            "pairs_per_embedding_rank_mean": lang * k / e,
            "pairs_per_language_rank": min(k, e),
            "heartbeats_per_s_fleet": 2 * lang * min(k, e) / hb,
            "control_sockets_per_language_rank": min(k, e),
            "store_ops_per_s_fleet_jobs": store}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--embedding", type=int, default=4, help="Embedding ranks of the run")
    p.add_argument("--language", type=int, default=16, help="Language ranks of the run")
    p.add_argument("--max-pairs", type=int, default=8,
                   help="DisaggConfig.max_pairs of the run: under the peers of either role, "
                        "so pairs are made on demand as at fleet size (at most max_pairs "
                        "peers on both sides, pairs are warmed at init instead)")
    p.add_argument("--store-seconds", type=float, default=1.0, help="seconds per store op")
    args = p.parse_args(argv)
    rates = store_rates(args.store_seconds)
    print("store, one client (measured): " + ", ".join(
        f"{k} {v:,.0f}/s" for k, v in rates.items()
        if k not in ("multi_get_per_key_vs_get", "clone_p50_ms", "clone_max_ms"))
          + f"; multi_get costs {rates['multi_get_per_key_vs_get']:.2f} of a get per key; "
          f"a new client {rates['clone_p50_ms']:.1f} ms p50, {rates['clone_max_ms']:,.0f} ms "
          f"max of 16")
    e, lang = args.embedding, args.language
    measured: dict[str, dict[int, dict[str, Any]]] = {}
    for label, k in (("full mesh", None), (f"affinity k={K}", K)):
        run = measured[label] = world_run(e, lang, k, args.max_pairs)
        by_role: dict[str, list[dict[str, Any]]] = {"embedding": [], "language": []}
        for r in run.values():
            by_role[r["role"]].append(r)
        start = [r["startup_s"] for r in run.values()]
        first = [r["first_rooms_s"] for r in by_role["language"]]
        print(f"world mode, {e} x {lang} ranks, max_pairs {args.max_pairs}, {label} (measured): "
              f"start-up p50 "
              f"{statistics.median(start):.2f} s (max {max(start):.2f}), pairs at start "
              f"{max(r['pairs_at_start'] for r in run.values())}; Language ranks' first rooms "
              f"p50 {statistics.median(first):.3f} s (min {min(first):.3f}, max "
              f"{max(first):.3f})")
        for role, rs in by_role.items():
            print(f"  {role:9s} pairs live/rank max {max(r['pairs_live'] for r in rs)} "
                  f"(made {sum(r['pairs_created'] for r in rs)} in all), heartbeats/s/rank max "
                  f"{max(r['heartbeats_per_s'] for r in rs):.0f}, control sockets/rank max "
                  f"{max(r['control_sockets'] for r in rs)}")
    print(f"\nmodel (pairs on demand, affinity k = {K}, max_pairs = 24; start-up makes no pair, "
          f"so it and the time to a first room do not grow with the fleet)")
    print(f"{'fleet':>12} {'pairs/E max':>11} {'(wanted)':>8} {'pairs/E mean':>12} {'pairs/L':>8} "
          f"{'hb/s fleet':>10} {'sockets/L':>9} {'store ops/s':>12}")
    for fe, fl in FLEETS:
        m = model(fe, fl, K)
        print(f"{fe:>5} x {fl:<5} {m['pairs_per_embedding_rank']:>11} "
              f"{m['pairs_wanted_per_embedding_rank']:>8} "
              f"{m['pairs_per_embedding_rank_mean']:>12.1f} {m['pairs_per_language_rank']:>8}"
              f" {m['heartbeats_per_s_fleet']:>10,.0f} "
              f"{m['control_sockets_per_language_rank']:>9}"
              f" {m['store_ops_per_s_fleet_jobs']:>12,.0f}")
    big = model(*FLEETS[-1], K)
    ok = (big["pairs_per_embedding_rank"] <= 24 and big["pairs_per_language_rank"] <= 8
          and big["heartbeats_per_s_fleet"] < 5000 and big["store_ops_per_s_fleet_jobs"] < 5000)
    print(f"targets at 128 x 1024, k = 2 (issue 28): <= 24 pairs per Embedding device, <= 8 per "
          f"Language device, heartbeats < 5k/s, store < 5k ops/s: "
          f"{'met' if ok else 'NOT met'} by the model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
