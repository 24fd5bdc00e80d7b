"""Language side: receive rooms from Embedding ranks into bounded memory.

Room state machine on one Language rank (see `embedding.py` for the peer):

    BOOTSTRAPPING      receiver(room) made; init() has not got blocks yet
    WAITING_FOR_INPUT  ALLOC sent; the first chunk has not arrived
    TRANSFERRING       a chunk landed but not the last one. Either a RESUME is
                       in flight ("resume in flight") or the room waits for one
                       ("partial landed": `needs_resume`)
    SUCCESS            every token landed; result() is ready
    FAILED             with `failure` saying which side, peer, stage and cause

Each allocation (ALLOC or RESUME) is answered by exactly one frame on the
pair's stream. The pair's receiver thread keeps a meta recv posted only while
answers are owed; on a DATA meta it checks every size against the allocation,
posts the payload recvs, and once they completed (host-observed) lands the
chunk at `token_offset` of the room's output and frees the blocks at once.
seq_len and aux come from the FIRST chunk's meta and are cached; a later chunk
that disagrees fails the room. A meta for a room with nothing owed, or whose
sizes disagree with the allocation, means the stream cannot be trusted: the
pair is torn down and its rooms fail.

Resume is keyed by the tokens landed so far, which only grow: repeated polls
and repeated resume() calls in one round never free, allocate or send twice.
With `auto_resume` the receiver thread sends the next RESUME as soon as a
partial chunk's meta arrives, while its payload is still landing.

Abort keeps the room's blocks until a frame answers the allocation (the chunk
in flight lands, or an ABORT frame arrives), so a later room that reuses the
blocks can never receive a ghost of the aborted one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DisaggConfig
from .control import ControlPort, RateLimitedLog
from .errors import DisaggError, PeerLost, ProtocolError, TransferTimeout
from .geometry import PACKED_IDS, Geometry, Topology
from .pages import empty_result
from .plan import Segment, alloc_blocks_for, num_blocks_for, segment_plan
from .pool import BlockPool
from .stats import Stats
from .transport import PairTransport, Posted
from .types import EmbeddingResult, TransferStatus
from .wire import (
    ABORT_REASON_BYTES,
    Abort,
    Alloc,
    ControlMessage,
    FrameKind,
    Heartbeat,
    Meta,
    Reject,
    Resume,
    reason_from_tensor,
)

log = logging.getLogger(__name__)

AUTO_COLD_START = 8192  # "auto" first allocation until it has seen enough lengths
AUTO_WINDOW = 256  # recent lengths that "auto" first allocation learns from
AUTO_QUANTILE = 90
AUTO_MIN_SAMPLES = 8


class _StreamBroken(DisaggError):
    """A frame that disagrees with what this side allocated: the pair is unusable."""


@dataclass
class _Alloc:
    """Blocks (or direct credit) announced to the Embedding rank, by `key` =
    tokens landed before it."""

    key: int
    block_ids: list[int]
    allocated_tokens: int
    direct: bool


@dataclass
class _Room:
    room: int
    src_rank: int
    status: TransferStatus = TransferStatus.BOOTSTRAPPING
    failure: str | None = None
    seq_len: int | None = None
    aux: tuple[int, ...] = ()
    received: int = 0
    chunk_index: int = 0
    outstanding: _Alloc | None = None  # sent, not yet answered by a frame
    landing: _Alloc | None = None  # answered by a DATA meta, payload landing
    outputs: dict[str, torch.Tensor] | None = None
    alloc_sent: bool = False
    created: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    # stage timings, for latency stats and the slow-room log
    alloc_at: float | None = None
    first_byte_at: float | None = None
    partial_at: float | None = None
    num_resumes: int = 0
    auto_first_blocks: int | None = None  # first allocation chosen by "auto"


class _PairReceiver:
    """The one thread that reads a pair's stream (from Embedding rank `src`)."""

    def __init__(self, engine: LanguageEngine, src: int, transport: PairTransport) -> None:
        self.engine = engine
        self.src = src
        self.transport = transport
        self.owed = 0  # frames the Embedding rank owes us (guarded by engine lock)
        # The next meta recv, posted while the frame before it still lands (only
        # when a frame is owed, so it never waits for one that cannot come).
        # Held until it completes: Gloo must not lose a posted buffer.
        self.next_meta: Posted | None = None
        self.dead: str | None = None
        self.stopping = False
        self.cv = threading.Condition(engine._lock)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"disagg-recv-{src}->{engine.rank}")
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cv:
                while self.owed == 0 and not self.stopping and self.dead is None:
                    self.cv.wait(0.5)
                if self.owed == 0 or self.dead is not None:
                    return
            try:
                # Posts happen outside the engine lock: Gloo may block a post for
                # milliseconds while the pair's socket is busy, and the lock must
                # not wait with it. Only this thread posts on the stream.
                if self.next_meta is None:
                    self.next_meta = self.transport.post_meta_recv()
                meta = self.transport.wait_meta(self.next_meta)
                self.next_meta = None
                if meta.kind is FrameKind.ABORT:  # its reason follows, fixed size
                    buf = torch.empty(ABORT_REASON_BYTES, dtype=torch.uint8,
                                      device=self.engine.device)
                    self.transport.wait(self.transport.post_recv([buf]), "abort reason recv")
                    self.engine._on_abort_frame(self, meta, reason_from_tensor(buf))
                else:
                    self.engine._on_frame(self, meta)
            except (PeerLost, TransferTimeout, ProtocolError, _StreamBroken) as e:
                self.engine._pair_lost(self, e)
                return
            except Exception as e:  # a bug: never leave the stream half read
                log.exception("receiver thread for embedding rank %d", self.src)
                self.engine._pair_lost(self, e)
                return


