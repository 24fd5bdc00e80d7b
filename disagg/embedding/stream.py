"""Embedding side: the per-pair send streams. The only module of this side that
calls the `PairTransport`.

A frame is queued in the order the engine (under its lock) schedules it and
posted without the lock by whichever thread gets there first: a Gloo post can
wait milliseconds for the pair while a large payload is on its socket, and the
lock must not wait with it. Each pair's thread completes posted frames in
stream order and reports each through its `done` callback.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import streams
from .. import transport as transport_mod
from ..errors import DisaggError
from ..geometry import Geometry
from ..meta import FLAG_PADDED, FrameKind, Meta, reason_tensor
from ..plan import Segment, segment_plan
from ..transport import PairTransport, Posted
from .room import Grant, Part

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]


@dataclass
class Frame:
    """One frame for a pair: queued in stream order, posted, completed in order."""

    meta: Meta
    payload: list[torch.Tensor]
    ready: torch.cuda.Event | None
    done: Done
    posted: Posted | None = None


def data_frame(meta: Meta, parts: list[Part], plan: list[Segment], done: Done) -> Frame:
    """A DATA frame: for each buffer, one slice (a view, no copy) of the caller's
    tensor per segment, in wire order; then, on a first chunk whose room has
    more aux values than the meta holds, all of them as one int64 tensor.

    A segment that spans parts of a progressive send (parts given already
    coalesce into one chunk) has its pieces copied into one tensor. Each part
    may come from a stream of its own (DESIGN: produce on any stream, call
    send() from it), so a frame over several parts waits for every one's
    producer event: the copies and the sends run after all of them."""
    events = [p.ready for p in parts if p.ready is not None]
    ready = events[0] if len(events) == 1 else None
    device = parts[0].sources[0].device if parts else torch.device("cpu")
    payload: list[torch.Tensor] = []
    with streams.on_library_stream(device):  # a joined piece is made there
        if len(events) > 1:  # the library stream waits for every producer
            streams.wait_for(device, events)
        for j in range(len(parts[0].sources) if parts else 0):  # none: a meta-only frame
            for s in plan:
                a = meta.token_offset + s.chunk_start
                b = a + s.num_tokens
                pieces = [p.sources[j][max(a, p.start) - p.start:min(b, p.start + p.num_tokens)
                                       - p.start]
                          for p in parts if p.start < b and a < p.start + p.num_tokens]
                payload.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    if len(events) > 1:  # the sends wait for the copies and every producer
        ready = streams.joined_event(device)
    if meta.aux_follows:  # more aux than the meta holds: all of it, after the first chunk
        payload.append(streams.to_device(torch.tensor(meta.aux, dtype=torch.int64), device))
    return Frame(meta, payload, ready, done)


def filler(geometry: Geometry, grant: Grant, device: torch.device) -> list[torch.Tensor]:
    """Zeros of exactly the sizes the receiver posted for a pre-posted grant's
    answer (the plan both ends derive from its blocks and `expect`)."""
    if grant.expect <= 0:
        return []
    plan = segment_plan(grant.block_ids, geometry.block_size, grant.expect, direct=grant.direct)
    with streams.on_library_stream(device):
        return [torch.zeros((s.num_tokens, *b.per_token_shape), dtype=b.dtype, device=device)
                for b in geometry.wire_buffers for s in plan]


def abort_frame(room: int, reason: str, device: torch.device, done: Done,
                pad: list[torch.Tensor] | None = None) -> Frame:
    """An ABORT frame: its reason in-band, fixed size, so the Language side reports
    exactly this one; after `pad` (FLAG_PADDED) when it answers a pre-posted
    allocation, whose recvs then take the filler."""
    if pad is None:
        return Frame(Meta(FrameKind.ABORT, room),
                     [streams.to_device(reason_tensor(reason), device)], None, done)
    return Frame(Meta(FrameKind.ABORT, room, flags=FLAG_PADDED),
                 [*pad, streams.to_device(reason_tensor(reason), device)], None, done)


def defer_frame(room: int, pad: list[torch.Tensor], done: Done) -> Frame:
    """A DEFER frame: filler for a pre-posted allocation that is not answered
    yet, so another room's frame may use the pair first."""
    return Frame(Meta(FrameKind.DEFER, room, flags=FLAG_PADDED), pad, None, done)


