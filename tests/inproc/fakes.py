"""Fakes for the in-process layer: a pair transport, a control router, a clock,
and a `World` that wires real engines to them.

The engines under test are the real `EmbeddingEngine` and `LanguageEngine`,
with their own threads; only what they talk through is fake, and each fake
keeps the promises of the real thing that the engines rely on:

- `FakeLink` is one (Embedding rank -> Language rank) stream, like a Gloo or
  NCCL pair without tags: every tensor posted is one message, and the i-th
  send matches the i-th recv, whatever their shapes. Bytes are copied at the
  moment a send meets its recv, and a send completes only then (a rendezvous,
  as the real transport's comment says). A size disagreement between a send
  and its recv is where Gloo aborts the process and NCCL truncates or hangs:
  here it is recorded on the link, fails both works with `WireMismatch`,
  breaks the link, and makes `World.close()` fail. A link can be broken (peer
  lost: pending and later ops fail with `PeerLost`) and gated (messages match
  only once the test releases them), so a test can deliver a DATA meta, then a
  control message, then the payload, in exactly that order. Every post call
  records whether the posting engine's lock was held. On a CUDA device
  (`World(device=...)`, used by `scripts/gpu_check.py`) a link moves device
  memory on a CUDA stream of its own, as NCCL does: each post makes that
  stream wait for the posting thread's current stream (and a DATA frame's
  sends for the producer's event, which the Embedding engine must pass), the
  copy of a matched message is queued there (after an optional
  `torch.cuda._sleep`, so anything that reads too early sees garbage), and a
  wait returns only once the copy's event is host-observed, through the
  library's own polling (`disagg.streams.wait_until`). On CPU it copies at
  the match, as before.
- `FakeControl` routes control messages between the engines: `post` encodes
  with `wire.encode` and queues; delivery decodes with `wire.decode`, checks
  who may say what (as `ControlChannel` does) and calls `on_message` or
  `on_bad_message`. Messages wait until the test delivers them, or are
  pumped by a thread in auto mode, like the real control threads. One lock
  serialises deliveries and ticks: an engine sees one control thread.
- `FakeClock` is the engines' injected clock; the test advances it and calls
  `on_tick` itself (`World.tick`, `World.advance`).

Every wait in here is bounded and sleeps on a condition variable; a bound
that runs out is reported with the state seen. The transport's waits wake on
the link's own events only. `World.run_until`, which waits for engine state,
wakes on any fake's event and looks again at least every 2 ms, because an
engine thread may change a room's state without posting anything.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from disagg import streams, wire
from disagg.config import DisaggConfig
from disagg.control import ControlHandler
from disagg.embedding import EmbeddingEngine, Sender
from disagg.errors import DisaggError, PeerLost, ProtocolError, TransferTimeout
from disagg.geometry import Geometry, Topology
from disagg.language import LanguageEngine, Receiver
from disagg.meta import META_LEN, FrameKind, Meta
from disagg.stats import Stats
from disagg.streams import wait_until
from disagg.transport import Posted
from disagg.types import TransferStatus
from disagg.wire import ControlMessage

CPU = torch.device("cpu")
# The device every World uses unless told otherwise: DISAGG_TEST_DEVICE ("cpu",
# "cuda", "cuda:N"); scripts/gpu_check.py runs this layer on a GPU that way.
# On CUDA each link waits COPY_DELAY_CYCLES of GPU time before each copy (~50
# us at 1.5-2 GHz): long enough that anything reading early reads garbage.
TEST_DEVICE = torch.device(os.environ.get("DISAGG_TEST_DEVICE", "cpu"))
COPY_DELAY_CYCLES = 100_000
LINK_TIMEOUT_S = 5.0  # a transport wait that runs this long is a hang: the link reports it
WAIT_S = 5.0  # any one bounded wait of a test
CLOSE_S = 5.0  # engines' close(), and the wait for their threads to end
THREAD_PREFIX = "disagg"
TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)
RecvInto = Literal["output", "pool"]  # DisaggConfig.recv_into


class WireMismatch(DisaggError):
    """A send and the recv it matched disagree in size. Gloo aborts the process
    here ("Received data size doesn't match expected size"), NCCL truncates
    or hangs: never something an engine may recover from."""


class Activity:
    """A generation counter that every fake bumps on any event, so a test can
    sleep until something happened instead of polling."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.generation = 0

    def bump(self) -> None:
        with self._cv:
            self.generation += 1
            self._cv.notify_all()

    def wait_change(self, since: int, timeout: float) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.generation != since, timeout)


# ---------------------------------------------------------------- clock


class FakeClock:
    """The engines' clock: only `advance` moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time does not go back: advance({seconds})")
        with self._lock:
            self._now += seconds


# ---------------------------------------------------------------- transport


@dataclass(frozen=True)
class PostRecord:
    """One post call on a link: who made it, and whether it held its engine's lock."""

    side: str  # "embedding" or "language"
    op: str  # "post_frame", "post_meta_recv" or "post_recv"
    num_tensors: int
    under_lock: bool
    thread: str


