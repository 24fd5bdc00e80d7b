"""Peer liveness, written once for both sides: when each peer was last heard,
which peers are considered dead and why, and when the next heartbeat is due.

Language ranks send a HEARTBEAT to every Embedding rank each interval; the
Embedding rank answers each one. So each side hears the other at least every
interval while both live, and declares a peer dead after `peer_timeout` of
silence, even when no recv of its own is posted to notice. A BYE heartbeat is
a clean goodbye. Pure bookkeeping: the clock comes in as `now`.

With pairs made on demand (`lazy`, links.py) only the peers a rank uses now
are watched: heartbeats go to, and silence counts for, the peers whose pair is
open or wanted (`activate`); the others are known and believed alive (in jobs
mode membership says when one leaves), at no cost per peer.
"""

from __future__ import annotations

from collections.abc import Iterable


class Liveness:
    def __init__(self, peers: Iterable[int], peer_timeout: float, now: float) -> None:
        self.peer_timeout = peer_timeout
        self._heard = {p: now for p in peers}
        self.dead: dict[int, str] = {}  # peer -> why it is considered dead
        self.heartbeat_interval = min(1.0, peer_timeout / 4)
        self._next_heartbeat = now
        self.lazy = False  # watch only the `active` peers
        self.active: set[int] = set()

    def activate(self, peer: int, now: float) -> None:
        """A peer in use (a room wants its pair, or the pair is open): watched
        from now on, as if just heard."""
        if self.lazy and peer in self._heard and peer not in self.active:
            self.active.add(peer)
            self._heard[peer] = max(self._heard[peer], now)

    def deactivate(self, peer: int) -> None:
        """Its pair closed, idle: no longer watched."""
        self.active.discard(peer)

    def watched(self, peer: int) -> bool:
        return not self.lazy or peer in self.active

    def add(self, peer: int, now: float) -> None:
        """A peer that joined (jobs mode): heard now, alive."""
        if peer not in self._heard:
            self._heard[peer] = now

    def heard(self, peer: int, now: float) -> None:
        if peer in self._heard:
            self._heard[peer] = now

    def silence(self, peer: int, now: float) -> float:
        return now - self._heard[peer]

    def expired(self, now: float) -> list[tuple[int, str]]:
        """Live peers silent for longer than peer_timeout, with why."""
        return [(p, f"no heartbeat for {now - t:.1f}s (peer_timeout={self.peer_timeout:g}s)")
                for p, t in self._heard.items()
                if p not in self.dead and now - t > self.peer_timeout and self.watched(p)]

    def mark_dead(self, peer: int, why: str) -> bool:
        """True if `peer` was alive until now."""
        if peer in self.dead:
            return False
        self.dead[peer] = why
        return True

    def heartbeat_due(self, now: float) -> bool:
        """True once per interval (the caller then sends to every live peer)."""
        if now < self._next_heartbeat:
            return False
        self._next_heartbeat = now + self.heartbeat_interval
        return True

    @property
    def peers(self) -> list[int]:
        return list(self._heard)

    @property
    def known(self) -> dict[int, float]:
        """Every peer ever known (alive or not), for membership checks."""
        return self._heard

    def alive(self) -> list[int]:
        return [p for p in self._heard if p not in self.dead]

    def beat_targets(self) -> list[int]:
        """Live peers a heartbeat goes to: the watched ones."""
        return [p for p in self._heard if p not in self.dead and self.watched(p)]
