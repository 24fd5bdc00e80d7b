"""Language side: the per-pair receive streams. The only module of this side
that calls the `PairTransport`, and (with `results.py`) the only place a
received byte is copied: out of the pool into the room's output, in pool mode
(`landing.copy_out`). It posts and completes; what each frame means (which
allocation it answers, whether its sizes agree, where its payload lands) is
asked of the room's machine under the engine lock, in `frames.py`.

One thread per Embedding rank reads that pair's stream in order. It keeps a
meta recv posted only while frames are owed (a Gloo recv cannot be cancelled,
and a Gloo timeout closes the pair for good), posts every recv without the
engine lock (a Gloo post can wait milliseconds for the pair's busy socket),
and posts the next meta recv while a payload still lands when another frame
is owed, so the next frame is never waiting for a late post.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from .. import streams
from .. import transport as transport_mod
from ..errors import PeerLost, ProtocolError, StreamBroken, TransferTimeout
from ..meta import ABORT_REASON_BYTES, FrameKind, Meta, reason_from_tensor
from ..transport import PairTransport, Posted
from . import frames
from .landing import Job, StreamHost, copy_out
from .pair import Next, RecvPair

log = logging.getLogger(__name__)


class PairReceiver:
    """The one thread that reads a pair's stream (from Embedding rank `src`),
    doing the I/O its pair machine (`pair.RecvPair`, `self.m`, guarded by the
    engine lock `cv`) decides."""

    def __init__(self, engine: StreamHost, src: int, transport: PairTransport,
                 cv: threading.Condition, lock: threading.RLock) -> None:
        self.engine = engine
        self.src = src
        self.transport = transport
        self.m = RecvPair()
        # The next meta recv, posted while the frame before it still lands. Held
        # until it completes: Gloo must not lose a posted buffer.
        self.next_meta: Posted | None = None
        # The pre-posted frame (`prepost`), its recvs' tensors and, once posted,
        # its works; the machine says who posts them.
        self.job: Job | None = None
        # `cv` is the engine's: callers wait on it for rooms. This thread waits on
        # `wake`, a condition of the same lock, so what only concerns the pair (a
        # frame owed, a job handed over or posted) wakes this thread alone, and a
        # room's change wakes the callers alone.
        self.cv = cv
        self.wake = threading.Condition(lock)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"disagg-recv-{src}->{engine.rank}")
        self.thread.start()

    # The engine's side (engine lock held): the machine decides, this wakes.

    def expect(self) -> None:
        """One more frame is owed: an ALLOC or RESUME was sent."""
        if self.m.expect():
            self.wake.notify()

    def disown(self) -> None:
        """The ALLOC or RESUME counted by `expect` could not be sent: no frame comes."""
        self.m.disown()

    def lose(self, why: str) -> bool:
        """The stream is unusable: nothing more is read from it. True the first time."""
        first = self.m.lose(why)
        self.wake.notify()
        self.cv.notify_all()
        return first

    def stop(self) -> None:
        """Read what is still owed, then end."""
        self.m.stop()
        self.wake.notify()

    def prepost(self, job: Job) -> None:
        """Post `job`'s recvs as the next ones on the stream (the frame it answers
        is owed already and is the only one owed): by the caller that asked for
        it, right after it lets go of the lock (`post_claimed`), if this thread
        is parked; else by this thread."""
        self.job = job
        if not self.m.handed(job.credit):
            self.wake.notify()

    def post_claimed(self) -> None:
        """The caller's side of `prepost`: post the recvs of a job handed to it
        (engine lock not held), then let this thread wait for the frame."""
        with self.cv:
            job = self.job
            if job is None:
                return
            if not transport_mod.is_open(self.transport):  # made by this pair's thread
                self.m.caller_gone()
                self.wake.notify()
                return
            if not self.m.claim():
                return
        t = self.transport
        ok = False
        try:
            job.meta, job.payload = t.post_frame_recv(job.dsts)
            ok = True
        except Exception as e:  # the pair is broken: its thread finds out and ends it
            log.debug("posting room %d's pre-posted recvs: %s", job.room.room, e)
        finally:
            with self.cv:
                self.m.caller_posted(ok)
                self.wake.notify()

    # The thread's side.

    def _run(self) -> None:
        transport_mod.bind_device(self.engine.device)
        m = self.m
        while True:
            with self.cv:
                m.parked = True
                while m.should_sleep():
                    if not self.wake.wait(0.5):
                        m.caller_gone()  # a caller that never came: post it here
                m.parked = False
                # lost while a frame was handed to its caller: this thread will
                # never wait for its recvs, so it gives their blocks back itself
                orphan = m.dead is not None and self.job is not None
                if not orphan and (m.owed == 0 or m.dead is not None):
                    return
            if orphan:
                self.engine.pair_lost(self, PeerLost(str(m.dead), peer=self.src))
                return
            try:
                if not self._ensure():
                    continue  # nothing owed any more: back to sleep
                self._read_frame()
                with self.cv:
                    last = m.last_read()
                if last:  # the peer said goodbye after this frame: nothing more comes
                    self.engine.pair_lost(self, PeerLost("it shut down", peer=self.src),
                                          clean=True)
                    return
            except (PeerLost, TransferTimeout, ProtocolError, StreamBroken) as e:
                self.engine.pair_lost(self, e)
                return
            except Exception as e:  # a bug: never leave the stream half read
                log.exception("receiver thread for embedding rank %d", self.src)
                self.engine.pair_lost(self, e)
                return

    def _ensure(self) -> bool:
        """The pair's group is open, made now if it was not (links.py), while a
        frame is still owed on it; `PeerLost` if the pair is lost."""
        ensure = getattr(self.transport, "ensure", None)
        if ensure is None:
            return True
        m = self.m
        return bool(ensure(lambda: m.owed > 0 and m.dead is None))

    def _post_next(self, meta_if_owed: bool = False) -> Job | None:
        """Post, in stream order, what the machine says comes next: a handed-over
        job's recvs (waiting, bounded, for its caller to post them), or the next
        meta recv. The job, if any."""
        with self.cv:
            step = self.m.next_post(meta_if_owed)
            job = self.job
            if step is Next.WAIT_CALLER:
                # bounded: it posts right after letting go of the lock; a failed
                # post makes it the thread's (`caller_posted(False)`)
                self.wake.wait_for(lambda: not self.m.caller_posting
                                   or self.m.dead is not None, timeout=10.0)
                step = self.m.next_post()
                if step is Next.WAIT_CALLER or self.m.dead is not None:
                    assert job is not None
                    raise StreamBroken(f"language rank {self.engine.rank}: the recvs of room "
                                       f"{job.room.room}'s pre-posted frame were not posted")
        t = self.transport
        if step is Next.JOB:
            assert job is not None
            job.meta, job.payload = t.post_frame_recv(job.dsts)
        elif step is Next.META:
            if self.next_meta is None:
                self.next_meta = t.post_meta_recv()
            return None
        return job if step in (Next.JOB, Next.POSTED) else None

    def _read_frame(self) -> None:
        t = self.transport
        job = self._post_next()
        if job is not None:
            assert job.meta is not None
            if job.payload is not None:
                # Whatever answers a pre-posted frame fills its payload recvs (a DATA
                # payload, or a padded ABORT's or DEFER's filler), and a frame's
                # sends complete in order: waiting for the last recv first makes one
                # wake-up of this thread per frame instead of two (meta, then payload).
                # A work is waited once: a second Gloo wait() waits for another recv.
                t.wait(job.payload, "pre-posted payload recv")
                job.payload = None
            meta: Meta = t.wait_meta(job.meta)
            with self.cv:
                self.job = None
                self.m.frame_read(preposted=True)
            if meta.kind is not FrameKind.DATA:
                self._prepost_answered(job, meta)
                return
        else:
            if self.next_meta is None:
                self.next_meta = t.post_meta_recv()
            meta = t.wait_meta(self.next_meta)
            with self.cv:
                self.next_meta = None
                self.m.frame_read(preposted=False)
            if meta.kind is FrameKind.ABORT:  # its reason follows, fixed size
                frames.abort_arrived(self, meta, self._reason())
                return
        landing = frames.data_arrived(self, meta, job)
        t0 = time.monotonic()  # to the payload landed (pre-posted: landed already)
        if job is None:  # the payload (and aux) recvs, now that the sizes are known
            posted = t.post_recv(landing.dsts) if landing.dsts else None
            aux = None
        else:  # posted already; the aux values, if they follow, come after them
            posted = job.payload
            aux = t.post_recv([landing.aux]) if landing.aux is not None else None
        # after this payload, in stream order: a frame handed over meanwhile (an
        # eager resume), else the next meta when more is owed
        self._post_next(meta_if_owed=landing.more)
        if posted is not None:
            t.wait(posted, "payload recv")
        if aux is not None:
            t.wait(aux, "aux recv")
        if landing.aux is not None:  # the machine reads the values on the host
            landing = dataclasses.replace(landing, aux=streams.to_host(landing.aux))
        r = landing.room
        if landing.copy_out and r.outputs is not None:  # blocks still the room's
            e = self.engine
            copy_out(e.geometry, e.pool, r.outputs, landing.plan, landing.chunk.token_offset,
                     e.device)
        frames.landed(self, landing, time.monotonic() - t0)

    def _reason(self) -> str:
        """An ABORT frame's reason: its last tensor, fixed size."""
        with streams.on_library_stream(self.engine.device):
            buf = torch.empty(ABORT_REASON_BYTES, dtype=torch.uint8, device=self.engine.device)
        self.transport.wait(self.transport.post_recv([buf]), "abort reason recv")
        return reason_from_tensor(streams.to_host(buf))

    def _prepost_answered(self, job: Job, meta: Meta) -> None:
        """A pre-posted frame's meta was not DATA: a padded ABORT (its reason
        follows) or a DEFER (`RecvPair.answer_ahead` says which, or breaks the
        stream)."""
        assert job.payload is None  # its filler landed: `_read_frame` waits for it first
        with self.cv:
            kind = self.m.answer_ahead(meta, job.room.room, job.credit, self.engine.rank)
        if kind is FrameKind.ABORT:
            frames.abort_arrived(self, meta, self._reason())
            return
        with self.cv:
            self.engine.stats.add(deferred=1)