@dataclass(frozen=True)
class FrameRecord:
    """A frame as the Embedding side posted it: its meta, and where its
    messages sit in the send stream (`first` is the meta's index)."""

    meta: Meta
    payload_nbytes: tuple[int, ...]
    first: int

    @property
    def size(self) -> int:
        """Messages in the frame: the meta and one per payload tensor."""
        return 1 + len(self.payload_nbytes)


class _Message:
    """One posted tensor, send or recv; it is its own `Work` in `Posted.works`."""

    __slots__ = ("done", "event", "failure", "index", "tensor", "waited")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index = index
        # None once matched: as a finished Work, the link keeps no tensor alive
        # (recycled results are reused only once nothing views them)
        self.tensor: torch.Tensor | None = tensor
        self.done = False  # matched (on CUDA: its copy queued, complete once `event` is)
        self.event: torch.cuda.Event | None = None
        # (error type, why): set when the message can no longer complete
        self.failure: tuple[type[DisaggError], str] | None = None
        # Gloo's p2p Work may be waited once: a second wait() waits for another message
        self.waited = False


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{t.nbytes} bytes ({t.dtype}, shape {list(t.shape)})"


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # contiguous (checked at post): a view


class FakePairTransport:
    """One end of a `FakeLink`; implements `disagg.transport.PairTransport`.
    The Embedding end only sends, the Language end only receives."""

    def __init__(self, link: FakeLink, side: str, peer: int) -> None:
        self.link = link
        self.side = side
        self.peer = peer
        # Set by `World` to the owning engine's `holds_lock`: every post records it.
        self.lock_probe: Callable[[], bool] | None = None
        self.aborts = 0

    def post_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> Posted:
        self._record("post_frame", 1 + len(payload))
        self._only("embedding", "post_frame")
        if ready is not None and not self.link.cuda:
            raise self.link.misuse("post_frame got a CUDA event on a CPU link")
        if ready is None and self.link.cuda and meta.kind is FrameKind.DATA:
            raise self.link.misuse(f"room {meta.room}: a DATA frame without the producer's "
                                   f"CUDA event: its sends may read the tensors before the "
                                   f"producer's stream has written them")
        # a meta tensor per frame, as the real one (copied on the library stream)
        tensors = [streams.to_device(meta.to_tensor(), self.link.device), *payload]
        return Posted(self.link.post_sends(meta, tensors, ready),  # type: ignore[arg-type]
                      tensors)

    def wait(self, posted: Posted, what: str = "send") -> None:
        self.link.wait_messages(posted.works, what, self.peer)  # type: ignore[arg-type]

    def post_meta_recv(self) -> Posted:
        self._record("post_meta_recv", 1)
        self._only("language", "post_meta_recv")
        with streams.on_library_stream(self.link.device):
            t = torch.empty(META_LEN, dtype=torch.int64, device=self.link.device)
        return Posted(self.link.post_recvs([t]), [t])  # type: ignore[arg-type]

    def wait_meta(self, posted: Posted) -> Meta:
        self.wait(posted, "meta recv")
        # ProtocolError if garbled, as the real one (read back on the library stream)
        return Meta.from_tensor(streams.to_host(posted.tensors[0]))

    def post_recv(self, dsts: list[torch.Tensor]) -> Posted:
        self._record("post_recv", len(dsts))
        self._only("language", "post_recv")
        return Posted(self.link.post_recvs(list(dsts)), dsts)  # type: ignore[arg-type]

    def post_frame_recv(self, dsts: list[torch.Tensor]) -> tuple[Posted, Posted | None]:
        # two posts here: a fake link matches message by message, as Gloo does
        return self.post_meta_recv(), self.post_recv(dsts) if dsts else None

    def abort(self) -> None:
        """As Gloo's: the pair's pending ops end when its peer's connection
        closes, not here; counted, so tests see when the engine calls it."""
        self.aborts += 1

    def _record(self, op: str, n: int) -> None:
        under = bool(self.lock_probe()) if self.lock_probe is not None else False
        self.link.note_post(PostRecord(self.side, op, n, under,
                                       threading.current_thread().name))

    def _only(self, side: str, op: str) -> None:
        if self.side != side:
            raise self.link.misuse(f"{op} on the {self.side} end (streams go embedding -> "
                                   f"language only)")


