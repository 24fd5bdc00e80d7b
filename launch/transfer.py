"""Core transfer demo: Embedding ranks send seeded rooms, Language ranks receive
them through the serving-loop queue and verify every byte.

    torchrun --standalone --nproc-per-node 2 -m launch.transfer
    torchrun --standalone --nproc-per-node 3 -m launch.transfer --language-tp-size 2

Every rank regenerates each room's tensors from (seed, room), so the Language
side checks bit-exactness without any extra traffic. Exit code 1 on any
mismatch or failed room.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import disagg
from disagg import DisaggConfig, PoolFull, TransferStatus
from launch._start import init_or_explain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rooms", type=int, default=32, help="requests to move")
    p.add_argument("--min-tokens", type=int, default=16, help="shortest request")
    p.add_argument("--max-tokens", type=int, default=4096, help="longest request")
    p.add_argument("--hidden-size", type=int, default=3584, help="embedding width")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--num-blocks", type=int, default=128, help="blocks per rank's pool")
    p.add_argument("--default-alloc-tokens", type=int, default=1024,
                   help="first allocation per room (longer rooms resume)")
    p.add_argument("--recv-into", choices=("output", "pool"), default="output",
                   help="land payload straight in the output, or in pool blocks and copy")
    p.add_argument("--num-embedding-ranks", type=int, default=1,
                   help="ranks [0, N) encode and send; the rest receive")
    p.add_argument("--language-tp-size", type=int, default=1,
                   help="Language ranks per instance (tensor parallelism)")
    p.add_argument("--seed", type=int, default=0, help="seeds the rooms' lengths and bytes")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    if args.max_tokens > args.num_blocks * args.block_size:
        p.error(f"--max-tokens {args.max_tokens} exceeds the Embedding budget of --num-blocks "
                f"x --block-size = {args.num_blocks * args.block_size} tokens")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    return args


def room_tensors(seed: int, room: int, min_tokens: int, max_tokens: int,
                 hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + room)
    seq = int(torch.randint(min_tokens, max_tokens + 1, (1,), generator=g))
    emb = torch.randn(seq, hidden, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 151_000, (seq,), generator=g, dtype=torch.int32)
    pos = torch.randint(0, 4096, (3, seq), generator=g, dtype=torch.int32)
    return emb, ids, pos, (room, seq)


def run_embedding(ctx: disagg.Context, args: argparse.Namespace, deadline: float) -> int:
    e, num_e = ctx.rank, args.num_embedding_ranks
    mine = [r for r in range(args.rooms) if r % num_e == e]
    pending = list(mine)
    senders: list[disagg.Sender] = []
    while pending or any(s.poll() not in (TransferStatus.SUCCESS, TransferStatus.FAILED)
                         for s in senders):
        if time.monotonic() > deadline:
            print(f"[embedding {e}] timed out", file=sys.stderr)
            return 1
        if pending:
            room = pending[0]
            if not senders or senders[-1].room != room:
                senders.append(ctx.embedding.sender(room))
            emb, ids, pos, aux = room_tensors(args.seed, room, args.min_tokens,
                                              args.max_tokens, args.hidden_size)
            try:
                senders[-1].send(emb, ids, pos, aux=aux)
                pending.pop(0)
            except PoolFull:  # the room is untouched: send again once budget frees up
                busy = [s for s in senders[:-1]
                        if s.poll() not in (TransferStatus.SUCCESS, TransferStatus.FAILED)]
                if busy:
                    busy[0].wait(0.05)
                else:  # budget still draining from a failed room
                    time.sleep(0.001)
        else:
            senders[-1].wait(0.05)
    failed = [s.room for s in senders if s.poll() == TransferStatus.FAILED]
    for s in senders:
        if s.failure:
            print(f"[embedding {e}] room {s.room} failed: {s.failure}", file=sys.stderr)
    return 1 if failed else 0


def run_language(ctx: disagg.Context, args: argparse.Namespace, deadline: float) -> int:
    q = ctx.language.queue()
    num_instances = (ctx.world_size - args.num_embedding_ranks) // args.language_tp_size
    assert ctx.instance is not None  # a language rank
    for room in range(ctx.instance, args.rooms, num_instances):
        q.add(room, src_rank=room % args.num_embedding_ranks)
    bad = 0
    got = 0
    while len(q):
        if time.monotonic() > deadline:
            print(f"[language {ctx.rank}] timed out with {len(q)} rooms left", file=sys.stderr)
            return 1
        done, failed = q.step()
        for room, res in done:
            emb, ids, pos, aux = room_tensors(args.seed, room, args.min_tokens,
                                              args.max_tokens, args.hidden_size)
            same = (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))
                    and torch.equal(res.fill_ids, ids)
                    and res.mrope_positions is not None
                    and torch.equal(res.mrope_positions, pos) and res.aux == aux)
            if not same:
                print(f"[language {ctx.rank}] room {room}: MISMATCH", file=sys.stderr)
                bad += 1
            got += 1
        for room, reason in failed:
            print(f"[language {ctx.rank}] room {room} failed: {reason}", file=sys.stderr)
            bad += 1
        if not done and not failed:
            time.sleep(0.001)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = DisaggConfig(num_embedding_ranks=args.num_embedding_ranks,
                       language_tp_size=args.language_tp_size, hidden_size=args.hidden_size,
                       block_size=args.block_size, num_blocks=args.num_blocks,
                       default_alloc_tokens=args.default_alloc_tokens,
                       recv_into=args.recv_into, peer_timeout=30.0)
    ctx = init_or_explain(cfg, "launch.transfer")
    if ctx is None:
        return 2
    rc = 1
    try:
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        if ctx.role == "embedding":
            rc = run_embedding(ctx, args, deadline)
        else:
            rc = run_language(ctx, args, deadline)
        elapsed = time.monotonic() - t0
        st = ctx.stats()
        moved = st["bytes_sent"] if ctx.role == "embedding" else st["bytes_received"]
        assert isinstance(moved, int)
        leak = st["pool_free_blocks"] != st["pool_total_blocks"]
        print(f"[{ctx.role} rank {ctx.rank}] {'OK' if rc == 0 and not leak else 'FAILED'}: "
              f"{moved / 2**20:.1f} MiB in {elapsed:.2f}s ({moved / elapsed / 1e9:.2f} GB/s), "
              f"chunks={st['chunks']} resumes={st['resumes']} failures={st['failures']} "
              f"pool {st['pool_free_blocks']}/{st['pool_total_blocks']} free", flush=True)
        if leak:
            rc = 1
    finally:
        ctx.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
