"""Requests admitted as they arrive, on a TP > 1 instance.

    torchrun --standalone --nproc-per-node 3 examples/arrivals.py --language-tp-size 2

The lockstep contract asks every TP rank to add the same rooms in the same
order between the same steps. Requests, though, reach one place first: the
frontend in front of TP rank 0. This loop makes admission a rank-agreed
decision: each iteration TP rank 0 takes the requests that arrived since the
last one and broadcasts their ids over the instance's group
(`ctx.language.instance_group()`), then every rank adds them, in that order,
and steps. A fixed-size int64 tensor carries them: no pickle, one small
collective per iteration beside the step's own all-reduce.

The Embedding rank encodes the same requests on its own schedule (a sleep
stands in for the encoder). Every Language rank checks every room bit for bit
and prints `OK arrivals`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.distributed as dist

import disagg
from disagg import TransferStatus

MAX_NEW = 64  # requests admitted per iteration at most; later ones wait one iteration


def request(room: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(room)
    n = 16 + room % 7 * 24
    return (torch.randn(n, hidden, generator=g).to(torch.bfloat16),
            torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32),
            torch.randint(0, 1 << 12, (3, n), generator=g, dtype=torch.int32))


def arrivals(args: argparse.Namespace) -> list[float]:
    """When each request reaches the frontend, in seconds from the start."""
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(1000.0 / args.mean_gap_ms)
        out.append(t)
    return out


def embedding_side(ctx: disagg.Context, args: argparse.Namespace) -> int:
    senders = []
    start = time.monotonic()
    for room, at in enumerate(arrivals(args)):
        time.sleep(max(0.0, start + at - time.monotonic()) + args.encode_ms / 1000)
        s = ctx.embedding.sender(room)
        s.send(*request(room, args.hidden_size))
        senders.append(s)
    bad = [s.room for s in senders if s.wait(args.timeout) != TransferStatus.SUCCESS]
    print(f"[embedding {ctx.rank}] sent {len(senders)} requests"
          + (f", {len(bad)} failed" if bad else ""), flush=True)
    return 1 if bad else 0


def language_side(ctx: disagg.Context, args: argparse.Namespace) -> int:
    group = ctx.language.instance_group()
    first = dist.get_global_rank(group, 0) if group is not None else ctx.rank
    q = ctx.language.queue()
    times = arrivals(args)
    pending = list(range(args.requests))  # only TP rank 0 reads it: the frontend
    news = torch.zeros(MAX_NEW + 1, dtype=torch.int64)
    start = time.monotonic()
    exact = admitted = iterations = 0
    bad: list[str] = []
    while exact + len(bad) < args.requests:
        iterations += 1
        if ctx.rank == first:  # the frontend: what arrived since the last iteration
            now = time.monotonic() - start
            new = []
            while pending and times[pending[0]] <= now and len(new) < MAX_NEW:
                new.append(pending.pop(0))
            news.zero_()
            news[0] = len(new)
            news[1:1 + len(new)] = torch.tensor(new, dtype=torch.int64)
        if group is not None:
            dist.broadcast(news, src=first, group=group)  # every rank: the same decision
        for room in news[1:1 + int(news[0])].tolist():
            q.add(room, src_rank=0)
            admitted += 1
        done, failed = q.step()
        bad += [f"room {room}: {why}" for room, why in failed]
        for room, res in done:
            emb, ids, pos = request(room, args.hidden_size)
            ok = (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))
                  and torch.equal(res.fill_ids, ids) and torch.equal(res.mrope_positions, pos))
            if ok:
                exact += 1
            else:
                bad.append(f"room {room}: bytes differ")
            ctx.language.recycle(res)
        if time.monotonic() - start > args.timeout:
            bad.append("timed out")
            break
        time.sleep(0.0005)  # the rest of a serving loop's iteration
    if bad:
        print(f"[language {ctx.rank}] MISMATCH arrivals: {'; '.join(bad[:5])}", flush=True)
        return 1
    print(f"[language {ctx.rank}] OK arrivals: {admitted} requests admitted as they came, "
          f"{exact} bit-exact, {iterations} iterations", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--language-tp-size", type=int, default=2, help="ranks per instance")
    p.add_argument("--requests", type=int, default=40, help="requests in all")
    p.add_argument("--mean-gap-ms", type=float, default=5.0, help="mean time between arrivals")
    p.add_argument("--encode-ms", type=float, default=2.0, help="the encoder, per request")
    p.add_argument("--hidden-size", type=int, default=64, help="embedding width")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    cfg = disagg.DisaggConfig(language_tp_size=args.language_tp_size,
                              hidden_size=args.hidden_size, block_size=16, num_blocks=256,
                              default_alloc_tokens=64, backend="gloo",
                              bootstrap_timeout=args.timeout)
    ctx = disagg.init(cfg)
    try:
        side = embedding_side if ctx.role == "embedding" else language_side
        return side(ctx, args)
    finally:
        ctx.shutdown()


if __name__ == "__main__":
    sys.exit(main())
