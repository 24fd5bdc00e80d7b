"""fanout="copy" vs fanout="scatter" for TP Language instances, in one run.

One world per TP size T: Embedding rank 0, a copy instance (ranks 1..T) and a
scatter instance (ranks T+1..2T), side by side. Each round sends one room of
`--tokens` tokens to each instance, one after the other (which goes first
alternates), and times it from `send()` on the Embedding rank to the last TP
rank's `q.step()` returning it (CLOCK_MONOTONIC is one clock for every process
of a machine), the scatter instance's all-gather included. It reports, per T:

- bytes the Embedding rank sent per room (`ctx.stats()` counters): T x the
  payload for copy, 1 x for scatter;
- room time p50 (min-max) for each, and the throughput ratio scatter/copy
  (copy time / scatter time, per round: median and min-max).

Every room is checked byte for byte on every rank (round 0 and every round's
first rows). On CPU every byte crosses loopback either way, so the ratio
shows the all-gather's cost against T sends from one rank; the win scatter is
for is a cross-node link (one NIC carrying T copies) with NVLink inside the
instance. On one GPU there is nothing to measure: NCCL refuses two ranks on
one device, so a pair needs two GPUs.

    python scripts/bench_fanout.py                 # TP 2 and 4, 2000 tokens x 3584 hidden
    python scripts/bench_fanout.py --tp 2 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import disagg
from disagg import TransferStatus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default="2,4", help="TP sizes to run, comma-separated (default 2,4)")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per room (default 2000)")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size (default 3584)")
    p.add_argument("--rounds", type=int, default=9, help="measured rounds per TP size")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per TP size")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return p


def _room(room: int, tokens: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(room)
    return {"embeddings": torch.randn(tokens, hidden, generator=g).to(torch.bfloat16),
            "fill_ids": torch.randint(0, 1 << 30, (tokens,), generator=g, dtype=torch.int32),
            "mrope_positions": torch.randint(0, 1 << 20, (3, tokens), generator=g,
                                             dtype=torch.int32)}


def _rank(rank: int, world: int, tp: int, init_method: str, args: argparse.Namespace,
          out_dir: str) -> None:
    torch.set_num_threads(1)
    copy_ranks = range(1, 1 + tp)
    cfg = disagg.DisaggConfig(language_tp_size=tp, hidden_size=args.hidden,
                              num_blocks=4 * (-(-args.tokens // 128)) + 8,
                              fanout="copy" if rank in copy_ranks or rank == 0 else "scatter",
                              default_alloc_tokens=args.tokens, peer_timeout=30.0)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    store = dist.distributed_c10d._get_default_store()
    total = args.warmup + args.rounds
    out: dict[str, Any] = {"rank": rank}
    try:
        if ctx.role == "embedding":
            data = _room(7, args.tokens, args.hidden)
            times: dict[str, list[float]] = {"copy": [], "scatter": []}
            sent: dict[str, list[int]] = {"copy": [], "scatter": []}
            for i in range(total):
                order = ("copy", "scatter") if i % 2 == 0 else ("scatter", "copy")
                for mode in order:
                    room = 2 * i + (mode == "scatter")
                    store.set(f"go/{room}", b"1")
                    before = ctx.stats()["bytes_sent"]
                    t0 = time.monotonic()
                    s = ctx.embedding.sender(room)
                    s.send(data["embeddings"], data["fill_ids"], data["mrope_positions"])
                    if s.wait(args.timeout) != TransferStatus.SUCCESS:
                        raise RuntimeError(f"room {room}: {s.failure}")
                    dones = [float(store.get(f"done/{room}/{r}"))
                             for r in (copy_ranks if mode == "copy"
                                       else range(1 + tp, 1 + 2 * tp))]
                    if i >= args.warmup:
                        times[mode].append(max(dones) - t0)
                        sent[mode].append(int(ctx.stats()["bytes_sent"]) - int(before))
            out.update(times=times, sent=sent)
        else:
            mode = "copy" if rank in copy_ranks else "scatter"
            data = _room(7, args.tokens, args.hidden)
            q = ctx.language.queue()
            bad = 0
            for i in range(total):
                room = 2 * i + (mode == "scatter")
                store.wait([f"go/{room}"])
                q.add(room, src_rank=0)
                while True:
                    done, failed = q.step()
                    if failed:
                        raise RuntimeError(f"room {room}: {failed}")
                    if done:
                        break
                t = time.monotonic()
                (_, res), = done
                # every room, on every rank: bytes, not shapes
                bad += not (torch.equal(res.embeddings.view(torch.int16),
                                        data["embeddings"].view(torch.int16))
                            and torch.equal(res.fill_ids, data["fill_ids"]))
                store.set(f"done/{room}/{rank}", repr(t))
            st = ctx.stats()
            out.update(bad=bad, gather=st["latency_s"].get("gather_s"),
                       gathered=st["bytes_per_room"].get("gathered"))
    finally:
        ctx.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def _entry(rank: int, world: int, tp: int, init_method: str, args: argparse.Namespace,
           out_dir: str) -> None:
    _rank(rank, world, tp, init_method, args, out_dir)


def run_tp(tp: int, args: argparse.Namespace) -> dict[str, Any]:
    world = 1 + 2 * tp
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'init')}"
        ctx = mp.start_processes(_entry, args=(world, tp, init_method, args, tmp),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"TP {tp}: ranks still running after {args.timeout}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    emb = ranks[0]
    bad = sum(x["bad"] for x in ranks[1:])
    if bad:
        raise RuntimeError(f"TP {tp}: {bad} rooms differ from what was sent")
    ratios = [c / s for c, s in zip(emb["times"]["copy"], emb["times"]["scatter"], strict=True)]
    payload = args.tokens * (2 * args.hidden + 16)
    rec: dict[str, Any] = {"tp": tp, "tokens": args.tokens, "hidden": args.hidden,
                           "payload_bytes": payload, "rounds": args.rounds}
    for mode in ("copy", "scatter"):
        t = emb["times"][mode]
        rec[mode] = {"sent_bytes_per_room": statistics.median(emb["sent"][mode]),
                     "sent_x_payload": statistics.median(emb["sent"][mode]) / payload,
                     "p50_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                     "max_ms": 1e3 * max(t)}
    rec["throughput_scatter_over_copy"] = {"median": statistics.median(ratios),
                                           "min": min(ratios), "max": max(ratios)}
    gathers = [x["gather"] for x in ranks[1 + tp:] if x["gather"]]
    rec["gather_p50_ms"] = 1e3 * statistics.median(g["p50"] for g in gathers) if gathers else None
    return rec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tps = [int(t) for t in args.tp.split(",") if t.strip()]
    if not tps or any(t < 2 for t in tps):
        build_parser().error("--tp: TP sizes >= 2, e.g. 2,4")
    print(f"fanout copy vs scatter: {args.tokens} tokens x {args.hidden} hidden "
          f"({args.tokens * (2 * args.hidden + 16) / 2**20:.2f} MiB a room), {args.rounds} "
          f"rounds (+{args.warmup} warm-up), one world of 1 + 2T ranks per TP size", flush=True)
    recs = []
    for tp in tps:
        rec = run_tp(tp, args)
        recs.append(rec)
        c, s, r = rec["copy"], rec["scatter"], rec["throughput_scatter_over_copy"]
        print(f"TP {tp}: Embedding-side bytes per room: copy {c['sent_bytes_per_room'] / 2**20:.2f}"
              f" MiB ({c['sent_x_payload']:.2f}x payload), scatter "
              f"{s['sent_bytes_per_room'] / 2**20:.2f} MiB ({s['sent_x_payload']:.2f}x)", flush=True)
        print(f"      room time p50 (min-max): copy {c['p50_ms']:.1f} ({c['min_ms']:.1f}-"
              f"{c['max_ms']:.1f}) ms, scatter {s['p50_ms']:.1f} ({s['min_ms']:.1f}-"
              f"{s['max_ms']:.1f}) ms, all-gather p50 {rec['gather_p50_ms'] or 0:.1f} ms; "
              f"throughput scatter/copy {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
