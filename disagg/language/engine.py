"""Language side: the engine. It holds the lock and the room table, asks
`RecvMachine` what each event means, and executes the returned actions in
order: control messages to the Embedding ranks, blocks back to `Credits`,
frames owed to the pair's `PairReceiver`, final statuses to the caller.

Threads that call in: the caller (`receiver`, `init`, `resume`, `abort`,
`result`), the control thread (`on_message`, `on_tick`) and one receiver
thread per Embedding rank (`stream.PairReceiver`, which asks the machine what
each frame means under this engine's lock and calls `execute`, or
`pair_lost` when its stream breaks). What peers' losses and arrivals do to
rooms is the base class's, in `peers.py`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from ..config import DisaggConfig
from ..control import ControlPort
from ..errors import DisaggError, FailureCause
from ..geometry import Geometry
from ..items import ItemCache, geometry_of
from ..plan import scatter_stride
from ..pool import BlockPool
from ..recycle import Recycler
from ..stats import Stats
from ..topology import Topology
from ..transport import PairTransport
from ..types import EmbeddingResult, TransferStatus, check_room_id
from ..wire import Alloc, ControlMessage, Heartbeat, PairClose, PairDown, Reject, Resume
from . import timing
from .actions import (
    Action,
    AskResume,
    CountFailure,
    Disown,
    Owe,
    Post,
    Prepost,
    Publish,
    Release,
    Untrack,
)
from .credit import Credits
from .items_room import ItemRoom
from .landing import Job, destinations
from .machine import RecvMachine
from .peers import LanguagePeers
from .receiver import Receiver
from .room import RecvRoom, set_status
from .stream import PairReceiver

log = logging.getLogger(__name__)


class LanguageEngine(LanguagePeers):
    """All rooms of one Language rank. Built by `disagg.init`; use `receiver()`."""

    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 transports: dict[int, PairTransport], device: torch.device,
                 stats: Stats, control: ControlPort | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 peers: Iterable[int] | None = None) -> None:
        # peers: the Embedding ranks known at start (jobs mode: none; they join)
        super().__init__(cfg, rank, topology, geometry, device, stats, control, clock,
                         topology.embedding_ranks if peers is None else peers, log)
        self.pool = BlockPool(geometry, device, with_buffers=cfg.recv_into == "pool")
        self.credits = Credits(self.pool, stats, direct=cfg.recv_into == "output",
                               default_alloc_tokens=cfg.default_alloc_tokens)
        self.instance_size = topology.language_tp_size
        self.scatter = cfg.fanout == "scatter"
        instance = topology.instance_of(rank)
        assert instance is not None
        self.machine = RecvMachine(rank, self.instance_size, cfg.auto_resume,
                                   cfg.bootstrap_timeout, cfg.peer_timeout,
                                   slice_index=(rank - topology.instance_ranks(instance)[0]
                                                if self.scatter else None))
        self._transports = transports
        # jobs mode: whether an Embedding id this rank has not met yet is a member
        # of the deployment (its pair with this rank is then still forming)
        self.membership: Callable[[int], bool] | None = None
        # by (source, room): a room declared as items has a lane per source
        self.rooms: dict[tuple[int, int], RecvRoom] = {}
        self._pairs: dict[int, PairReceiver] = {}
        self.recycler = Recycler(geometry, device)
        # the TP instance's agreement is gone for good (a queue's LockstepError): why
        self.instance_lost: str | None = None
        # landed items kept by key for later rooms (DESIGN 0.3); None: off
        self.item_cache = ItemCache(cfg.item_cache_bytes) if cfg.item_cache_bytes else None
        self.item_lock = threading.Lock()
        self.item_shape = geometry_of({b.name: torch.empty((0, *b.per_token_shape),
                                                           dtype=b.dtype)
                                       for b in geometry.wire_buffers})
        stats.add_source(self._item_stats)
        stats.add(results_recycled=0, results_reused=0)
        stats.set_gauge("recycle_idle_bytes", 0)
        stats.add_source(self._live_by_peer)

    # ------------------------------------------------------------ public

    def receiver(self, room: int, src_rank: int) -> Receiver:
        check_room_id(room)
        self.check_source(src_rank)
        with self._lock:
            if self._closing:
                raise DisaggError("context is shut down", rank=self.rank)
            if self.room_live(room):
                raise ValueError(f"room {room} is still live on language rank {self.rank}; "
                                 f"room ids must be unique among live rooms")
            return Receiver(self, self.new_lane(room, src_rank))

    def room_live(self, room: int) -> bool:
        """Whether a room of this id is live here, from any source (lock held)."""
        return any(rm == room for _, rm in self.rooms)

    def check_source(self, src_rank: int) -> None:
        """`ValueError` unless `src_rank` is an Embedding rank this rank may use."""
        if isinstance(src_rank, bool) or not isinstance(src_rank, int) or (
                src_rank not in self.liveness.known
                and (self.membership is None or src_rank < 0)):
            alive = self.liveness.alive()
            raise ValueError(f"src_rank={src_rank!r} is not an embedding rank this rank knows "
                             f"(usable now: {alive[:16]}{' ...' if len(alive) > 16 else ''})")

    def untrack(self, r: RecvRoom) -> None:
        """Forget a room that never asked for anything (lock held)."""
        assert not r.alloc_sent
        if self.rooms.get((r.src_rank, r.room)) is r:
            del self.rooms[r.src_rank, r.room]
            self.stats.set_gauge("rooms_live", len(self.rooms))

    def tell(self, src: int, msg: Alloc) -> None:
        """An ALLOC that asks for nothing (every item of `src` is a hit): sent for
        `needed()` to answer; if it cannot be sent, nothing here waits on it."""
        self.reach(src)
        why = self._post(src, msg)
        if why is not None:
            log.info("language rank %d: could not tell embedding rank %d that room %d needs "
                     "nothing from it: %s", self.rank, src, msg.room, why)

    def _item_stats(self) -> dict[str, object]:
        c = self.item_cache
        if c is None:
            return {}
        with self.item_lock:
            return {"item_hits": c.hits, "item_misses": c.misses,
                    "item_bytes_reused": c.bytes_reused, "item_cache_bytes": c.bytes,
                    "item_evictions": c.evictions}

    def new_lane(self, room: int, src_rank: int) -> RecvRoom:
        """A room's state for its data from `src_rank` (lock held): the whole
        room, or one source's lane of a room declared as items."""
        now = self.clock()
        r = self.rooms[src_rank, room] = RecvRoom(room, src_rank, created=now,
                                                  last_progress=now)
        self.stats.set_gauge("rooms_live", len(self.rooms))
        self.need(src_rank, now)
        return r

    def output_rows(self, seq_len: int) -> int:
        """Rows of a room's result tensors: seq_len, or with fanout="scatter" the
        instance's slices end to end (T x ceil(seq_len / T)), so the all-gather
        lands every slice in place; the result is a view of the first seq_len."""
        if not self.scatter:
            return seq_len
        return scatter_stride(seq_len, self.instance_size) * self.instance_size

    def land_in(self, r: RecvRoom, rows: int) -> None:
        """Give room `r` its result tensors of `rows` rows (lock held): carved
        from a set a caller handed back when one fits, else new (`recycle.py`)."""
        bufs, reused = self.recycler.take(rows, r)
        r.buffers, r.outputs = bufs, bufs.views(rows)
        if reused:
            self.stats.add(results_reused=1)
            self.stats.set_gauge("recycle_idle_bytes", self.recycler.idle_bytes)

    def recycle(self, result: EmbeddingResult) -> None:
        """Take back a result the caller no longer needs, so later rooms land in
        its (already touched) memory. `ValueError` for anything but the very
        `EmbeddingResult` a room's `result()` (or `RoomQueue.step()`) returned on
        this rank, or one handed back already. The room's `result()` and
        `prefix()` raise from now on."""
        with self._lock:
            bufs = self.recycler.claim(result)
            room = bufs.owner() if bufs.owner is not None else None
            if isinstance(room, (RecvRoom, ItemRoom)):
                room.outputs = room.buffers = room.result = None
                room.handed_back = True
            if not self._closing:  # after shutdown nothing lands: let it go
                self.recycler.put(bufs)
            self.stats.add(results_recycled=1)
            self.stats.set_gauge("recycle_idle_bytes", self.recycler.idle_bytes)

    def first_alloc_tokens(self) -> int:
        """The first allocation of a room when the caller names none."""
        return self.credits.first_alloc_tokens()

    # ------------------------------------------------------------ allocation

    def ask_resume(self, r: RecvRoom, num_tokens: int | None, *, landed: int,
                    at_least: int = 1) -> bool:
        """Allocate for the rest after `landed` tokens (or `num_tokens` of it) and
        send RESUME keyed by `landed`. False: no blocks now."""
        assert r.total is not None
        remaining = r.total - landed
        c = self.credits.take(r.room, num_tokens or remaining, key=landed, remaining=remaining,
                              resume=True, at_least=at_least)
        if c is None:
            return False
        self.stats.add(resumes=1)
        self.execute(r, self.machine.resumed(r, c, prepost=self.can_prepost(r)))
        return True

    def can_prepost(self, r: RecvRoom) -> bool:
        """The next frame on `r`'s pair is sure to answer an allocation asked for
        now: nothing else is owed on it (lock held)."""
        pair = self.pair(r.src_rank)
        return pair.m.can_prepost(self._closing)

    # ------------------------------------------------------------ control thread

    def on_message(self, src: int, msg: ControlMessage) -> None:
        """A HEARTBEAT or REJECT from Embedding rank `src`."""
        if isinstance(msg, Heartbeat):
            self.liveness.heard(src, self.clock())
            if msg.bye:
                self._peer_bye(src, msg.frames)
            return
        if isinstance(msg, PairClose):  # before PairDown: it is one, on the wire
            if msg.ask:  # it would like the pair closed: if it is idle here too
                self.close_pair(src, asked=True)
            return
        if isinstance(msg, PairDown):
            self._peer_dead(src, f"it tore the pair down: {msg.reason}", told=True)
            return
        if not isinstance(msg, Reject):
            return
        with self._lock:
            r = self.rooms.get((src, msg.room))
            if r is None:
                return  # a room that already ended here
            self.execute(r, self.machine.reject(r, src, msg.reason))

    def on_bad_message(self, src: int | None, room: int | None, why: str) -> None:
        self._warn.warning("bad_message", "language rank %d: from embedding rank %s: %s",
                           self.rank, src, why)
        self.stats.failure(FailureCause.BAD_MESSAGE)

    def on_tick(self) -> None:
        now = self.clock()
        if not self._closing and self.liveness.heartbeat_due(now):
            self.unwatch_idle()
            for e in self.liveness.beat_targets():
                self._post(e, Heartbeat(self.rank))
        self.close_due(now)
        for e, why in self.liveness.expired(now):
            self._peer_dead(e, why)
        with self._lock:
            if self.progress.sweep_due(now):
                for r in list(self.rooms.values()):
                    self.execute(r, self.machine.tick(r, now, self.pair_note))

    # ------------------------------------------------------------ executing actions (locked)

    def execute(self, r: RecvRoom, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Post):
                why = self._post(r.src_rank, a.msg)
                if why is not None and isinstance(a.msg, (Alloc, Resume)):
                    self.execute(r, self.machine.post_failed(r, why))
            elif isinstance(a, Owe):
                self.pair(r.src_rank).expect()
            elif isinstance(a, Prepost):
                if r.outstanding is a.credit:  # else its ALLOC/RESUME could not be sent
                    self._prepost(r, a)
            elif isinstance(a, Disown):
                self.pair(r.src_rank).disown()
            elif isinstance(a, Release):
                self.credits.release(r.room, a.credit)
            elif isinstance(a, AskResume):
                self.ask_resume(r, None, landed=a.landed, at_least=a.at_least)
            elif isinstance(a, CountFailure):
                self.stats.failure(a.cause)
            elif isinstance(a, Untrack):
                if self.rooms.get((r.src_rank, r.room)) is r:
                    del self.rooms[r.src_rank, r.room]
                    self.stats.set_gauge("rooms_live", len(self.rooms))
            elif isinstance(a, Publish):
                if a.status is TransferStatus.SUCCESS:
                    timing.room_done(self.stats, self.rank, self.cfg.slow_room_s, r,
                                     self.clock())
                set_status(r, a.status)  # last: blocks and the room id are free
                if r.group is not None:
                    r.group.lane_ended(r)  # its room's other lanes may have to end too
                self.cond.notify_all()

    def _prepost(self, r: RecvRoom, a: Prepost) -> None:
        """Hand the pair's thread the recvs of the frame that answers `a.credit`."""
        if a.credit.direct and r.outputs is None:  # the declared length sizes the result
            # if it cannot be made, the frame lands in scratch (stream.destinations)
            with contextlib.suppress(RuntimeError, MemoryError):
                self.land_in(r, self.output_rows(r.declared_seq_len))
        plan, dsts = destinations(self.geometry, self.pool, r, a.credit, a.num_tokens,
                                  a.token_offset, self.device)
        self.stats.add(preposted=1)
        self.pair(r.src_rank).prepost(Job(r, a.credit, a.num_tokens, a.token_offset, plan, dsts,
                                          scratch=a.credit.direct and r.outputs is None))

    def post_claimed(self, src: int) -> None:
        """After the caller let go of the lock: post the recvs of a pre-posted
        frame that was handed to it (`PairReceiver.prepost`), if any."""
        pair = self._pairs.get(src)
        if pair is not None:
            pair.post_claimed()

    def stuck_peers(self) -> list[int]:
        """Embedding ranks whose receiver thread still waits after `close`."""
        return [src for src, p in self._pairs.items() if p.thread.is_alive()]

    def pair(self, src: int) -> PairReceiver:
        p = self._pairs.get(src)
        if p is None:
            p = self._pairs[src] = PairReceiver(self, src, self._transports[src], self.cond,
                                                 self._lock)
        return p

    def close(self, timeout_s: float) -> None:
        """Abort every live room ("shutdown"), wait (bounded) for the answers owed
        on each stream, then stop the receiver threads."""
        with self._lock:
            self._closing = True
            for r in list(self.rooms.values()):
                self.execute(r, self.machine.shutdown(r))
            pairs = list(self._pairs.values())
            for p in pairs:
                p.stop()
        deadline = time.monotonic() + timeout_s
        for p in pairs:
            p.thread.join(max(0.0, deadline - time.monotonic()))
            if p.thread.is_alive():  # blocked in a recv that cannot be cancelled
                log.error("language rank %d: receiver thread for embedding rank %d still "
                          "waits for %d frame(s) after %.1fs", self.rank, p.src, p.m.owed,
                          timeout_s)
            else:
                del self._pairs[p.src]
        self.recycler.clear()
        self.stats.set_gauge("recycle_idle_bytes", 0)
        # let go of the transports and so of their process groups (a thread still
        # blocked in a recv keeps its own until the pair's timeout ends it)
        self._transports.clear()
        for e in self.liveness.peers:  # after the owed frames: a clean goodbye
            self._post(e, Heartbeat(self.rank, bye=True))
