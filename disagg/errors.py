"""Typed errors. Each carries the rank, peer and room it concerns, when known."""

from __future__ import annotations

import enum


class DisaggError(RuntimeError):
    """Base of every error this library raises on purpose."""

    def __init__(self, message: str, *, rank: int | None = None, peer: int | None = None,
                 room: int | None = None) -> None:
        where = ", ".join(f"{k}={v}" for k, v in (("rank", rank), ("peer", peer), ("room", room))
                          if v is not None)
        super().__init__(f"{message} [{where}]" if where else message)
        self.rank = rank
        self.peer = peer
        self.room = room


class ProtocolError(DisaggError):
    """A control message or meta frame that is malformed or impossible."""


class PeerLost(DisaggError):
    """A peer died, closed its connection, or stopped answering."""


class TransferTimeout(DisaggError):
    """A bounded wait ran out."""


class PoolFull(DisaggError):
    """The pool (or the Embedding budget) cannot take this request now; retry later."""


class GeometryMismatch(DisaggError, ValueError):
    """Two ranks disagree on block size, buffer names, shapes or dtypes."""


class LockstepError(DisaggError):
    """TP ranks of one instance disagree on the queue's rooms or steps."""


class StreamBroken(DisaggError):
    """A frame that disagrees with what this side allocated: the pair's stream can
    no longer be trusted and is torn down (never guess sizes)."""


class FailureCause(str, enum.Enum):
    """Why a room failed, as counted in `ctx.stats()["failures_by_cause"]`."""

    ABORT = "abort"  # this side's caller aborted
    ABORTED_BY_PEER = "aborted_by_peer"  # the Embedding rank answered with an ABORT frame
    BAD_MESSAGE = "bad_message"  # a malformed or impossible control message
    BAD_PEER = "bad_peer"  # a message from an identity that is no known rank
    CANCELLED = "cancelled"  # the Language serving loop cancelled it (`RoomQueue.cancel`)
    CORRUPT_FRAME = "corrupt_frame"  # a chunk that disagrees with the room's first chunk
    LENGTH_MISMATCH = "length_mismatch"  # the declared seq_len is not the room's
    PEER_LOST = "peer_lost"  # the peer died, said goodbye, or its stream broke
    REJECTED = "rejected"  # the Embedding rank refused the room (REJECT)
    SHUTDOWN = "shutdown"  # this rank shut down with the room live
    TIMEOUT = "timeout"  # bootstrap_timeout (or the first-chunk bound) ran out
    TOO_LONG = "too_long"  # longer than the whole Embedding budget: can never be sent


class Failure(str):
    """Why a room failed: the message (a `str`, as before) with `.cause`, a
    `FailureCause` a serving loop can branch on (retry a PEER_LOST room
    elsewhere, drop a CANCELLED one), and `.rank`, the rank it failed on."""

    cause: FailureCause
    rank: int | None

    def __new__(cls, message: str, cause: FailureCause, rank: int | None = None) -> Failure:
        self = super().__new__(cls, message)
        self.cause = cause
        self.rank = rank
        return self

    def __reduce__(self) -> tuple[object, ...]:  # pickles (e.g. through multiprocessing) whole
        return (Failure, (str(self), self.cause, self.rank))

    def __repr__(self) -> str:
        return f"Failure({str(self)!r}, cause={self.cause.name}, rank={self.rank})"


def clip_reason(reason: str, limit: int) -> str:
    """`reason` in at most `limit` UTF-8 bytes: whole, or cut after a whole word
    with " ..." (never mid-word, never mid-character): for the wire's bounded
    reason fields."""
    raw = reason.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return reason
    head = raw[:limit - 4].decode("utf-8", errors="ignore")
    cut = head.rsplit(" ", 1)[0] if " " in head else head
    return cut + " ..."
