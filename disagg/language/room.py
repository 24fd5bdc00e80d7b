"""Language side: what one room is made of, its phases (derived from its
fields), `needs_resume`, and the one function that changes its status. Read
`machine.py` for the transitions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import Failure
from ..recycle import BufferSet
from ..types import EmbeddingResult, TransferStatus, advance
from ..wire import AllocItem
from .credit import Credit


class LaneGroup(Protocol):
    """What a lane tells the room it belongs to (`items_room.ItemRoom`)."""

    def lane_ended(self, lane: RecvRoom) -> None: ...


class Phase(enum.Enum):
    NEW = "new"
    ASKED = "asked"
    LANDING = "landing"
    PARTIAL = "partial"
    RESUMED = "resumed"
    DRAINING = "draining"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Chunk:
    """A DATA meta checked against the allocation it answers."""

    num_tokens: int
    token_offset: int
    last: bool
    corrupt: str | None  # why the room is corrupt (the stream is fine), or None


@dataclass
class RecvRoom:
    room: int
    src_rank: int
    created: float
    last_progress: float
    status: TransferStatus = TransferStatus.BOOTSTRAPPING
    failure: Failure | None = None
    seq_len: int | None = None  # the whole room's, from the first chunk's meta
    # tokens [lo, hi) of the room this rank receives: all of it, or with
    # fanout="scatter" its slice (`plan.scatter_slice`); set with seq_len
    span: tuple[int, int] | None = None
    declared_seq_len: int = 0  # init(seq_len=): the caller's word for it (0: none)
    aux: tuple[int, ...] = ()
    received: int = 0  # of the span
    given_all: bool = False  # the last DATA meta said the sender holds the whole room
    chunk_index: int = 0
    outstanding: Credit | None = None  # sent, not yet answered by a frame
    landing: Credit | None = None  # answered by a DATA meta, payload landing
    # the chunk landing there, as the machine ruled on it (`RecvMachine.landing`;
    # a ruling while it lands, e.g. its aux values, may mark it corrupt)
    landing_chunk: Chunk | None = None
    outputs: dict[str, torch.Tensor] | None = None  # views of `buffers`' first rows
    buffers: BufferSet | None = None  # what outputs are carved from (`recycle.py`)
    alloc_sent: bool = False
    init_refused: bool = False  # an init() found no blocks (for the timeout's reason)
    # stage timings, for latency stats and the slow-room log
    alloc_at: float | None = None
    first_byte_at: float | None = None
    partial_at: float | None = None
    num_resumes: int = 0
    auto_first_blocks: int | None = None  # first allocation chosen by "auto"
    tracked: bool = True  # in the engine's table (forgotten once nothing can land)
    result: EmbeddingResult | None = None  # made once, at the first result() call
    gathered: bool = False  # fanout="scatter": the instance all-gathered the slices
    handed_back: bool = False  # the caller recycled its result: the memory is not its own
    # a lane of a room declared as items (`items_room.ItemRoom`): its source's
    # item table, sent with the ALLOC, and the room it is a lane of (told when
    # the lane ends); None: a plain room
    items: tuple[AllocItem, ...] | None = None
    group: LaneGroup | None = None

    @property
    def total(self) -> int | None:
        """Tokens this rank receives (its span's length), once the first chunk told."""
        return None if self.span is None else self.span[1] - self.span[0]

    @property
    def complete(self) -> bool:
        return self.span is not None and self.received == self.span[1] - self.span[0]


def phase(r: RecvRoom) -> Phase:
    if r.failure is not None:
        return Phase.DRAINING if (r.outstanding or r.landing) else Phase.FAILED
    if r.complete:
        return Phase.DONE
    if r.landing is not None:
        return Phase.LANDING
    if r.outstanding is not None:
        return Phase.ASKED if r.seq_len is None else Phase.RESUMED
    return Phase.PARTIAL if r.seq_len is not None else Phase.NEW


def needs_resume(r: RecvRoom) -> bool:
    """Partial landed: the caller (or auto resume) must allocate for the rest."""
    return (r.failure is None and r.status == TransferStatus.TRANSFERRING
            and r.outstanding is None and r.landing is None
            and r.total is not None and r.received < r.total)


def set_status(r: RecvRoom, status: TransferStatus) -> None:
    """The only writer of `r.status`: progress is monotone, SUCCESS and FAILED
    are final, and FAILED is reached only through a failure."""
    r.status = advance(r.room, r.status, status, r.failure)
