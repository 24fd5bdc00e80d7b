"""Embedding side: what one Language rank's stream holds beyond its rooms'
lanes. Pure. A Language rank posts the recvs of an allocation's answer ahead
(wire FLAG_PREPOSTED) only when nothing else is owed on the pair, so at most
one such answer waits per pair; any other room's frame must not take its
recvs. The one DEFER rule lives here (`defer`): such an allocation whose
answer cannot be its DATA frame now gets a DEFER frame (filler of the posted
sizes) and is answered later by an ordinary frame.

States by event (a frame about to go on the stream, of the waiting answer's
room or of another; the pair lost): the state after, and what the caller of
the event must do. `-`: cannot happen. `tests/test_machines.py` checks every
cell and that this table is the one it checks.

| state | posted | frame(same room) | frame(other room) | lost |
|---|---|---|---|---|
| NOTHING_WAITS | WAITS | NOTHING_WAITS | NOTHING_WAITS | NOTHING_WAITS |
| WAITS | - | NOTHING_WAITS | NOTHING_WAITS: DEFER it | NOTHING_WAITS |
| WAITS_DEFERRED | - | NOTHING_WAITS | NOTHING_WAITS | NOTHING_WAITS |
"""

from __future__ import annotations

from dataclasses import dataclass

from .room import Grant


def defer(grant: Grant) -> None:
    """The DEFER transition: a pre-posted grant becomes an ordinary one (its
    posted recvs are filled by the DEFER frame the caller puts on the stream)."""
    grant.preposted = False


@dataclass
class SendPair:
    """One Language rank's stream: the pre-posted answer that waits, if any."""

    waiting: tuple[int, Grant] | None = None  # (room, grant) whose answer's recvs are posted

    def posted(self, room: int, grant: Grant) -> None:
        """`grant` of `room` was accepted pre-posted: its answer must come next."""
        self.waiting = (room, grant)

    def before_frame(self, room: int) -> tuple[int, Grant] | None:
        """A frame of `room` is about to go on the stream. The pre-posted answer
        of another room that still waits must be DEFERred first (returned, and
        deferred); the frame of the same room is its answer (or follows it)."""
        waiting, self.waiting = self.waiting, None
        if waiting is None or waiting[0] == room or not waiting[1].preposted:
            return None
        defer(waiting[1])
        return waiting

    def lost(self) -> None:
        """The pair is gone: nothing waits on it any more."""
        self.waiting = None
