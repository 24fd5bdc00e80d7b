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

import dataclasses

from ..errors import FailureCause, StreamBroken
from ..plan import prepost_tokens, span
from ..types import TERMINAL, TransferStatus
from ..wire import FLAG_GIVEN, MAX_INLINE_AUX, Abort, Alloc, FrameKind, Meta, Resume
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
from .credit import Credit
from .room import Chunk, Phase, RecvRoom, needs_resume, phase, set_status

__all__ = ["Chunk", "Phase", "Publish", "RecvMachine", "RecvRoom", "needs_resume", "phase",
           "set_status"]


# ---------------------------------------------------------------- transitions


class RecvMachine:
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
            preposted=prepost))]
        if prepost:
            lo, hi = self.span(r.declared_seq_len)
            out.append(Prepost(c, prepost_tokens(hi - lo, 0, c.allocated_tokens), lo))
        return out

    def span(self, seq_len: int) -> tuple[int, int]:
        """Tokens [lo, hi) of a `seq_len`-token room that this rank receives."""
        return span(seq_len, self.instance_size, self.slice_index)

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

    def owed(self, r: RecvRoom | None, src: int, m: Meta) -> Credit:
        """The allocation a frame from `src` answers: a frame for a room with
        nothing outstanding towards `src` means the stream cannot be trusted."""
        if r is None or r.src_rank != src or r.outstanding is None:
            raise StreamBroken(f"language rank {self.rank}: {m.kind.name} frame for room "
                               f"{m.room}, which has nothing outstanding towards embedding "
                               f"rank {src}")
        return r.outstanding

    def check_meta(self, r: RecvRoom, a: Credit, m: Meta) -> Chunk:
        """Sizes must match the allocation exactly, else the stream is broken."""

        def broken(why: str) -> StreamBroken:
            return StreamBroken(f"language rank {self.rank}: room {r.room} chunk from "
                                f"embedding rank {r.src_rank}: {why}", room=r.room)

        if m.kind is not FrameKind.DATA:
            raise broken(f"unexpected {m.kind.name} frame")

        # a.key: tokens of our span landed before this allocation; 0 for the ALLOC
        if m.first != (a.key == 0):
            raise broken(f"FIRST flag does not match the allocation at {a.key} tokens")
        corrupt = None
        if m.first:
            if m.seq_len < 1:
                raise broken(f"seq_len={m.seq_len}")
            seq_len = m.seq_len
            lo, hi = self.span(seq_len)
            if r.declared_seq_len and m.seq_len != r.declared_seq_len:
                # the Embedding rank answers such an ALLOC with ABORT; this is the backstop
                corrupt = (f"language rank {self.rank}: room {r.room} has {m.seq_len} tokens, "
                           f"but seq_len={r.declared_seq_len} was declared")
        else:
            assert r.seq_len is not None and r.span is not None
            seq_len, (lo, hi) = r.seq_len, r.span
            if (m.seq_len != r.seq_len or m.num_aux != len(r.aux)
                    or m.aux != r.aux[:MAX_INLINE_AUX]):
                corrupt = (f"language rank {self.rank}: chunk {m.chunk_index} of room {r.room} "
                           f"says seq_len={m.seq_len} aux={m.aux} ({m.num_aux} values), "
                           f"first chunk said seq_len={r.seq_len} aux="
                           f"{r.aux[:MAX_INLINE_AUX]} ({len(r.aux)} values)")
        if m.token_offset != lo + a.key or m.chunk_index != r.chunk_index:
            raise broken(f"token_offset={m.token_offset} chunk_index={m.chunk_index}, "
                         f"expected {lo + a.key} and {r.chunk_index}")
        # min(remaining, allocated), or fewer when the sender has not been given
        # more of the room yet (progressive send): the rest follows a resume. An
        # empty span (scatter, a room shorter than the instance) is one meta frame.
        expect = min(hi - m.token_offset, a.allocated_tokens)
        if not min(1, hi - lo) <= m.num_tokens <= expect:
            raise broken(f"num_tokens={m.num_tokens}, expected at most {expect} "
                         f"(seq_len {seq_len}, tokens [{lo}, {hi}) here, allocated "
                         f"{a.allocated_tokens})")
        last = m.token_offset + m.num_tokens == hi
        if m.last != last:
            raise broken("LAST flag does not match the token count")
        return Chunk(m.num_tokens, m.token_offset, last, corrupt)

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

    @staticmethod
    def spoiled(chunk: Chunk, why: str) -> Chunk:
        """A chunk that cannot be the room's data (no output to land in, aux values
        that disagree): it still lands, for the stream's sake, and the room
        fails once it has (`landed`). The first reason stands."""
        return chunk if chunk.corrupt is not None else dataclasses.replace(chunk, corrupt=why)

    def output_failed(self, r: RecvRoom, chunk: Chunk, err: BaseException) -> Chunk:
        """The room's result tensors could not be made for its first chunk."""
        return self.spoiled(chunk, f"language rank {self.rank}: cannot allocate room "
                                   f"{r.room}'s output: {err}")

    def prepost_matches(self, r: RecvRoom, a: Credit, chunk: Chunk, room: RecvRoom,
                        credit: Credit, num_tokens: int, token_offset: int,
                        scratch: bool) -> Chunk:
        """A DATA meta arrived where a pre-posted frame's recvs wait: it must be
        exactly that frame (else the stream cannot be trusted); one posted into
        scratch (no output could be made when it was asked for) is no data."""
        if (r is not room or a is not credit or chunk.num_tokens != num_tokens
                or chunk.token_offset != token_offset):
            raise StreamBroken(f"language rank {self.rank}: room {r.room}'s chunk of "
                               f"{chunk.num_tokens} tokens at {chunk.token_offset} is not "
                               f"the pre-posted one ({num_tokens} at {token_offset} of "
                               f"room {room.room})", room=r.room)
        if not scratch:
            return chunk
        return self.spoiled(chunk, f"language rank {self.rank}: could not allocate room "
                                   f"{r.room}'s output when its first chunk was asked for")

    def aux_landed(self, r: RecvRoom, values: tuple[int, ...]) -> None:
        """A first chunk's aux values (more than the meta holds) landed after its
        payload: the meta's inline ones must be their head."""
        if values[:len(r.aux)] != r.aux and r.landing_chunk is not None:
            r.landing_chunk = self.spoiled(r.landing_chunk, f"language rank {self.rank}: "
                                           f"room {r.room}'s aux values disagree with its "
                                           f"meta frame")
        r.aux = values

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
                              f"{src}: {reason}", FailureCause.ABORTED_BY_PEER),
                *self._maybe_untrack(r)]

    # -------------------------------------------------------- other events

    def reject(self, r: RecvRoom, src: int, reason: str) -> list[Action]:
        return self.fail(r, f"rejected by embedding rank {src}: {reason}", FailureCause.REJECTED)

    def abort(self, r: RecvRoom, reason: str) -> list[Action]:
        if r.status in TERMINAL or r.failure is not None:
            return []
        # Also before ALLOC: the Embedding rank may hold the data and its budget.
        return [*self.fail(r, f"aborted on language rank {self.rank}: {reason}",
                           FailureCause.ABORT),
                Post(Abort(r.room, self.rank, reason))]

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

    def tick(self, r: RecvRoom, now: float) -> list[Action]:
        if r.failure is not None or r.status in TERMINAL:
            return []
        boot = self.bootstrap_timeout
        idle = now - r.last_progress
        if r.status == TransferStatus.BOOTSTRAPPING and idle > boot:
            return self.fail(r, f"language rank {self.rank}: no free blocks for room {r.room} "
                                f"within bootstrap_timeout={boot:g}s", FailureCause.TIMEOUT)
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
            return [*self.fail(r, f"language rank {self.rank}: no {stage} from embedding "
                                  f"rank {r.src_rank} within {bound:g}s", FailureCause.TIMEOUT),
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
        r.failure = reason
        return [CountFailure(cause), *self._maybe_untrack(r), Publish(TransferStatus.FAILED)]

    def _maybe_untrack(self, r: RecvRoom) -> list[Action]:
        """Forget a finished room once no frame can still land in its blocks."""
        finished = r.failure is not None or r.complete
        if finished and r.outstanding is None and r.landing is None and r.tracked:
            r.tracked = False
            return [Untrack()]
        return []
