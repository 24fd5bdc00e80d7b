"""Embedding side: what the machine asks the engine to do, in order."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FailureCause
from ..plan import Segment
from ..types import TransferStatus
from ..wire import Meta
from .room import Lane, Part, SendRoom


@dataclass(frozen=True)
class SendData:
    """Post a DATA frame on the lane's stream; `frame_done` follows its completion."""

    room: SendRoom
    lane: Lane
    meta: Meta
    plan: list[Segment]
    nbytes: int
    part: Part  # the part whose tensors the chunk is sliced from


@dataclass(frozen=True)
class SendAbortFrame:
    """Answer an allocation with an ABORT frame carrying `reason`. With a lane,
    `frame_done(..., data=False)` follows its completion; without one it is a
    refusal of an allocation that never joined a room."""

    room: int
    lang_rank: int
    reason: str
    lane: Lane | None = None
    owner: SendRoom | None = None


@dataclass(frozen=True)
class SendReject:
    """Tell a Language rank, by control message, why the room failed."""

    room: int
    lang_rank: int
    reason: str


@dataclass(frozen=True)
class CountFailure:
    cause: FailureCause


@dataclass(frozen=True)
class Count:
    bytes_sent: int = 0
    chunks: int = 0
    resumes: int = 0


@dataclass(frozen=True)
class End:
    """Return the budget, forget the room (tombstone `outcome`), then publish
    `status`: a caller that sees it may reuse the id and the budget at once."""

    room: SendRoom
    status: TransferStatus
    outcome: str
    send_total_s: float | None = None


Action = SendData | SendAbortFrame | SendReject | CountFailure | Count | End
