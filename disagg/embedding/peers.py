"""Embedding side: the Language ranks this rank serves, and what their
comings and goings do to rooms. A peer declared dead or whose stream broke
(every room it was part of, or whose instance it belongs to, fails; it is
told why unless it said goodbye or told us), a peer that joins or leaves in
jobs mode, and the health report. The base of `EmbeddingEngine`, which
executes the machine's answers."""

from __future__ import annotations

import collections
import logging
import time

from ..errors import PeerLost, ProtocolError
from ..pairs import LinkState
from ..shell import EngineShell
from ..transport import PairTransport
from ..wire import PairClose, PairDown
from .actions import Action
from .admission import Admission
from .lobby import Lobby, Refusal
from .machine import SendMachine
from .pair import SendPair
from .room import SendRoom
from .stream import SendStreams

log = logging.getLogger("disagg.embedding.engine")

CLOSE_DRAIN_S = 2.0  # a PAIR_CLOSE waits this long for the last send's completion
ASK_EVERY_S = 0.5  # a pair is asked to close at most this often


class EmbeddingPeers(EngineShell):
    """The peer half of `EmbeddingEngine`: its pairs' losses and arrivals."""

    machine: SendMachine
    admission: Admission
    lobby: Lobby
    _rooms: dict[int, SendRoom]
    _pairs: dict[int, SendPair]
    _streams: SendStreams
    _transports: dict[int, PairTransport]

    def execute(self, actions: list[Action]) -> None:
        raise NotImplementedError  # the engine's

    def flush(self) -> None:
        raise NotImplementedError  # the engine's

    def _refuse(self, refusals: list[Refusal]) -> None:
        raise NotImplementedError  # the engine's

    def lost_peers(self) -> set[int]:
        """Language ranks not usable now (their pair is lost)."""
        with self._lock:
            return set(self.liveness.dead)

    # ------------------------------------------------------------ pairs on demand

    def need(self, lang: int, now: float) -> None:
        """`lang` asked for a room (lock held): its pair is in use. Watched only
        while its pair is open (`pair_opened`): the Language rank heartbeats
        whenever it watches, which covers every moment this side does."""
        if self.links is not None:
            self.links.touch(lang)

    def pair_busy(self, lang: int) -> bool:
        """Whether the pair with `lang` carries anything: a frame queued or in
        flight, a room it has not received whole, an ALLOC of its waiting."""
        with self._lock:
            return (self._streams.busy(lang) or self.lobby.waiting_from(lang)
                    or any(lang in r.lanes and not r.lanes[lang].done
                           for r in self._rooms.values()))

    def make_room(self, candidates: list[int]) -> None:
        """At `max_pairs`: ask the least recently used idle pair's Language rank to
        close it (only it knows that nothing more is owed on it)."""
        for lang in candidates:
            if not self.pair_busy(lang) and self._ask_close(lang):
                return

    def _ask_close(self, lang: int) -> bool:
        """PAIR_CLOSE with FLAG_ASK, at most every ASK_EVERY_S per pair (the
        Language rank closes it when it idles there, if it was busy)."""
        assert self.links is not None
        link = self.links.links.get(lang)
        now = self.clock()
        if link is None or not link.is_open() or now - link.asked_at < ASK_EVERY_S:
            return False
        link.asked_at = now
        return self._post(lang, PairClose(self.rank, "idle", gen=link.gen, ask=True)) is None

    def peer_closed_pair(self, lang: int, gen: int) -> None:
        """`lang` closed its end of the pair's generation `gen`: this end goes too,
        once the last frame's send is done (its recv is, or the peer would not
        have closed). Before any later message of `lang`'s is read."""
        link = None if self.links is None else self.links.links.get(lang)
        deadline = self.clock() + CLOSE_DRAIN_S
        while link is not None and link.state is LinkState.FORMING and self.clock() < deadline:
            time.sleep(0.001)  # its peer's end is made already: this end's is a moment away
        if link is None or link.begin_close(gen) is None:
            log.debug("embedding rank %d: PAIR_CLOSE of generation %d from language rank %d "
                      "for a pair not open in it", self.rank, gen, lang)
            return
        deadline = self.clock() + CLOSE_DRAIN_S
        while self._streams.in_flight(lang) and self.clock() < deadline:
            time.sleep(0.001)
        if self._streams.in_flight(lang):
            link.cancel_close()
            with self._lock:
                self._pair_lost(lang, ProtocolError(
                    f"language rank {lang} closed the pair while a frame to it was still "
                    f"in flight after {CLOSE_DRAIN_S:g}s"))
            self.flush()
            return
        link.finish_close()

    def ask_idle(self, now: float) -> None:
        """Control thread: pairs idle for `pair_idle_s` here are asked to close."""
        if self.links is not None and not self._closing:
            for lang in self.links.idle(now):
                self._ask_close(lang)

    def add_peer(self, lang: int, transport: PairTransport, num_blocks: int) -> None:
        """Jobs mode: Language rank `lang` joined and its pair is made (its
        control messages must be allowed on the channel before it sends)."""
        with self._lock:
            self._transports[lang] = transport
            self.admission.peer_num_blocks[lang] = num_blocks
            self.liveness.add(lang, self.clock())

    def peer_gone(self, lang: int, why: str) -> None:
        """Jobs mode: Language rank `lang` left (its membership ended): as a lost peer."""
        with self._lock:
            self._pair_lost(lang, PeerLost(why, peer=lang))
            self._streams.retire(lang)  # ids are never reused: its thread and group go
        self.flush()

    def _pair_lost(self, lang: int, err: BaseException, *, clean: bool = False,
                   told: bool = False) -> None:
        """`lang` is gone or its stream broke: nothing is sent to it again, and every
        room it was part of, or whose instance it belongs to, fails. Unless it
        said goodbye (`clean`) or told us (`told`), it is told why, so both sides
        agree the pair is gone. Idempotent."""
        if not self.liveness.mark_dead(lang, str(err)):
            return
        self._pairs[lang].lost()
        if not clean:  # before any budget is returned or FAILED is said
            self._streams.abort(lang)
        if self.links is not None:  # its slot under max_pairs is free
            self.links.lose(lang, abort=not clean)
        if not self._closing:
            log.log(logging.INFO if clean else logging.WARNING,
                    "embedding rank %d: language rank %d is down: %s", self.rank, lang, err)
            if not clean and not told:
                self._post(lang, PairDown(self.rank, str(err)))
        why = f"embedding rank {self.rank}: language rank {lang} is down: {err}"
        for r in list(self._rooms.values()):
            self.execute(self.machine.peer_lost(r, lang, why, clean=clean))
        # Early ALLOCs go with it, and its instance's are refused, except in the
        # rooms it asked nothing of this rank for: its part of those is complete
        # (as a lane all sent, above), so they go on and end at their sender()
        instance = self.topology.instance_of(lang)
        complete = self.lobby.complete_from(lang)
        self.lobby.drop(lambda room, lr, g: lr == lang and room not in complete)
        self._refuse(self.lobby.drop(
            lambda room, lr, g: room not in complete and self.topology.instance_of(lr) == instance,
            f"language rank {lang} of this room's instance is down: {err}"))

    def health(self) -> dict[int, dict[str, object]]:
        """Per Language rank: see `EngineShell.health_report`; its live rooms are
        those it asked for and has not received whole."""
        with self._lock:
            return self.health_report(self._rooms_by_peer(), dict(self.liveness.dead))

    def _rooms_by_peer(self) -> collections.Counter[int]:
        """Live rooms per Language rank that asked for them and has not received
        them whole (-1: rooms no rank asked for yet). Lock held."""
        counts: collections.Counter[int] = collections.Counter()
        for r in self._rooms.values():
            counts.update([lang for lang, p in r.lanes.items() if not p.done] or [-1])
        return counts

    def _live_by_peer(self) -> dict[str, object]:
        with self._lock:
            return {"rooms_live_by_peer": dict(self._rooms_by_peer())}
