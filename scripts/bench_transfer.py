"""Throughput of one room through disagg against a raw torch.distributed
send/recv of the same bytes, measured in the same processes, rounds interleaved.

    python scripts/bench_transfer.py --quick
    python scripts/bench_transfer.py --tokens 2000 --alloc 512 --rounds 20 --json out.json

Spawns 2 ranks on Gloo over 127.0.0.1 (rank 0 Embedding, rank 1 Language). Each
round: both ranks meet at a barrier on a side group, then move one room; the
Language rank times barrier -> last byte usable. The baseline sends the same
tensors (embeddings, fill_ids, mrope [seq, 3]) with plain send/recv on its own
group into preallocated tensors. Reports medians, min-max and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000, help="room length")
    p.add_argument("--hidden-size", type=int, default=3584)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--alloc", type=int, default=8192,
                   help="first allocation in tokens (smaller: more resume rounds)")
    p.add_argument("--recv-into", choices=("output", "pool"), default="output")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10 rounds")
    p.add_argument("--json", metavar="PATH", help="write the result record here")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, args: argparse.Namespace, port: int, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import disagg  # after the env is set

    n, h = args.tokens, args.hidden_size
    num_blocks = max(4, -(-max(n, args.alloc) // args.block_size) * 2)
    cfg = disagg.DisaggConfig(hidden_size=h, block_size=args.block_size, num_blocks=num_blocks,
                              default_alloc_tokens=args.alloc, recv_into=args.recv_into,
                              bootstrap_timeout=60, peer_timeout=30)
    ctx = disagg.init(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    side = dist.new_group([0, 1], backend="gloo")
    raw = dist.new_group([0, 1], backend="gloo")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(n, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32)
    pos = torch.randint(0, 1 << 12, (3, n), generator=g, dtype=torch.int32)
    pos_t = pos.t().contiguous()
    dst = [torch.empty_like(emb), torch.empty_like(ids), torch.empty_like(pos_t)]
    times: dict[str, list[float]] = {"disagg": [], "raw": []}
    room = 0
    rounds = 10 if args.quick else args.rounds
    try:
        for i in range(args.warmup + rounds):
            for kind in ("disagg", "raw") if i % 2 == 0 else ("raw", "disagg"):
                dist.barrier(group=side)
                t0 = time.perf_counter()
                if kind == "raw":
                    for src, d in zip((emb, ids, pos_t), dst, strict=True):
                        if rank == 0:
                            dist.send(src, 1, group=raw)
                        else:
                            dist.recv(d, 0, group=raw)
                elif rank == 0:
                    s = ctx.embedding.sender(room)
                    s.send(emb, ids, pos)
                    s.wait(30.0)
                else:
                    r = ctx.language.receiver(room, src_rank=0)
                    r.init()
                    while r.wait(30.0) < disagg.TransferStatus.SUCCESS and not r.failure:
                        r.resume()  # only when the receiver could not resume by itself
                    assert r.poll() == disagg.TransferStatus.SUCCESS, r.failure
                    if i == 0:
                        res = r.result()
                        assert torch.equal(res.embeddings.view(torch.int16),
                                           emb.view(torch.int16))
                dt = time.perf_counter() - t0
                room += kind == "disagg"
                if i >= args.warmup:
                    times[kind].append(dt)
        if rank == 1:
            out.update(times=times, stats=ctx.stats())
        dist.barrier(group=side)
    finally:
        ctx.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = _free_port()
    with mp.Manager() as mgr:
        out = mgr.dict()
        mp.start_processes(_worker, args=(args, port, out), nprocs=2, start_method="spawn")
        times = dict(out["times"])
        stats = dict(out["stats"])
    nbytes = args.tokens * (args.hidden_size * 2 + 4 + 12)
    rec: dict[str, object] = {"tokens": args.tokens, "hidden_size": args.hidden_size,
                              "alloc": args.alloc, "recv_into": args.recv_into,
                              "bytes": nbytes, "chunks_per_room": 0}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"room: {args.tokens} tokens x {args.hidden_size} bf16 = {nbytes / 2**20:.1f} MiB, "
          f"alloc {args.alloc}, recv_into={args.recv_into}, {len(times['raw'])} rounds")
    for k, v in times.items():
        print(f"  {k:7s} median {med[k] * 1e3:7.2f} ms  ({min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})"
              f"  {nbytes / med[k] / 1e9:5.2f} GB/s")
        rec[k] = {"median_s": med[k], "min_s": min(v), "max_s": max(v),
                  "gbps": nbytes / med[k] / 1e9}
    ratio = med["raw"] / med["disagg"]
    ratios = sorted(r / d for r, d in zip(times["raw"], times["disagg"], strict=True))
    rec["ratio_disagg_over_raw"] = ratio
    rec["chunks_per_room"] = int(stats["chunks"]) / max(1, len(times["disagg"]) + 3)
    print(f"  throughput ratio disagg/raw: {ratio:.3f} "
          f"(per-round pairs {ratios[0]:.2f}-{ratios[-1]:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
