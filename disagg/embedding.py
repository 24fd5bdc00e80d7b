"""Embedding side: serve each room's embeddings to the Language ranks that ask.

Who sends what, per room and Language rank ("pair"):

    Language --ALLOC(blocks)------------>  Embedding   (before or after send())
    Language <--meta, payload (chunk 0)--  Embedding   (once data and ALLOC are both here)
    Language --RESUME(sent_tokens, ...)->  Embedding   (only if chunk 0 was partial)
    Language <--meta, payload (chunk 1)--  ...          until the last chunk

The rule that keeps both ends in step: every ALLOC or RESUME accepted from a
genuine Language rank is answered by exactly one frame on that pair's stream,
a DATA chunk or an ABORT frame. The Language side frees blocks only when a
frame answers them, and keeps a meta recv posted only while answers are owed,
so nothing can land in a freed block and no recv waits for a frame that never
comes. REJECT messages only carry the reason a room failed.

Resume is keyed by `sent_tokens`, which only grows: a RESUME at a key already
served is a repeat and is ignored; any other key than what was really sent on
the pair fails the room. A room is SUCCESS once every rank of the instance has
received everything (its last chunk's send completed), FAILED once it failed
and no chunk of it is still in flight (only then may the caller touch its
tensors again). Its budget blocks are returned at that moment, exactly once.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import DisaggConfig
from .control import ControlPort, RateLimitedLog
from .errors import DisaggError, PeerLost, PoolFull
from .geometry import Geometry, Topology
from .plan import Segment, chunk_tokens, num_blocks_for, segment_plan
from .pool import BlockAllocator
from .stats import Stats
from .transport import PairTransport, Posted
from .types import TransferStatus
from .wire import (
    MAX_AUX,
    Abort,
    Alloc,
    ControlMessage,
    FrameKind,
    Heartbeat,
    Meta,
    Reject,
    Resume,
    reason_tensor,
)

log = logging.getLogger(__name__)

MAX_EARLY_ALLOCS = 1 << 14
MAX_TOMBSTONES = 1 << 14


@dataclass
class _Grant:
    """An accepted allocation from one Language rank, not yet answered."""

    key: int  # sent_tokens at which it starts (0 for ALLOC)
    block_ids: tuple[int, ...]
    allocated_tokens: int
    direct: bool
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Pair:
    lang_rank: int
    sent_tokens: int = 0  # handed to the sender thread; the next chunk starts here
    chunk_index: int = 0
    pending: _Grant | None = None
    in_flight: int = 0
    done: bool = False
    keys: set[int] = field(default_factory=set)  # sent_tokens of every grant accepted


@dataclass
class _Room:
    room: int
    created: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    seq_len: int = 0
    sources: list[torch.Tensor] | None = None  # geometry order, each [seq, *per_token]
    aux: tuple[int, ...] = ()
    ready: torch.cuda.Event | None = None
    budget: list[int] = field(default_factory=list)
    instance_size: int | None = None
    pairs: dict[int, _Pair] = field(default_factory=dict)
    failure: str | None = None
    status: TransferStatus = TransferStatus.WAITING_FOR_INPUT
    ended: bool = False
    # time of the first send() and of the end, for latency stats
    sent_at: float | None = None


@dataclass
class _Job:
    """One frame for a pair: queued in stream order, posted, completed in order."""

    meta: Meta
    payload: list[torch.Tensor]
    ready: torch.cuda.Event | None
    done: Callable[[BaseException | None], None]
    posted: Posted | None = None


class _PairSender:
    """Writes a pair's stream. `submit` queues a frame in the order of the calls
    (the engine lock orders them); `flush` posts queued frames' sends, in that
    order, and must be called without the engine lock: a Gloo post can wait
    milliseconds for the pair while a large payload is on its socket. The
    pair's thread waits for each posted frame in order, reports it through
    `done`, and posts whatever is still queued whenever it looks (after each
    frame, and at least every half second)."""

    def __init__(self, transport: PairTransport, name: str) -> None:
        self.transport = transport
        self._queued: collections.deque[_Job] = collections.deque()  # not yet posted
        self._jobs: collections.deque[_Job] = collections.deque()  # posted, in stream order
        self._cv = threading.Condition()
        self._posting = threading.Lock()  # held while posting: one poster at a time
        self._stop = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._stop:
                raise DisaggError("sender thread stopped")
            # No wake-up: the scheduling thread flushes as soon as it lets go of
            # the engine lock, and this thread would only contend with it.
            self._queued.append(job)

    def flush(self) -> None:
        """Post every queued frame. If another thread is posting, it posts ours
        too: it looks at the queue again after it lets go of `_posting`."""
        while self._queued:
            if not self._posting.acquire(blocking=False):
                return
            try:
                while True:
                    with self._cv:
                        if not self._queued:
                            break
                        job = self._queued.popleft()
                    if self.dead is None:
                        try:
                            job.posted = self.transport.post_frame(job.meta, job.payload,
                                                                   job.ready)
                        except Exception as e:  # reported through this job and every later one
                            self.dead = e
                    with self._cv:
                        self._jobs.append(job)
                        self._cv.notify()
            finally:
                self._posting.release()
                with self._cv:
                    self._cv.notify()  # our thread may wait for the poster to finish

    def _run(self) -> None:
        while True:
            with self._cv:
                # nothing posted to wait for, and nothing this thread could post
                while not self._jobs and (not self._queued or self._posting.locked()):
                    if self._stop and not self._queued and not self._posting.locked():
                        return
                    self._cv.wait(0.5)
            self.flush()
            with self._cv:
                if not self._jobs:
                    continue
                job = self._jobs.popleft()
            err: BaseException | None = None
            if job.posted is None:  # never posted: the pair was already broken
                err = self.dead
            else:  # posted in time: its own completion decides
                try:
                    self.transport.wait(job.posted)
                except Exception as e:
                    self.dead = err = e
                job.posted = None  # the tensors may go
            job.done(err)

    def stop(self, timeout_s: float) -> bool:
        """Finish queued jobs, then exit. True if the thread ended in time."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class EmbeddingEngine:
    """All rooms of one Embedding rank. Built by `disagg.init`; use `sender(room)`."""

    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 peer_num_blocks: dict[int, int], transports: dict[int, PairTransport],
                 device: torch.device, stats: Stats, control: ControlPort | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self.rank = rank
        self.topology = topology
        self.geometry = geometry
        self.device = device
        self.stats = stats
        self.budget = BlockAllocator(geometry.num_blocks)
        self._peer_num_blocks = peer_num_blocks
        self._transports = transports
        self._senders: dict[int, _PairSender] = {}
        self._rooms: dict[int, _Room] = {}
        self._early: dict[int, dict[int, _Grant]] = {}
        self._early_instance: dict[int, int] = {}
        self._tombstones: collections.OrderedDict[int, str] = collections.OrderedDict()
        # ABORTs for rooms this rank has not created yet: the sender starts FAILED
        self._early_aborts: collections.OrderedDict[int, tuple[str, float]] = (
            collections.OrderedDict())
        self._lock = threading.RLock()
        self._ended = threading.Condition(self._lock)  # a room reached SUCCESS or FAILED
        self._warn = RateLimitedLog(log)
        self.control: ControlPort | None = control
        self._closing = False
        now = self._clock()
        self._last_heard = {lang: now for lang in topology.language_ranks}
        self._dead: dict[int, str] = {}  # Language rank -> why it is considered dead
        stats.add_source(self._live_by_peer)

    def _live_by_peer(self) -> dict[str, object]:
        """Live rooms per Language rank that asked for them (-1: none asked yet)."""
        with self._lock:
            counts: collections.Counter[int] = collections.Counter()
            for r in self._rooms.values():
                counts.update([lang for lang, p in r.pairs.items() if not p.done] or [-1])
        return {"rooms_live_by_peer": dict(counts)}

    # ------------------------------------------------------------ public

    def holds_lock(self) -> bool:
        """Whether the calling thread holds the engine lock (tests check that no
        transport call is made under it)."""
        return self._lock._is_owned()  # type: ignore[attr-defined]

    def sender(self, room: int) -> Sender:
        _check_room_id(room)
        with self._lock:
            if self._closing:
                raise DisaggError("context is shut down", rank=self.rank)
            if room in self._rooms:
                raise ValueError(f"room {room} is still live on embedding rank {self.rank}; "
                                 f"room ids must be unique among live rooms")
            r = _Room(room, created=self._clock(), last_progress=self._clock())
            self._tombstones.pop(room, None)
            early_abort = self._early_aborts.pop(room, None)
            if early_abort is not None and (self._clock() - early_abort[1]
                                            < self.cfg.bootstrap_timeout):
                r.failure, r.status, r.ended = early_abort[0], TransferStatus.FAILED, True
                self.stats.failure("abort")
                return Sender(self, r)
            self._rooms[room] = r
            # ALLOCs that came before the room existed are the room's from now on,
            # so every way it can end answers them
            r.instance_size = self._early_instance.pop(room, None)
            for lang_rank, grant in self._early.pop(room, {}).items():
                r.pairs[lang_rank] = _Pair(lang_rank, pending=grant, keys={0})
            self.stats.set_gauge("rooms_live", len(self._rooms))
        return Sender(self, r)

    # ------------------------------------------------------------ sender API (locked)

    def _send(self, r: _Room, sources: list[torch.Tensor], seq_len: int,
              aux: tuple[int, ...]) -> None:
        bs = self.geometry.block_size
        need = num_blocks_for(seq_len, bs)
        if need > self.budget.num_blocks:
            raise ValueError(f"send(room={r.room}): seq_len={seq_len} needs {need} blocks of "
                             f"{bs} tokens, more than the whole budget of "
                             f"{self.budget.num_blocks} blocks")
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        with self._lock:
            if r.failure is not None:
                return  # aborted before its data came (e.g. by Language): poll() says why
            if r.ended:
                raise DisaggError(f"room {r.room} already ended: success",
                                  rank=self.rank, room=r.room)
            if r.sources is not None:
                raise ValueError(f"room {r.room}: send() was already called")
            try:
                r.budget = self.budget.allocate(need, owner=r.room)
            except PoolFull as e:
                raise PoolFull(f"embedding budget full: room {r.room} needs {need} blocks, "
                               f"{self.budget.num_free} of {self.budget.num_blocks} free",
                               rank=self.rank, room=r.room) from e
            self.stats.set_gauge("pool_free_blocks", self.budget.num_free)
            r.sources, r.seq_len, r.aux, r.ready = sources, seq_len, aux, ready
            r.sent_at = r.last_progress = self._clock()
            r.status = (TransferStatus.TRANSFERRING if r.pairs
                        else TransferStatus.BOOTSTRAPPING)
            for pair in list(r.pairs.values()):
                self._schedule(r, pair)

    def _abort(self, r: _Room, reason: str) -> None:
        with self._lock:
            if r.ended or r.failure is not None:
                return
            self._fail(r, f"aborted on embedding rank {self.rank}: {reason}", cause="abort")

    # ------------------------------------------------------------ scheduling (locked)

    def _schedule(self, r: _Room, pair: _Pair) -> None:
        grant = pair.pending
        if grant is None or r.sources is None or r.failure is not None:
            return
        pair.pending = None
        n = chunk_tokens(r.seq_len, pair.sent_tokens, grant.allocated_tokens)
        offset = pair.sent_tokens
        plan = segment_plan(grant.block_ids, self.geometry.block_size, n, direct=grant.direct)
        flags = (1 if offset == 0 else 0) | (2 if offset + n == r.seq_len else 0)
        meta = Meta(FrameKind.DATA, r.room, pair.chunk_index, offset, n, r.seq_len, flags, r.aux)
        payload = _slice_payload(r.sources, offset, plan)
        pair.sent_tokens += n
        pair.chunk_index += 1
        pair.in_flight += 1
        nbytes = n * self.geometry.token_nbytes
        self._submit(pair.lang_rank, _Job(meta, payload, r.ready,
                                          lambda err: self._on_chunk_done(r, pair, nbytes, err)))

    def _answer_with_abort(self, room: int, lang_rank: int, reason: str,
                           on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Answer one outstanding allocation of `lang_rank` with an ABORT frame,
        its reason in-band so the Language side reports exactly this one."""
        payload = [reason_tensor(reason).to(self.device)]
        self._submit(lang_rank, _Job(Meta(FrameKind.ABORT, room), payload, None,
                                     on_done or (lambda err: None)))

    def flush_posts(self) -> None:
        """Post the frames scheduled so far. Called without the engine lock, by
        whichever thread scheduled them, so the next frame is on the wire without
        waiting for a thread hand-off; a pair's own thread posts them otherwise."""
        for s in list(self._senders.values()):
            s.flush()

    def _submit(self, lang_rank: int, job: _Job) -> None:
        if self._closing:  # the streams are closing: the peer learns from their end
            job.done(DisaggError(f"embedding rank {self.rank} is shut down"))
            return
        if lang_rank in self._dead:
            job.done(PeerLost(f"language rank {lang_rank} is down: {self._dead[lang_rank]}",
                              rank=self.rank, peer=lang_rank))
            return
        s = self._senders.get(lang_rank)
        if s is None:
            s = _PairSender(self._transports[lang_rank],
                            f"disagg-send-{self.rank}->{lang_rank}")
            self._senders[lang_rank] = s
        s.submit(job)

    def _on_chunk_done(self, r: _Room, pair: _Pair, nbytes: int,
                       err: BaseException | None) -> None:
        with self._lock:
            pair.in_flight -= 1
            r.last_progress = self._clock()
            if err is not None:
                self._pair_lost(pair.lang_rank, err)
                # _pair_lost spares rooms whose last chunk was on the wire; this was it
                self._fail(r, f"embedding rank {self.rank}: send to language rank "
                              f"{pair.lang_rank} failed: {err}", cause="peer_lost")
            elif r.failure is None:
                self.stats.add(bytes_sent=nbytes, chunks=1)
                if pair.sent_tokens == r.seq_len and pair.in_flight == 0:
                    pair.done = True
                    self._maybe_succeed(r)
                elif pair.lang_rank in self._dead and pair.in_flight == 0:
                    self._fail(r, f"embedding rank {self.rank}: language rank "
                                  f"{pair.lang_rank} is down: {self._dead[pair.lang_rank]}",
                               cause="peer_lost")
            self._maybe_end(r)

    def _maybe_succeed(self, r: _Room) -> None:
        done = sum(p.done for p in r.pairs.values())
        if r.instance_size is not None and done == r.instance_size:
            if r.sent_at is not None:
                self.stats.observe("send_total_s", self._clock() - r.sent_at)
            self._end(r, "success", TransferStatus.SUCCESS)

    def _maybe_end(self, r: _Room) -> None:
        if r.failure is not None and not r.ended and all(
                p.in_flight == 0 for p in r.pairs.values()):
            self._end(r, r.failure, TransferStatus.FAILED)

    def _end(self, r: _Room, outcome: str, status: TransferStatus) -> None:
        """Return the budget, forget the room, and only then publish `status`: a
        caller that sees SUCCESS may reuse the id and the budget at once."""
        if r.budget:
            self.budget.free(r.budget, owner=r.room)
            r.budget = []
        r.sources = None  # drop the caller's tensors
        if self._rooms.get(r.room) is r:
            del self._rooms[r.room]
            self._tombstones[r.room] = outcome
            while len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
        self.stats.set_gauge("rooms_live", len(self._rooms))
        self.stats.set_gauge("pool_free_blocks", self.budget.num_free)
        r.status = status
        r.ended = True
        self._ended.notify_all()

    def _fail(self, r: _Room, reason: str, *, cause: str) -> None:
        """Fail a live room: answer pending grants with ABORT frames, tell every
        Language rank of the room why, end it once nothing is in flight."""
        if r.failure is not None or r.ended:
            return
        r.failure = reason
        self.stats.failure(cause)
        for pair in r.pairs.values():
            if pair.pending is not None:
                pair.pending = None
                pair.in_flight += 1
                self._answer_with_abort(r.room, pair.lang_rank, reason,
                                        functools.partial(self._on_abort_sent, r, pair))
            elif not pair.done:  # no frame owed to it: the reason goes by REJECT
                self._reject(pair.lang_rank, r.room, -1, reason)
        self._maybe_end(r)

    def _on_abort_sent(self, r: _Room, pair: _Pair, err: BaseException | None) -> None:
        with self._lock:
            pair.in_flight -= 1
            if err is not None:
                self._pair_lost(pair.lang_rank, err)
            self._maybe_end(r)

    def _pair_lost(self, lang_rank: int, err: BaseException, *, clean: bool = False) -> None:
        """`lang_rank` is gone or its stream broke: nothing is sent to it again, and
        every room it was part of, or whose instance it belongs to, fails (such a
        room can never reach SUCCESS). Idempotent."""
        if lang_rank in self._dead:
            return
        self._dead[lang_rank] = str(err)
        if not self._closing:
            log.log(logging.INFO if clean else logging.WARNING,
                    "embedding rank %d: language rank %d is down: %s", self.rank, lang_rank, err)
        instance = self.topology.instance_of(lang_rank)
        why = f"embedding rank {self.rank}: language rank {lang_rank} is down: {err}"
        for r in list(self._rooms.values()):
            pair = r.pairs.get(lang_rank)
            if pair is not None:
                pair.pending = None  # owed, but it can no longer be answered
                if pair.done or (pair.in_flight and pair.sent_tokens == r.seq_len):
                    continue  # its last chunk is on the wire: that send's outcome decides
                self._fail(r, why, cause="peer_lost")
            elif r.pairs and self.topology.instance_of(next(iter(r.pairs))) == instance:
                self._fail(r, why, cause="peer_lost")
        self._early_drop(lambda room, lr: lr == lang_rank)
        self._early_drop(lambda room, lr: self.topology.instance_of(lr) == instance,
                         f"language rank {lang_rank} of this room's instance is down: {err}")

    def _reject(self, lang_rank: int, room: int, key: int, reason: str) -> None:
        if self.control is not None and not self._closing:
            try:
                self.control.post(lang_rank, Reject(room, key, reason))
            except DisaggError as e:
                self._warn.warning("reject", "could not send REJECT for room %d: %s", room, e)

    # ------------------------------------------------------------ control thread

    def on_message(self, peer: int, msg: ControlMessage) -> None:
        """Control thread: one authenticated message; frames it scheduled leave at once."""
        try:
            self._on_message(peer, msg)
        finally:
            self.flush_posts()

    def on_bad_message(self, peer: int | None, room: int | None, why: str) -> None:
        """Control thread: a message the channel could not accept."""
        if peer is None:
            self.stats.failure("bad_peer")
            self._warn.warning("bad_peer", "embedding rank %d: %s dropped", self.rank, why)
            return
        self.stats.failure("bad_message")
        self._warn.warning("bad_message", "embedding rank %d: from language rank %d: %s",
                           self.rank, peer, why)
        if room is not None:
            try:
                with self._lock:
                    self._bad_message(peer, room, why)
            finally:
                self.flush_posts()

    def _on_message(self, claimed: int, msg: ControlMessage) -> None:
        """Act on one message (frames are posted by the caller)."""
        if isinstance(msg, Heartbeat):
            self._last_heard[claimed] = self._clock()
            if msg.bye:
                with self._lock:
                    self._pair_lost(claimed, PeerLost("it shut down", peer=claimed), clean=True)
            elif self.control is not None and not self._closing:
                self.control.post(claimed, Heartbeat(self.rank))
            return
        with self._lock:
            if isinstance(msg, Alloc):
                self._on_alloc(msg)
            elif isinstance(msg, Resume):
                self._on_resume(msg)
            elif isinstance(msg, Abort):
                self._on_abort(msg)

    def _bad_message(self, lang: int, room: int, why: str) -> None:
        """A message from `lang` naming `room` that cannot be served: the room fails
        here too (its pending grants are answered), or `lang` learns by REJECT."""
        r = self._rooms.get(room)
        reason = f"embedding rank {self.rank}: bad message from language rank {lang}: {why}"
        if r is not None:
            self._fail(r, reason, cause="bad_message")
            if lang not in r.pairs:  # no frame is owed to it: REJECT carries the reason
                self._reject(lang, room, -1, reason)
        else:
            self._reject(lang, room, -1, reason)

    def _check_grant(self, lang_rank: int, block_ids: tuple[int, ...], allocated: int,
                     direct: bool, *, allow_empty: bool) -> str | None:
        """Why these blocks cannot be a destination on `lang_rank`, or None."""
        bs = self.geometry.block_size
        num = self._peer_num_blocks[lang_rank]
        if allocated < 1:
            return f"allocated_tokens={allocated} must be >= 1"
        if not block_ids:
            if direct and allow_empty:
                return None
            return "no blocks"
        if allocated != len(block_ids) * bs:
            return (f"allocated_tokens={allocated} != {len(block_ids)} blocks x "
                    f"block_size {bs}")
        bad = [b for b in block_ids if not 0 <= b < num]
        if bad:
            return f"block ids {bad[:8]} out of range [0, {num})"
        if len(set(block_ids)) != len(block_ids):
            return "duplicate block ids"
        return None

    def _on_alloc(self, m: Alloc) -> None:
        lang, room = m.lang_rank, m.room
        why = self._check_grant(lang, m.block_ids, m.allocated_tokens, m.direct,
                                allow_empty=False)
        tp = self.topology.language_tp_size
        if why is None and not 1 <= m.instance_size <= tp:
            why = f"instance_size={m.instance_size} outside [1, {tp}]"
        grant = _Grant(0, m.block_ids, m.allocated_tokens, m.direct, self._clock())
        r = self._rooms.get(room)
        if r is None:
            if room in self._tombstones:
                self._refuse(lang, room, f"ALLOC for a room that already ended: "
                                         f"{self._tombstones[room]}")
            elif why is not None:
                self._refuse(lang, room, f"bad ALLOC from language rank {lang}: {why}")
            else:
                self._early_alloc(lang, room, m.instance_size, grant)
            return
        if r.failure is not None or r.ended:
            self._refuse(lang, room, f"ALLOC for a room that already failed: {r.failure}")
            return
        if why is None and lang in r.pairs:
            why = "duplicate ALLOC from this language rank"
        if why is None and r.pairs:
            intruder = self._other_instance(lang, next(iter(r.pairs)))
            if intruder is not None:  # the room is another instance's: refuse only this ALLOC
                self._refuse(lang, room, f"bad ALLOC from language rank {lang}: {intruder}")
                self.stats.failure("bad_message")
                return
        if why is None and r.instance_size not in (None, m.instance_size):
            why = f"instance_size={m.instance_size} disagrees with {r.instance_size}"
        if why is not None:
            why = f"bad ALLOC from language rank {lang}: {why}"
            self._refuse(lang, room, why)
            self._fail(r, f"embedding rank {self.rank}: {why}", cause="bad_message")
            return
        r.instance_size = m.instance_size
        pair = r.pairs[lang] = _Pair(lang, pending=grant, keys={0})
        r.last_progress = self._clock()
        if r.sources is not None:
            r.status = TransferStatus.TRANSFERRING
        self._schedule(r, pair)

    def _on_resume(self, m: Resume) -> None:
        lang, room = m.lang_rank, m.room
        r = self._rooms.get(room)
        if r is None or r.failure is not None or r.ended:
            ended = self._tombstones.get(room) if r is None else r.failure
            self._refuse(lang, room, "RESUME for a room that is unknown here" if ended is None
                         else f"RESUME for a room that already ended: {ended}")
            return
        pair = r.pairs.get(lang)
        why = self._check_grant(lang, m.block_ids, m.allocated_tokens, m.direct, allow_empty=True)
        if why is None and pair is None:
            why = "RESUME before ALLOC"
        elif why is None and pair is not None:
            if m.sent_tokens in pair.keys:
                return  # a repeat of a grant already accepted: resume is idempotent
            if pair.pending is not None:
                why = "RESUME while the previous allocation is still unanswered"
            elif m.sent_tokens != pair.sent_tokens:
                why = (f"RESUME sent_tokens={m.sent_tokens} but {pair.sent_tokens} tokens "
                       f"were sent on this pair")
            elif pair.sent_tokens >= r.seq_len:
                why = f"RESUME after all {r.seq_len} tokens were sent"
        if why is not None:
            why = f"bad RESUME from language rank {lang}: {why}"
            self._refuse(lang, room, why)
            self._fail(r, f"embedding rank {self.rank}: {why}", cause="bad_message")
            return
        assert pair is not None
        pair.pending = _Grant(m.sent_tokens, m.block_ids, m.allocated_tokens, m.direct,
                              self._clock())
        pair.keys.add(m.sent_tokens)
        r.last_progress = self._clock()
        self.stats.add(resumes=1)
        self._schedule(r, pair)

    def _on_abort(self, m: Abort) -> None:
        lang, room = m.lang_rank, m.room
        early = self._early.get(room)
        if early is not None and lang in early:
            # every rank of the instance that asked gets its answer, with the reason
            self._early_drop(lambda rm, _: rm == room,
                             f"aborted by language rank {lang}: {m.reason}")
            self._remember_early_abort(room, lang, m.reason)
            return
        r = self._rooms.get(room)
        if r is not None:
            self._fail(r, f"aborted by language rank {lang}: {m.reason}", cause="abort")
        elif room not in self._tombstones:
            self._remember_early_abort(room, lang, m.reason)

    def _remember_early_abort(self, room: int, lang: int, reason: str) -> None:
        self._early_aborts[room] = (f"aborted by language rank {lang} before this rank "
                                    f"had the room's data: {reason}", self._clock())
        while len(self._early_aborts) > MAX_TOMBSTONES:
            self._early_aborts.popitem(last=False)

    def _refuse(self, lang_rank: int, room: int, why: str) -> None:
        """Refuse an allocation: its answer is an ABORT frame that says why."""
        self._answer_with_abort(room, lang_rank, f"embedding rank {self.rank}: {why}")

    def _other_instance(self, lang: int, first: int) -> str | None:
        """A room is received by one Language instance: why `lang` may not join a
        room that `first` already asked for, or None."""
        mine, theirs = self.topology.instance_of(lang), self.topology.instance_of(first)
        if mine == theirs:
            return None
        return (f"room already claimed by language instance {theirs} (rank {first}); "
                f"rank {lang} is in instance {mine}")

    def _early_alloc(self, lang: int, room: int, instance_size: int, grant: _Grant) -> None:
        total = sum(len(v) for v in self._early.values())
        pending = self._early.setdefault(room, {})
        inst = self._early_instance.setdefault(room, instance_size)
        other = self._other_instance(lang, next(iter(pending))) if pending else None
        if lang in pending or inst != instance_size or other or total >= MAX_EARLY_ALLOCS:
            why = ("duplicate ALLOC" if lang in pending else
                   "instance_size disagrees" if inst != instance_size else
                   other if other else
                   f"too many ALLOCs waiting for data ({total})")
            if not pending:
                self._early.pop(room, None)
                self._early_instance.pop(room, None)
            self._refuse(lang, room, f"bad ALLOC from language rank {lang}: {why}")
            self.stats.failure("bad_message")
            return
        pending[lang] = grant

    def _early_drop(self, match: Callable[[int, int], bool], reason: str = "") -> None:
        for room in list(self._early):
            grants = self._early[room]
            for lang in [lang for lang in grants if match(room, lang)]:
                del grants[lang]
                if reason:
                    self._refuse(lang, room, reason)
            if not grants:
                del self._early[room]
                self._early_instance.pop(room, None)

    def on_tick(self) -> None:
        """Control thread, every poll interval: liveness and bootstrap timeouts."""
        now = self._clock()
        limit = self.cfg.bootstrap_timeout
        with self._lock:
            for lang, heard in self._last_heard.items():
                if lang not in self._dead and now - heard > self.cfg.peer_timeout:
                    self._pair_lost(lang, PeerLost(
                        f"no heartbeat for {now - heard:.1f}s (peer_timeout="
                        f"{self.cfg.peer_timeout:g}s)", peer=lang))
            self._early_drop(
                lambda room, lang: now - self._early[room][lang].arrived > limit,
                f"no data for this room within bootstrap_timeout={limit:g}s")
            for r in list(self._rooms.values()):
                if r.sources is None or r.failure is not None:
                    continue
                if now - r.last_progress > limit and not any(
                        p.in_flight for p in r.pairs.values()):
                    waiting = ("ALLOC" if not r.pairs else
                               f"ALLOC from {r.instance_size - len(r.pairs)} more rank(s)"
                               if r.instance_size and len(r.pairs) < r.instance_size
                               else "RESUME")
                    self._fail(r, f"embedding rank {self.rank}: timed out after {limit:g}s "
                                  f"waiting for {waiting}", cause="timeout")
        self.flush_posts()  # ABORT frames for the rooms that timed out

    # ------------------------------------------------------------ shutdown

    def close(self, timeout_s: float) -> None:
        """Fail every live room ("shutdown"), flush ABORT frames, stop threads."""
        with self._lock:
            for r in list(self._rooms.values()):
                if r.sources is None and not r.pairs:
                    r.failure = "shutdown"
                    self._end(r, "shutdown", TransferStatus.FAILED)
                else:
                    self._fail(r, f"embedding rank {self.rank} shut down", cause="shutdown")
            self._early_drop(lambda room, lang: True, "shut down")
            self._closing = True
            senders = list(self._senders.values())
        deadline = time.monotonic() + timeout_s
        for s in senders:
            if not s.stop(max(0.0, deadline - time.monotonic())):
                log.error("embedding rank %d: a sender thread did not stop in %.1fs",
                          self.rank, timeout_s)
        if self.control is not None:  # after the last frames: a clean goodbye
            for lang in self.topology.language_ranks:
                self.control.post(lang, Heartbeat(self.rank, bye=True))


def _check_room_id(room: int) -> None:
    if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < (1 << 63):
        raise ValueError(f"room={room!r} must be an int in [0, 2**63)")


def _slice_payload(sources: list[torch.Tensor], offset: int,
                   plan: list[Segment]) -> list[torch.Tensor]:
    """Payload tensors in wire order: for each buffer, one slice per segment."""
    return [src[offset + s.chunk_start:offset + s.chunk_start + s.num_tokens]
            for src in sources for s in plan]


class Sender:
    """One room on an Embedding rank. See the module docstring for the protocol."""

    def __init__(self, engine: EmbeddingEngine, state: _Room) -> None:
        self._engine = engine
        self._r = state
        self.room = state.room

    def send(self, embeddings: torch.Tensor, fill_ids: torch.Tensor,
             mrope_positions: torch.Tensor | None = None, aux: tuple[int, ...] | None = None,
             **extra: torch.Tensor) -> None:
        """Hand the room's tensors over, without a copy of the embeddings.

        embeddings [seq, hidden]; fill_ids [seq] int32; mrope_positions [3, seq]
        int32; extra buffers [seq, *per_token_shape]. Do not modify them until
        `poll()` is SUCCESS or FAILED. Raises `PoolFull` when the budget cannot
        take seq tokens now, `ValueError` for bad input.
        """
        sources, seq_len, aux_t = _validate_send(
            self._engine.cfg, self._engine.geometry, self._engine.device, self.room,
            embeddings, fill_ids, mrope_positions, aux, extra)
        self._engine._send(self._r, sources, seq_len, aux_t)
        self._engine.flush_posts()

    def poll(self) -> TransferStatus:
        return self._r.status

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until SUCCESS or FAILED, or `timeout_s` (default: bootstrap_timeout
        + peer_timeout) passed; return the status then. For loops that would
        rather sleep than poll."""
        e = self._engine
        bound = e.cfg.bootstrap_timeout + e.cfg.peer_timeout if timeout_s is None else timeout_s
        with e._ended:
            e._ended.wait_for(lambda: self._r.ended, bound)
        return self._r.status

    @property
    def failure(self) -> str | None:
        return self._r.failure

    def abort(self, reason: str = "aborted") -> None:
        self._engine._abort(self._r, reason)
        self._engine.flush_posts()  # the ABORT frames it answered with


def _validate_send(cfg: DisaggConfig, geometry: Geometry, device: torch.device, room: int,
                   embeddings: torch.Tensor, fill_ids: torch.Tensor,
                   mrope_positions: torch.Tensor | None, aux: tuple[int, ...] | None,
                   extra: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int,
                                                            tuple[int, ...]]:
    """Check every tensor against the geometry; return them in wire order
    (`Geometry.wire_buffers`)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"send(room={room}): {msg}")

    def check(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise bad(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise bad(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype != dtype:
            raise bad(f"{name} has dtype {t.dtype}, expected {dtype}")
        if t.device.type != device.type or (device.index is not None
                                            and t.device.index not in (None, device.index)):
            raise bad(f"{name} is on {t.device}, expected {device}")
        return t

    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise bad(f"embeddings must be a 2-D [seq, hidden] tensor, got "
                  f"{list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
    seq = embeddings.shape[0]
    if seq == 0:
        raise bad("seq_len is 0: nothing to send")
    by_name = {b.name: b for b in geometry.buffers}
    hidden = by_name["embeddings"].per_token_shape[0]
    out = [check("embeddings", embeddings, (seq, hidden), by_name["embeddings"].dtype)]
    if not embeddings.is_contiguous():
        raise bad("embeddings must be contiguous (no copy is made); pass .contiguous()")
    ids = check("fill_ids", fill_ids, (seq,), torch.int32)
    if "mrope_positions" in by_name:
        if mrope_positions is None:
            raise bad("mrope_positions [3, seq] is required (config mrope=True)")
        m = check("mrope_positions", mrope_positions, (3, seq), torch.int32)
        # one [seq, 4] wire buffer (geometry.PACKED_IDS): 16 bytes a token, the only copy made
        out.append(torch.cat([ids[:, None], m.t()], dim=1))
    elif mrope_positions is not None:
        raise bad("mrope_positions given but the config has mrope=False")
    else:
        out.append(ids.contiguous())
    names = geometry.extra_names
    unknown = sorted(set(extra) - set(names))
    missing = sorted(set(names) - set(extra))
    if unknown or missing:
        raise bad(f"extra buffers: unknown {unknown}, missing {missing} "
                  f"(config declares {list(names)})")
    for name in names:
        b = by_name[name]
        t = check(name, extra[name], (seq, *b.per_token_shape), b.dtype)
        if not t.is_contiguous():
            raise bad(f"{name} must be contiguous")
        out.append(t)
    aux_t: tuple[int, ...] = ()
    if aux is not None:
        aux_t = tuple(aux)
        if len(aux_t) > MAX_AUX or not all(
                isinstance(a, int) and not isinstance(a, bool) and -(1 << 63) <= a < (1 << 63)
                for a in aux_t):
            raise bad(f"aux must be at most {MAX_AUX} int64 values, got {aux!r}")
    return out, seq, aux_t
