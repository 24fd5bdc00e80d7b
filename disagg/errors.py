"""Typed errors. Each carries the rank, peer and room it concerns, when known."""

from __future__ import annotations


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
