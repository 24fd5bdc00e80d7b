"""Language side: the Embedding ranks this rank hears from, and what their
comings and goings do to rooms. A stream that breaks, a peer declared dead
(heartbeats stopped, a PAIR_DOWN, a membership that ended), a clean goodbye
(the frames already sent are read first), a peer that joins (jobs mode), and
the health report. Every room it touches is asked of `RecvMachine.peer_lost`
and the actions executed by the engine (`LanguageEngine`, which is one)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from ..errors import PeerLost
from ..pairs import LinkState
from ..shell import EngineShell
from ..transport import PairTransport
from ..wire import PairClose, PairDown
from .actions import Action
from .landing import ReadingPair
from .machine import RecvMachine
from .room import RecvRoom
from .stream import PairReceiver

log = logging.getLogger("disagg.language.engine")


class LanguagePeers(EngineShell):
    """The peer half of `LanguageEngine`: its pairs' losses and arrivals."""

    rooms: dict[tuple[int, int], RecvRoom]
    machine: RecvMachine
    _pairs: dict[int, PairReceiver]
    _transports: dict[int, PairTransport]

    def execute(self, r: RecvRoom, actions: list[Action]) -> None:
        raise NotImplementedError  # the engine's

    def pair_lost(self, pair: ReadingPair, err: BaseException, *, from_thread: bool = True,
                  clean: bool = False, tell: bool = True) -> None:
        """The stream from `pair.src` is unusable: no recv is posted on it again,
        its rooms fail (`RecvMachine.peer_lost`), and (`tell`) the Embedding rank
        is told why, so it tears the pair down too."""
        why = f"stream from embedding rank {pair.src} lost: {err}"
        with self._lock:
            first = pair.lose(str(err))
            if first and not clean:
                # before any block under a posted recv is reused or FAILED is said
                pair.transport.abort()
            if first and self.links is not None:  # its slot under max_pairs is free
                self.links.lose(pair.src, abort=not clean)
            if first and not self._closing and not clean:
                log.error("language rank %d: %s", self.rank, why)
                if tell:
                    self._post(pair.src, PairDown(self.rank, why))
            self._fail_rooms_from(pair.src, why, release_landing=from_thread, clean=clean)

    def _fail_rooms_from(self, src: int, why: str, *, release_landing: bool,
                         clean: bool = False) -> None:
        for r in list(self.rooms.values()):
            if r.src_rank == src:
                self.execute(r, self.machine.peer_lost(r, why, release_landing=release_landing,
                                                       clean=clean))

    def _peer_dead(self, src: int, why: str, *, clean: bool = False,
                   told: bool = False) -> None:
        """Embedding rank `src` is gone: heartbeats stopped, it said BYE (`clean`),
        or it tore the pair down itself (`told`). Unless told, it is told."""
        with self._lock:
            if not self.liveness.mark_dead(src, why):
                return
            if not self._closing:
                log.log(logging.INFO if clean else logging.WARNING,
                        "language rank %d: embedding rank %d is down: %s", self.rank, src, why)
            pair = self._pairs.get(src)
            if pair is not None:
                self.pair_lost(pair, PeerLost(why, peer=src), from_thread=False, clean=clean,
                               tell=not told)
                return
            if not clean and not told and not self._closing:
                self._post(src, PairDown(self.rank, why))
            if self.links is not None:  # made (warm) but never read from: its slot
                self.links.lose(src, abort=not clean)
            self._fail_rooms_from(src, f"embedding rank {src} is down: {why}",
                                  release_landing=False, clean=clean)

    def _peer_bye(self, src: int, frames: int) -> None:
        """Embedding rank `src` shut down cleanly after putting `frames` frames on
        the pair's stream. Those already sent are read first (a room whose last
        chunk is among them succeeded on both sides); the pair's thread gives
        the pair up after the last of them."""
        with self._lock:
            pair = self._pairs.get(src)
            if (pair is not None and pair.m.bye(frames)
                    and self.liveness.mark_dead(src, "it shut down")):
                return
        self._peer_dead(src, "it shut down", clean=True)

    def lost_peers(self) -> set[int]:
        """Embedding ranks not usable now: declared dead, or their stream lost."""
        with self._lock:
            return set(self._lost())

    def _lost(self) -> dict[int, str]:
        """Embedding rank -> why it is not usable (lock held)."""
        return {e: why for e in self.liveness.peers
                if (why := self.liveness.dead.get(e) or self.stream_lost(e)) is not None}

    def stream_lost(self, src: int) -> str | None:
        """Why the stream from Embedding rank `src` is unusable, or None (lock held)."""
        pair = self._pairs.get(src)
        return None if pair is None else pair.m.dead

    # ------------------------------------------------------------ pairs on demand

    # jobs mode: connects the control socket to a peer the first time it is used
    connect: Callable[[int], None] | None = None

    def need(self, src: int, now: float) -> None:
        """A room wants data from `src` (lock held): its pair is in use, watched,
        and reachable (links.py)."""
        if self.links is None:
            return
        self.links.touch(src)
        self.liveness.activate(src, now)
        self.reach(src)

    def reach(self, src: int) -> None:
        """The control socket to `src` is connected (jobs mode connects on first use)."""
        if self.connect is not None:
            self.connect(src)

    def pair_note(self, src: int) -> str:
        """Why the pair with `src` is not open, for a timeout's reason."""
        return "" if self.links is None else self.links.why_not_open(src)

    def unwatch_idle(self) -> None:
        """Peers watched for a room that ended before their pair opened (a REJECT,
        a cancel): no longer watched once nothing wants them."""
        if self.links is None:
            return
        with self._lock:
            for src in list(self.liveness.active):
                link = self.links.links.get(src)
                if (link is not None and link.state is LinkState.CLOSED
                        and not self.pair_busy(src)):
                    self.liveness.deactivate(src)

    def pair_busy(self, src: int) -> bool:
        """Whether the pair with `src` carries anything: a live room from it, a
        frame owed or posted ahead. An idle pair may be closed."""
        with self._lock:
            if any(s == src for s, _ in self.rooms):
                return True
            pair = self._pairs.get(src)
            return pair is not None and (pair.m.owed > 0 or pair.job is not None
                                         or pair.next_meta is not None)

    def close_pair(self, src: int, *, asked: bool = False) -> bool:
        """Close the pair with `src` if it is idle here: PAIR_CLOSE first (it
        reaches the peer before any later ALLOC), then this end's group, off the
        engine lock. Whether it was closed. `asked`: the peer asked for it (it is
        at its cap); a busy pair is then closed as soon as it idles."""
        assert self.links is not None
        with self._lock:
            link = self.links.links.get(src)
            if self._closing or link is None:
                return False
            if self.pair_busy(src):
                link.close_asked = asked  # then closed as soon as it idles (`close_due`)
                return False
            link.close_asked = False
            gen = link.begin_close()
            if gen is None:
                return False
            if self._post(src, PairClose(self.rank, "idle", gen=gen)) is not None:
                link.cancel_close()
                return False
        link.finish_close()
        return True

    def close_due(self, now: float) -> None:
        """Control thread: close the pairs idle for `pair_idle_s`, and those their
        peer asked to close that are idle at last (each once)."""
        if self.links is None or self._closing:
            return
        asked = {p for p, k in list(self.links.links.items()) if k.close_asked}
        for src in dict.fromkeys([*self.links.idle(now), *asked]):
            self.close_pair(src, asked=src in asked)

    def make_room(self, candidates: list[int]) -> None:
        """At `max_pairs`: close the least recently used idle pair."""
        for src in candidates:
            if self.close_pair(src):
                return

    def add_peer(self, src: int, transport: PairTransport) -> None:
        """Jobs mode: Embedding rank `src` joined and its pair is made (its
        DEALER must be connected before a room names it)."""
        with self._lock:
            self._transports[src] = transport
            self.liveness.add(src, self.clock())

    def peer_gone(self, src: int, why: str) -> None:
        """Jobs mode: Embedding rank `src` left (its membership ended): its rooms
        fail (PEER_LOST), and so does any room addressed to it from now on."""
        self._peer_dead(src, why)
        with self._lock:  # ids are never reused: its group goes once its thread is done
            self._transports.pop(src, None)

    def health(self) -> dict[int, dict[str, object]]:
        """Per Embedding rank: see `EngineShell.health_report`. After shutdown, a
        receiver thread still blocked in a recv that cannot be cancelled (a
        frozen peer) is reported; it ends at the pair's transport timeout."""
        with self._lock:
            out = self.health_report(self._rooms_by_peer(), self._lost())
            for e, pair in self._pairs.items():
                if self._closing and pair.thread.is_alive():
                    out[e]["receiver"] = ("blocked in a recv until the pair's transport "
                                          "timeout (a daemon thread)")
            return out

    def _rooms_by_peer(self) -> collections.Counter[int]:
        """Live rooms per Embedding rank (lock held)."""
        return collections.Counter(r.src_rank for r in self.rooms.values())

    def _live_by_peer(self) -> dict[str, object]:
        with self._lock:
            return {"rooms_live_by_peer": dict(self._rooms_by_peer())}

    # ------------------------------------------------------------ shutdown
