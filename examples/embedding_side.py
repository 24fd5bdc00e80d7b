"""A minimal Embedding-side serving loop: encode, send, hold back when full.

The encoder is a stand-in (seeded random embeddings). What matters is the loop:
`send` never blocks; on `PoolFull` the request stays at the head of the line
and the loop keeps polling the rooms in flight until budget frees up. The
caller's tensors stay untouched until their room is SUCCESS or FAILED.
"""

from __future__ import annotations

import collections
import time

import torch

import disagg
from disagg import PoolFull, TransferStatus

TICK_S = 0.02  # one scheduler iteration


def encode(room: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(room)
    seq = int(torch.randint(16, 2048, (1,), generator=g))
    emb = torch.randn(seq, hidden, generator=g).to(torch.bfloat16)
    ids = torch.full((seq,), 151655, dtype=torch.int32)  # image-pad token
    pos = torch.arange(seq, dtype=torch.int32).expand(3, seq).contiguous()
    return emb, ids, pos


def run(ctx: disagg.Context, rooms: list[int], hidden: int, timeout_s: float) -> int:
    waiting = collections.deque(rooms)  # requests whose encoder output is not sent yet
    head: tuple[disagg.Sender, tuple[torch.Tensor, ...]] | None = None  # refused by PoolFull
    in_flight: dict[int, tuple[disagg.Sender, tuple[torch.Tensor, ...]]] = {}
    failed = 0
    deadline = time.monotonic() + timeout_s
    while waiting or in_flight:
        if time.monotonic() > deadline:
            print(f"[embedding {ctx.rank}] timed out")
            return 1
        while waiting:  # admit as much as the budget takes
            room = waiting[0]
            sender, tensors = head or (ctx.embedding.sender(room), encode(room, hidden))
            try:
                sender.send(*tensors, aux=(room,))
            except PoolFull:  # the room is untouched: same sender, same tensors, next tick
                head = (sender, tensors)
                break
            head = None
            in_flight[room] = (sender, tensors)  # keep the tensors alive
            waiting.popleft()
        for room, (sender, _) in list(in_flight.items()):
            status = sender.poll()
            if status in (TransferStatus.SUCCESS, TransferStatus.FAILED):
                failed += status == TransferStatus.FAILED
                del in_flight[room]  # now the tensors may be freed or reused
        time.sleep(TICK_S)
    print(f"[embedding {ctx.rank}] sent {len(rooms)} rooms, {failed} failed, "
          f"budget {ctx.stats()['pool_free_blocks']}/{ctx.stats()['pool_total_blocks']} free")
    return 1 if failed else 0
