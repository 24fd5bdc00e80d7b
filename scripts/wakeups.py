"""Thread wake-ups per chunk, traced by the kernel: how many times each thread
of each rank blocked and was woken again while rooms moved.

Two ranks on Gloo (rank 0 Embedding, rank 1 Language). Each rank reads, for
every thread of its process, the kernel's count of voluntary context
switches (`/proc/self/task/<tid>/status`: the thread blocked, on a socket, a
condition, a Work or the GIL, and was woken) before and after the measured
rooms, and names each thread (disagg's own are `disagg-*`; the caller is
`MainThread`; torch's and Gloo's C++ threads are counted together as
`native`). A Python thread's wake-up costs a GIL hand-off on top of the
kernel's, which is what a busy caller pays for.

Rooms move one at a time, both callers blocked in `wait()` (the caller's own
wake-ups are then exactly the ones a blocking caller pays), in three shapes:
one chunk, no length declared; one chunk with `seq_len=` (pre-posted); and
`--chunks` chunks through a pool of one chunk (resume rounds, auto_resume).

    python scripts/wakeups.py --rooms 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading

import torch
import torch.multiprocessing as mp

import disagg
from disagg import TransferStatus

SHAPES = ("one chunk", "one chunk, seq_len known", "chunks through a small pool")


def switches() -> dict[str, int]:
    """Voluntary context switches per thread name of this process (native threads
    summed under "native")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                n = next(int(line.split()[1]) for line in f
                         if line.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):
            continue  # the thread ended meanwhile
        name = names.get(int(tid), "native")
        # one name per role: the pair and control threads carry their peers' ranks
        key = name if name in ("MainThread", "native") else name.rsplit("-", 1)[0]
        out[key] = out.get(key, 0) + n
    return out


def _config(args: argparse.Namespace, shape: int) -> disagg.DisaggConfig:
    tokens = args.tokens
    if shape == 2:  # a pool of one chunk: every room takes `chunks` resume rounds
        block = 16
        per_chunk = -(-tokens // args.chunks)
        blocks = -(-per_chunk // block)
        # the Embedding budget holds a whole room, the Language pool one chunk
        room_blocks = -(-tokens // block)
        return disagg.DisaggConfig(hidden_size=args.hidden, block_size=block,
                                   num_blocks=2 * room_blocks if args.rank == 0 else blocks,
                                   default_alloc_tokens=blocks * block, peer_timeout=30.0)
    return disagg.DisaggConfig(hidden_size=args.hidden, default_alloc_tokens=tokens,
                               num_blocks=-(-tokens // 128) * 4, peer_timeout=30.0)


def _rank(rank: int, path: str, shape: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    args.rank = rank
    ctx = disagg.init(_config(args, shape), rank=rank, world_size=2, init_method=f"file://{path}")
    emb = torch.randn(args.tokens, args.hidden).to(torch.bfloat16)
    ids = torch.zeros(args.tokens, dtype=torch.int32)
    pos = torch.zeros(3, args.tokens, dtype=torch.int32)
    known = shape == 1
    try:
        before: dict[str, int] = {}
        for i in range(args.warmup + args.rooms):
            if i == args.warmup:
                chunks0 = ctx.stats()["chunks"]
                before = switches()
            if rank == 0:
                s = ctx.embedding.sender(i)
                s.send(emb, ids, pos)
                if s.wait(60) != TransferStatus.SUCCESS:
                    raise RuntimeError(f"room {i}: {s.failure}")
            else:
                r = ctx.language.receiver(i, 0)
                if not (r.init(seq_len=args.tokens) if known else r.init()):
                    raise RuntimeError(f"room {i}: no blocks")
                if r.wait(60) != TransferStatus.SUCCESS:
                    raise RuntimeError(f"room {i}: {r.failure}")
        after = switches()
        chunks = ctx.stats()["chunks"] - chunks0
        per = {k: (after.get(k, 0) - before.get(k, 0)) / chunks for k in after}
        with open(os.path.join(os.path.dirname(path), f"out{rank}.json"), "w") as f:
            json.dump({"chunks": chunks, "per_chunk": per}, f)
    finally:
        ctx.shutdown()


def measure(args: argparse.Namespace, shape: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(os.path.join(d, "init"), shape, args), nprocs=2)
        outs = []
        for rank in (0, 1):
            with open(os.path.join(d, f"out{rank}.json")) as f:
                outs.append(json.load(f))
        return outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=200, help="measured rooms (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="rooms first, unmeasured (default 20)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per room (default 256)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--chunks", type=int, default=4,
                   help="chunks per room in the small-pool shape (default 4)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    print(f"{args.rooms} rooms of {args.tokens} tokens x {args.hidden}, one at a time, both "
          f"callers in wait(); voluntary context switches per chunk, by thread", flush=True)
    doc = []
    for shape, what in enumerate(SHAPES):
        outs = measure(args, shape)
        doc.append({"shape": what, "ranks": outs})
        print(f"\n{what} ({outs[1]['chunks'] / args.rooms:.1f} chunks a room)")
        for side, out in zip(("embedding", "language"), outs, strict=True):
            per = out["per_chunk"]
            python = sum(v for k, v in per.items() if k != "native")
            row = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items()) if v >= 0.005)
            print(f"  {side:9}: Python threads {python:.2f} ({row})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
