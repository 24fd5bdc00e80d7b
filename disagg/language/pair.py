"""Language side: one pair's stream, as a pure machine. What is owed on it,
what was posted ahead and by whom, and when it ends. The pair's thread
(`stream.PairReceiver`) and the callers ask it under the engine lock and do
the I/O it decides; nothing here posts, waits or sleeps.

The rules it keeps:
- **owed**: every ALLOC or RESUME sent counts one frame owed (`expect`), one
  that could not be sent counts none (`disown`), every frame read answers one
  (`answered`). The thread keeps a meta recv posted only while frames are
  owed (a Gloo recv cannot be cancelled).
- **pre-posted** (`handed`): the recvs of a frame are posted ahead only when
  nothing else is owed on the pair, so that frame is the next one on the
  stream. If the thread is parked (idle) the caller that asked for it posts
  them (`claim`, `caller_posted`), which saves the thread's wake-up before the
  recvs are up; else the thread does, in stream order after what it reads.
  Whoever posts them, only the thread frees the allocation's blocks from then
  on (`Credit.posted`).
- **meta ahead**: while a payload lands and more is owed, the next meta recv
  is posted at once (`next_post(meta_if_owed=True)`), never beside a job.
- **goodbye** (`bye`): a peer that shut down cleanly after N frames has those
  read first; the pair ends after the last (`last_read`).

States (`state`, derived) by event: the next state, and what the caller of
the event must do. `-`: cannot happen there. `tests/test_machines.py` checks
every cell and that this table is the one it checks.

| state | expect | disown | handed(parked) | handed(busy) | caller_posted | caller_gone | frame | bye | lose | next_post |
|---|---|---|---|---|---|---|---|---|---|---|
| IDLE | OWED: wake | - | - | - | - | - | - | IDLE: lost now | LOST: first | IDLE: nothing |
| OWED | OWED: wake | IDLE | HANDED: caller posts | PREPOSTED: wake | - | - | IDLE | DRAINING: drain | LOST: first | META_AHEAD: post meta |
| META_AHEAD | META_AHEAD: wake | META_AHEAD | - | - | - | - | OWED | DRAINING: drain | LOST: first | META_AHEAD: post meta |
| HANDED | HANDED | - | - | - | PREPOSTED: wake | PREPOSTED | - | DRAINING: drain | LOST: first | HANDED: wait for the caller |
| PREPOSTED | PREPOSTED: wake | - | - | - | - | PREPOSTED | IDLE | DRAINING: drain | LOST: first | PREPOSTED: post job |
| DRAINING | DRAINING: wake | DRAINING | - | - | - | - | DRAINING: last | DRAINING: drain | LOST: first | DRAINING: post meta |
| LOST | - | - | - | - | - | - | - | LOST: lost now | LOST | LOST: nothing |

`handed` happens only right after the `expect` that owes its frame on an
IDLE pair (the one frame owed is the one handed over): `OWED --handed(parked)-->
HANDED` (the caller posts), `--handed(busy)--> PREPOSTED` (the thread does).

What answers a pre-posted frame (`answer_ahead`): its DATA chunk; a padded
ABORT (the filler took the posted recvs, the reason follows, the allocation is
answered); or a padded DEFER (filler only: the allocation stays owed, nothing
is posted into its blocks any more, and its answer comes later as an ordinary
frame). Anything else breaks the stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import StreamBroken
from ..meta import FLAG_PADDED, FrameKind, Meta
from .credit import Credit


class PairState(enum.Enum):
    IDLE = "nothing owed"
    OWED = "frames owed, the next meta recv posted when the thread reads"
    META_AHEAD = "frames owed, the next meta recv posted ahead while a payload lands"
    HANDED = "a pre-posted frame whose caller posts its recvs"
    PREPOSTED = "a pre-posted frame, its recvs posted (or the thread's to post)"
    DRAINING = "the peer said goodbye: the frames it sent are read, then the pair ends"
    LOST = "nothing more is read from it"


class Next(enum.Enum):
    """What the thread posts next, in stream order (`RecvPair.next_post`)."""

    NOTHING = "nothing"
    WAIT_CALLER = "wait for the caller"  # it posts the job's recvs right after its lock
    JOB = "post job"  # the handed-over frame's meta and payload recvs
    POSTED = "job posted"  # the caller posted them already
    META = "post meta"  # the next meta recv


@dataclass
class RecvPair:
    """The machine's state; every method is called with the engine lock held."""

    owed: int = 0
    credit: Credit | None = None  # the pre-posted frame's allocation, until its frame is read
    caller_posts: bool = False  # its caller posts its recvs (the thread was parked)
    claimed: bool = False  # the caller is posting them now
    posted: bool = False  # its recvs are up
    meta_ahead: bool = False  # a next meta recv is posted, or about to be
    parked: bool = False  # the thread waits with nothing to read
    frames_read: int = 0  # metas read: every frame the peer sent that arrived
    final_frames: int | None = None  # the peer said goodbye after this many
    dead: str | None = None
    stopping: bool = False

    @property
    def state(self) -> PairState:
        if self.dead is not None:
            return PairState.LOST
        if self.final_frames is not None:
            return PairState.DRAINING
        if self.credit is not None:
            return PairState.HANDED if self.caller_posting else PairState.PREPOSTED
        if self.owed == 0:
            return PairState.IDLE
        return PairState.META_AHEAD if self.meta_ahead else PairState.OWED

    # ------------------------------------------------------------ owed

    def expect(self) -> bool:
        """An ALLOC or RESUME was sent: one more frame owed. Whether to wake the
        thread (not while its caller still posts a handed-over frame)."""
        self.owed += 1
        return not self.caller_posting

    def disown(self) -> None:
        """The ALLOC or RESUME counted by `expect` could not be sent."""
        self.owed -= 1

    def answered(self) -> None:
        """A frame arrived: it answers one owed allocation."""
        self.owed -= 1

    def can_prepost(self, closing: bool) -> bool:
        """A frame's recvs may be posted ahead: nothing else is owed on the pair."""
        return (self.dead is None and self.owed == 0 and self.credit is None
                and not self.meta_ahead and not closing)

    # ------------------------------------------------------------ pre-posted frames

    def handed(self, credit: Credit) -> bool:
        """The frame answering `credit` (owed already, the only one) has its recvs
        posted ahead: by its caller if the thread is parked (True), else by the
        thread (which marks it so when it posts them). Once its recvs may be up,
        only the thread frees its blocks."""
        self.credit = credit
        self.caller_posts = self.parked
        self.posted = False
        credit.posted = self.caller_posts
        return self.caller_posts

    @property
    def caller_posting(self) -> bool:
        """A frame handed to its caller whose recvs are not up yet."""
        return self.credit is not None and self.caller_posts and not self.posted

    def claim(self) -> bool:
        """The caller is about to post a handed-over frame's recvs: whether it may
        (it was handed to it, and nobody posts them yet)."""
        if not self.caller_posting or self.claimed:
            return False
        self.claimed = True
        return True

    def caller_posted(self, ok: bool) -> None:
        """The caller posted the recvs (`ok`), or failed to: the thread then tries
        itself and finds the pair broken."""
        self.claimed = False
        self.posted = ok
        self.caller_posts = ok

    def caller_gone(self) -> None:
        """A handed-over frame's caller did not post it in time: the thread does."""
        if self.caller_posting and not self.claimed:
            self.caller_posts = False

    # ------------------------------------------------------------ the thread

    def should_sleep(self) -> bool:
        """The thread has nothing to read: nothing owed, or the one frame owed is
        one its caller is still posting (the caller wakes it once posted)."""
        return ((self.owed == 0 or self.caller_posting) and not self.stopping
                and self.dead is None)

    def next_post(self, meta_if_owed: bool = False) -> Next:
        """What the thread posts next, in stream order: a handed-over frame's recvs,
        else (`meta_if_owed`, while a payload lands) the next meta when a frame is
        owed. A frame is never handed over while a meta recv of the thread's is
        posted or about to be."""
        if self.last_read():
            return Next.NOTHING  # the peer said goodbye after the frame being read
        if self.credit is not None:
            if self.caller_posts:
                return Next.POSTED if self.posted else Next.WAIT_CALLER
            if self.posted:
                return Next.POSTED
            self.posted = self.credit.posted = True
            return Next.JOB
        if meta_if_owed and self.owed > 0:
            self.meta_ahead = True
        return Next.META if self.meta_ahead else Next.NOTHING

    def frame_read(self, preposted: bool) -> None:
        """A frame's meta was read: the pre-posted one, or the next in order."""
        self.frames_read += 1
        if preposted:
            self.credit, self.caller_posts, self.posted = None, False, False
        else:
            self.meta_ahead = False

    @staticmethod
    def answer_ahead(meta: Meta, room: int, credit: Credit, rank: int) -> FrameKind:
        """What the frame whose meta arrived where room `room`'s pre-posted frame
        was due (for `credit`) is: DATA, a padded ABORT, or a padded DEFER (then
        nothing is posted into its blocks any more: the allocation is owed still,
        and is answered by an ordinary frame). Else `StreamBroken`."""
        if meta.kind is FrameKind.DATA:
            return meta.kind
        padded = bool(meta.flags & FLAG_PADDED)
        if meta.room != room or not padded or meta.kind not in (FrameKind.ABORT,
                                                                FrameKind.DEFER):
            raise StreamBroken(f"language rank {rank}: {meta.kind.name} frame for room "
                               f"{meta.room} (padded: {padded}) where room {room}'s "
                               f"pre-posted frame was due", room=meta.room)
        if meta.kind is FrameKind.DEFER:
            credit.posted = False
        return meta.kind

    # ------------------------------------------------------------ its end

    def bye(self, frames: int) -> bool:
        """The peer shut down cleanly after putting `frames` frames on the stream.
        True: some are still to be read (the pair ends after the last); False:
        it ends now."""
        if self.dead is None and frames > self.frames_read:
            self.final_frames = frames
            return True
        return False

    def last_read(self) -> bool:
        """The peer's last frame before its goodbye has been read."""
        return self.final_frames is not None and self.frames_read >= self.final_frames

    def lose(self, why: str) -> bool:
        """Nothing more is read from the stream. True the first time."""
        first = self.dead is None
        if first:
            self.dead = why
        self.owed = 0
        return first

    def stop(self) -> None:
        """Read what is still owed, then end (shutdown)."""
        self.stopping = True
