"""Language side: where a frame's payload lands, what a pair's thread needs of
its engine (`StreamHost`), and what the engine and `frames` need of a pair's
reader (`ReadingPair`): the stream, the engine and the frame decisions depend
on these, not on each other. Pure bookkeeping around tensors: which recv
targets a chunk has (`destinations`), a pre-posted frame (`Job`), the decision
for a frame that arrived (`Landing`), and pool mode's one copy (`copy_out`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .. import streams
from ..errors import TransferTimeout
from ..geometry import Geometry
from ..plan import Segment, segment_plan
from ..pool import BlockPool
from ..transport import PairTransport, Posted
from .credit import Credit
from .room import Chunk, RecvRoom

if TYPE_CHECKING:
    from ..stats import Stats
    from .actions import Action
    from .credit import Credits
    from .machine import RecvMachine
    from .pair import RecvPair


class StreamHost(Protocol):
    """What a pair's receive thread needs of its engine (`LanguageEngine` is one):
    the stream depends on this, not on the engine."""

    rank: int
    geometry: Geometry
    pool: BlockPool
    device: torch.device
    stats: Stats
    credits: Credits
    rooms: dict[tuple[int, int], RecvRoom]
    machine: RecvMachine

    def clock(self) -> float: ...

    def execute(self, r: RecvRoom, actions: list[Action]) -> None: ...

    def output_rows(self, seq_len: int) -> int: ...

    def land_in(self, r: RecvRoom, rows: int) -> None: ...

    def pair_lost(self, pair: ReadingPair, err: BaseException, *,
                  from_thread: bool = True, clean: bool = False, tell: bool = True) -> None: ...


class ReadingPair(Protocol):
    """A pair's reader as the engine and `frames` see it (`stream.PairReceiver`
    is one): its peer, its machine and the engine lock that guards it, its
    transport, and `lose`."""

    src: int
    engine: StreamHost
    m: RecvPair
    cv: threading.Condition
    transport: PairTransport

    def lose(self, why: str) -> bool: ...


@dataclass
class Job:
    """A pre-posted frame: the recvs of the frame that will answer `credit` (its
    meta, then `dsts`), posted in stream order before anything arrives, by the
    pair's thread or by the caller that asked for it (`pair.RecvPair.handed`
    decides which, under the lock, so exactly one of them posts)."""

    room: RecvRoom
    credit: Credit
    num_tokens: int
    token_offset: int
    plan: list[Segment]
    dsts: list[torch.Tensor]
    scratch: bool = False  # no result could be made for it: it lands in scratch
    meta: Posted | None = None  # set once posted
    payload: Posted | None = None


@dataclass(frozen=True)
class Landing:
    """What the engine decided for a DATA frame: where its payload lands."""

    room: RecvRoom
    chunk: Chunk
    plan: list[Segment]
    dsts: list[torch.Tensor]
    copy_out: bool  # it lands in pool blocks: copy into the output once landed
    more: bool  # another frame is owed after this one
    aux: torch.Tensor | None = None  # the room's aux values, after a first chunk's payload


def destinations(geometry: Geometry, pool: BlockPool, r: RecvRoom, a: Credit, n: int,
                 offset: int, device: torch.device) -> tuple[list[Segment], list[torch.Tensor]]:
    """Recv targets in wire order: for each buffer, one tensor per segment."""
    if n == 0:  # an empty scatter slice: the meta frame was all of it
        return [], []
    plan = segment_plan(a.block_ids, geometry.block_size, n, direct=a.direct, dst_offset=offset)
    bufs = geometry.wire_buffers
    if a.direct and r.outputs is not None:
        return plan, [r.outputs[b.name][s.dst_token:s.dst_token + s.num_tokens]
                      for b in bufs for s in plan]
    if not a.direct:
        return plan, [pool.token_view(b.name, s.dst_token, s.num_tokens)
                      for b in bufs for s in plan]
    # no output to land in (allocation failed): drain into scratch to keep the stream
    return plan, [torch.empty((s.num_tokens, *b.per_token_shape), dtype=b.dtype, device=device)
                  for b in bufs for s in plan]


def copy_out(geometry: Geometry, pool: BlockPool, outputs: dict[str, torch.Tensor],
             plan: list[Segment], offset: int, device: torch.device) -> None:
    """Pool mode: a chunk that landed in pool blocks, into the room's output, on
    the library stream, and host-observed before the room's status moves (the
    blocks' next recvs are posted on that stream, after the copy, anyway)."""
    with streams.on_library_stream(device):
        for b in geometry.wire_buffers:
            out = outputs[b.name]
            for s in plan:
                start = offset + s.chunk_start
                out[start:start + s.num_tokens].copy_(pool.token_view(b.name, s.dst_token,
                                                                      s.num_tokens))
    if not streams.settle(device):
        raise TransferTimeout(f"pool mode's copy-out on {device} not done after "
                              f"{streams.HOST_READ_TIMEOUT_S:.0f}s")
