"""Embedding side: what the machine asks the engine to do, in order."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FailureCause
from ..meta import Meta
from ..plan import Segment
from ..types import TransferStatus
from .room import Grant, Lane, Part, SendRoom


@dataclass(frozen=True)
class SendData:
    """Post a DATA frame on the lane's stream; `frame_done` follows its completion."""

    room: SendRoom
    lane: Lane
    meta: Meta
    plan: list[Segment]
    nbytes: int
    # the parts whose tensors the chunk is sliced from: one, or several when
    # parts given already coalesce into one chunk (a segment across parts is
    # then copied into one tensor: the receiver posts one recv per segment)
    parts: list[Part]


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
    pad: Grant | None = None  # a pre-posted grant: filler of its sizes precedes the reason


@dataclass(frozen=True)
class Preposted:
    """`lang_rank` posted the recvs of `grant`'s answer: until it is on the
    wire, any other frame for that pair must first DEFER it (the engine)."""

    room: int
    lang_rank: int
    grant: Grant


@dataclass(frozen=True)
class SendDefer:
    """Fill the posted recvs of `grant`'s answer with a DEFER frame: the grant
    is answered later by an ordinary frame."""

    room: int
    lang_rank: int
    grant: Grant


@dataclass(frozen=True)
class DropPair:
    """Give up the stream to `lang_rank` (it is told why): no frame could keep
    it in step."""

    lang_rank: int
    reason: str


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


Action = (SendData | SendAbortFrame | SendDefer | Preposted | DropPair | SendReject
          | CountFailure | Count | End)
