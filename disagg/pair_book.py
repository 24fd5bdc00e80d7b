"""A rank's pairs under one cap (`links.py` says how a pair is made and
closed): `PairBook` keeps every peer's `PairLink`, counts the live ones
against `max_pairs`, answers which are idle, warms pairs and lets go of
them all at shutdown. `LinkHost` is what it asks of the rank's engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .config import DisaggConfig
from .errors import PeerLost
from .links import LinkHost, Maker, PairLink
from .pairing import PairMaker, destroy_pair, max_ctas_from_env
from .pairs import LIVE, LinkState, LinkView, idle_due
from .stats import Stats
from .transport import TorchPairTransport

log = logging.getLogger(__name__)


def make_book(store: dist.Store, base: Callable[[int], str], *, embedding: bool,
              device: torch.device, timeout_s: float, cfg: DisaggConfig,
              stats: Stats) -> PairBook:
    """A rank's pairs, made on demand on `store`; `base(peer)` names a pair's
    keys there. Thin NCCL communicators when DISAGG_PAIR_NCCL_MAX_CTAS says so."""
    maker = PairMaker(store, base, embedding=embedding, device=device, timeout_s=timeout_s,
                      max_ctas=max_ctas_from_env())
    return PairBook(maker, destroy_pair, max_pairs=cfg.max_pairs, idle_s=cfg.pair_idle_s,
                    stats=stats, follow=maker.waiting if embedding else None)


class PairBook:
    """One rank's links. `link(peer)` makes a peer's (cheap: no group yet)."""

    def __init__(self, make: Maker, destroy: Callable[[TorchPairTransport], None], *,
                 max_pairs: int, idle_s: float, stats: Stats,
                 clock: Callable[[], float] = time.monotonic,
                 follow: Callable[[int, int], bool] | None = None) -> None:
        self.make, self.destroy = make, destroy
        self.follow = follow  # the Embedding end's `PairMaker.waiting` (`links.py`)
        self.max_pairs, self.idle_s = max_pairs, idle_s
        self.stats, self.clock = stats, clock
        self.cv = threading.Condition()
        self.links: dict[int, PairLink] = {}
        self.host: LinkHost | None = None  # the engine, once built
        self.stopped = False
        self.warm_failed: dict[int, str] = {}  # peer -> why `warm` could not make it
        stats.add(pairs_created=0, pairs_closed=0)
        stats.set_gauge("pairs_live", 0)

    @property
    def live(self) -> int:
        return sum(1 for k in self.links.values() if k.state in LIVE)

    def link(self, peer: int) -> PairLink:
        with self.cv:
            k = self.links.get(peer)
            if k is None:
                k = self.links[peer] = PairLink(self, peer)
            return k

    def views(self) -> list[LinkView]:
        with self.cv:
            return [LinkView(k.peer, k.state, k.last_used) for k in self.links.values()]

    def touch(self, peer: int) -> None:
        """A room of `peer`'s was made or answered: the pair is in use now."""
        k = self.links.get(peer)
        if k is not None:
            k.last_used = self.clock()

    def idle(self, now: float) -> list[int]:
        """Open pairs due to close (`pairs.idle_due`)."""
        host = self.host
        return [] if host is None else idle_due(self.views(), host.pair_busy, now, self.idle_s)

    def _changed(self) -> None:  # cv held
        self.stats.set_gauge("pairs_live", self.live)
        self.cv.notify_all()

    def lose(self, peer: int, *, abort: bool) -> None:
        """The pair with `peer` is lost for good (`PairLink.lose`)."""
        k = self.links.get(peer)
        if k is not None:
            k.lose(abort=abort)

    def forget(self, peer: int) -> None:
        """A peer that left (jobs mode): its link is aborted and its group goes."""
        with self.cv:
            k = self.links.pop(peer, None)
        if k is not None:
            k.abort()
            k.drop()

    def why_not_open(self, peer: int) -> str:
        """Why the pair with `peer` is not open now ("" if it is, or has no link)."""
        with self.cv:
            k = self.links.get(peer)
            if k is None or k.state is LinkState.OPEN:
                return ""
            if k.broken is not None:
                return f"its pair group is lost: {k.broken}"
            if k.state is LinkState.CLOSED and self.live >= self.max_pairs:
                return (f"its pair group waits for a slot: this rank is at max_pairs="
                        f"{self.max_pairs} with every pair busy")
            if k.state is LinkState.CLOSED and self.follow is not None:
                return ("its pair group waits for the Language rank to start making it "
                        "(it may be at its max_pairs with every pair busy)")
            if k.state is LinkState.FORMING:
                return ("its pair group is still being made: the peer has not joined in "
                        "(it may be at its max_pairs with every pair busy)")
            return f"its pair group is {k.state.value}"

    def warm(self, peer: int, wanted: Callable[[], bool]) -> bool:
        """Make the pair with `peer` now, before any room needs it (the calling
        thread: one of the context's), while `wanted`. The peer must warm it
        too, or a room must need it there, within that time. False: it was not
        made in time (why in `warm_failed`), and is made again when a room needs
        it. A pair lost meanwhile (its peer came, then said goodbye or died, as
        a peer that starts and stops at once does) is the engines' business,
        not start-up's: True."""
        try:
            return self.link(peer).ensure(wanted)
        except PeerLost as e:
            log.info("warming the pair with rank %d: %s", peer, e)
            with self.cv:
                if not self.stopped:
                    return True
            self.warm_failed[peer] = str(e)
            return False

    def warm_in_order(self, peers: list[int], timeout_s: float) -> int | None:
        """World mode's warm pairs at `init`: one after another in one global
        order, (Embedding, Language) ascending, as every rank does, so the first
        pair not yet made has both its ends at it and none waits in a cycle.
        The first peer whose pair was not made in `timeout_s`, or None."""
        deadline = time.monotonic() + timeout_s
        for peer in sorted(peers):
            if not self.warm(peer, lambda: time.monotonic() < deadline):
                return peer
        return None

    def stop(self) -> None:
        """Shutting down: no pair forms any more; a thread waiting for one gives up."""
        with self.cv:
            self.stopped = True
            self.cv.notify_all()

    def close_all(self) -> None:
        """Destroy every group left (after the threads stopped or were aborted)."""
        self.stop()
        with self.cv:
            links = list(self.links.values())
        for k in links:
            k.drop()
        # let go of the maker (and so of the store it holds: a world's store closes
        # its sockets with its last reference) and of the engine, without waiting
        # for the garbage collector to break the book's cycles
        with self.cv:
            self.links.clear()
        self.host = None
        close = getattr(self.make, "close", None)
        if close is not None:
            close()
        self.make = _stopped
        self.follow = None


def _stopped(peer: int, gen: int, wanted: Callable[[], bool]) -> TorchPairTransport | None:
    raise PeerLost("shut down", peer=peer)


