"""Progressive vs whole-room send: how much earlier chunked prefill can start.

    python scripts/bench_progressive.py [--rounds 9] [--images 4] [--encode-ms 50]

Two ranks on this machine (Gloo over 127.0.0.1). Rank 0 encodes a request's
images one at a time (a sleep of --encode-ms stands in for the encoder) and
either sends each image as it is encoded ("progressive": the first send()
declares the length) or sends the whole request once every image is encoded
("whole"). Rank 1 steps a queue and starts a chunked-prefill stand-in on
`q.prefix(room)` as soon as any token is ready. Measured per request: from the
end of the first image's encode to the start of the Language side's first
prefill chunk (both ranks read the same monotonic clock: one host). Modes
alternate request by request, so both see the same machine; the report gives
the median and min-max of each, and their difference.
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

MODES = ("progressive", "whole")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch

    import disagg
    torch.set_num_threads(1)
    total = args.images * args.tokens_per_image
    cfg = disagg.DisaggConfig(hidden_size=args.hidden_size, block_size=64, num_blocks=512,
                              default_alloc_tokens=total, peer_timeout=30.0)
    ctx = disagg.init(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    store = disagg.context.dist.distributed_c10d._get_default_store()
    try:
        rooms = [(i, MODES[i % 2]) for i in range(2 * args.rounds)]
        if rank == 0:
            part = torch.randn(args.tokens_per_image, args.hidden_size).to(torch.bfloat16)
            ids = torch.zeros(args.tokens_per_image, dtype=torch.int32)
            pos = torch.zeros(3, args.tokens_per_image, dtype=torch.int32)
            for room, mode in rooms:
                store.wait([f"bench/ready/{room}"])
                s = ctx.embedding.sender(room)
                parts = []
                for image in range(args.images):
                    time.sleep(args.encode_ms / 1000)  # the encoder
                    parts.append((part.clone(), ids, pos))
                    if image == 0:
                        store.set(f"bench/encoded/{room}", repr(time.monotonic()))
                    if mode == "progressive":
                        s.send(*parts[-1], **({"seq_len": total} if image == 0 else {}))
                if mode == "whole":
                    s.send(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                           torch.cat([p[2] for p in parts], dim=1))
                assert s.wait(60.0).name == "SUCCESS", s.failure
            out.put((rank, None))
            return
        q = ctx.language.queue()
        firsts: dict[str, list[float]] = {m: [] for m in MODES}
        for room, mode in rooms:
            q.add(room, src_rank=0, seq_len=total)
            store.set(f"bench/ready/{room}", "1")
            started = None
            prefilled = 0
            while len(q):
                done, failed = q.step()
                assert not failed, failed
                if done:
                    break
                ready = q.ready_tokens(room)
                if ready > prefilled:
                    if started is None:
                        started = time.monotonic()  # the first prefill chunk starts now
                    q.prefix(room).embeddings[prefilled:ready].float().sum()
                    prefilled = ready
                time.sleep(0.0005)
            if started is None:
                started = time.monotonic()  # the whole room came in one step
            encoded = float(store.get(f"bench/encoded/{room}").decode())
            firsts[mode].append(started - encoded)
        out.put((rank, firsts))
    finally:
        ctx.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9, help="requests per mode (interleaved)")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--tokens-per-image", type=int, default=1024, help="tokens per image")
    p.add_argument("--encode-ms", type=float, default=50.0, help="encoder time per image")
    p.add_argument("--hidden-size", type=int, default=2048, help="embedding width")
    p.add_argument("--json", type=Path, help="write the per-request figures here")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args, out)) for r in (0, 1)]
    for pr in procs:
        pr.start()
    results = dict(out.get(timeout=600) for _ in procs)
    for pr in procs:
        pr.join(30)
    firsts: dict[str, list[float]] = results[1]
    ms = {m: [1000 * x for x in v] for m, v in firsts.items()}
    print(f"{args.images} images of {args.tokens_per_image} tokens (hidden {args.hidden_size}), "
          f"{args.encode_ms:g} ms encode each, {args.rounds} requests per mode, interleaved")
    print("first image encoded -> first prefill chunk starts (ms): median (min-max)")
    for m in MODES:
        print(f"  {m:12s} {statistics.median(ms[m]):8.1f} ({min(ms[m]):.1f}-{max(ms[m]):.1f})")
    gain = [w - p for p, w in zip(ms["progressive"], ms["whole"], strict=True)]
    print(f"  earlier by   {statistics.median(gain):8.1f} ({min(gain):.1f}-{max(gain):.1f}) "
          f"(expected about {(args.images - 1) * args.encode_ms:g} ms: the later images' "
          f"encode time)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "first_prefill_ms": ms}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
