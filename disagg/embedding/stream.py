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

from ..errors import DisaggError
from ..plan import Segment
from ..transport import PairTransport, Posted
from ..wire import FrameKind, Meta, reason_tensor

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


def data_frame(meta: Meta, sources: list[torch.Tensor], start: int, plan: list[Segment],
               ready: torch.cuda.Event | None, done: Done) -> Frame:
    """A DATA frame: for each buffer, one slice (a view, no copy) of the caller's
    tensor per segment, in wire order; then, on a first chunk whose room has
    more aux values than the meta holds, all of them as one int64 tensor."""
    offset = meta.token_offset - start  # within the part's tensors, which begin at `start`
    payload = [src[offset + s.chunk_start:offset + s.chunk_start + s.num_tokens]
               for src in sources for s in plan]
    if meta.aux_follows:  # more aux than the meta holds: all of it, after the first chunk
        payload.append(torch.tensor(meta.aux, dtype=torch.int64, device=sources[0].device))
    return Frame(meta, payload, ready, done)


def abort_frame(room: int, reason: str, device: torch.device, done: Done) -> Frame:
    """An ABORT frame: its reason in-band, fixed size, so the Language side reports
    exactly this one."""
    return Frame(Meta(FrameKind.ABORT, room), [reason_tensor(reason).to(device)], None, done)


class PairSender:
    """Writes one pair's stream. `submit` queues a frame; `flush` posts queued
    frames, in order, and must be called without the engine lock. The pair's
    thread waits for each posted frame in order, reports it through `done`, and
    posts whatever is still queued whenever it looks (after each frame, and at
    least every half second)."""

    def __init__(self, transport: PairTransport, name: str) -> None:
        self.transport = transport
        self._queued: collections.deque[Frame] = collections.deque()  # not yet posted
        self._posted: collections.deque[Frame] = collections.deque()  # in stream order
        self._cv = threading.Condition()
        self._posting = threading.Lock()  # held while posting: one poster at a time
        self._stop = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, frame: Frame) -> None:
        with self._cv:
            if self._stop:
                raise DisaggError("sender thread stopped")
            # No wake-up: the scheduling thread flushes as soon as it lets go of
            # the engine lock, and this thread would only contend with it.
            self._queued.append(frame)

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
                        frame = self._queued.popleft()
                    if self.dead is None:
                        try:
                            frame.posted = self.transport.post_frame(frame.meta, frame.payload,
                                                                     frame.ready)
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
        while True:
            with self._cv:
                # nothing posted to wait for, and nothing this thread could post
                while not self._posted and (not self._queued or self._posting.locked()):
                    if self._stop and not self._queued and not self._posting.locked():
                        return
                    self._cv.wait(0.5)
            self.flush()
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

    def stop(self, timeout_s: float) -> bool:
        """Finish queued frames, then exit. True if the thread ended in time."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class SendStreams:
    """One `PairSender` per Language rank, started on first use."""

    def __init__(self, rank: int, transports: dict[int, PairTransport]) -> None:
        self._rank = rank
        self._transports = transports
        self._senders: dict[int, PairSender] = {}

    def submit(self, lang_rank: int, frame: Frame) -> None:
        s = self._senders.get(lang_rank)
        if s is None:
            s = self._senders[lang_rank] = PairSender(
                self._transports[lang_rank], f"disagg-send-{self._rank}->{lang_rank}")
        s.submit(frame)

    def flush(self) -> None:
        """Post the frames scheduled so far (without the engine lock)."""
        for s in list(self._senders.values()):
            s.flush()

    def stop(self, timeout_s: float) -> None:
        """Finish every queued frame, stop the threads, and let go of the
        transports (and so of their process groups: nothing but garbage
        collection would free them otherwise)."""
        deadline = time.monotonic() + timeout_s
        for lang, s in list(self._senders.items()):
            if s.stop(max(0.0, deadline - time.monotonic())):
                del self._senders[lang]
            else:
                log.error("embedding rank %d: a sender thread did not stop in %.1fs",
                          self._rank, timeout_s)
        self._transports.clear()
