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

import logging
import threading
import time

import torch

from ..errors import PeerLost, ProtocolError, StreamBroken, TransferTimeout
from ..meta import ABORT_REASON_BYTES, FLAG_PADDED, FrameKind, Meta, reason_from_tensor
from ..transport import PairTransport, Posted
from . import frames
from .landing import Job, StreamHost, copy_out

log = logging.getLogger(__name__)


class PairReceiver:
    """The one thread that reads a pair's stream (from Embedding rank `src`).
    `owed`, `dead` and `stopping` are guarded by the engine lock (`cv`)."""

    def __init__(self, engine: StreamHost, src: int, transport: PairTransport,
                 cv: threading.Condition, lock: threading.RLock) -> None:
        self.engine = engine
        self.src = src
        self.transport = transport
        self.owed = 0  # frames the Embedding rank owes us
        # The next meta recv, posted while the frame before it still lands. Held
        # until it completes: Gloo must not lose a posted buffer.
        self.next_meta: Posted | None = None
        # A frame to pre-post (`prepost`), then posted and awaited. Never beside
        # `next_meta`: it is handed over only when nothing else is owed.
        self.job: Job | None = None
        self.parked = False  # this thread waits with nothing owed (it posts nothing now)
        self._claimed = False  # a caller is posting a handed-over job's recvs
        self.meta_ahead = False  # a next meta recv is posted, or about to be
        self.frames_read = 0  # metas read: every frame the peer sent that arrived
        self.final_frames: int | None = None  # the peer said goodbye after this many
        self.dead: str | None = None
        self.stopping = False
        # `cv` is the engine's: callers wait on it for rooms. This thread waits on
        # `wake`, a condition of the same lock, so what only concerns the pair (a
        # frame owed, a job handed over or posted) wakes this thread alone, and a
        # room's change wakes the callers alone.
        self.cv = cv
        self.wake = threading.Condition(lock)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"disagg-recv-{src}->{engine.rank}")
        self.thread.start()

    # `owed` changes here only (engine lock held): one more frame is owed, an
    # allocation that could not be announced owes none, a frame arrived, or
    # the pair is lost and nothing more will come.

    def expect(self) -> None:
        """One more frame is owed: an ALLOC or RESUME was sent."""
        self.owed += 1
        self.wake.notify()

    def disown(self) -> None:
        """The ALLOC or RESUME counted by `expect` could not be sent: no frame comes."""
        self.owed -= 1

    def answered(self) -> None:
        """A frame arrived: it answers one owed allocation."""
        self.owed -= 1

    def lose(self, why: str) -> bool:
        """The stream is unusable: nothing more is read from it. True the first time."""
        first = self.dead is None
        if first:
            self.dead = why
        self.owed = 0
        self.wake.notify()
        self.cv.notify_all()
        return first

    def stop(self) -> None:
        """Read what is still owed, then end (engine lock held)."""
        self.stopping = True
        self.wake.notify()

    def prepost(self, job: Job) -> None:
        """Post `job`'s recvs as the next ones on the stream (engine lock held;
        the frame it answers is owed already and is the only one owed). If this
        thread is parked with nothing to read, the caller posts them itself
        (`post_claimed`, after it lets go of the lock)."""
        assert self.job is None and self.next_meta is None
        self.job = job
        if self.parked:
            job.caller_posts = True
            job.credit.posted = True  # only this thread frees its blocks now
            return  # the caller's post_claimed wakes this thread, once posted
        self.wake.notify()

    def post_claimed(self) -> None:
        """The caller's side of `prepost`: post the recvs of a job handed to it
        (engine lock not held), then let this thread wait for the frame."""
        with self.cv:
            job = self.job
            if job is None or not job.caller_posts or job.meta is not None or self._claimed:
                return
            self._claimed = True
        t = self.transport
        meta: Posted | None = None
        payload: Posted | None = None
        try:
            meta = t.post_meta_recv()
            payload = t.post_recv(job.dsts) if job.dsts else None
        except Exception as e:  # the pair is broken: its thread finds out and ends it
            log.debug("posting room %d's pre-posted recvs: %s", job.room.room, e)
            meta = None
        finally:
            with self.cv:
                job.meta, job.payload = meta, payload
                job.caller_posts = meta is not None
                self._claimed = False
                self.wake.notify()

    def _caller_posting(self) -> bool:
        """A job handed to its caller is not posted yet (engine lock held)."""
        job = self.job
        return job is not None and job.caller_posts and job.meta is None

    def _run(self) -> None:
        while True:
            with self.cv:
                self.parked = True
                # asleep while nothing is owed, or while the one frame owed is a job
                # its caller is still posting (it wakes this thread once posted)
                while ((self.owed == 0 or self._caller_posting()) and not self.stopping
                       and self.dead is None):
                    if (not self.wake.wait(0.5) and self._caller_posting()
                            and not self._claimed):
                        assert self.job is not None  # a caller that never came: post it here
                        self.job.caller_posts = False
                self.parked = False
                if self.owed == 0 or self.dead is not None:
                    return
            try:
                self._read_frame()
                with self.cv:
                    last = self.final_frames is not None and self.frames_read >= self.final_frames
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

    def _post_next(self, meta_if_owed: bool = False) -> Job | None:
        """Post, in stream order, the recvs of the next frame: a handed-over job's
        (its meta and payload), else (`meta_if_owed`) the next meta when a frame
        is owed. Decided under the lock, so a job is never handed over while a
        meta recv of this thread's is posted or about to be. The job, if any."""
        with self.cv:
            if self.final_frames is not None and self.frames_read >= self.final_frames:
                return None  # the peer said goodbye after the frame being read
            job = self.job
            if job is not None and job.caller_posts:
                # its caller posts it: wait until it has (bounded: it posts right
                # after letting go of the lock; a failed post clears caller_posts)
                self.wake.wait_for(lambda: job.meta is not None or not job.caller_posts
                                   or self.dead is not None, timeout=10.0)
                if job.meta is None:
                    raise StreamBroken(f"language rank {self.engine.rank}: the recvs of room "
                                       f"{job.room.room}'s pre-posted frame were not posted")
                return job
            if job is not None and job.meta is None:
                job.credit.posted = True  # only this thread frees its blocks now
            elif job is None and meta_if_owed and self.owed > 0:
                self.meta_ahead = True
        t = self.transport
        if job is not None and job.meta is None:
            job.meta = t.post_meta_recv()
            job.payload = t.post_recv(job.dsts) if job.dsts else None
        elif job is None and self.meta_ahead and self.next_meta is None:
            self.next_meta = t.post_meta_recv()
        return job

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
                self.frames_read += 1
            if meta.kind is not FrameKind.DATA:
                self._prepost_answered(job, meta)
                return
        else:
            if self.next_meta is None:
                self.next_meta = t.post_meta_recv()
            meta = t.wait_meta(self.next_meta)
            with self.cv:
                self.next_meta, self.meta_ahead = None, False
                self.frames_read += 1
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
        r = landing.room
        if landing.copy_out and r.outputs is not None:  # blocks still the room's
            e = self.engine
            copy_out(e.geometry, e.pool, r.outputs, landing.plan, landing.chunk.token_offset,
                     e.device)
        frames.landed(self, landing, time.monotonic() - t0)

    def _reason(self) -> str:
        """An ABORT frame's reason: its last tensor, fixed size."""
        buf = torch.empty(ABORT_REASON_BYTES, dtype=torch.uint8, device=self.engine.device)
        self.transport.wait(self.transport.post_recv([buf]), "abort reason recv")
        return reason_from_tensor(buf)

    def _prepost_answered(self, job: Job, meta: Meta) -> None:
        """A pre-posted frame's meta was not DATA: a padded ABORT (the filler
        took the posted recvs; the reason follows) or a DEFER (filler only: the
        allocation stays owed, and its answer comes later as an ordinary frame)."""
        padded = bool(meta.flags & FLAG_PADDED)
        if meta.room != job.room.room or not padded or meta.kind not in (FrameKind.ABORT,
                                                                          FrameKind.DEFER):
            raise StreamBroken(f"language rank {self.engine.rank}: {meta.kind.name} frame "
                               f"for room {meta.room} (padded: {padded}) where room "
                               f"{job.room.room}'s pre-posted frame was due", room=meta.room)
        if job.payload is not None:
            self.transport.wait(job.payload, "filler recv")
        if meta.kind is FrameKind.ABORT:
            frames.abort_arrived(self, meta, self._reason())
            return
        with self.cv:
            job.credit.posted = False  # nothing is posted into it any more
            self.engine.stats.add(deferred=1)
