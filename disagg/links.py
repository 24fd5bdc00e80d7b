"""Pairs made on demand: `PairLink`, the `PairTransport` the engines hold for a
peer, whose process group is made when a stream thread first needs it and
closed when it idles. A rank's links live in its `pair_book.PairBook`, under
one cap. The rules are `pairs.py`'s; the making is `pairing.PairMaker`'s.

Who makes a group: only a pair's own stream thread (`ensure`), never a
caller and never under the engine lock or the device lock (on NCCL the
communicator forms eagerly in that thread, after both ends said hello in the
store, so it is a matter of milliseconds and other pairs keep posting
meanwhile). The Embedding end takes a slot only once its peer waits for the
pair (`pairing.py`: no ring of ranks at their caps). A caller that would post
on a pair that is not open hands the post to the pair's thread instead
(`is_open`).

Warm pairs: while a rank knows at most `max_pairs` peers of the other role,
the context makes every pair at once (world mode at `init`, in one global
order; jobs mode as members join), so a small deployment pays nothing at its
first room and watches every peer, as if pairs were made at start-up. Past
the cap, pairs are made only on demand.

Who closes one: the Language side, when the pair is idle on its side (no live
room from the peer, nothing owed): it sends PAIR_CLOSE with the generation,
then destroys its end; the Embedding side destroys its end when the message
arrives, before it reads any later ALLOC of that Language rank (one ordered
socket), so both sides make the next generation together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch

from .errors import PeerLost
from .meta import Meta
from .pairing import HELLO_POLL_S
from .pairs import LIVE, LinkState, LinkView, evictable, may_form
from .stats import Stats
from .transport import Posted, TorchPairTransport

log = logging.getLogger(__name__)

WAIT_S = 0.1  # a thread waiting for a slot under the cap looks again this often


class LinkHost(Protocol):
    """What a book asks of its rank's engine (each call takes the engine lock
    itself; the book's lock is never held across one)."""

    def pair_busy(self, peer: int) -> bool: ...

    def make_room(self, candidates: list[int]) -> None: ...

    def pair_opened(self, peer: int) -> None: ...

    def pair_closed(self, peer: int) -> None: ...


# (peer, generation, still wanted) -> the formed transport, or None if it stopped
# being wanted before the peer came
Maker = Callable[[int, int, Callable[[], bool]], "TorchPairTransport | None"]


class LinkOwner(Protocol):
    """What a link reads and calls of its rank's book (`pair_book.PairBook`),
    under the book's lock `cv`."""

    cv: threading.Condition
    clock: Callable[[], float]
    stopped: bool
    max_pairs: int
    host: LinkHost | None
    make: Maker
    # the Embedding end: whether the peer waits for generation `gen` now (it
    # leads: `pairing.py`); None on the Language end
    follow: Callable[[int, int], bool] | None
    destroy: Callable[[TorchPairTransport], None]
    stats: Stats
    links: dict[int, PairLink]

    @property
    def live(self) -> int: ...

    def views(self) -> list[LinkView]: ...

    def _changed(self) -> None: ...


