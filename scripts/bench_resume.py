"""Eager vs manual resume inside a serving loop that wakes every --tick-ms.

    python scripts/bench_resume.py
    python scripts/bench_resume.py --rounds 1 4 10 --tick-ms 20 --repeats 5

Spawns 2 ranks on Gloo over 127.0.0.1 per mode. A room of rounds x chunk tokens
goes through a Language pool that holds one chunk, so it needs `rounds` chunks.
The Language loop does what a scheduler would each iteration (init, resume
when `needs_resume`, poll) and sleeps --tick-ms between iterations; the time
from init() to the loop seeing SUCCESS is reported per room. With eager resume
the receiver thread sends each RESUME itself, so the time should not grow with
the number of rounds by one tick per round the way manual mode does.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per round")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--tick-ms", type=float, default=20.0, help="serving-loop iteration")
    p.add_argument("--repeats", type=int, default=5, help="rooms per round count")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, args: argparse.Namespace, auto: bool, port: int, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    import disagg
    from disagg import TransferStatus

    chunk_blocks = args.chunk_tokens // args.block_size
    max_tokens = max(args.rounds) * args.chunk_tokens
    cfg = disagg.DisaggConfig(
        hidden_size=args.hidden_size, block_size=args.block_size, recv_into="pool",
        auto_resume=auto, default_alloc_tokens=args.chunk_tokens,
        # the Language pool holds one chunk; the Embedding budget the longest room
        num_blocks=chunk_blocks if rank else -(-max_tokens // args.block_size),
        bootstrap_timeout=60, peer_timeout=30)
    ctx = disagg.init(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    side = dist.new_group([0, 1], backend="gloo")
    times: dict[int, list[float]] = {}
    room = 0
    try:
        for rounds in args.rounds:
            seq = rounds * args.chunk_tokens
            emb = torch.randn(seq, args.hidden_size).to(torch.bfloat16)
            ids = torch.zeros(seq, dtype=torch.int32)
            pos = torch.zeros(3, seq, dtype=torch.int32)
            for _ in range(args.repeats):
                room += 1
                dist.barrier(group=side)
                if rank == 0:
                    s = ctx.embedding.sender(room)
                    s.send(emb, ids, pos)
                    assert s.wait(60) == TransferStatus.SUCCESS, s.failure
                    continue
                r = ctx.language.receiver(room, src_rank=0)
                t0 = time.perf_counter()
                while r.poll() != TransferStatus.SUCCESS:
                    assert r.poll() != TransferStatus.FAILED, r.failure
                    if r.poll() == TransferStatus.BOOTSTRAPPING:
                        r.init()
                    elif r.needs_resume:
                        r.resume()
                    time.sleep(args.tick_ms / 1e3)
                times.setdefault(rounds, []).append(time.perf_counter() - t0)
        if rank == 1:
            out[auto] = times
        dist.barrier(group=side)
    finally:
        ctx.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.chunk_tokens % args.block_size:
        raise SystemExit("--chunk-tokens must be a multiple of --block-size")
    with mp.Manager() as mgr:
        out = mgr.dict()
        for auto in (True, False):
            mp.start_processes(_worker, args=(args, auto, _free_port(), out), nprocs=2,
                               start_method="spawn")
        res = {k: dict(v) for k, v in out.items()}
    print(f"room = rounds x {args.chunk_tokens} tokens x {args.hidden_size} bf16; loop tick "
          f"{args.tick_ms:g} ms; median (min-max) of {args.repeats} rooms, init -> SUCCESS seen")
    print(f"{'rounds':>6} {'eager ms':>22} {'manual ms':>22} {'manual/eager':>12}")
    for rounds in args.rounds:
        e, m = res[True][rounds], res[False][rounds]
        me, mm = statistics.median(e), statistics.median(m)
        print(f"{rounds:>6} {me * 1e3:9.1f} ({min(e) * 1e3:5.1f}-{max(e) * 1e3:5.1f}) "
              f"{mm * 1e3:9.1f} ({min(m) * 1e3:5.1f}-{max(m) * 1e3:5.1f}) {mm / me:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
