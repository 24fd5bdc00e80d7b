"""Language side: the engine. It holds the lock and the room table, asks
`RecvMachine` what each event means, and executes the returned actions in
order: control messages to the Embedding ranks, blocks back to `Credits`,
frames owed to the pair's `PairReceiver`, final statuses to the caller.

Threads that call in: the caller (`receiver`, `init`, `resume`, `abort`,
`result`), the control thread (`on_message`, `on_tick`) and one receiver
thread per Embedding rank (`on_frame`, `on_landed`, `on_abort_frame`,
`pair_lost`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import torch

from ..config import DisaggConfig
from ..control import ControlPort, RateLimitedLog
from ..errors import DisaggError, FailureCause, PeerLost, StreamBroken
from ..geometry import Geometry
from ..liveness import Liveness
from ..pool import BlockPool
from ..results import make_outputs, to_result
from ..stats import Stats
from ..topology import Topology
from ..transport import PairTransport
from ..types import EmbeddingResult, TransferStatus, check_room_id
from ..wire import Abort, Alloc, ControlMessage, Heartbeat, Meta, Reject, Resume
from .credit import Credits
from .machine import (
    Action,
    AskResume,
    Chunk,
    CountFailure,
    Owe,
    Post,
    Publish,
    RecvMachine,
    RecvRoom,
    Release,
    Untrack,
    needs_resume,
    set_status,
)
from .receiver import Receiver, check_tokens
from .stream import Landing, PairReceiver, destinations

log = logging.getLogger(__name__)


class LanguageEngine:
    """All rooms of one Language rank. Built by `disagg.init`; use `receiver()`."""

    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 transports: dict[int, PairTransport], device: torch.device,
                 stats: Stats, control: ControlPort | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.rank = rank
        self.topology = topology
        self.geometry = geometry
        self.device = device
        self.stats = stats
        self.control = control
        self._clock = clock
        self.pool = BlockPool(geometry, device, with_buffers=cfg.recv_into == "pool")
        self.credits = Credits(self.pool, stats, direct=cfg.recv_into == "output",
                               default_alloc_tokens=cfg.default_alloc_tokens)
        self.instance_size = topology.language_tp_size
        self.machine = RecvMachine(rank, self.instance_size, cfg.auto_resume,
                                   cfg.bootstrap_timeout, cfg.peer_timeout)
        self._transports = transports
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # some room may need the caller
        self._rooms: dict[int, RecvRoom] = {}
        self._pairs: dict[int, PairReceiver] = {}
        self.liveness = Liveness(topology.embedding_ranks, cfg.peer_timeout, clock())
        self._warn = RateLimitedLog(log)
        self._closing = False
        stats.add_source(self._live_by_peer)

    # ------------------------------------------------------------ public

    def holds_lock(self) -> bool:
        """Whether the calling thread holds the engine lock (tests check that no
        transport call is made under it)."""
        return self._lock._is_owned()  # type: ignore[attr-defined]

    def receiver(self, room: int, src_rank: int) -> Receiver:
        check_room_id(room)
        if src_rank not in self.topology.embedding_ranks:
            raise ValueError(f"src_rank={src_rank!r} is not an embedding rank (embedding "
                             f"ranks are {list(self.topology.embedding_ranks)})")
        with self._lock:
            if self._closing:
                raise DisaggError("context is shut down", rank=self.rank)
            if room in self._rooms:
                raise ValueError(f"room {room} is still live on language rank {self.rank}; "
                                 f"room ids must be unique among live rooms")
            now = self._clock()
            r = self._rooms[room] = RecvRoom(room, src_rank, created=now, last_progress=now)
            self.stats.set_gauge("rooms_live", len(self._rooms))
        return Receiver(self, r)

    def first_alloc_tokens(self) -> int:
        """The first allocation of a room when the caller names none."""
        return self.credits.first_alloc_tokens()

    # ------------------------------------------------------------ Receiver calls

    def _init(self, r: RecvRoom, num_tokens: int | None) -> bool:
        check_tokens("init", num_tokens)
        want = num_tokens if num_tokens is not None else self.first_alloc_tokens()
        with self._lock:
            if r.failure is not None:
                return False
            if r.alloc_sent:
                return True
            down = self.liveness.dead.get(r.src_rank) or self._pair(r.src_rank).dead
            if down is not None:
                self._execute(r, self.machine.fail(
                    r, f"language rank {self.rank}: embedding rank {r.src_rank} is down: "
                       f"{down}", FailureCause.PEER_LOST))
                return False
            c = self.credits.take(r.room, want, key=0, remaining=None, resume=False,
                                  reserve=sum(1 for x in self._rooms.values()
                                              if x is not r and needs_resume(x)))
            if c is None:
                return False
            auto = num_tokens is None and self.cfg.default_alloc_tokens == "auto"
            self._execute(r, self.machine.asked(r, c, self._clock(), auto=auto))
            return True

    def _resume(self, r: RecvRoom, num_tokens: int | None) -> bool:
        check_tokens("resume", num_tokens)
        with self._lock:
            if r.failure is not None:
                return False
            if not needs_resume(r):
                return True  # nothing to do this round: in flight, done, or a repeat
            return self._ask_resume(r, num_tokens, landed=r.received)

    def _ask_resume(self, r: RecvRoom, num_tokens: int | None, *, landed: int,
                    at_least: int = 1) -> bool:
        """Allocate for the rest after `landed` tokens (or `num_tokens` of it) and
        send RESUME keyed by `landed`. False: no blocks now."""
        assert r.seq_len is not None
        remaining = r.seq_len - landed
        c = self.credits.take(r.room, num_tokens or remaining, key=landed, remaining=remaining,
                              resume=True, at_least=at_least)
        if c is None:
            return False
        self.stats.add(resumes=1)
        self._execute(r, self.machine.resumed(r, c))
        return True

    def _abort(self, r: RecvRoom, reason: str) -> None:
        with self._lock:
            self._execute(r, self.machine.abort(r, reason))

    def _needs_resume(self, r: RecvRoom) -> bool:
        with self._lock:
            return needs_resume(r)

    def _wait(self, r: RecvRoom, timeout_s: float | None) -> TransferStatus:
        bound = (self.cfg.bootstrap_timeout + self.cfg.peer_timeout
                 if timeout_s is None else timeout_s)
        done = (TransferStatus.SUCCESS, TransferStatus.FAILED)
        with self._changed:
            self._changed.wait_for(lambda: r.status in done or needs_resume(r), bound)
        return r.status

    def _result(self, r: RecvRoom) -> EmbeddingResult:
        with self._lock:
            if r.status != TransferStatus.SUCCESS:
                raise DisaggError(f"room {r.room} has no result: status {r.status.name}"
                                  + (f" ({r.failure})" if r.failure else ""),
                                  rank=self.rank, room=r.room)
            out = r.outputs
            assert out is not None
        return to_result(self.geometry, out, r.aux)

    # ------------------------------------------------------------ receiver threads

    def _owed_room(self, pair: PairReceiver, meta: Meta) -> RecvRoom:
        if pair.dead is not None:  # declared dead meanwhile: read nothing more from it
            raise StreamBroken(f"stream from embedding rank {pair.src} already torn down")
        r = self._rooms.get(meta.room)
        self.machine.owed(r, pair.src, meta)
        assert r is not None
        return r

    def on_abort_frame(self, pair: PairReceiver, meta: Meta, reason: str) -> None:
        with self._lock:
            r = self._owed_room(pair, meta)
            pair.owed -= 1
            self._execute(r, self.machine.abort_frame(r, reason, pair.src))

    def on_frame(self, pair: PairReceiver, meta: Meta) -> Landing:
        """A DATA meta: check it (a bad one raises `StreamBroken` before anything
        changes, so the room still holds its blocks), then say where it lands."""
        with self._lock:
            r = self._owed_room(pair, meta)
            a = r.outstanding
            assert a is not None
            chunk = self.machine.check_meta(r, a, meta)
            pair.owed -= 1
            now = r.last_progress = self._clock()
            if meta.first:
                self.credits.learn(meta.seq_len)
                try:
                    r.outputs = make_outputs(self.geometry, meta.seq_len, self.device)
                except (RuntimeError, MemoryError) as e:
                    chunk = Chunk(chunk.num_tokens, chunk.token_offset, chunk.last,
                                  f"language rank {self.rank}: cannot allocate output: {e}")
            if r.first_byte_at is None:
                r.first_byte_at = now
                self.stats.observe("alloc_to_first_byte_s", now - (r.alloc_at or r.created))
                self.credits.account_auto(r.auto_first_blocks, meta.seq_len)
            elif r.partial_at is not None:
                self.stats.observe("resume_gap_s", now - r.partial_at)
                r.partial_at = None
            plan, dsts = destinations(self.geometry, self.pool, r, a, chunk.num_tokens,
                                      chunk.token_offset, self.device)
            self._execute(r, self.machine.landing(r, a, meta, chunk))
            return Landing(r, chunk, plan, dsts, not a.direct, pair.owed > 0)

    def on_landed(self, pair: PairReceiver, landing: Landing, seconds: float) -> None:
        with self._lock:
            self.stats.observe("chunk_transfer_s", seconds)
            self.stats.add(bytes_received=landing.chunk.num_tokens * self.geometry.token_nbytes,
                           chunks=1)
            r = landing.room
            self._execute(r, self.machine.landed(r, landing.chunk, pair.dead, self._clock()))
            self._changed.notify_all()

    def pair_lost(self, pair: PairReceiver, err: BaseException, *, from_thread: bool = True,
                  clean: bool = False) -> None:
        """The stream from `pair.src` is unusable: no recv is posted on it again,
        and its rooms fail (`RecvMachine.peer_lost`)."""
        with self._lock:
            if pair.dead is None:
                pair.dead = str(err)
                if not self._closing and not clean:
                    log.error("language rank %d: stream from embedding rank %d lost: %s",
                              self.rank, pair.src, err)
            pair.owed = 0
            pair.cv.notify_all()
            self._fail_rooms_from(pair.src, f"stream from embedding rank {pair.src} lost: "
                                            f"{err}", release_landing=from_thread)

    def _fail_rooms_from(self, src: int, why: str, *, release_landing: bool) -> None:
        for r in list(self._rooms.values()):
            if r.src_rank == src:
                self._execute(r, self.machine.peer_lost(r, why, release_landing=release_landing))

    def _peer_dead(self, src: int, why: str, *, clean: bool = False) -> None:
        """Embedding rank `src` is gone: heartbeats stopped, or (`clean`) it said BYE."""
        with self._lock:
            if not self.liveness.mark_dead(src, why):
                return
            if not self._closing:
                log.log(logging.INFO if clean else logging.WARNING,
                        "language rank %d: embedding rank %d is down: %s", self.rank, src, why)
            pair = self._pairs.get(src)
            if pair is not None:
                self.pair_lost(pair, PeerLost(why, peer=src), from_thread=False, clean=clean)
            else:
                self._fail_rooms_from(src, f"embedding rank {src} is down: {why}",
                                      release_landing=False)

    # ------------------------------------------------------------ control thread

    def on_message(self, src: int, msg: ControlMessage) -> None:
        """A HEARTBEAT or REJECT from Embedding rank `src`."""
        if isinstance(msg, Heartbeat):
            self.liveness.heard(src, self._clock())
            if msg.bye:
                self._peer_dead(src, "it shut down", clean=True)
            return
        if not isinstance(msg, Reject):
            return
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None or r.src_rank != src:
                return  # a room that already ended here
            self._execute(r, self.machine.reject(r, src, msg.reason))

    def on_bad_message(self, src: int | None, room: int | None, why: str) -> None:
        self._warn.warning("bad_message", "language rank %d: from embedding rank %s: %s",
                           self.rank, src, why)
        self.stats.failure(FailureCause.BAD_MESSAGE)

    def on_tick(self) -> None:
        now = self._clock()
        if not self._closing and self.liveness.heartbeat_due(now):
            for e in self.liveness.alive():
                self._post(e, Heartbeat(self.rank))
        for e, why in self.liveness.expired(now):
            self._peer_dead(e, why)
        with self._lock:
            for r in list(self._rooms.values()):
                self._execute(r, self.machine.tick(r, now))

    # ------------------------------------------------------------ executing actions (locked)

    def _execute(self, r: RecvRoom, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Post):
                self._post(r.src_rank, a.msg)
            elif isinstance(a, Owe):
                self._pair(r.src_rank).expect()
            elif isinstance(a, Release):
                self.credits.release(r.room, a.credit)
            elif isinstance(a, AskResume):
                self._ask_resume(r, None, landed=a.landed, at_least=a.at_least)
            elif isinstance(a, CountFailure):
                self.stats.failure(a.cause)
            elif isinstance(a, Untrack):
                if self._rooms.get(r.room) is r:
                    del self._rooms[r.room]
                    self.stats.set_gauge("rooms_live", len(self._rooms))
            elif isinstance(a, Publish):
                if a.status is TransferStatus.SUCCESS:
                    self._observe_done(r)
                set_status(r, a.status)  # last: blocks and the room id are free
                self._changed.notify_all()

    def _pair(self, src: int) -> PairReceiver:
        p = self._pairs.get(src)
        if p is None:
            p = self._pairs[src] = PairReceiver(self, src, self._transports[src], self._changed)
        return p

    def _post(self, src: int, msg: Alloc | Resume | Abort | Heartbeat) -> None:
        if self.control is None:
            return
        try:
            self.control.post(src, msg)
        except DisaggError as e:
            self._warn.warning("post", "language rank %d: control message to embedding "
                               "rank %d not sent: %s", self.rank, src, e)

    def _observe_done(self, r: RecvRoom) -> None:
        now = self._clock()
        total = now - r.created
        self.stats.observe("recv_total_s", total)
        if self.cfg.slow_room_s is not None and total > self.cfg.slow_room_s:
            waited = (r.alloc_at or r.created) - r.created
            to_first = (r.first_byte_at or now) - (r.alloc_at or r.created)
            log.warning("language rank %d: room %d from embedding rank %d took %.2fs: "
                        "%.3fs waiting for blocks, %.3fs ALLOC -> first byte, %.3fs "
                        "transferring %d tokens in %d chunks (%d resumes)", self.rank, r.room,
                        r.src_rank, total, waited, to_first, now - (r.first_byte_at or now),
                        r.seq_len, r.chunk_index, r.num_resumes)

    def _live_by_peer(self) -> dict[str, object]:
        with self._lock:
            counts = collections.Counter(r.src_rank for r in self._rooms.values())
        return {"rooms_live_by_peer": dict(counts)}

    # ------------------------------------------------------------ shutdown

    def close(self, timeout_s: float) -> None:
        """Abort every live room ("shutdown"), wait (bounded) for the answers owed
        on each stream, then stop the receiver threads."""
        with self._lock:
            self._closing = True
            for r in list(self._rooms.values()):
                self._execute(r, self.machine.shutdown(r))
            pairs = list(self._pairs.values())
            for p in pairs:
                p.stopping = True
                p.cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for p in pairs:
            p.thread.join(max(0.0, deadline - time.monotonic()))
            if p.thread.is_alive():
                log.error("language rank %d: receiver thread for embedding rank %d still "
                          "waits for %d frame(s) after %.1fs", self.rank, p.src, p.owed,
                          timeout_s)
        for e in self.topology.embedding_ranks:  # after the owed frames: a clean goodbye
            self._post(e, Heartbeat(self.rank, bye=True))
