"""Where a small room's time goes: stage latencies of rooms received one at a
time, with and without a declared length.

Two ranks (Gloo on this machine). The Embedding rank gives every room's data
first, so what is timed is the Language side's path alone: `init()` (ALLOC
over ZeroMQ), the Embedding rank answering it, the first meta frame arriving
(`alloc_to_first_byte_s`), the payload landing (`chunk_transfer_s`) and the
caller's `wait()` returning. With `seq_len=` the frame's recvs are posted with
the ALLOC (pre-posted), so the payload needs no second rendezvous.

    python scripts/bench_stages.py --rooms 300 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import disagg
from disagg import TransferStatus


def _rank(rank: int, path: str, known: bool, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    blocks = args.rooms * -(-args.tokens // 128) + 8
    cfg = disagg.DisaggConfig(hidden_size=args.hidden, default_alloc_tokens=args.tokens,
                              num_blocks=blocks, peer_timeout=30.0)
    ctx = disagg.init(cfg, rank=rank, world_size=2, init_method=f"file://{path}")
    try:
        if rank == 0:  # every room's data first: the Language side's path alone is timed
            emb = torch.randn(args.tokens, args.hidden).to(torch.bfloat16)
            ids = torch.zeros(args.tokens, dtype=torch.int32)
            pos = torch.zeros(3, args.tokens, dtype=torch.int32)
            senders = []
            for i in range(args.rooms):
                s = ctx.embedding.sender(i)
                s.send(emb, ids, pos)
                senders.append(s)
            for s in senders:
                s.wait(120)
            return
        rooms = []
        for i in range(args.rooms):
            r = ctx.language.receiver(i, 0)
            t0 = time.perf_counter()
            assert r.init(seq_len=args.tokens) if known else r.init()
            if r.wait(30) != TransferStatus.SUCCESS:
                raise RuntimeError(f"room {i}: {r.failure}")
            rooms.append(time.perf_counter() - t0)
        st = ctx.stats()
        with open(os.path.join(os.path.dirname(path), "out.json"), "w") as f:
            json.dump({"room_ms": 1e3 * statistics.median(rooms),
                       "stages_ms": {k: 1e3 * v["p50"] for k, v in st["latency_s"].items()},
                       "preposted": st.get("preposted", 0)}, f)
    finally:
        ctx.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=300, help="rooms, one at a time (default 300)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per room (default 64)")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size (default 3584)")
    args = p.parse_args(argv)
    print(f"{args.rooms} rooms of {args.tokens} tokens x {args.hidden} hidden, one at a time; "
          f"p50 ms", flush=True)
    for known in (False, True):
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_rank, args=(os.path.join(d, "init"), known, args), nprocs=2)
            with open(os.path.join(d, "out.json")) as f:
                out = json.load(f)
        st = out["stages_ms"]
        print(f"{'seq_len declared' if known else 'no seq_len':>17}: room {out['room_ms']:.3f}, "
              f"ALLOC -> first meta {st.get('alloc_to_first_byte_s', 0):.3f}, payload "
              f"{st.get('chunk_transfer_s', 0):.3f} ({out['preposted']} frames pre-posted)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