class FakeLink:
    """One pair's ordered stream, Embedding rank `emb` -> Language rank `lang`.

    Ungated (the default), a send and a recv match as soon as both are
    posted. Gated, the next message matches only once released (`release`,
    `release_frame`, `deliver`, `deliver_frame`); `open()` lifts the gate.
    """

    def __init__(self, emb: int, lang: int, activity: Activity, *,
                 timeout_s: float = LINK_TIMEOUT_S, gated: bool = False,
                 device: torch.device = CPU, copy_delay_cycles: int = 0) -> None:
        self.name = f"link {emb}->{lang}"
        self.timeout_s = timeout_s
        self.gated = gated
        self.device = device
        self.cuda = device.type == "cuda"
        # CUDA: the link's own stream, and GPU cycles spent before each copy
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copy_delay_cycles = copy_delay_cycles
        self.producer_events = 0  # DATA frames whose sends waited for the producer's event
        self._activity = activity
        self._cv = threading.Condition()
        self._sends: list[_Message] = []
        self._recvs: list[_Message] = []
        self._matched = 0
        self._released = 0
        self.broken: str | None = None
        self.errors: list[str] = []  # anything here fails the test at World.close()
        self.posts: list[PostRecord] = []
        self.frames: list[FrameRecord] = []
        self.embedding = FakePairTransport(self, "embedding", peer=lang)
        self.language = FakePairTransport(self, "language", peer=emb)

    # ------------------------------------------------------------ engine side

    def note_post(self, record: PostRecord) -> None:
        with self._cv:
            self.posts.append(record)

    def misuse(self, why: str) -> WireMismatch:
        with self._cv:
            self.errors.append(f"{self.name}: {why}")
        return WireMismatch(f"{self.name}: {why}")

    def post_sends(self, meta: Meta, tensors: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> list[_Message]:
        return self._post(self._sends, tensors, meta, ready)

    def post_recvs(self, tensors: list[torch.Tensor]) -> list[_Message]:
        return self._post(self._recvs, tensors, None)

    def _post(self, stream: list[_Message], tensors: list[torch.Tensor],
              meta: Meta | None, ready: torch.cuda.Event | None = None) -> list[_Message]:
        bad = [_describe_tensor(t) for t in tensors if not t.is_contiguous()]
        if bad:  # torch.distributed refuses these
            raise self.misuse(f"non-contiguous tensors posted: {bad}")
        elsewhere = [f"{_describe_tensor(t)} on {t.device}" for t in tensors
                     if t.device != self.device]
        if elsewhere:  # NCCL takes device tensors only, Gloo (here) CPU ones
            raise self.misuse(f"tensors posted off the link's device {self.device}: {elsewhere}")
        # as the real transport: every post is made on the library stream
        with streams.on_library_stream(self.device), self._cv:
            if self.broken is not None:  # as the real transport: posting on a broken pair
                raise PeerLost(f"posting on {self.name} failed: {self.broken}")
            if self.stream is not None:
                # as ProcessGroupNCCL: the op's stream waits for the poster's current
                # stream (where its tensors were made), and a frame for its producer
                posted_at = torch.cuda.Event()
                posted_at.record(torch.cuda.current_stream(self.device))
                self.stream.wait_event(posted_at)
                if ready is not None:
                    self.stream.wait_event(ready)
                    self.producer_events += 1
            if meta is not None:
                self.frames.append(FrameRecord(meta, tuple(t.nbytes for t in tensors[1:]),
                                               len(stream)))
            msgs = [_Message(len(stream) + i, t) for i, t in enumerate(tensors)]
            stream.extend(msgs)
            self._match()
            self._cv.notify_all()
        self._activity.bump()
        return msgs

    def wait_messages(self, msgs: list[_Message], what: str, peer: int) -> None:
        """Block until every message completed; raise as the real transport would:
        `PeerLost` once the link is broken, `TransferTimeout` after `timeout_s`
        (which, as on Gloo, also closes the pair, and is reported as a hang).
        On CUDA, complete means the copy's event is host-observed."""
        deadline = time.monotonic() + self.timeout_s
        twice = [m.index for m in msgs if m.waited]
        if twice:
            raise self.misuse(f"{what} with rank {peer}: messages {twice} waited twice (a "
                              f"second Gloo wait() waits for another message)")
        for m in msgs:
            m.waited = True
        with self._cv:
            while True:
                failure = next((m.failure for m in msgs if m.failure is not None), None)
                if failure is not None:
                    kind, why = failure
                    raise kind(f"{what} with rank {peer} failed: {why}", peer=peer)
                if all(m.done for m in msgs):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    why = (f"{what} with rank {peer}: not matched within {self.timeout_s:g}s "
                           f"({self._state()})")
                    self.errors.append(f"{self.name}: {why}")
                    self._break(f"timed out: {why}")
                    raise TransferTimeout(why, peer=peer)
                self._cv.wait(left)
        events = [m.event for m in msgs if m.event is not None]
        if events and not wait_until(lambda: all(e.query() for e in events), deadline):
            why = f"{what} with rank {peer}: CUDA copy not done within {self.timeout_s:g}s"
            with self._cv:
                self.errors.append(f"{self.name}: {why}")
                self._break(f"timed out: {why}")
            raise TransferTimeout(why, peer=peer)

    def _match(self) -> None:
        """Pair sends with recvs in stream order (caller holds `_cv`)."""
        while (self.broken is None and self._matched < len(self._sends)
               and self._matched < len(self._recvs)
               and (not self.gated or self._matched < self._released)):
            s, r = self._sends[self._matched], self._recvs[self._matched]
            self._matched += 1
            assert s.tensor is not None and r.tensor is not None
            if s.tensor.nbytes != r.tensor.nbytes:
                why = (f"message {s.index}: a send of {_describe_tensor(s.tensor)} matched a "
                       f"recv of {_describe_tensor(r.tensor)}: Gloo aborts the process here, "
                       f"NCCL truncates or hangs")
                self.errors.append(f"{self.name}: {why}")
                s.failure = r.failure = (WireMismatch, why)
                self._break(f"stream unusable after a size mismatch at message {s.index}")
                return
            if self.stream is None:
                _as_bytes(r.tensor).copy_(_as_bytes(s.tensor))
            else:  # queued on the link's stream, after both posts' stream waits
                with torch.cuda.stream(self.stream):
                    if self.copy_delay_cycles:
                        torch.cuda._sleep(self.copy_delay_cycles)
                    _as_bytes(r.tensor).copy_(_as_bytes(s.tensor), non_blocking=True)
                    s.event = r.event = torch.cuda.Event()
                    s.event.record(self.stream)
            s.done = r.done = True
            s.tensor = r.tensor = None

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        for m in [*self._sends, *self._recvs]:
            if not m.done and m.failure is None:
                m.failure = (PeerLost, why)
        self._cv.notify_all()

    def _state(self) -> str:
        gate = f", released {self._released}" if self.gated else ""
        return (f"{len(self._sends)} sent in {len(self.frames)} frames, {len(self._recvs)} recvs "
                f"posted, {self._matched} matched{gate}"
                + (f", broken: {self.broken}" if self.broken else ""))

    # ------------------------------------------------------------ test side

    def describe(self) -> str:
        with self._cv:
            return f"{self.name}: {self._state()}"

    @property
    def num_sends(self) -> int:
        return len(self._sends)

    @property
    def num_recvs(self) -> int:
        return len(self._recvs)

    @property
    def num_matched(self) -> int:
        return self._matched

    def break_link(self, why: str = "peer lost") -> None:
        """The peer is gone: pending and later operations fail with `PeerLost`."""
        with self._cv:
            self._break(why)
        self._activity.bump()

    def gate(self) -> None:
        """From now on, messages not yet matched wait for `release`."""
        with self._cv:
            self.gated = True
            self._released = self._matched

    def open(self) -> None:
        with self._cv:
            self.gated = False
            self._match()
            self._cv.notify_all()
        self._activity.bump()

    def release(self, n: int = 1) -> None:
        """Let `n` more messages match (when their recvs are posted)."""
        with self._cv:
            self._released = max(self._released, self._matched) + n
            self._match()
            self._cv.notify_all()
        self._activity.bump()

    def release_frame(self, timeout: float = WAIT_S) -> FrameRecord:
        """Release the rest of the next frame (waiting for it to be posted)."""
        with self._cv:
            start = max(self._released, self._matched)
            self._wait_locked(lambda: self._frame_at(start) is not None,
                              f"a frame holding message {start}", timeout)
            f = self._frame_at(start)
            assert f is not None
            self._released = f.first + f.size
            self._match()
            self._cv.notify_all()
        self._activity.bump()
        return f

    def deliver(self, n: int = 1, timeout: float = WAIT_S) -> None:
        """Release `n` messages and wait until they have matched."""
        with self._cv:
            target = max(self._released, self._matched) + n
        self.release(n)
        self.wait_matched(target, timeout)

    def deliver_next(self, timeout: float = WAIT_S) -> None:
        """Release the next message alone and wait until it has matched."""
        self.deliver(1, timeout)

    def deliver_frame(self, timeout: float = WAIT_S) -> FrameRecord:
        """Release the next frame and wait until all of it has matched (the
        receiver posts the payload recvs once it has read the meta)."""
        f = self.release_frame(timeout)
        self.wait_matched(f.first + f.size, timeout)
        return f

    def wait_until(self, pred: Callable[[FakeLink], bool], what: str,
                   timeout: float = WAIT_S) -> None:
        with self._cv:
            self._wait_locked(lambda: pred(self), what, timeout)

    def wait_sends(self, n: int, timeout: float = WAIT_S) -> None:
        self.wait_until(lambda k: len(k._sends) >= n, f"{n} sends posted", timeout)

    def wait_recvs(self, n: int, timeout: float = WAIT_S) -> None:
        self.wait_until(lambda k: len(k._recvs) >= n, f"{n} recvs posted", timeout)

    def wait_frames(self, n: int, timeout: float = WAIT_S) -> None:
        self.wait_until(lambda k: len(k.frames) >= n, f"{n} frames posted", timeout)

    def wait_matched(self, n: int, timeout: float = WAIT_S) -> None:
        self.wait_until(lambda k: k._matched >= n, f"{n} messages matched", timeout)

    def _wait_locked(self, pred: Callable[[], bool], what: str, timeout: float) -> None:
        if not self._cv.wait_for(pred, timeout):
            raise AssertionError(f"{self.name}: {what}: not within {timeout:g}s "
                                 f"({self._state()})")

    def _frame_at(self, index: int) -> FrameRecord | None:
        for f in reversed(self.frames):
            if f.first <= index < f.first + f.size:
                return f
        return None

    def posts_under_lock(self) -> list[PostRecord]:
        with self._cv:
            return [p for p in self.posts if p.under_lock]

    def metas(self) -> list[Meta]:
        """The meta of every frame sent so far, in stream order."""
        with self._cv:
            return [f.meta for f in self.frames]


# ---------------------------------------------------------------- control


@dataclass(frozen=True)
class Envelope:
    """A control message in flight: raw bytes, as on the socket. `src` None is
    a sender that is no known rank (a foreign ZeroMQ identity)."""

    src: int | None
    dst: int
    payload: bytes

    @property
    def msg(self) -> ControlMessage | None:
        try:
            return wire.decode(self.payload)
        except ProtocolError:
            return None

    def __str__(self) -> str:
        return f"{self.src}->{self.dst}: {self.msg!r}"


Where = Callable[[Envelope], bool]


class _Port:
    """What one engine holds as its `ControlPort`."""

    def __init__(self, control: FakeControl, rank: int) -> None:
        self._control = control
        self._rank = rank

    def post(self, peer: int, msg: ControlMessage) -> None:
        self._control.post(self._rank, peer, msg)


class FakeControl:
    """Routes control messages between the engines of one process."""

    def __init__(self, activity: Activity, max_queued: int = 1 << 16) -> None:
        self._activity = activity
        self.max_queued = max_queued
        self._cv = threading.Condition()  # guards the queue
        self._queue: collections.deque[Envelope] = collections.deque()
        # one "control thread" per process: deliveries and ticks never overlap
        self.delivering = threading.RLock()
        self._handlers: dict[int, ControlHandler] = {}
        self._roles: dict[int, str] = {}
        self.dead: set[int] = set()
        self.delivered: list[Envelope] = []
        self.dropped: list[Envelope] = []
        self.errors: list[str] = []
        self._pump: threading.Thread | None = None
        self._stop = False

    def register(self, rank: int, handler: ControlHandler, role: str) -> None:
        self._handlers[rank] = handler
        self._roles[rank] = role

    def port(self, rank: int) -> _Port:
        return _Port(self, rank)

    @property
    def auto(self) -> bool:
        return self._pump is not None

    # ------------------------------------------------------------ sending

    def post(self, src: int, dst: int, msg: ControlMessage) -> None:
        """An engine's `ControlPort.post`: encoded now, queued for delivery."""
        if self._roles.get(dst) in (None, self._roles.get(src)):  # a bug of the engine
            self.errors.append(f"{self._roles.get(src)} rank {src} posted {msg!r} to rank "
                               f"{dst} ({self._roles.get(dst) or 'no rank'})")
            return
        self._enqueue(Envelope(src, dst, wire.encode(msg)))

    def inject(self, src: int | None, dst: int, payload: bytes) -> None:
        """Queue raw bytes as if `src` had sent them (malformed ones included)."""
        self._enqueue(Envelope(src, dst, payload))

    def _enqueue(self, env: Envelope) -> None:
        with self._cv:
            if env.src in self.dead or env.dst in self.dead:
                self.dropped.append(env)
                return
            if len(self._queue) >= self.max_queued:  # as the real outbox
                raise DisaggError(f"control outbox full ({self.max_queued} messages)")
            self._queue.append(env)
            self._cv.notify_all()
        self._activity.bump()

    # ------------------------------------------------------------ test side

    def pending(self, where: Where | None = None) -> list[Envelope]:
        with self._cv:
            return [e for e in self._queue if where is None or where(e)]

    def drop(self, where: Where | None = None) -> list[Envelope]:
        """Remove queued messages (all, or those `where` picks) without delivery."""
        with self._cv:
            gone = [e for e in self._queue if where is None or where(e)]
            self._queue = collections.deque(e for e in self._queue if e not in gone)
            self.dropped.extend(gone)
        return gone

    def kill(self, rank: int) -> None:
        """`rank` is gone: whatever it sent and whatever is sent to it is lost."""
        with self._cv:
            self.dead.add(rank)
        self.drop(lambda e: e.src == rank or e.dst == rank)

    def deliver(self, n: int = 1, where: Where | None = None) -> int:
        """Deliver the first `n` queued messages (that `where` picks: a later
        message may so overtake earlier ones). Returns how many were."""
        done = 0
        while done < n:
            with self._cv:
                env = next((e for e in self._queue if where is None or where(e)), None)
                if env is None:
                    break
                self._queue.remove(env)
            self._dispatch(env)
            done += 1
        return done

    def deliver_all(self, where: Where | None = None, limit: int = 100_000) -> int:
        """Deliver until nothing (that `where` picks) is queued, messages posted
        meanwhile included."""
        if self.auto:
            raise AssertionError("deliver_all() while the auto pump runs")
        n = 0
        while self.deliver(1, where):
            n += 1
            if n > limit:
                raise AssertionError(f"control messages keep coming: {n} delivered")
        return n

    def start_auto(self) -> None:
        """Deliver every message as it comes, on a pump thread (like the real
        control threads), until `stop_auto`."""
        if self._pump is not None:
            return
        self._stop = False
        self._pump = threading.Thread(target=self._run_pump, name="fake-control-pump",
                                      daemon=True)
        self._pump.start()

    def stop_auto(self, timeout: float = CLOSE_S) -> None:
        pump = self._pump
        if pump is None:
            return
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        pump.join(timeout)
        if pump.is_alive():
            self.errors.append(f"control pump still running after {timeout:g}s")
        self._pump = None

    def _run_pump(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stop)
                if not self._queue:
                    return
                env = self._queue.popleft()
            with contextlib.suppress(Exception):  # recorded in self.errors; the pump goes on
                self._dispatch(env)

    # ------------------------------------------------------------ delivery

    def _dispatch(self, env: Envelope) -> None:
        handler = self._handlers.get(env.dst)
        if handler is None or env.dst in self.dead:
            self.dropped.append(env)
            return
        with self.delivering:
            self.delivered.append(env)
            try:
                self._deliver_to(handler, env)
            except Exception as e:  # the real thread logs and survives; a test must see it
                self.errors.append(f"rank {env.dst}'s handler raised on {env}: {e!r}")
                raise
        self._activity.bump()

    def _deliver_to(self, handler: ControlHandler, env: Envelope) -> None:
        """What `ControlChannel` does with inbound bytes: decode, check who may
        say what, then `on_message` or `on_bad_message`."""
        src = env.src
        if src is None or self._roles.get(src) in (None, self._roles[env.dst]):
            handler.on_bad_message(None, None, f"message from unknown peer {src!r}")
            return
        try:
            msg = wire.decode(env.payload)
        except ProtocolError as e:
            handler.on_bad_message(src, wire.peek_room(env.payload),
                                   f"malformed control message: {e}")
            return
        why = self._unauthorised(src, env.dst, msg)
        if why is not None:
            room = getattr(msg, "room", None)
            handler.on_bad_message(src, room if isinstance(room, int) else None, why)
            return
        handler.on_message(src, msg)

    def _unauthorised(self, src: int, dst: int, msg: ControlMessage) -> str | None:
        if self._roles[dst] == "embedding":
            if isinstance(msg, wire.Reject):
                return "REJECT is not a Language->Embedding message"
            claimed = (msg.rank if isinstance(msg, (wire.Heartbeat, wire.PairDown))
                       else msg.lang_rank)
            if claimed != src:
                return f"message claims language rank {claimed} but comes from {src}"
            return None
        if isinstance(msg, wire.Reject) or (isinstance(msg, (wire.Heartbeat, wire.PairDown))
                                            and msg.rank == src):
            return None
        return f"unexpected {type(msg).__name__} from embedding rank {src}"


# ---------------------------------------------------------------- world


def disagg_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def _join_threads(timeout: float) -> list[str]:
    """Wait (bounded) for every disagg thread to end; the names of those left."""
    deadline = time.monotonic() + timeout
    for t in disagg_threads():
        t.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in disagg_threads())


