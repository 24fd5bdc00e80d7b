"""Embedding side: the Language ranks this rank serves, and what their
comings and goings do to rooms. A peer declared dead or whose stream broke
(every room it was part of, or whose instance it belongs to, fails; it is
told why unless it said goodbye or told us), a peer that joins or leaves in
jobs mode, and the health report. The base of `EmbeddingEngine`, which
executes the machine's answers."""

from __future__ import annotations

import collections
import logging

from ..errors import PeerLost
from ..shell import EngineShell
from ..transport import PairTransport
from ..wire import PairDown
from .actions import Action
from .admission import Admission
from .lobby import Lobby, Refusal
from .machine import SendMachine
from .pair import SendPair
from .room import SendRoom
from .stream import SendStreams

log = logging.getLogger("disagg.embedding.engine")


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
        if not self._closing:
            log.log(logging.INFO if clean else logging.WARNING,
                    "embedding rank %d: language rank %d is down: %s", self.rank, lang, err)
            if not clean and not told:
                self._post(lang, PairDown(self.rank, str(err)))
        why = f"embedding rank {self.rank}: language rank {lang} is down: {err}"
        for r in list(self._rooms.values()):
            self.execute(self.machine.peer_lost(r, lang, why, clean=clean))
        instance = self.topology.instance_of(lang)
        self.lobby.drop(lambda room, lr, g: lr == lang)
        self._refuse(self.lobby.drop(
            lambda room, lr, g: self.topology.instance_of(lr) == instance,
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
