"""What one `queue().step()` costs a serving loop, against the raw all-reduce it
is built on, measured in the same processes.

    python scripts/bench_step.py [--tp 2 4] [--rooms 1 30 200] [--steps 300]

For each TP size: one Embedding rank and one instance of that many Language
ranks (Gloo over 127.0.0.1). Each Language rank queues the given number of
live rooms (their ALLOCs answered by no data, so they stay live and every step
looks at all of them), then times `step()` and, interleaved with it, a raw
`dist.all_reduce` of the queue's buffer on the instance's group. Reported per
(TP, rooms): p50, p99 and max of each, in ms, on TP rank 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    import disagg
    torch.set_num_threads(1)
    tp = world - 1
    most = max(args.rooms)
    cfg = disagg.DisaggConfig(language_tp_size=tp, hidden_size=64, block_size=16,
                              num_blocks=most + 8, default_alloc_tokens=16,
                              bootstrap_timeout=600, peer_timeout=30, step_timeout=120,
                              slow_room_s=None)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    store = dist.distributed_c10d._get_default_store()
    try:
        if ctx.role == "embedding":
            store.wait(["bench/step/done"], )
            out.put((rank, None))
            return
        q = ctx.language.queue()
        group = ctx.language.instance_group()
        figures: dict[str, dict[str, list[float]]] = {}
        added = 0
        for n in sorted(args.rooms):
            while added < n:  # rooms that stay live: no data ever comes for them
                q.add(added, src_rank=0)
                added += 1
            for _ in range(5):
                q.step()
            buf = torch.zeros_like(q._buf)  # the same bytes as the step's all-reduce
            steps: list[float] = []
            raws: list[float] = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
                t1 = time.perf_counter()
                done, failed = q.step()
                t2 = time.perf_counter()
                assert not done and not failed, (done, failed)
                raws.append(1000 * (t1 - t0))
                steps.append(1000 * (t2 - t1))
            figures[str(n)] = {"step_ms": steps, "allreduce_ms": raws}
        if rank == 1:
            store.set("bench/step/done", "1")
        out.put((rank, figures))
    finally:
        ctx.shutdown()


def run(tp: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, tp + 1, port, args, out)) for r in range(tp + 1)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return results[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="TP sizes")
    p.add_argument("--rooms", type=int, nargs="+", default=[1, 30, 200], help="live rooms")
    p.add_argument("--steps", type=int, default=300, help="timed steps per case")
    p.add_argument("--json", type=Path, help="write every sample here")
    args = p.parse_args(argv)
    print("queue().step() vs the raw all-reduce of its buffer, TP rank 0, ms: "
          "p50 / p99 / max")
    every: dict[str, Any] = {}
    for tp in args.tp:
        figures = run(tp, args)
        every[str(tp)] = figures
        for n in sorted(args.rooms):
            f = figures[str(n)]
            s, r = f["step_ms"], f["allreduce_ms"]
            print(f"  TP {tp}, {n:4d} rooms: step {statistics.median(s):6.3f} / "
                  f"{_pct(s, 0.99):6.3f} / {max(s):6.3f}   all-reduce "
                  f"{statistics.median(r):6.3f} / {_pct(r, 0.99):6.3f} / {max(r):6.3f}")
    if args.json:
        args.json.write_text(json.dumps(every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
