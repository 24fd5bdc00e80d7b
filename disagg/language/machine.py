"""Language side: one room's state machine. Pure: no threads, locks, sockets or
process groups; the clock comes in as `now`, and every transition returns the
actions the engine must execute, in order.

Each allocation (ALLOC or RESUME) is answered by exactly one frame on the
pair's stream: a DATA chunk, which lands and then frees the allocation's
blocks, or an ABORT frame, after which nothing of the room can land. So a
room keeps its blocks until a frame answers them, whatever ended it, and a
later room that reuses them can never receive a ghost of this one. seq_len
and aux come from the FIRST chunk's meta and are cached; a later chunk that
disagrees fails the room. A meta frame for a room with nothing owed, or whose
sizes disagree with the allocation, breaks the stream (`StreamBroken`).

Phases (`phase`, derived from the room's fields) by event: the next phase,
the actions in order, and the public status after. `-`: cannot happen;
StreamBroken: the frame breaks the pair's stream (every room on it fails).
`tests/test_machines.py` checks every cell and that this table is the one it
checks. ASKED is an ALLOC outstanding, RESUMED a RESUME; LANDING a DATA
meta answered it and its payload lands; PARTIAL is `needs_resume`; DRAINING
failed while a frame is still owed (its blocks held until it comes).

| state | meta | landed | abort_frame | reject | abort | peer_lost | peer_bye | timeout |
|---|---|---|---|---|---|---|---|---|
| NEW | StreamBroken | - | StreamBroken | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish, Post (FAILED) | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish (FAILED) |
| ASKED | LANDING (WAITING_FOR_INPUT) | - | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | DRAINING: CountFailure, Publish (FAILED) | DRAINING: CountFailure, Publish, Post (FAILED) | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | DRAINING: CountFailure, Publish, Post (FAILED) |
| LANDING | StreamBroken | PARTIAL: Release (TRANSFERRING) | StreamBroken | DRAINING: CountFailure, Publish (FAILED) | DRAINING: CountFailure, Publish, Post (FAILED) | DRAINING: CountFailure, Publish (FAILED) | LANDING (WAITING_FOR_INPUT) | LANDING (WAITING_FOR_INPUT) |
| PARTIAL | StreamBroken | - | StreamBroken | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish, Post (FAILED) | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish (FAILED) | FAILED: CountFailure, Untrack, Publish, Post (FAILED) |
| RESUMED | LANDING (TRANSFERRING) | - | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | DRAINING: CountFailure, Publish (FAILED) | DRAINING: CountFailure, Publish, Post (FAILED) | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | FAILED: Release, CountFailure, Untrack, Publish (FAILED) | DRAINING: CountFailure, Publish, Post (FAILED) |
| DRAINING | DRAINING (FAILED) | - | FAILED: Release, Untrack (FAILED) | DRAINING (FAILED) | DRAINING (FAILED) | FAILED: Release, Untrack (FAILED) | FAILED: Release, Untrack (FAILED) | DRAINING (FAILED) |
| DONE | StreamBroken | - | StreamBroken | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) |
| FAILED | StreamBroken | - | StreamBroken | FAILED (FAILED) | FAILED (FAILED) | FAILED (FAILED) | FAILED (FAILED) | FAILED (FAILED) |

Status: NEW is BOOTSTRAPPING; ASKED is WAITING_FOR_INPUT; a landed partial
chunk (or an eager resume) makes it TRANSFERRING; DONE is SUCCESS; FAILED is
published the moment the room fails (DRAINING rooms included: their blocks
come back when the owed frame arrives). SUCCESS and FAILED are published by
the engine as the last action (`Publish`), after blocks and the room id are
free. `needs_resume` is exactly PARTIAL.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Failure, FailureCause
from ..meta import FLAG_GIVEN, Meta
from ..plan import prepost_tokens
from ..types import TERMINAL, TransferStatus
from ..wire import Abort, Alloc, Resume
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
from .checks import FrameChecks
from .credit import Credit
from .room import Chunk, Phase, RecvRoom, needs_resume, phase, set_status

__all__ = ["Chunk", "Phase", "Publish", "RecvMachine", "RecvRoom", "needs_resume", "phase",
           "set_status"]


# ---------------------------------------------------------------- transitions


class RecvMachine(FrameChecks):
    """Transitions of every room of one Language rank. Holds only constants."""

    def __init__(self, rank: int, instance_size: int, auto_resume: bool,
                 bootstrap_timeout: float, peer_timeout: float,
                 slice_index: int | None = None) -> None:
        self.rank = rank
        self.instance_size = instance_size
        # fanout="scatter": this rank's place in its instance, which picks its
        # slice of every room; None: it receives whole rooms
        self.slice_index = slice_index
        self.auto_resume = auto_resume
        self.bootstrap_timeout = bootstrap_timeout
        self.peer_timeout = peer_timeout

    # -------------------------------------------------------- allocations

    def asked(self, r: RecvRoom, c: Credit, now: float, *, auto: bool,
              prepost: bool = False) -> list[Action]:
        """init() got blocks: announce them with ALLOC. `prepost`: the pair has
        nothing else owed, so with a declared seq_len the first chunk's sizes
        are known and its recvs are posted now (one rendezvous, not two)."""
        r.alloc_sent = True
        r.outstanding = c
        set_status(r, TransferStatus.WAITING_FOR_INPUT)
        r.last_progress = r.alloc_at = now
        if auto:
            r.auto_first_blocks = len(c.block_ids)
        prepost = prepost and r.declared_seq_len > 0
        out: list[Action] = [Owe(), Post(Alloc(
            r.room, self.rank, self.instance_size, tuple(c.block_ids), c.allocated_tokens,
            c.direct, r.declared_seq_len, scatter=self.slice_index is not None,
            preposted=prepost, items=r.items))]
        if prepost:
            lo, hi = self.span(r.declared_seq_len)
            out.append(Prepost(c, prepost_tokens(hi - lo, 0, c.allocated_tokens), lo))
        return out

    def resumed(self, r: RecvRoom, c: Credit, *, prepost: bool = False) -> list[Action]:
        """A resume got blocks (or direct credit): announce them with RESUME.
        `prepost`: the pair has nothing else owed; when the sender holds the
        whole room the chunk is min(rest, allocated) and its recvs are posted now."""
        r.outstanding = c
        r.num_resumes += 1
        total = r.total
        prepost = prepost and r.given_all and total is not None
        n = prepost_tokens(total, c.key, c.allocated_tokens) if prepost and total else 0
        # direct: the Embedding rank needs no block ids, only how many tokens fit;
        # pre-posted: it sizes every answer, a refusal included, from `n`
        out: list[Action] = [Owe(), Post(Resume(r.room, self.rank, c.key,
                                                () if c.direct else tuple(c.block_ids),
                                                c.allocated_tokens, c.direct, prepost, n))]
        if prepost:
            assert r.span is not None
            out.append(Prepost(c, n, r.span[0] + c.key))
        return out

    # -------------------------------------------------------- frames

    def landing(self, r: RecvRoom, a: Credit, meta: Meta, chunk: Chunk) -> list[Action]:
        """A DATA meta answered `a`: its payload lands next. With auto resume the
        next chunk is asked for now, while this one lands; only for a next chunk
        at least as big as this one (pool mode: double buffering when the pool
        has room), as a smaller one would split what waiting for our own landing
        blocks gives whole."""
        r.outstanding = None
        r.landing = a
        r.landing_chunk = chunk
        r.given_all = bool(meta.flags & FLAG_GIVEN)
        if meta.first:  # aux that follow the payload replace these once landed
            r.seq_len, r.aux, r.span = meta.seq_len, meta.aux, self.span(meta.seq_len)
        if not chunk.last and self.auto_resume and r.failure is None and chunk.corrupt is None:
            set_status(r, TransferStatus.TRANSFERRING)
            return [AskResume(r.received + chunk.num_tokens, at_least=len(a.block_ids))]
        return []

    def landed(self, r: RecvRoom, pair_down: str | None, now: float) -> list[Action]:
        """The payload completed (host-observed): the allocation is answered."""
        a, chunk = r.landing, r.landing_chunk
        assert a is not None and chunk is not None
        r.landing = r.landing_chunk = None
        out: list[Action] = [Release(a)]
        r.received += chunk.num_tokens
        r.chunk_index += 1
        if chunk.corrupt is not None:
            out += self.fail(r, chunk.corrupt, FailureCause.CORRUPT_FRAME)
        elif r.failure is None and not r.complete:
            if pair_down is not None:  # the sender left after this chunk
                out += self.fail(r, f"language rank {self.rank}: embedding rank {r.src_rank} "
                                    f"is down: {pair_down}", FailureCause.PEER_LOST)
            else:
                set_status(r, TransferStatus.TRANSFERRING)
                r.partial_at = now
                if self.auto_resume and r.outstanding is None:
                    out.append(AskResume(r.received))  # our blocks came free
        out += self._maybe_untrack(r)
        if r.failure is None and r.complete:
            out.append(Publish(TransferStatus.SUCCESS))
        return out

    def abort_frame(self, r: RecvRoom, reason: str, src: int) -> list[Action]:
        """The Embedding rank answered our allocation with ABORT: nothing more of
        this room can land, so its blocks are free."""
        a = r.outstanding
        assert a is not None
        r.outstanding = None
        return [Release(a),
                *self.fail(r, f"language rank {self.rank}: room ended by embedding rank "
                              f"{src}: {reason.removeprefix(f'embedding rank {src}: ')}",
                           FailureCause.ABORTED_BY_PEER),
                *self._maybe_untrack(r)]

    # -------------------------------------------------------- other events

    def reject(self, r: RecvRoom, src: int, reason: str) -> list[Action]:
        return self.fail(r, f"rejected by embedding rank {src}: {reason}", FailureCause.REJECTED)

    def abort(self, r: RecvRoom, reason: str,
              cause: FailureCause = FailureCause.ABORT) -> list[Action]:
        """The caller ended the room (`cause` ABORT), or cancelled it (CANCELLED,
        which the ABORT carries so the Embedding side counts it the same)."""
        if r.status in TERMINAL or r.failure is not None:
            return []
        # Also before ALLOC: the Embedding rank may hold the data and its budget.
        return [*self.fail(r, f"aborted on language rank {self.rank}: {reason}", cause),
                Post(Abort(r.room, self.rank, reason,
                           cancelled=cause is FailureCause.CANCELLED))]

    def shutdown(self, r: RecvRoom) -> list[Action]:
        if r.status in TERMINAL or r.failure is not None:
            return []
        out = self.fail(r, f"language rank {self.rank} shut down", FailureCause.SHUTDOWN)
        if r.alloc_sent:
            out.append(Post(Abort(r.room, self.rank, "shutdown")))
        return out

    def peer_lost(self, r: RecvRoom, why: str, *, release_landing: bool,
                  clean: bool = False) -> list[Action]:
        """The stream from the room's Embedding rank is unusable: the room fails
        now, whatever lands, unless the peer said goodbye (`clean`) after the
        chunk now landing, which then decides. Outstanding blocks are free at
        once (before a meta frame arrives nothing is posted into them); blocks a
        recv is posted into are freed when that recv ends (`release_landing`:
        this is the thread that waited for it)."""
        out: list[Action] = []
        if r.outstanding is not None:
            if r.outstanding.posted and not release_landing:
                # its answer's recvs are posted: they hold the blocks until the
                # receiver thread's wait ends; the room fails now (draining)
                return self.fail(r, f"language rank {self.rank}: {why}",
                                 FailureCause.PEER_LOST)
            out.append(Release(r.outstanding))
            r.outstanding = None
        if r.landing is not None:
            if not release_landing:
                if clean:  # a goodbye after this chunk was sent: its landing decides
                    return out
                # declared dead: its payload recv is posted, so its blocks stay held
                # until the receiver thread's wait ends, but the room fails now
                return [*out, *self.fail(r, f"language rank {self.rank}: {why}",
                                         FailureCause.PEER_LOST)]
            out.append(Release(r.landing))
            r.landing = r.landing_chunk = None
        return [*out, *self.fail(r, f"language rank {self.rank}: {why}", FailureCause.PEER_LOST),
                *self._maybe_untrack(r)]

    def tick(self, r: RecvRoom, now: float,
             pair_note: Callable[[int], str] | None = None) -> list[Action]:
        """Timeouts. `pair_note(src)`: why the pair with `src` is not open, if it
        is not (a pair made on demand, waiting under `max_pairs`), for the
        reason of a room that got no chunk."""
        if r.failure is not None or r.status in TERMINAL:
            return []
        boot = self.bootstrap_timeout
        idle = now - r.last_progress
        if r.status == TransferStatus.BOOTSTRAPPING and idle > boot:
            why = ("no free blocks for it (init() found none)" if r.init_refused else
                   "no init() call (a queue not stepped, or a receiver never initialised)")
            return self.fail(r, f"language rank {self.rank}: room {r.room} timed out after "
                                f"bootstrap_timeout={boot:g}s waiting for {why}",
                             FailureCause.TIMEOUT)
        if needs_resume(r) and idle > boot:
            return [*self.fail(r, f"language rank {self.rank}: room {r.room} waited {boot:g}s "
                                  f"for blocks to resume", FailureCause.TIMEOUT),
                    Post(Abort(r.room, self.rank, "resume timeout"))]
        bound = boot + self.peer_timeout
        if r.outstanding is not None and idle > bound:
            # The Embedding rank answers an allocation it cannot serve by
            # bootstrap_timeout (an ABORT frame); this is the backstop for one that
            # stopped answering, still peer_timeout before the pair's transport
            # timeout (bootstrap + 2 x peer_timeout) could end the pair.
            stage = "first chunk" if r.seq_len is None else "next chunk"
            note = pair_note(r.src_rank) if pair_note is not None else ""
            return [*self.fail(r, f"language rank {self.rank}: no {stage} from embedding "
                                  f"rank {r.src_rank} within {bound:g}s"
                                  + (f" ({note})" if note else ""), FailureCause.TIMEOUT),
                    Post(Abort(r.room, self.rank, "timeout"))]
        return []

    def post_failed(self, r: RecvRoom, why: str) -> list[Action]:
        """The ALLOC or RESUME announcing `r.outstanding` could not be sent: nothing
        will answer it, so its blocks are free and the room fails."""
        c = r.outstanding
        assert c is not None
        r.outstanding = None
        return [Disown(), Release(c),
                *self.fail(r, f"language rank {self.rank}: {why}", FailureCause.PEER_LOST),
                *self._maybe_untrack(r)]

    # -------------------------------------------------------- internals

    def fail(self, r: RecvRoom, reason: str, cause: FailureCause) -> list[Action]:
        if r.failure is not None or r.status == TransferStatus.SUCCESS:
            return []
        r.failure = Failure(reason, cause, self.rank)
        return [CountFailure(cause), *self._maybe_untrack(r), Publish(TransferStatus.FAILED)]

    def _maybe_untrack(self, r: RecvRoom) -> list[Action]:
        """Forget a finished room once no frame can still land in its blocks."""
        finished = r.failure is not None or r.complete
        if finished and r.outstanding is None and r.landing is None and r.tracked:
            r.tracked = False
            return [Untrack()]
        return []
