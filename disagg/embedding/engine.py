"""Embedding side: the engine. It holds the lock and the tables (live rooms, the
lobby, liveness), asks `SendMachine` what each event means, and executes the
returned actions in order: frames go to `SendStreams`, control messages to the
channel, the budget back to its allocator, statuses to the caller.

Threads that call in: the caller (`sender`, `send`, `abort`), the control
thread (`on_message`, `on_bad_message`, `on_tick`) and each pair's send thread
(frame completions). Every frame scheduled under the lock is posted right after
the lock is released, by the thread that scheduled it (`flush`). What peers'
losses and arrivals do to rooms is the base class's, in `peers.py`.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterable

import torch

from ..config import DisaggConfig
from ..control import ControlPort
from ..errors import DisaggError, Failure, FailureCause, PeerLost
from ..geometry import Geometry
from ..pool import BlockAllocator
from ..stats import Stats
from ..topology import Topology
from ..transport import PairTransport
from ..types import TransferStatus, check_room_id
from ..wire import Abort, Alloc, ControlMessage, Heartbeat, PairClose, PairDown, Reject, Resume
from .actions import (
    Action,
    Count,
    CountFailure,
    DropPair,
    End,
    Preposted,
    SendAbortFrame,
    SendData,
    SendDefer,
    SendReject,
)
from .admission import Admission
from .lobby import Lobby, Refusal
from .machine import SendMachine
from .pair import SendPair
from .peers import EmbeddingPeers
from .room import Lane, SendRoom, set_status
from .sender import Sender
from .stream import Frame, SendStreams, abort_frame, data_frame, defer_frame, filler

log = logging.getLogger(__name__)


class EmbeddingEngine(EmbeddingPeers):
    """All rooms of one Embedding rank. Built by `disagg.init`; use `sender(room)`."""

    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 peer_num_blocks: dict[int, int], transports: dict[int, PairTransport],
                 device: torch.device, stats: Stats, control: ControlPort | None = None,
                 *, clock: Callable[[], float] = time.monotonic,
                 peers: Iterable[int] | None = None) -> None:
        # peers: the Language ranks known at start (jobs mode: none; they join)
        super().__init__(cfg, rank, topology, geometry, device, stats, control, clock,
                         topology.language_ranks if peers is None else peers, log)
        self.budget = BlockAllocator(geometry.num_blocks)
        self.machine = SendMachine(rank, geometry, topology, cfg.bootstrap_timeout)
        self._transports = transports
        self._streams = SendStreams(rank, transports, device)
        # per Language rank: its stream's state beyond the lanes (`pair.SendPair`:
        # the pre-posted answer that waits; any other room's frame DEFERs it first)
        self._pairs: dict[int, SendPair] = collections.defaultdict(SendPair)
        self._rooms: dict[int, SendRoom] = {}
        self.lobby = Lobby(cfg.bootstrap_timeout, topology.instance_of)
        self.admission = Admission(self.machine, self.lobby, geometry, topology, peer_num_blocks)
        stats.add_source(self._live_by_peer)

    # ------------------------------------------------------------ public

    def sender(self, room: int) -> Sender:
        check_room_id(room)
        with self._lock:
            if self._closing:
                raise DisaggError("context is shut down", rank=self.rank)
            if room in self._rooms:
                raise ValueError(f"room {room} is still live on embedding rank {self.rank}; "
                                 f"room ids must be unique among live rooms")
            now = self.clock()
            r = SendRoom(room, last_progress=now)
            claimed = self.lobby.claim(room, now)
            if claimed.early_abort is not None:
                r.failure = Failure(claimed.early_abort, FailureCause.ABORT, self.rank)
                r.ended = True
                set_status(r, TransferStatus.FAILED)
                self.stats.failure(FailureCause.ABORT)
                self._refuse(claimed.refused)  # ALLOCs that raced the abort: answered
            else:
                self._rooms[room] = r
                r.instance_size = claimed.instance_size
                self.stats.set_gauge("rooms_live", len(self._rooms))
                self.execute(self.machine.claimed(r, claimed.grants, now))
        self.flush()
        return Sender(self, r)

    # ------------------------------------------------------------ control thread

    def on_message(self, peer: int, msg: ControlMessage) -> None:
        """One authenticated message; frames it scheduled leave at once."""
        if isinstance(msg, Heartbeat):
            self.liveness.heard(peer, self.clock())
            if msg.bye:
                with self._lock:
                    self._pair_lost(peer, PeerLost("it shut down", peer=peer), clean=True)
            elif not self._closing:
                self._post(peer, Heartbeat(self.rank))
            return
        if isinstance(msg, PairClose):  # before PairDown: it is one, on the wire
            if not msg.ask:
                self.peer_closed_pair(peer, msg.gen)
            return
        if isinstance(msg, PairDown):
            with self._lock:
                self._pair_lost(peer, PeerLost(f"it tore the pair down: {msg.reason}",
                                               peer=peer), told=True)
            self.flush()
            return
        if not isinstance(msg, (Alloc, Resume, Abort)):
            return  # the channel lets only these through
        with self._lock:
            r, now = self._rooms.get(msg.room), self.clock()
            if isinstance(msg, Alloc):
                self.need(peer, now)
                self.execute(self.admission.alloc(r, msg, now))
                if r is not None:
                    self.cond.notify_all()  # needed() may have its answer
            elif isinstance(msg, Resume):
                self.execute(self.admission.resume(r, msg, now))
            else:
                self.execute(self.admission.abort(r, msg, now))
        self.flush()

    def on_bad_message(self, peer: int | None, room: int | None, why: str) -> None:
        """A message the channel could not accept. A room it names fails here
        too (its pending grants are answered), or the peer learns by REJECT."""
        if peer is None:
            self.stats.failure(FailureCause.BAD_PEER)
            self._warn.warning("bad_peer", "embedding rank %d: %s dropped", self.rank, why)
            return
        self.stats.failure(FailureCause.BAD_MESSAGE)
        self._warn.warning("bad_message", "embedding rank %d: from language rank %d: %s",
                           self.rank, peer, why)
        if room is None:
            return
        reason = f"embedding rank {self.rank}: bad message from language rank {peer}: {why}"
        with self._lock:
            self.execute(self.admission.bad_message(self._rooms.get(room), peer, room, reason))
        self.flush()

    def on_tick(self) -> None:
        """Control thread, every poll interval: liveness and bootstrap timeouts."""
        now = self.clock()
        with self._lock:
            for lang, why in self.liveness.expired(now):
                self._pair_lost(lang, PeerLost(why, peer=lang))
            if self.progress.sweep_due(now):
                self._refuse(self.lobby.expired(now))
                for r in list(self._rooms.values()):
                    self.execute(self.machine.tick(r, now))
        self.ask_idle(now)
        self.flush()  # ABORT frames for the rooms that timed out

    # ------------------------------------------------------------ executing actions (locked)

    def execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendData):
                self._submit(a.lane.lang_rank, data_frame(
                    a.meta, a.parts, a.plan,
                    functools.partial(self._frame_done, a.room, a.lane, True, a.nbytes)))
            elif isinstance(a, SendAbortFrame):
                done: Callable[[BaseException | None], None] = _ignore
                if a.lane is not None and a.owner is not None:
                    done = functools.partial(self._frame_done, a.owner, a.lane, False, 0)
                pad = None if a.pad is None else filler(self.geometry, a.pad, self.device)
                self._submit(a.lang_rank, abort_frame(a.room, a.reason, self.device, done, pad))
            elif isinstance(a, SendDefer):
                self.stats.add(deferred=1)
                self._submit(a.lang_rank, defer_frame(
                    a.room, filler(self.geometry, a.grant, self.device), _ignore))
            elif isinstance(a, Preposted):
                self._pairs[a.lang_rank].posted(a.room, a.grant)
            elif isinstance(a, DropPair):
                self._pair_lost(a.lang_rank, PeerLost(a.reason, peer=a.lang_rank))
            elif isinstance(a, SendReject):
                self._reject(a.lang_rank, a.room, a.reason)
            elif isinstance(a, CountFailure):
                self.stats.failure(a.cause)
            elif isinstance(a, Count):
                self.stats.add(bytes_sent=a.bytes_sent, chunks=a.chunks, resumes=a.resumes)
            elif isinstance(a, End):
                self._end(a)

    def _submit(self, lang: int, frame: Frame) -> None:
        waiting = self._pairs[lang].before_frame(frame.meta.room)
        if waiting is not None:
            # `lang` posted the recvs of another room's answer, which is not ready:
            # fill them, so this frame goes now; that answer comes later, ordinary
            room, grant = waiting
            self.stats.add(deferred=1)
            self._submit(lang, defer_frame(room, filler(self.geometry, grant, self.device),
                                           _ignore))
        if self._closing:  # the streams are closing: the peer learns from their end
            frame.done(DisaggError(f"embedding rank {self.rank} is shut down"))
            return
        dead = self.liveness.dead.get(lang)
        if dead is not None:
            frame.done(PeerLost(f"language rank {lang} is down: {dead}", rank=self.rank,
                                peer=lang))
            return
        self._streams.submit(lang, frame)

    def _frame_done(self, r: SendRoom, lane: Lane, data: bool, nbytes: int,
                    err: BaseException | None) -> None:
        """A pair's send thread (or `_submit` on a dead pair): a frame completed."""
        with self._lock:
            if err is not None:
                self._pair_lost(lane.lang_rank, err)
            self.execute(self.machine.frame_done(
                r, lane, data=data, nbytes=nbytes, err=err,
                lane_down=self.liveness.dead.get(lane.lang_rank), now=self.clock()))
            if r.ended:  # a frame to a peer declared dead, back after the room ended
                self._return_budget(r)

    def _end(self, a: End) -> None:
        r = a.room
        self._return_budget(r)
        r.sources, r.parts = None, []  # drop the caller's tensors (frames keep their own)
        if self._rooms.get(r.room) is r:
            del self._rooms[r.room]
            self.lobby.bury(r.room, a.outcome, set(r.lanes))
        self.stats.set_gauge("rooms_live", len(self._rooms))
        self.stats.set_gauge("pool_free_blocks", self.budget.num_free)
        if a.send_total_s is not None:
            self.stats.observe("send_total_s", a.send_total_s)
        if a.status is TransferStatus.SUCCESS:  # every lane's payload: T x the room's for
            self.stats.observe_bytes("sent", r.bytes_sent)  # fanout="copy", 1 x for "scatter"
        set_status(r, a.status)  # last: the id and the budget are free
        self.cond.notify_all()

    def _return_budget(self, r: SendRoom) -> None:
        """An ended room's budget, once no frame of it is in flight (a lane given
        up for a dead peer may still have one until the transport returns it)."""
        if r.budget and not any(lane.in_flight for lane in r.lanes.values()):
            self.budget.free(r.budget, owner=r.room)
            r.budget = []
            self.stats.set_gauge("pool_free_blocks", self.budget.num_free)

    def _refuse(self, refusals: list[Refusal]) -> None:
        self.execute(self.admission.refusals(refusals))

    def _reject(self, lang_rank: int, room: int, reason: str) -> None:
        if not self._closing:
            self._post(lang_rank, Reject(room, -1, reason))

    def stuck_peers(self) -> list[int]:
        """Language ranks whose pair thread still runs after `close`."""
        return self._streams.alive()

    def flush(self) -> None:
        """Post the frames scheduled so far, without the engine lock."""
        self._streams.flush()

    # ------------------------------------------------------------ shutdown

    def close(self, timeout_s: float) -> None:
        """Fail every live room ("shutdown"), flush ABORT frames, stop threads."""
        with self._lock:
            for r in list(self._rooms.values()):
                self.execute(self.machine.shutdown(r))
            self._refuse(self.lobby.drop(lambda room, lang, g: True, "shut down"))
            self._closing = True
        self._streams.stop(timeout_s)
        for lang in self.liveness.peers:  # after the last frames: a clean goodbye
            self._post(lang, Heartbeat(self.rank, bye=True,
                                       frames=self._streams.frames_posted(lang)))


def _ignore(err: BaseException | None) -> None:
    pass