class LanguageEngine:
    """All rooms of one Language rank. Built by `disagg.init`; use `receiver()`."""

    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 transports: dict[int, PairTransport], device: torch.device,
                 stats: Stats, control: ControlPort | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self.rank = rank
        self.topology = topology
        self.geometry = geometry
        self.device = device
        self.stats = stats
        self.pool = BlockPool(geometry, device, with_buffers=cfg.recv_into == "pool")
        self.direct = cfg.recv_into == "output"
        self._transports = transports
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # some room may need the caller
        self._rooms: dict[int, _Room] = {}
        self._pairs: dict[int, _PairReceiver] = {}
        self._recent_lengths: collections.deque[int] = collections.deque(maxlen=AUTO_WINDOW)
        self._warn = RateLimitedLog(log)
        self.control: ControlPort | None = control
        self._closing = False
        self.instance_size = topology.language_tp_size
        now = self._clock()
        self._last_heard = {e: now for e in topology.embedding_ranks}
        self._dead: dict[int, str] = {}  # Embedding rank -> why it is considered dead
        self._next_heartbeat = now
        self.heartbeat_interval = min(1.0, cfg.peer_timeout / 4)
        stats.add_source(self._live_by_peer)

    # ------------------------------------------------------------ public

    def holds_lock(self) -> bool:
        """Whether the calling thread holds the engine lock (tests check that no
        transport call is made under it)."""
        return self._lock._is_owned()  # type: ignore[attr-defined]

    def receiver(self, room: int, src_rank: int) -> Receiver:
        if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < (1 << 63):
            raise ValueError(f"room={room!r} must be an int in [0, 2**63)")
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
            r = self._rooms[room] = _Room(room, src_rank, created=now, last_progress=now)
            self.stats.set_gauge("rooms_live", len(self._rooms))
        return Receiver(self, r)

    def first_alloc_tokens(self) -> int:
        """The first allocation of a room when the caller names none."""
        d = self.cfg.default_alloc_tokens
        if d != "auto":
            assert isinstance(d, int)
            return d
        with self._lock:
            lengths = list(self._recent_lengths)
        if len(lengths) < AUTO_MIN_SAMPLES:
            return self._auto_cold_start()
        return max(1, min(int(np.percentile(lengths, AUTO_QUANTILE)), self._fair_share()))

    def _fair_share(self) -> int:
        """Tokens one room's "auto" first allocation may take: a quarter of the pool."""
        return max(1, self.pool.allocator.num_blocks // 4) * self.geometry.block_size

    def _auto_cold_start(self) -> int:
        return min(AUTO_COLD_START, self._fair_share())

    # ------------------------------------------------------------ receiver API (locked)

    def _init(self, r: _Room, num_tokens: int | None) -> bool:
        if num_tokens is not None and (isinstance(num_tokens, bool) or num_tokens < 1):
            raise ValueError(f"init(num_tokens={num_tokens!r}): must be an int >= 1 or None")
        want = num_tokens if num_tokens is not None else self.first_alloc_tokens()
        with self._lock:
            if r.failure is not None:
                return False
            if r.alloc_sent:
                return True
            down = self._dead.get(r.src_rank) or self._pair(r.src_rank).dead
            if down is not None:
                self._fail(r, f"language rank {self.rank}: embedding rank {r.src_rank} is "
                              f"down: {down}", cause="peer_lost")
                return False
            a = self._allocate(r, want, key=0, remaining=None, resume=False)
            if a is None:
                return False
            r.alloc_sent = True
            r.status = TransferStatus.WAITING_FOR_INPUT
            r.last_progress = r.alloc_at = self._clock()
            if num_tokens is None and self.cfg.default_alloc_tokens == "auto":
                r.auto_first_blocks = len(a.block_ids)
            self._post(r.src_rank, Alloc(r.room, self.rank, self.instance_size,
                                         tuple(a.block_ids), a.allocated_tokens, a.direct))
            return True

    def _resume(self, r: _Room, num_tokens: int | None) -> bool:
        if num_tokens is not None and (isinstance(num_tokens, bool) or num_tokens < 1):
            raise ValueError(f"resume(num_tokens={num_tokens!r}): must be an int >= 1 or None")
        with self._lock:
            if r.failure is not None:
                return False
            if not self._needs_resume(r):
                return True  # nothing to do this round: in flight, done, or a repeat
            return self._send_resume(r, num_tokens, landed=r.received)

    def _send_resume(self, r: _Room, num_tokens: int | None, *, landed: int,
                     at_least: int = 1) -> bool:
        """Allocate for the rest after `landed` tokens (or `num_tokens` of it) and
        send RESUME keyed by `landed`. False: no blocks now."""
        assert r.seq_len is not None
        remaining = r.seq_len - landed
        a = self._allocate(r, num_tokens or remaining, key=landed, remaining=remaining,
                           resume=True, at_least=at_least)
        if a is None:
            return False
        r.num_resumes += 1
        self.stats.add(resumes=1)
        # direct: the Embedding rank needs no block ids, only how many tokens fit
        self._post(r.src_rank, Resume(r.room, self.rank, a.key,
                                      () if a.direct else tuple(a.block_ids),
                                      a.allocated_tokens, a.direct))
        return True

    def _allocate(self, r: _Room, want: int, *, key: int, remaining: int | None,
                  resume: bool, at_least: int = 1) -> _Alloc | None:
        """Take blocks (or direct credit) for `want` tokens and record them as owed.

        When the pool is short the allocation is partial (at least `at_least`
        blocks, or all of them if fewer are wanted), so a room never waits for
        more blocks than may ever be free at once. A new
        room (ALLOC) leaves one block for each room waiting to resume: those
        hold the Embedding side's data and budget, so they must be able to move
        or the two sides could wait on each other for good.
        """
        bs = self.geometry.block_size
        num = alloc_blocks_for(want, bs, remaining, self.pool.allocator.num_blocks)
        if resume and self.direct:
            ids: list[int] = []  # output mode asks for the rest at once: no credit needed
        else:
            free = self.pool.allocator.num_free
            if not resume:
                free -= sum(1 for x in self._rooms.values()
                            if x is not r and self._needs_resume(x))
            if free < min(num, at_least):
                return None
            num = min(num, free)
            if num < 1:
                return None
            ids = self.pool.allocator.allocate(num, owner=r.room)
            self.stats.set_gauge("pool_free_blocks", self.pool.allocator.num_free)
        # A resume knows seq_len and the output exists, so it lands there in both
        # modes; in pool mode its blocks are only credit that bounds what is in flight.
        a = _Alloc(key, ids, num * bs, self.direct or resume)
        r.outstanding = a
        pair = self._pairs[r.src_rank]
        pair.owed += 1
        pair.cv.notify()
        return a

    @staticmethod
    def _needs_resume(r: _Room) -> bool:
        return (r.failure is None and r.status == TransferStatus.TRANSFERRING
                and r.outstanding is None and r.landing is None
                and r.seq_len is not None and r.received < r.seq_len)

    def _abort(self, r: _Room, reason: str) -> None:
        with self._lock:
            if r.status in (TransferStatus.SUCCESS, TransferStatus.FAILED):
                return
            self._fail(r, f"aborted on language rank {self.rank}: {reason}", cause="abort")
            # Also before ALLOC: the Embedding rank may hold the data and its budget.
            self._post(r.src_rank, Abort(r.room, self.rank, reason))

    def _result(self, r: _Room) -> EmbeddingResult:
        with self._lock:
            if r.status != TransferStatus.SUCCESS:
                raise DisaggError(f"room {r.room} has no result: status {r.status.name}"
                                  + (f" ({r.failure})" if r.failure else ""),
                                  rank=self.rank, room=r.room)
            out = r.outputs
            assert out is not None
        packed = out.get(PACKED_IDS)  # [seq, 4]: fill_ids, then the 3 positions
        # clone, not contiguous(): a 1-token column counts as contiguous with stride 4
        own = torch.contiguous_format
        return EmbeddingResult(
            embeddings=out["embeddings"],
            fill_ids=out["fill_ids"] if packed is None else packed[:, 0].clone(memory_format=own),
            mrope_positions=None if packed is None else packed[:, 1:].t().clone(memory_format=own),
            aux=r.aux, extra={n: out[n] for n in self.geometry.extra_names})

    # ------------------------------------------------------------ state changes (locked)

    def _pair(self, src: int) -> _PairReceiver:
        p = self._pairs.get(src)
        if p is None:
            p = self._pairs[src] = _PairReceiver(self, src, self._transports[src])
        return p

    def _post(self, src: int, msg: Alloc | Resume | Abort | Heartbeat) -> None:
        if self.control is None:
            return
        try:
            self.control.post(src, msg)
        except DisaggError as e:
            self._warn.warning("post", "language rank %d: control message to embedding "
                               "rank %d not sent: %s", self.rank, src, e)

    def _fail(self, r: _Room, reason: str, *, cause: str) -> None:
        if r.failure is not None or r.status == TransferStatus.SUCCESS:
            return
        r.failure = reason
        self.stats.failure(cause)
        self._maybe_untrack(r)
        r.status = TransferStatus.FAILED  # last: the room is forgotten when it can be
        self._changed.notify_all()

    def _maybe_untrack(self, r: _Room) -> None:
        """Forget a finished room once no frame can still land in its blocks."""
        finished = r.failure is not None or r.received == r.seq_len
        if (finished and r.outstanding is None and r.landing is None
                and self._rooms.get(r.room) is r):
            del self._rooms[r.room]
            self.stats.set_gauge("rooms_live", len(self._rooms))

    def _release(self, r: _Room, a: _Alloc) -> None:
        if a.block_ids:
            self.pool.allocator.free(a.block_ids, owner=r.room)
            self.stats.set_gauge("pool_free_blocks", self.pool.allocator.num_free)

    # ------------------------------------------------------------ receiver thread

    def _owed_room(self, pair: _PairReceiver, meta: Meta) -> _Room:
        if pair.dead is not None:  # declared dead meanwhile: read nothing more from it
            raise _StreamBroken(f"stream from embedding rank {pair.src} already torn down")
        r = self._rooms.get(meta.room)
        if r is None or r.src_rank != pair.src or r.outstanding is None:
            raise _StreamBroken(f"language rank {self.rank}: {meta.kind.name} frame for "
                                f"room {meta.room}, which has nothing outstanding towards "
                                f"embedding rank {pair.src}")
        return r

    def _on_abort_frame(self, pair: _PairReceiver, meta: Meta, reason: str) -> None:
        """The Embedding rank answered our allocation with ABORT: nothing more of
        this room can land, so its blocks are free."""
        with self._lock:
            r = self._owed_room(pair, meta)
            assert r.outstanding is not None
            self._release(r, r.outstanding)
            r.outstanding = None
            pair.owed -= 1
            self._fail(r, f"language rank {self.rank}: room ended by embedding rank "
                          f"{pair.src}: {reason}", cause="aborted_by_peer")
            self._maybe_untrack(r)

    def _on_frame(self, pair: _PairReceiver, meta: Meta) -> None:
        """One frame from `pair`: validate, land the payload, update the room."""
        with self._lock:
            r = self._owed_room(pair, meta)
            a = r.outstanding
            assert a is not None
            r.outstanding = None
            pair.owed -= 1
            r.last_progress = self._clock()
            if meta.kind is not FrameKind.DATA:
                raise _StreamBroken(f"unexpected {meta.kind.name} frame for room {r.room}")
            n, offset, last, corrupt = self._check_data(r, a, meta)
            now = self._clock()
            if r.first_byte_at is None:
                r.first_byte_at = now
                self.stats.observe("alloc_to_first_byte_s", now - (r.alloc_at or r.created))
                self._account_auto(r)
            elif r.partial_at is not None:
                self.stats.observe("resume_gap_s", now - r.partial_at)
                r.partial_at = None
            plan, dsts = self._destinations(r, a, n, offset)
            r.landing = a
            if not last and self.cfg.auto_resume and r.failure is None and corrupt is None:
                r.status = TransferStatus.TRANSFERRING
                # Keyed by what will have landed. Only for a next chunk at least
                # as big as this one (pool mode: double buffering when the pool
                # has room); a smaller one would split what waiting for our own
                # landing blocks gives whole.
                self._send_resume(r, None, landed=offset + n, at_least=len(a.block_ids))
            more = pair.owed > 0
        t0 = time.monotonic()  # posted outside the lock: see _PairReceiver._run
        landing = pair.transport.post_recv(dsts)
        if more:  # after this payload, in stream order
            pair.next_meta = pair.transport.post_meta_recv()
        pair.transport.wait(landing, "payload recv")
        with self._lock:
            if not a.direct and r.outputs is not None:
                self._copy_out(r, plan, offset)
            self.stats.observe("chunk_transfer_s", time.monotonic() - t0)
            self.stats.add(bytes_received=n * self.geometry.token_nbytes, chunks=1)
            r.landing = None
            self._release(r, a)
            r.received += n
            r.chunk_index += 1
            if corrupt is not None:
                self._fail(r, corrupt, cause="corrupt_frame")
            elif r.failure is None and r.received < (r.seq_len or 0):
                if pair.dead is not None:  # the sender left after this chunk
                    self._fail(r, f"language rank {self.rank}: embedding rank {pair.src} is "
                                  f"down: {pair.dead}", cause="peer_lost")
                else:
                    r.status = TransferStatus.TRANSFERRING
                    r.partial_at = self._clock()
                    if self.cfg.auto_resume and r.outstanding is None:
                        self._send_resume(r, None, landed=r.received)  # our blocks came free
            self._maybe_untrack(r)
            if r.failure is None and r.received == r.seq_len:
                self._observe_done(r)
                r.status = TransferStatus.SUCCESS  # last: blocks and room id are free
            self._changed.notify_all()

    def _account_auto(self, r: _Room) -> None:
        """For "auto" first allocations: resume rounds saved against always taking
        the cold-start value (negative: rounds it spent to save memory) and blocks
        beyond what the room needed."""
        if r.auto_first_blocks is None or r.seq_len is None:
            return
        bs = self.geometry.block_size
        fixed = num_blocks_for(self._auto_cold_start(), bs) * bs
        self.stats.add(
            auto_alloc_resumes_avoided=int(r.seq_len > fixed)
            - int(r.seq_len > r.auto_first_blocks * bs),
            auto_alloc_overallocated_blocks=max(
                0, r.auto_first_blocks - num_blocks_for(r.seq_len, bs)))

    def _observe_done(self, r: _Room) -> None:
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

    def _check_data(self, r: _Room, a: _Alloc, m: Meta) -> tuple[int, int, bool, str | None]:
        """Sizes must match the allocation exactly, else the stream is broken.
        Returns (n_tokens, offset, last, why the room is corrupt or None)."""

        def broken(why: str) -> _StreamBroken:
            return _StreamBroken(f"language rank {self.rank}: room {r.room} chunk from "
                                 f"embedding rank {r.src_rank}: {why}", room=r.room)

        if m.token_offset != a.key or m.chunk_index != r.chunk_index:
            raise broken(f"token_offset={m.token_offset} chunk_index={m.chunk_index}, "
                         f"expected {a.key} and {r.chunk_index}")
        if m.first != (m.token_offset == 0):
            raise broken("FIRST flag does not match token_offset")
        corrupt = None
        if m.first:
            if m.seq_len < 1:
                raise broken(f"seq_len={m.seq_len}")
            seq_len = m.seq_len
        else:
            assert r.seq_len is not None
            seq_len = r.seq_len
            if m.seq_len != r.seq_len or m.aux != r.aux:
                corrupt = (f"language rank {self.rank}: chunk {m.chunk_index} of room {r.room} "
                           f"says seq_len={m.seq_len} aux={m.aux}, first chunk said "
                           f"seq_len={r.seq_len} aux={r.aux}")
        expect = min(seq_len - m.token_offset, a.allocated_tokens)
        if m.num_tokens != expect:
            raise broken(f"num_tokens={m.num_tokens}, expected {expect} "
                         f"(seq_len {seq_len}, allocated {a.allocated_tokens})")
        last = m.token_offset + m.num_tokens == seq_len
        if m.last != last:
            raise broken("LAST flag does not match the token count")
        if m.first:
            r.seq_len, r.aux = m.seq_len, m.aux
            self._recent_lengths.append(m.seq_len)
            try:
                r.outputs = {b.name: empty_result((m.seq_len, *b.per_token_shape),
                                                  b.dtype, self.device)
                             for b in self.geometry.wire_buffers}
            except (RuntimeError, MemoryError) as e:
                corrupt = f"language rank {self.rank}: cannot allocate output: {e}"
        return m.num_tokens, m.token_offset, last, corrupt

    def _destinations(self, r: _Room, a: _Alloc, n: int,
                      offset: int) -> tuple[list[Segment], list[torch.Tensor]]:
        """Recv targets in wire order: for each buffer, one tensor per segment."""
        plan = segment_plan(a.block_ids, self.geometry.block_size, n, direct=a.direct,
                            dst_offset=offset)
        bufs = self.geometry.wire_buffers
        if a.direct and r.outputs is not None:
            return plan, [r.outputs[b.name][s.dst_token:s.dst_token + s.num_tokens]
                          for b in bufs for s in plan]
        if not a.direct:
            return plan, [self.pool.token_view(b.name, s.dst_token, s.num_tokens)
                          for b in bufs for s in plan]
        # no output to land in (allocation failed): drain into scratch to keep the stream
        return plan, [torch.empty((s.num_tokens, *b.per_token_shape), dtype=b.dtype,
                                  device=self.device) for b in bufs for s in plan]

    def _copy_out(self, r: _Room, plan: list[Segment], offset: int) -> None:
        assert r.outputs is not None
        for b in self.geometry.wire_buffers:
            out = r.outputs[b.name]
            for s in plan:
                start = offset + s.chunk_start
                out[start:start + s.num_tokens].copy_(
                    self.pool.token_view(b.name, s.dst_token, s.num_tokens))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # before blocks are reused

    def _pair_lost(self, pair: _PairReceiver, err: BaseException, *,
                   from_thread: bool = True, clean: bool = False) -> None:
        """The stream from `pair.src` is unusable: no recv is posted on it again.
        Its rooms fail and their outstanding blocks are freed at once (before a
        meta frame arrives nothing is posted into them; the meta lands in the
        transport's own buffer). Blocks a payload recv is landing in are freed by
        the receiver thread when that recv ends, unless this is that thread."""
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
            if r.src_rank != src:
                continue
            if r.outstanding is not None:
                self._release(r, r.outstanding)
                r.outstanding = None
            if r.landing is not None:
                if not release_landing:
                    continue  # its payload recv is posted: the receiver thread decides
                self._release(r, r.landing)
                r.landing = None
            self._fail(r, f"language rank {self.rank}: {why}", cause="peer_lost")
            self._maybe_untrack(r)

    def _peer_dead(self, src: int, why: str, *, clean: bool = False) -> None:
        """Embedding rank `src` is gone: heartbeats stopped, or (`clean`) it said BYE."""
        with self._lock:
            if src in self._dead:
                return
            self._dead[src] = why
            if not self._closing:
                log.log(logging.INFO if clean else logging.WARNING,
                        "language rank %d: embedding rank %d is down: %s", self.rank, src, why)
            pair = self._pairs.get(src)
            if pair is not None:
                self._pair_lost(pair, PeerLost(why, peer=src), from_thread=False, clean=clean)
            else:
                self._fail_rooms_from(src, f"embedding rank {src} is down: {why}",
                                      release_landing=False)

    # ------------------------------------------------------------ control thread

    def on_message(self, src: int, msg: ControlMessage) -> None:
        """Control thread: a HEARTBEAT or REJECT from Embedding rank `src`."""
        if isinstance(msg, Heartbeat):
            self._last_heard[src] = self._clock()
            if msg.bye:
                self._peer_dead(src, "it shut down", clean=True)
            return
        if not isinstance(msg, Reject):
            return
        with self._lock:
            r = self._rooms.get(msg.room)
            if r is None or r.src_rank != src:
                return  # a room that already ended here
            self._fail(r, f"rejected by embedding rank {src}: {msg.reason}", cause="rejected")

    def on_bad_message(self, src: int | None, room: int | None, why: str) -> None:
        self._warn.warning("bad_message", "language rank %d: from embedding rank %s: %s",
                           self.rank, src, why)
        self.stats.failure("bad_message")

    def on_tick(self) -> None:
        now = self._clock()
        if now >= self._next_heartbeat and not self._closing:
            self._next_heartbeat = now + self.heartbeat_interval
            for e in self.topology.embedding_ranks:
                if e not in self._dead:
                    self._post(e, Heartbeat(self.rank))
        for e, heard in self._last_heard.items():
            if e not in self._dead and now - heard > self.cfg.peer_timeout:
                self._peer_dead(e, f"no heartbeat for {now - heard:.1f}s "
                                   f"(peer_timeout={self.cfg.peer_timeout:g}s)")
        boot = self.cfg.bootstrap_timeout
        with self._lock:
            for r in list(self._rooms.values()):
                if r.failure is not None:
                    continue
                idle = now - r.last_progress
                if r.status == TransferStatus.BOOTSTRAPPING and idle > boot:
                    self._fail(r, f"language rank {self.rank}: no free blocks for room "
                                  f"{r.room} within bootstrap_timeout={boot:g}s",
                               cause="timeout")
                elif self._needs_resume(r) and idle > boot:
                    self._fail(r, f"language rank {self.rank}: room {r.room} waited "
                                  f"{boot:g}s for blocks to resume", cause="timeout")
                    self._post(r.src_rank, Abort(r.room, self.rank, "resume timeout"))
                elif r.outstanding is not None and idle > boot + self.cfg.peer_timeout:
                    stage = "first chunk" if r.seq_len is None else "next chunk"
                    self._fail(r, f"language rank {self.rank}: no {stage} from embedding "
                                  f"rank {r.src_rank} within {boot + self.cfg.peer_timeout:g}s",
                               cause="timeout")
                    self._post(r.src_rank, Abort(r.room, self.rank, "timeout"))

    # ------------------------------------------------------------ shutdown

    def close(self, timeout_s: float) -> None:
        """Abort every live room ("shutdown"), wait (bounded) for the answers owed
        on each stream, then stop the receiver threads."""
        with self._lock:
            self._closing = True
            for r in list(self._rooms.values()):
                if r.status not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
                    self._fail(r, f"language rank {self.rank} shut down", cause="shutdown")
                    if r.alloc_sent:
                        self._post(r.src_rank, Abort(r.room, self.rank, "shutdown"))
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


class Receiver:
    """One room on a Language rank. Every TP rank of the instance makes the same calls."""

    def __init__(self, engine: LanguageEngine, state: _Room) -> None:
        self._engine = engine
        self._r = state
        self.room = state.room
        self.src_rank = state.src_rank

    def init(self, num_tokens: int | None = None) -> bool:
        """Allocate (default_alloc_tokens if None) and send ALLOC. False: no free
        blocks yet, or the room failed (see poll()); call again later."""
        return self._engine._init(self._r, num_tokens)

    def poll(self) -> TransferStatus:
        return self._r.status

    @property
    def needs_resume(self) -> bool:
        with self._engine._lock:
            return self._engine._needs_resume(self._r)

    @property
    def progress(self) -> tuple[int, int | None]:
        return self._r.received, self._r.seq_len

    @property
    def failure(self) -> str | None:
        return self._r.failure

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until the room is SUCCESS or FAILED or `needs_resume`, or
        `timeout_s` (default: bootstrap_timeout + peer_timeout) passed; return
        the status then. For loops that would rather sleep than poll."""
        e = self._engine
        bound = e.cfg.bootstrap_timeout + e.cfg.peer_timeout if timeout_s is None else timeout_s
        done = (TransferStatus.SUCCESS, TransferStatus.FAILED)
        with e._changed:
            e._changed.wait_for(lambda: self._r.status in done or e._needs_resume(self._r),
                                bound)
        return self._r.status

    def resume(self, num_tokens: int | None = None) -> bool:
        """Allocate for the rest (or num_tokens of it) and send RESUME. False: no
        blocks yet (or the room failed); a repeat in the same round does nothing."""
        return self._engine._resume(self._r, num_tokens)

    def result(self) -> EmbeddingResult:
        return self._engine._result(self._r)

    def abort(self, reason: str = "aborted") -> None:
        self._engine._abort(self._r, reason)
