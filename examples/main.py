"""Run both example loops: rank 0 embeds, rank 1 receives.

    torchrun --standalone --nproc-per-node 2 examples/main.py
"""

from __future__ import annotations

import argparse
import sys

import embedding_side  # beside this script, which Python puts on sys.path
import language_side

import disagg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    cfg = disagg.DisaggConfig(hidden_size=args.hidden_size, block_size=64, num_blocks=64,
                              default_alloc_tokens=512)
    ctx = disagg.init(cfg)
    try:
        rooms = list(range(args.rooms))
        if ctx.role == "embedding":
            return embedding_side.run(ctx, rooms, args.hidden_size, args.timeout)
        return language_side.run(ctx, rooms, args.timeout)
    finally:
        ctx.shutdown()


if __name__ == "__main__":
    sys.exit(main())