class PairSender:
    """Writes one pair's stream. `submit` queues a frame; `flush` posts queued
    frames, in order, and must be called without the engine lock. The pair's
    thread waits for each posted frame in order, reports it through `done`, and
    posts whatever is still queued whenever it looks (after each frame, and at
    least every half second)."""

    def __init__(self, transport: PairTransport, name: str,
                 device: torch.device | None = None) -> None:
        self.transport = transport
        self.device = device  # the rank's: this thread's CUDA calls go there
        self._queued: collections.deque[Frame] = collections.deque()  # not yet posted
        self._posted: collections.deque[Frame] = collections.deque()  # in stream order
        self._cv = threading.Condition()
        self._posting = threading.Lock()  # held while posting: one poster at a time
        self._stop = False
        self.dead: BaseException | None = None
        self.frames_posted = 0  # put on the stream; told to the peer at a clean goodbye
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, frame: Frame) -> None:
        with self._cv:
            if self._stop:
                raise DisaggError("sender thread stopped")
            # No wake-up: the scheduling thread flushes as soon as it lets go of
            # the engine lock, and this thread would only contend with it.
            self._queued.append(frame)

    def flush(self, own: bool = False) -> None:
        """Post every queued frame. If another thread is posting, it posts ours
        too: it looks at the queue again after it lets go of `_posting`. Only
        the pair's own thread (`own`) posts on a pair whose group must be made
        first (links.py): a caller wakes it instead."""
        if not own and not transport_mod.is_open(self.transport):
            with self._cv:
                self._cv.notify()
            return
        while self._queued:
            if not self._posting.acquire(blocking=False):
                return
            try:
                while True:
                    with self._cv:
                        if not self._queued:
                            break
                        frame = self._queued.popleft()
                    if self.dead is None:
                        try:
                            frame.posted = self.transport.post_frame(frame.meta, frame.payload,
                                                                     frame.ready)
                            self.frames_posted += 1
                        except Exception as e:  # reported through this frame and every later one
                            self.dead = e
                    with self._cv:
                        self._posted.append(frame)
                        self._cv.notify()
            finally:
                self._posting.release()
                with self._cv:
                    self._cv.notify()  # our thread may wait for the poster to finish

    def _run(self) -> None:
        transport_mod.bind_device(self.device)
        while True:
            with self._cv:
                # nothing posted to wait for, and nothing this thread could post
                while not self._posted and (not self._queued or self._posting.locked()):
                    if self._stop and not self._queued and not self._posting.locked():
                        return
                    self._cv.wait(0.5)
            self._ensure()
            self.flush(own=True)
            with self._cv:
                if not self._posted:
                    continue
                frame = self._posted.popleft()
            err: BaseException | None = None
            if frame.posted is None:  # never posted: the pair was already broken
                err = self.dead
            else:  # posted in time: its own completion decides
                try:
                    self.transport.wait(frame.posted)
                except Exception as e:
                    self.dead = err = e
                frame.posted = None  # the tensors may go
            frame.done(err)

    def _ensure(self) -> None:
        """Make the pair's group if it is not open (links.py) before posting what
        is queued; a pair lost meanwhile fails those frames."""
        ensure = getattr(self.transport, "ensure", None)
        if ensure is None or not self._queued or self.dead is not None:
            return
        try:
            ensure()
        except Exception as e:  # reported through every queued frame
            self.dead = e

    def busy(self) -> bool:
        """Frames queued or not yet done: the pair carries something."""
        with self._cv:
            return bool(self._queued or self._posted) or self._posting.locked()

    def in_flight(self) -> bool:
        """Frames posted and not yet done."""
        with self._cv:
            return bool(self._posted) or self._posting.locked()

    def request_stop(self) -> None:
        """Finish queued frames, then exit; do not wait for it."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Finish queued frames, then exit. True if the thread ended in time."""
        self.request_stop()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class SendStreams:
    """One `PairSender` per Language rank, started on first use."""

    def __init__(self, rank: int, transports: dict[int, PairTransport],
                 device: torch.device | None = None) -> None:
        self._rank = rank
        self._device = device
        self._transports = transports
        self._senders: dict[int, PairSender] = {}
        self._retired: list[PairSender] = []  # departed peers' threads, ending
        self._posted_before: dict[int, int] = {}  # frames of streams stopped already

    def submit(self, lang_rank: int, frame: Frame) -> None:
        s = self._senders.get(lang_rank)
        if s is None:
            s = self._senders[lang_rank] = PairSender(
                self._transports[lang_rank], f"disagg-send-{self._rank}->{lang_rank}",
                self._device)
        s.submit(frame)

    def flush(self) -> None:
        """Post the frames scheduled so far (without the engine lock)."""
        for s in list(self._senders.values()):
            s.flush()

    def retire(self, lang_rank: int) -> None:
        """A departed peer (jobs mode): its thread ends once its frames are done
        (a frame in flight is the transport's business), and its transport goes."""
        s = self._senders.pop(lang_rank, None)
        if s is not None:
            s.request_stop()
            self._retired.append(s)
        self._retired = [r for r in self._retired if r.running]
        self._transports.pop(lang_rank, None)

    def abort(self, lang_rank: int) -> None:
        """The pair with `lang_rank` is lost: end what stands on it now."""
        t = self._transports.get(lang_rank)
        if t is not None:
            t.abort()

    def busy(self, lang_rank: int) -> bool:
        s = self._senders.get(lang_rank)
        return s is not None and s.busy()

    def in_flight(self, lang_rank: int) -> bool:
        s = self._senders.get(lang_rank)
        return s is not None and s.in_flight()

    def alive(self) -> list[int]:
        """Language ranks whose pair thread still runs (a frame still pending)."""
        return [lang for lang, s in self._senders.items() if s.running]

    def frames_posted(self, lang_rank: int) -> int:
        """Frames put on the stream to `lang_rank` so far."""
        s = self._senders.get(lang_rank)
        return s.frames_posted if s is not None else self._posted_before.get(lang_rank, 0)

    def stop(self, timeout_s: float) -> None:
        """Finish every queued frame, stop the threads, and let go of the
        transports (and so of their process groups: nothing but garbage
        collection would free them otherwise)."""
        deadline = time.monotonic() + timeout_s
        for r in self._retired:
            r.stop(max(0.0, deadline - time.monotonic()))
        for lang, s in list(self._senders.items()):
            if s.stop(max(0.0, deadline - time.monotonic())):
                self._posted_before[lang] = s.frames_posted
                del self._senders[lang]
            else:
                log.error("embedding rank %d: a sender thread did not stop in %.1fs",
                          self._rank, timeout_s)
        self._transports.clear()
