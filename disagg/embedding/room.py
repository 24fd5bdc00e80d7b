"""Embedding side: what one room is made of (its lanes, one per Language rank
that asked, and the grants they hold), the lane states, and the one function
that changes a room's status. Read `machine.py` for the transitions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..errors import Failure
from ..plan import span
from ..types import TransferStatus, advance
from ..wire import AllocItem
from .rows import RowMap


@dataclass
class Grant:
    """An accepted allocation from one Language rank, not yet answered."""

    key: int  # sent_tokens at which it starts (0 for ALLOC)
    block_ids: tuple[int, ...]
    allocated_tokens: int
    direct: bool
    arrived: float
    seq_len: int = 0  # ALLOC only: the length the Language caller declared (0: none)
    scatter: bool = False  # ALLOC only: the rank wants only its slice (fanout="scatter")
    # The rank posted the recvs of this grant's answer already (wire
    # FLAG_PREPOSTED): a DATA chunk of exactly `expect` tokens, or an ABORT or
    # DEFER frame padded to the same sizes. Cleared by a DEFER: the answer is
    # then an ordinary frame.
    preposted: bool = False
    expect: int = -1  # pre-posted: the chunk's tokens (`plan.prepost_tokens`)
    # ALLOC only: the room's items this source sends (wire FLAG_ITEMS); None: no items
    items: tuple[AllocItem, ...] | None = None

    @property
    def asks_nothing(self) -> bool:
        """An item room's ALLOC to a source all of whose items are hits there: it
        only tells the source (`needed()` is then []), and owes no frame."""
        return self.items is not None and self.seq_len == 0


@dataclass
class Part:
    """One `send()` call's tensors (wire order, each [n, *per_token]), which
    hold the room's tokens [start, start + n)."""

    start: int
    num_tokens: int
    sources: list[torch.Tensor]
    ready: torch.cuda.Event | None = None  # recorded on the producer's stream at send()


@dataclass
class Lane:
    """The room as seen by one Language rank's stream."""

    lang_rank: int
    # fanout="scatter": the rank's place in its TP instance, which picks its
    # slice of the room (`plan.scatter_slice`); None: it gets the whole room
    slice_index: int | None = None
    sent_tokens: int = 0  # sent on this pair (from the start of its slice)
    chunk_index: int = 0
    pending: Grant | None = None  # accepted, not yet answered
    in_flight: int = 0  # frames posted, not yet completed
    aborting: bool = False  # one of them is an ABORT frame
    done: bool = False  # the last chunk completed
    # its Language rank was declared dead: frames still in flight on it hold
    # the budget until the transport gives them back, but not the room's end
    lost: bool = False
    keys: set[int] = field(default_factory=set)  # sent_tokens of every grant accepted


class LaneState(enum.Enum):
    GRANTED = "granted"
    SENDING = "sending"
    WAIT_RESUME = "wait_resume"
    SENT_LAST = "sent_last"
    DONE = "done"
    ABORTING = "aborting"
    CLOSED = "closed"


@dataclass
class SendRoom:
    room: int
    last_progress: float
    seq_len: int = 0
    sources: list[torch.Tensor] | None = None  # the first part's, wire order; None: no data yet
    parts: list[Part] = field(default_factory=list)  # every part given so far, in order
    given: int = 0  # tokens handed over so far (== seq_len once complete)
    aux: tuple[int, ...] = ()
    budget: list[int] = field(default_factory=list)
    instance_size: int | None = None
    lanes: dict[int, Lane] = field(default_factory=dict)
    failure: Failure | None = None
    status: TransferStatus = TransferStatus.WAITING_FOR_INPUT
    ended: bool = False  # End emitted: nothing more happens to this room
    sent_at: float | None = None  # first send(), for latency stats
    bytes_sent: int = 0  # payload bytes completed on every lane, for stats
    # a room declared as items (DESIGN 0.3): this source's items, as every rank's
    # ALLOC gave them (None: no items, or no ALLOC yet)
    items: tuple[AllocItem, ...] | None = None
    asked: bool = False  # needed() gave the caller a list before its first send()
    # the caller gives all of its items' rows (it did not ask): which are sent
    rows: RowMap | None = None


def lane_span(room: SendRoom, lane: Lane) -> tuple[int, int]:
    """Tokens [lo, hi) of the room this lane carries (needs the room's seq_len)."""
    assert lane.slice_index is None or room.instance_size is not None  # set with the lane
    return span(room.seq_len, room.instance_size or 1, lane.slice_index)


def lane_total(room: SendRoom, lane: Lane) -> int:
    lo, hi = lane_span(room, lane)
    return hi - lo


def lane_state(room: SendRoom, lane: Lane) -> LaneState:
    if lane.done:
        return LaneState.DONE
    if lane.lost:
        return LaneState.CLOSED
    if lane.aborting:
        return LaneState.ABORTING
    if lane.pending is not None:
        return LaneState.GRANTED
    if room.failure is not None and not lane.in_flight:
        return LaneState.CLOSED
    if lane.in_flight:
        return (LaneState.SENT_LAST if lane.sent_tokens == lane_total(room, lane)
                else LaneState.SENDING)
    return LaneState.WAIT_RESUME


def set_status(room: SendRoom, status: TransferStatus) -> None:
    """The only writer of `room.status`: progress is monotone, an ended room
    never changes, and FAILED is reached only through a failure."""
    room.status = advance(room.room, room.status, status, room.failure)


def add_runs(room: SendRoom, runs: list[tuple[list[torch.Tensor], int]],
             ready: torch.cuda.Event | None) -> None:
    """Append a part's runs of wire rows (each the tensors of its rows, wire
    order, and their count) after what was given so far."""
    for sources, n in runs:
        room.parts.append(Part(room.given, n, sources, ready))
        room.given += n


def decided_on_the_wire(room: SendRoom) -> bool:
    """Every rank of the instance has the room's last chunk on the wire (or
    received): the room's outcome is its sends' completion, whoever aborts
    meanwhile, so both sides agree (SUCCESS if they complete)."""
    return (room.sources is not None and room.instance_size is not None
            and len(room.lanes) == room.instance_size
            and all(lane.done or (lane.in_flight
                                  and lane.sent_tokens == lane_total(room, lane)
                                  and not lane.aborting) for lane in room.lanes.values()))


def waiting_for(room: SendRoom) -> str:
    """What a room that made no progress waits for, for its timeout's reason."""
    if room.sources is None:
        return "the caller's data (send())"
    if room.given < room.seq_len and any(p.pending is not None for p in room.lanes.values()):
        return "the caller's next part (send())"
    if not room.lanes:
        return "ALLOC"
    if room.instance_size and len(room.lanes) < room.instance_size:
        return f"ALLOC from {room.instance_size - len(room.lanes)} more rank(s)"
    return "RESUME"
