"""Which pair groups live (DESIGN 0.3, "Deployments"): the rules of pairs made
on demand, written once for both sides and both deployments. Pure: the links'
states and clocks come in, the peers to close come out.

A pair's process group is made when a room first needs it and closed when it
idles; each making is a new generation of the pair, with keys of its own in
the store, so a group never meets a stale half of an older one. A rank keeps
at most `max_pairs` live (forming, open or closing). To make room at the cap,
the least recently used open pair that is idle on this side is closed first;
never one with a live room or a frame owed (`busy`). The Language side
decides every close (it asks for every room, so it knows when nothing more
is owed on a pair) and tells the Embedding side with PAIR_CLOSE; the
Embedding side may only ask for one (PAIR_CLOSE with FLAG_ASK).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class LinkState(enum.Enum):
    CLOSED = "closed"  # no group: made again when a room needs it
    FORMING = "forming"  # the peer's hello awaited, then the backend's constructor
    OPEN = "open"
    CLOSING = "closing"  # being torn down; the next group is the next generation
    BROKEN = "broken"  # lost for good (its peer died or its stream broke)


LIVE = frozenset({LinkState.FORMING, LinkState.OPEN, LinkState.CLOSING})


@dataclass(frozen=True)
class LinkView:
    """What the rules read of one link."""

    peer: int
    state: LinkState
    last_used: float


def evictable(links: Iterable[LinkView], busy: Callable[[int], bool],
              exclude: int | None = None) -> list[int]:
    """Open pairs that may be closed to make room for another, least recently
    used first: none with a live room or a frame owed."""
    open_ = sorted((v for v in links if v.state is LinkState.OPEN and v.peer != exclude),
                   key=lambda v: v.last_used)
    return [v.peer for v in open_ if not busy(v.peer)]


def idle_due(links: Iterable[LinkView], busy: Callable[[int], bool], now: float,
             idle_s: float) -> list[int]:
    """Open pairs unused for `idle_s` and idle now: to be closed (or asked to be)."""
    return [v.peer for v in links
            if v.state is LinkState.OPEN and now - v.last_used >= idle_s and not busy(v.peer)]


def may_form(state: LinkState, live: int, max_pairs: int) -> bool:
    """A closed pair may start forming now: the rank is under its cap."""
    return state is LinkState.CLOSED and live < max_pairs


def warm_pair(n_embedding: int, n_language: int, embedding_cap: int, language_cap: int) -> bool:
    """Whether a pair is made before any room needs it (at start-up, or as its
    member joins) rather than on demand: while its Embedding end could hold a
    pair with each of the `n_language` Language ranks under its `max_pairs`
    (`embedding_cap`), and its Language end one with each of the `n_embedding`
    Embedding ranks under its own (`language_cap`). Past either cap, pairs are
    made only when rooms need them (and closed when idle)."""
    return n_language <= embedding_cap and n_embedding <= language_cap