class PairLink:
    """A `PairTransport` whose group is made on demand, generation after
    generation. Its state is guarded by the book's lock."""

    def __init__(self, book: LinkOwner, peer: int) -> None:
        self.book = book
        self.peer = peer
        self.gen = 0  # the generation open now, or made next
        self.state = LinkState.CLOSED
        self.inner: TorchPairTransport | None = None
        self.last_used = book.clock()
        self.asked_at = -1e9  # Embedding side: when it last asked the peer to close it
        self.close_asked = False  # Language side: the peer asked, and the pair was busy
        self.broken: str | None = None

    # ------------------------------------------------------------ PairTransport

    def post_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> Posted:
        return self._open().post_frame(meta, payload, ready)

    def wait(self, posted: Posted, what: str = "send") -> None:
        self._inner().wait(posted, what)

    def post_meta_recv(self) -> Posted:
        return self._open().post_meta_recv()

    def wait_meta(self, posted: Posted) -> Meta:
        return self._inner().wait_meta(posted)

    def post_recv(self, dsts: list[torch.Tensor]) -> Posted:
        return self._open().post_recv(dsts)

    def post_frame_recv(self, dsts: list[torch.Tensor]) -> tuple[Posted, Posted | None]:
        return self._open().post_frame_recv(dsts)

    def abort(self) -> None:
        """The pair is lost for good: what stands on its group ends now (NCCL: the
        communicator is aborted), and it is never made again."""
        self.lose(abort=True)

    def lose(self, *, abort: bool) -> None:
        """The pair is lost for good (its peer died, said goodbye, or its stream
        broke): no post goes on it again, and its slot under the cap is free at
        once. `abort`: what stands on its group ends now (not after a clean
        goodbye, whose last frames were read). Its group is destroyed when the
        peer is forgotten, or at shutdown."""
        with self.book.cv:
            self.broken = self.broken or ("aborted" if abort else "lost")
            t = self.inner
            if self.state in (LinkState.OPEN, LinkState.CLOSED):  # else its owner does
                self.state = LinkState.BROKEN
            self.book._changed()
        if t is not None and abort:
            t.abort()

    @property
    def aborted(self) -> bool:
        return self.broken is not None

    def _inner(self) -> TorchPairTransport:
        t = self.inner
        if t is None:
            raise PeerLost(f"the pair with rank {self.peer} has no group "
                           f"({self.broken or self.state.value})", peer=self.peer)
        return t

    def _open(self) -> TorchPairTransport:
        if self.state is not LinkState.OPEN:
            raise PeerLost(f"the pair with rank {self.peer} is {self.state.value}"
                           + (f": {self.broken}" if self.broken else ""), peer=self.peer)
        self.last_used = self.book.clock()
        return self._inner()

    # ------------------------------------------------------------ making

    def is_open(self) -> bool:
        return self.state is LinkState.OPEN

    def ensure(self, wanted: Callable[[], bool] = lambda: True) -> bool:
        """Make the pair's group if it is not open (the pair's own thread only, no
        lock held): under the cap, closing (or, on the Embedding side, asking
        the peer to close) an idle pair first when at it. The Embedding side
        takes a slot only once its peer waits for the pair (`pairing.py`). True
        once open; False if it stopped being `wanted` first; `PeerLost` if the
        pair is lost or the rank shuts down."""
        book = self.book
        delay = HELLO_POLL_S[0]  # an Embedding end looks for its peer's hello as `hello` does
        while True:
            candidates: list[int] | None = None
            ready = self._peer_ready()  # no lock held: a store read on the Embedding side
            with book.cv:
                if self.broken is not None or book.stopped:
                    raise PeerLost(f"the pair with rank {self.peer} is "
                                   f"{self.broken or 'shut down'}", peer=self.peer)
                if self.state is LinkState.OPEN:
                    self.last_used = book.clock()
                    return True
                if not wanted():
                    return False
                if not ready:
                    book.cv.wait(delay)
                    delay = min(delay * 2, HELLO_POLL_S[1])
                    continue
                if may_form(self.state, book.live, book.max_pairs):
                    self.state, gen = LinkState.FORMING, self.gen
                    book._changed()
                elif self.state is LinkState.CLOSED and book.host is not None:
                    candidates = evictable(book.views(), lambda p: False, exclude=self.peer)
                else:
                    book.cv.wait(WAIT_S)
                    continue
            if candidates is not None:  # at the cap: the host closes (or asks) one
                assert book.host is not None
                book.host.make_room(candidates)
                with book.cv:
                    if book.live >= book.max_pairs:
                        book.cv.wait(WAIT_S)
                continue
            self._form(gen, wanted)

    def _peer_ready(self) -> bool:
        """Whether this end may take a slot for the pair now: the Language end
        always; the Embedding end once the peer waits for this generation.
        State and generation are read unlocked: a stale read costs one look more."""
        follow = self.book.follow
        return follow is None or self.state is not LinkState.CLOSED or follow(self.peer, self.gen)

    def _form(self, gen: int, wanted: Callable[[], bool]) -> None:
        book = self.book
        t: TorchPairTransport | None = None
        err: BaseException | None = None
        try:
            t = book.make(self.peer, gen, lambda: (wanted() and self.broken is None
                                                   and not book.stopped))
        except Exception as e:  # the peer went away as the pair formed
            err = e
        with book.cv:
            if t is not None and self.broken is None:
                self.inner, self.state = t, LinkState.OPEN
                self.last_used = book.clock()
                book.stats.add(pairs_created=1)
            else:
                self.state = LinkState.BROKEN if self.broken else LinkState.CLOSED
            book._changed()
        if t is not None and self.inner is not t:  # aborted while it formed
            t.abort()
            book.destroy(t)
        if err is not None:
            raise PeerLost(f"the pair with rank {self.peer} was not formed: {err}",
                           peer=self.peer) from err
        if self.inner is t and t is not None and book.host is not None:
            book.host.pair_opened(self.peer)

    # ------------------------------------------------------------ closing

    def begin_close(self, gen: int | None = None) -> int | None:
        """Mark an open pair closing (of generation `gen`, if given): its
        generation, or None if it is not open (or of another generation)."""
        with self.book.cv:
            if self.state is not LinkState.OPEN or (gen is not None and gen != self.gen):
                return None
            self.state = LinkState.CLOSING
            return self.gen

    def cancel_close(self) -> None:
        """The PAIR_CLOSE could not be sent: the pair stays open."""
        with self.book.cv:
            if self.state is LinkState.CLOSING:
                self.state = LinkState.OPEN
            self.book._changed()

    def finish_close(self) -> None:
        """Destroy the closing group (no lock held but the device's); the next one
        is the next generation."""
        t = self.inner
        try:
            if t is not None:
                self.book.destroy(t)
        except Exception as e:  # a group broken meanwhile: gone all the same
            log.debug("closing the pair with rank %d: %s", self.peer, e)
        finally:
            with self.book.cv:
                self.inner = None
                self.gen += 1
                self.state = LinkState.BROKEN if self.broken else LinkState.CLOSED
                self.book.stats.add(pairs_closed=1)
                self.book._changed()
        if self.book.host is not None:
            self.book.host.pair_closed(self.peer)

    def drop(self) -> None:
        """Shutdown or departure: destroy the group, whatever its state."""
        with self.book.cv:
            t, self.inner = self.inner, None
            was_live = self.state in LIVE
            self.state = LinkState.BROKEN if self.broken else LinkState.CLOSED
            self.book._changed()
        if t is not None:
            try:
                self.book.destroy(t)
            except Exception as e:
                log.debug("destroying the pair with rank %d: %s", self.peer, e)
            if was_live:
                with self.book.cv:
                    self.book.stats.add(pairs_closed=1)