class World:
    """Every rank of a topology in this process: the real engines, one
    `FakeLink` per (Embedding, Language) pair, one `FakeControl`, one
    `FakeClock`. Ranks [0, E) embed; then `instances` Language instances of
    `cfg.language_tp_size` ranks. Pool sizes (and other per-rank fields) may
    differ, as on real ranks: `embedding_blocks` is every Embedding rank's
    budget, `language_blocks` every Language rank's pool, `per_rank` replaces
    any config field of one rank.

    `close()` shuts everything down and fails on anything left behind: a
    disagg thread, an error on a link or in the control router, a post made
    under an engine lock, a pool or budget not whole, a room still live.
    """

    def __init__(self, cfg: DisaggConfig, *, instances: int = 1,
                 embedding_blocks: int | None = None, language_blocks: int | None = None,
                 per_rank: dict[int, dict[str, Any]] | None = None,
                 gated: bool = False, auto_control: bool = False,
                 link_timeout_s: float = LINK_TIMEOUT_S, device: torch.device | None = None,
                 copy_delay_cycles: int | None = None) -> None:
        self.cfg = cfg
        device = TEST_DEVICE if device is None else device
        if copy_delay_cycles is None:
            copy_delay_cycles = COPY_DELAY_CYCLES if device.type == "cuda" else 0
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device  # every engine's: pools, results, and what the links move
        self.topology = Topology(cfg.num_embedding_ranks + instances * cfg.language_tp_size,
                                 cfg.num_embedding_ranks, cfg.language_tp_size)
        self.activity = Activity()
        self.clock = FakeClock()
        self.control = FakeControl(self.activity)
        self.links = {(e, lang): FakeLink(e, lang, self.activity, timeout_s=link_timeout_s,
                                          gated=gated, device=device,
                                          copy_delay_cycles=copy_delay_cycles)
                      for e in self.topology.embedding_ranks
                      for lang in self.topology.language_ranks}
        role_blocks = {"embedding": embedding_blocks, "language": language_blocks}
        self.cfgs: dict[int, DisaggConfig] = {}
        for rank in range(self.topology.world_size):
            changes = dict((per_rank or {}).get(rank, {}))
            blocks = role_blocks[self.topology.role(rank)]
            if blocks is not None:
                changes.setdefault("num_blocks", blocks)
            self.cfgs[rank] = cfg.replace(**changes) if changes else cfg
        self.stats: dict[int, Stats] = {}
        self.embedding: dict[int, EmbeddingEngine] = {}
        self.language: dict[int, LanguageEngine] = {}
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.close(check=False)
            raise
        if auto_control:
            self.control.start_auto()

    def _build(self) -> None:
        topo = self.topology
        geom = {rank: Geometry.from_config(c) for rank, c in self.cfgs.items()}
        for e in topo.embedding_ranks:
            st = self.stats[e] = _stats(geom[e])
            eng = EmbeddingEngine(
                self.cfgs[e], e, topo, geom[e],
                {lang: geom[lang].num_blocks for lang in topo.language_ranks},
                {lang: self.links[(e, lang)].embedding for lang in topo.language_ranks},
                self.device, st, self.control.port(e), clock=self.clock.now)
            self.embedding[e] = eng
            self.control.register(e, eng, "embedding")
            for lang in topo.language_ranks:
                self.links[(e, lang)].embedding.lock_probe = eng.holds_lock
        for lang in topo.language_ranks:
            st = self.stats[lang] = _stats(geom[lang])
            leng = LanguageEngine(
                self.cfgs[lang], lang, topo, geom[lang],
                {e: self.links[(e, lang)].language for e in topo.embedding_ranks},
                self.device, st, self.control.port(lang), clock=self.clock.now)
            self.language[lang] = leng
            self.control.register(lang, leng, "language")
            for e in topo.embedding_ranks:
                self.links[(e, lang)].language.lock_probe = leng.holds_lock

    # ------------------------------------------------------------ access

    def emb(self, rank: int = 0) -> EmbeddingEngine:
        return self.embedding[rank]

    def lang(self, rank: int | None = None) -> LanguageEngine:
        return self.language[self.topology.language_ranks[0] if rank is None else rank]

    def link(self, emb: int = 0, lang: int | None = None) -> FakeLink:
        return self.links[(emb, self.topology.language_ranks[0] if lang is None else lang)]

    def snapshot(self, rank: int) -> dict[str, Any]:
        return self.stats[rank].snapshot()

    def causes(self, rank: int) -> dict[str, int]:
        return dict(self.snapshot(rank)["failures_by_cause"])

    def counter(self, rank: int, name: str) -> int:
        return int(self.snapshot(rank)[name])

    # ------------------------------------------------------------ driving

    def deliver_all(self, where: Where | None = None) -> int:
        return self.control.deliver_all(where)

    def tick(self) -> None:
        """Every live engine's `on_tick`, Embedding ranks first, as the control
        threads would (never at the same time as a delivery)."""
        engines: list[tuple[int, ControlHandler]] = [*self.embedding.items(),
                                                     *self.language.items()]
        with self.control.delivering:
            for rank, eng in engines:
                if rank not in self.control.dead:
                    eng.on_tick()

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move the clock by `seconds` in steps (default a quarter of
        peer_timeout), ticking every live engine and delivering every control
        message after each: heartbeats flow, so only a dead or muted peer is
        declared lost."""
        step = step if step is not None else self.cfg.peer_timeout / 4
        left = seconds
        while left > 1e-12:
            dt = min(step, left)
            self.clock.advance(dt)
            left -= dt
            self.tick()
            self.deliver_all()

    def kill(self, rank: int) -> None:
        """`rank` dies: its control traffic is lost and its links break."""
        self.control.kill(rank)
        for (e, lang), link in self.links.items():
            if rank in (e, lang):
                link.break_link(f"rank {rank} died")

    def mute(self, rank: int) -> None:
        """`rank` goes silent (wedged): its control traffic is lost, its links stand."""
        self.control.kill(rank)

    def run_until(self, pred: Callable[[], Any], what: str, timeout: float = WAIT_S, *,
                  deliver: bool = True, detail: Callable[[], str] | None = None) -> Any:
        """pred()'s first truthy value. Between looks, control messages are
        delivered (`deliver`, unless the auto pump does it) and the test sleeps
        until some link or control event happens (or 2 ms, for state that
        engine threads change without one)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.activity.generation
            if deliver and not self.control.auto:
                self.deliver_all()
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                extra = f"{detail()}; " if detail is not None else ""
                raise AssertionError(f"{what}: not within {timeout:g}s; {extra}{self.describe()}")
            self.activity.wait_change(seen, 0.002)

    def ended(self, handle: Sender | Receiver, what: str,
              timeout: float = WAIT_S) -> TransferStatus:
        """Wait (delivering control messages, never resuming) until a Sender or
        Receiver is SUCCESS or FAILED; its status."""
        self.run_until(lambda: handle.poll() in TERMINAL, what, timeout,
                       detail=lambda: f"{handle.poll().name} failure={handle.failure}")
        return handle.poll()

    def finish(self, receiver: Receiver, what: str, timeout: float = WAIT_S) -> TransferStatus:
        """Drive a Receiver to its end, calling resume() whenever it needs one."""

        def step() -> bool:
            if receiver.needs_resume:
                receiver.resume()
            return receiver.poll() in TERMINAL

        self.run_until(step, what, timeout, detail=lambda: (
            f"{receiver.poll().name} progress={receiver.progress} "
            f"needs_resume={receiver.needs_resume} failure={receiver.failure}"))
        return receiver.poll()

    # ------------------------------------------------------------ checks

    def describe(self) -> str:
        parts = [link.describe() for link in self.links.values()]
        parts.append(f"control: {len(self.control.pending())} queued "
                     f"{[str(e) for e in self.control.pending()[:4]]}")
        for rank in sorted(self.stats):
            s = self.snapshot(rank)
            parts.append(f"rank {rank}: free {s['pool_free_blocks']}/{s['pool_total_blocks']} "
                         f"rooms_live {s['rooms_live']} failures {s['failures_by_cause']}")
        return "; ".join(parts)

    def whole_problems(self, *, dead_too: bool = False) -> list[str]:
        """Pools and budgets with blocks out, or rooms still live. A dead or muted
        rank is left out unless `dead_too`: it holds what it held when it went
        silent, until it is closed."""
        ranks = {r for r in self.stats if dead_too or r not in self.control.dead}
        out = []
        for rank, e in self.embedding.items():
            if rank in ranks and e.budget.num_free != e.budget.num_blocks:
                out.append(f"embedding rank {rank}: budget {e.budget.num_free}/"
                           f"{e.budget.num_blocks} free")
        for rank, lang in self.language.items():
            a = lang.pool.allocator
            if rank in ranks and a.num_free != a.num_blocks:
                out.append(f"language rank {rank}: pool {a.num_free}/{a.num_blocks} free")
        if out:  # stats snapshots compute latency percentiles: only when it may pass
            return out
        for rank in sorted(ranks):
            s = self.snapshot(rank)
            if s["pool_free_blocks"] != s["pool_total_blocks"] or s["rooms_live"]:
                out.append(f"rank {rank}: stats say pool_free_blocks={s['pool_free_blocks']} "
                           f"pool_total_blocks={s['pool_total_blocks']} "
                           f"rooms_live={s['rooms_live']}")
        return out

    def assert_whole(self, what: str = "") -> None:
        problems = self.whole_problems()
        assert not problems, f"not whole {what}: {problems}; {self.describe()}"

    def settle_whole(self, what: str = "", timeout: float = WAIT_S) -> None:
        """Whole, once the threads have finished what they were doing (bounded)."""
        self.run_until(lambda: not self.whole_problems(), f"pools whole {what}", timeout,
                       detail=lambda: str(self.whole_problems()))

    def problems(self) -> list[str]:
        """Everything a fake saw that must fail the test."""
        out = [e for link in self.links.values() for e in link.errors]
        out += [f"control: {e}" for e in self.control.errors]
        out += [f"{link.name}: {p.op} by {p.side} thread {p.thread!r} under the engine lock"
                for link in self.links.values() for p in link.posts_under_lock()]
        return out

    # ------------------------------------------------------------ shutdown

    def close(self, *, check: bool = True) -> None:
        """Shut everything down as `Context.shutdown` would, every rank at once:
        gates open, control pumped, Language engines closed, then Embedding
        engines. Then: no disagg thread left, no fake saw a problem, every pool
        and budget whole. Idempotent."""
        if self._closed:
            return
        self._closed = True
        left: list[str] = []
        try:
            for (e, lang), link in self.links.items():
                if e in self.control.dead or lang in self.control.dead:
                    # a muted (wedged) rank is killed in the end: its streams die with it
                    link.break_link("rank died")
                link.open()
            self.control.start_auto()
            for leng in self.language.values():
                leng.close(CLOSE_S)
            for eng in self.embedding.values():
                eng.close(CLOSE_S)
            self.control.stop_auto()
            with self.control.delivering:  # the goodbyes, to whoever is left
                self.control.deliver_all()
            left = _join_threads(CLOSE_S)
        finally:
            self.control.stop_auto()
            for link in self.links.values():  # frees any thread still waiting, bug or not
                link.break_link("world closed")
            _join_threads(CLOSE_S)
        if not check:
            return
        problems = self.problems()
        if left:
            problems.append(f"threads still alive after close: {left}")
        problems += self.whole_problems(dead_too=True)
        assert not problems, "\n".join(problems)

    def __enter__(self) -> World:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # With an exception already on its way, shut down but let it be the report.
        self.close(check=exc_type is None)


def _stats(geometry: Geometry) -> Stats:
    return Stats(pool_total_blocks=geometry.num_blocks, pool_free_blocks=geometry.num_blocks,
                 rooms_live=0)

