"""Embedding side: what a room's lane sends next, decided by the room's
machine. A grant (an accepted ALLOC or RESUME) is answered by exactly one
frame: the chunk that fits it and was given already (parts given coalesce
into one chunk), a DEFER first when a pre-posted grant's data is given only
in part, an ABORT frame when it is refused. Pure, as the machine is: it
returns actions, and `plan` holds the span rules.

The lane table (`machine.py`) for what the lane states share; this one for
what parts, pre-posted grants and scatter slices add. Rows: how the lane got
there, in a room of 10 tokens (blocks of 4) given in parts. Columns: the
caller gives 2 more tokens, or all the rest; a RESUME of 2 blocks arrives,
plain or pre-posted (its recvs posted for what is due). Cells: the lane state
after, the actions (a DATA frame with its tokens, and its parts when it spans
several) and the room's status. `tests/test_machines.py` checks every cell
and that this table is the one it checks.

| lane | part(2) | part(rest) | resume | resume_preposted |
|---|---|---|---|---|
| FIRST_GRANT | SENDING: SendData[2] (TRANSFERRING) | SENDING: SendData[8] (TRANSFERRING) | - | - |
| WAITS_FOR_PART | SENDING: SendData[2] (TRANSFERRING) | SENDING: SendData[4] (TRANSFERRING) | GRANTED (TRANSFERRING) | GRANTED (TRANSFERRING) |
| PREPOSTED_WAITS | SENDING: SendDefer, SendData[2] (TRANSFERRING) | SENDING: SendData[4] (TRANSFERRING) | GRANTED (TRANSFERRING) | GRANTED (TRANSFERRING) |
| PARTS_GIVEN | - | - | SENT_LAST: Count, SendData[6, 2 parts] (TRANSFERRING) | SENT_LAST: Count, Preposted, SendData[6, 2 parts] (TRANSFERRING) |
| SCATTER_EMPTY_SLICE | - | SENT_LAST: SendData[1], SendData[0] (TRANSFERRING) | - | - |
"""

from __future__ import annotations

from ..errors import FailureCause
from ..geometry import Geometry
from ..meta import FLAG_FIRST, FLAG_GIVEN, FLAG_LAST, FrameKind, Meta
from ..plan import chunk_tokens, segment_plan
from ..topology import Topology
from .actions import Action, Preposted, SendAbortFrame, SendData, SendDefer, SendReject
from .pair import defer
from .room import Grant, Lane, SendRoom, lane_span


class Scheduler:
    """The scheduling half of `SendMachine`: lanes, refusals and the next chunk."""

    rank: int
    geometry: Geometry
    topology: Topology

    def fail(self, r: SendRoom, reason: str, cause: FailureCause, *,
             force: bool = False) -> list[Action]:
        raise NotImplementedError  # the machine's

    def new_lane(self, lang: int, grant: Grant) -> Lane:
        """The lane an accepted ALLOC opens (now, or when `sender()` claims it)."""
        index = self.topology.index_in_instance(lang) if grant.scatter else None
        if grant.items is not None and grant.seq_len == 0:
            # every item of this source is a hit there: nothing is owed to it
            return Lane(lang, slice_index=index, done=True, keys={0})
        return Lane(lang, slice_index=index, pending=grant, keys={0})

    def refuse(self, lang: int, room: int, why: str,
               grant: Grant | None = None) -> SendAbortFrame | SendReject:
        """Refuse an allocation: its answer is an ABORT frame that says why
        (padded to the allocation's sizes when its recvs are posted). An item
        room's ALLOC that asks for nothing is owed no frame: a REJECT says why."""
        # an earlier failure quoted in `why` names this rank already: once is enough
        reason = f"embedding rank {self.rank}: " + why.replace(f"embedding rank {self.rank}: ", "")
        if grant is not None and grant.items is not None and grant.seq_len == 0:
            return SendReject(room, lang, reason)
        return SendAbortFrame(room, lang, reason,
                              pad=grant if grant is not None and grant.preposted else None)

    @staticmethod
    def _preposted(room: int, lang: int, grant: Grant) -> list[Action]:
        return [Preposted(room, lang, grant)] if grant.preposted else []

    def _schedule(self, r: SendRoom, lane: Lane) -> list[Action]:
        grant = lane.pending
        if grant is None or r.sources is None or r.failure is not None:
            return []
        if grant.seq_len and grant.seq_len != r.seq_len:
            # The Language rank sized (and may have posted) its receives for the
            # length its caller declared: answer with an ABORT frame instead,
            # so the stream stays aligned, and fail the room on both sides.
            return self.fail(r, f"embedding rank {self.rank}: language rank {lane.lang_rank} "
                                f"declared seq_len={grant.seq_len} for room {r.room}, but it "
                                f"has {r.seq_len} tokens", FailureCause.LENGTH_MISMATCH)
        lo, hi = lane_span(r, lane)
        offset = lo + lane.sent_tokens  # in the room's tokens
        if grant.preposted:
            # exactly what the rank's posted recvs expect, whatever the parts
            n = grant.expect
            assert n == (min(hi - offset, grant.allocated_tokens) if hi > lo else 0)
            if n and offset >= r.given:
                return []  # none of it given yet: waits (or a DEFER, for another room)
            if n and offset + n > r.given:
                # a progressive send gave only some of it (whether the part or the
                # grant came first): DEFER, and an ordinary chunk leaves at once
                defer(grant)
                return [SendDefer(r.room, lane.lang_rank, grant), *self._schedule(r, lane)]
        elif hi > lo and offset >= r.given:
            return []  # its data is not given yet: the grant waits for the next part
        else:
            # Whatever was given and fits: parts given already coalesce into one
            # chunk (a segment that spans two of them is joined, `stream.data_frame`,
            # which costs a copy of it but saves a resume round each); while the
            # room is incomplete, never past what was given.
            n = (0 if hi == lo else min(chunk_tokens(hi, offset, grant.allocated_tokens),
                                        r.given - offset))
        lane.pending = None
        # an empty span (scatter, a room shorter than its instance) is answered
        # by a meta frame alone, which carries seq_len
        plan = (segment_plan(grant.block_ids, self.geometry.block_size, n, direct=grant.direct)
                if n else [])
        parts = [p for p in r.parts if p.start < offset + n and offset < p.start + p.num_tokens]
        flags = ((FLAG_FIRST if lane.sent_tokens == 0 else 0)
                 | (FLAG_LAST if offset + n == hi else 0)
                 | (FLAG_GIVEN if r.given == r.seq_len else 0))
        meta = Meta(FrameKind.DATA, r.room, lane.chunk_index, offset, n, r.seq_len, flags,
                    r.aux)
        lane.sent_tokens += n
        lane.chunk_index += 1
        lane.in_flight += 1
        return [SendData(r, lane, meta, plan, n * self.geometry.token_nbytes,
                         parts or r.parts[:1])]
