"""Embedding side: one room's state machine. Pure: no threads, locks, sockets or
process groups; the clock comes in as `now`, and every transition returns the
actions the engine must execute, in order.

A room has one *lane* per Language rank that asked for it. The rule that
keeps both ends in step: every allocation (ALLOC or RESUME) accepted on a lane
is answered by exactly one frame on that pair's stream, a DATA chunk or an
ABORT frame. REJECT messages only carry the reason a room failed.

A room's data may come in parts (progressive send: `data`, then `part`): a
grant waits while the tokens it would carry are not given yet, and a chunk
carries what was given and fits, spanning parts given already (a segment
across two parts is joined, the only copy the Embedding side makes), so a
chunk may be shorter than its allocation only while the room is incomplete,
and the Language rank resumes for the rest.

Room status (monotone; `set_status` is the only writer):

    WAITING_FOR_INPUT  from sender(): the room lacks the caller's data, or any
                       Language rank's ALLOC (the Embedding side never reports
                       BOOTSTRAPPING: that is the Language side's "no blocks yet")
    TRANSFERRING       data and at least one ALLOC: frames are on the wire
    SUCCESS            every rank of the instance received every byte
    FAILED             failed, and no frame of the room is in flight any more
                       (only then may the caller touch its tensors again)

Between "failure decided" and FAILED a room is *failing*: `failure` is set,
frames already on the wire complete. The budget is returned when the room
ends (`End`), exactly once, before the status is published.

Lane states (derived by `lane_state`) by event, for a TP-1 room: the next
state, the actions in order, and the room's status after. `-`: the event
cannot happen there (the engine refuses it first). `tests/test_machines.py`
checks every cell and that this table is the one it checks. In words: a grant
waits for data, or is answered by an ABORT frame if the room fails first; a
chunk on the wire decides its lane (a failure meanwhile only tells the
Language rank by REJECT); when the last chunk of every lane is on the wire,
aborts, timeouts and a clean goodbye (`peer_bye`) change nothing: the sends'
completion decides, so both sides agree. A peer declared dead (`peer_lost`:
silent for peer_timeout, its stream broken, or it tore the pair down) ends
the room at once, frame on the wire or not: its lane is given up, the frame
is the transport's business, and the budget waits for it (the engine).

| state | data | resume | resume_preposted | frame_done | send_failed | abort | peer_abort | peer_lost | peer_bye | timeout |
|---|---|---|---|---|---|---|---|---|---|---|
| GRANTED | SENDING: SendData (TRANSFERRING) | GRANTED (WAITING_FOR_INPUT) | GRANTED (WAITING_FOR_INPUT) | - | - | ABORTING: CountFailure, SendAbortFrame (WAITING_FOR_INPUT) | ABORTING: CountFailure, SendAbortFrame (WAITING_FOR_INPUT) | CLOSED: CountFailure, SendReject, End (FAILED) | CLOSED: CountFailure, SendReject, End (FAILED) | ABORTING: CountFailure, SendAbortFrame (WAITING_FOR_INPUT) |
| SENDING | - | SENDING: Count, SendData (TRANSFERRING) | SENDING: Count, Preposted, SendData (TRANSFERRING) | WAIT_RESUME: Count (TRANSFERRING) | CLOSED: CountFailure, SendReject, End (FAILED) | SENDING: CountFailure, SendReject (TRANSFERRING) | SENDING: CountFailure, SendReject (TRANSFERRING) | CLOSED: CountFailure, SendReject, End (FAILED) | SENDING: CountFailure, SendReject (TRANSFERRING) | SENDING (TRANSFERRING) |
| WAIT_RESUME | - | SENDING: Count, SendData (TRANSFERRING) | SENDING: Count, Preposted, SendData (TRANSFERRING) | - | - | CLOSED: CountFailure, SendReject, End (FAILED) | CLOSED: CountFailure, SendReject, End (FAILED) | CLOSED: CountFailure, SendReject, End (FAILED) | CLOSED: CountFailure, SendReject, End (FAILED) | CLOSED: CountFailure, SendReject, End (FAILED) |
| SENT_LAST | - | SENT_LAST: SendAbortFrame (TRANSFERRING) | SENT_LAST: SendAbortFrame(padded) (TRANSFERRING) | DONE: Count, End (SUCCESS) | CLOSED: CountFailure, SendReject, End (FAILED) | SENT_LAST (TRANSFERRING) | SENT_LAST (TRANSFERRING) | CLOSED: CountFailure, SendReject, End (FAILED) | SENT_LAST (TRANSFERRING) | SENT_LAST (TRANSFERRING) |
| DONE | - | DONE: SendAbortFrame (SUCCESS) | DONE: SendAbortFrame(padded) (SUCCESS) | - | - | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) | DONE (SUCCESS) |
| ABORTING | - | ABORTING: SendAbortFrame (WAITING_FOR_INPUT) | ABORTING: SendAbortFrame(padded) (WAITING_FOR_INPUT) | CLOSED: End (FAILED) | - | ABORTING (WAITING_FOR_INPUT) | ABORTING (WAITING_FOR_INPUT) | CLOSED: End (FAILED) | ABORTING (WAITING_FOR_INPUT) | ABORTING (WAITING_FOR_INPUT) |
| CLOSED | - | CLOSED: SendAbortFrame (FAILED) | CLOSED: SendAbortFrame(padded) (FAILED) | - | - | CLOSED (FAILED) | CLOSED (FAILED) | CLOSED (FAILED) | CLOSED (FAILED) | CLOSED (FAILED) |

Resume is keyed by `sent_tokens`, which only grows: a RESUME at a key already
served is a repeat and is ignored; any other key than what was really sent on
the pair fails the room. A RESUME from a rank with no lane is a late one of an
earlier room of the same id (a rank's ALLOC comes first on its channel): it is
answered and the room is untouched. A pre-posted RESUME says how many tokens
its posted recvs expect (`Resume.posted_tokens`), so each of its answers, a
refusal in any state included, is padded to exactly that (the table's
`resume_preposted` column; `(padded)` marks such an ABORT frame).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import Failure, FailureCause
from ..geometry import Geometry
from ..plan import prepost_tokens
from ..topology import Topology
from ..types import TransferStatus
from .actions import (
    Action,
    Count,
    CountFailure,
    End,
    SendAbortFrame,
    SendReject,
)
from .item_table import take_items
from .room import (
    Grant,
    Lane,
    LaneState,
    SendRoom,
    add_runs,
    decided_on_the_wire,
    lane_state,
    lane_total,
    set_status,
    waiting_for,
)
from .rules import alloc_conflict
from .schedule import Scheduler

__all__ = ["Grant", "Lane", "LaneState", "SendMachine", "SendRoom", "lane_state", "set_status"]


# ---------------------------------------------------------------- transitions


class SendMachine(Scheduler):
    """Transitions of every room of one Embedding rank. Holds only constants."""

    def __init__(self, rank: int, geometry: Geometry, topology: Topology,
                 bootstrap_timeout: float) -> None:
        self.rank = rank
        self.geometry = geometry
        self.topology = topology
        self.bootstrap_timeout = bootstrap_timeout

    # -------------------------------------------------------- caller events

    def data(self, r: SendRoom, runs: list[tuple[list[torch.Tensor], int]], seq_len: int,
             aux: tuple[int, ...], ready: torch.cuda.Event | None, budget: list[int],
             now: float) -> list[Action]:
        """The first send(): the room's length (in wire tokens), budget and first
        part (the whole room, or its first tokens: its runs of rows that go on the
        wire, `Sender._select`); answer every grant it can."""
        r.sources = runs[0][0] if runs else []
        r.seq_len, r.aux, r.budget = seq_len, aux, budget
        r.sent_at = now
        if r.lanes:
            set_status(r, TransferStatus.TRANSFERRING)
        return self.part(r, runs, ready, now)

    def part(self, r: SendRoom, runs: list[tuple[list[torch.Tensor], int]],
             ready: torch.cuda.Event | None, now: float) -> list[Action]:
        """A part of the room (progressive send), as its runs of wire rows: what
        waiting grants can take of it leaves at once."""
        add_runs(r, runs, ready)
        r.last_progress = now
        out: list[Action] = []
        for lane in list(r.lanes.values()):
            out += self._schedule(r, lane)
        return out

    def abort(self, r: SendRoom, reason: str) -> list[Action]:
        return self.fail(r, f"aborted on embedding rank {self.rank}: {reason}",
                         FailureCause.ABORT)

    def shutdown(self, r: SendRoom) -> list[Action]:
        if r.sources is None and not r.lanes:  # nothing given, nobody asked: no count
            r.failure = Failure(f"embedding rank {self.rank} shut down", FailureCause.SHUTDOWN,
                                self.rank)
            return self._end(r, TransferStatus.FAILED, "shutdown")
        # decided on the wire: the streams finish their frames before they stop
        return self.fail(r, f"embedding rank {self.rank} shut down", FailureCause.SHUTDOWN)

    # -------------------------------------------------------- control events

    def alloc(self, r: SendRoom, lang: int, grant: Grant, instance_size: int,
              why: str | None, other_instance: Callable[[int, int], str | None]) -> list[Action]:
        """An ALLOC for a live room; `why` is what the grant checks found wrong,
        `other_instance` says why `lang` may not join a room another rank asked for."""
        if r.failure is not None or r.ended:
            return [self.refuse(lang, r.room, f"ALLOC for a room that already failed: "
                                              f"{r.failure}", grant)]
        if why is None:
            conflict = alloc_conflict(
                {rank: lane.slice_index is not None for rank, lane in r.lanes.items()},
                r.instance_size, lang, grant.scatter, instance_size, other_instance)
            if conflict is not None and not conflict[1]:  # another instance's room
                return [self.refuse(lang, r.room, f"bad ALLOC from language rank {lang}: "
                                                  f"{conflict[0]}", grant),
                        CountFailure(FailureCause.BAD_MESSAGE)]
            why = None if conflict is None else conflict[0]
        if why is not None:
            why = f"bad ALLOC from language rank {lang}: {why}"
            return [self.refuse(lang, r.room, why, grant),
                    *self.fail(r, f"embedding rank {self.rank}: {why}",
                               FailureCause.BAD_MESSAGE)]
        problem = take_items(r, lang, grant)
        if problem is not None:
            return [self.refuse(lang, r.room, problem[0], grant),
                    *self.fail(r, f"embedding rank {self.rank}: {problem[0]}", problem[1])]
        r.instance_size = instance_size
        lane = r.lanes[lang] = self.new_lane(lang, grant)
        r.last_progress = grant.arrived
        if r.sources is not None:
            set_status(r, TransferStatus.TRANSFERRING)
        return [*self._preposted(r.room, lang, grant), *self._schedule(r, lane),
                *self._maybe_succeed(r, grant.arrived)]

    def claimed(self, r: SendRoom, grants: dict[int, Grant], now: float) -> list[Action]:
        """`sender()` takes over the room's early ALLOCs as its lanes: their item
        tables must agree; a room that needs nothing from here ends SUCCESS."""
        problem = None
        for lang, grant in grants.items():
            problem = problem or take_items(r, lang, grant)
            r.lanes[lang] = self.new_lane(lang, grant)
        if problem is not None:
            return self.fail(r, f"embedding rank {self.rank}: {problem[0]}", problem[1])
        return self._maybe_succeed(r, now)

    def resume(self, r: SendRoom, lang: int, grant: Grant, why: str | None) -> list[Action]:
        """A RESUME for a live room keyed by `grant.key` (= sent_tokens)."""
        if r.failure is not None or r.ended:
            return [self.refuse(lang, r.room, f"RESUME for a room that already ended: "
                                              f"{r.failure}", grant)]
        lane = r.lanes.get(lang)
        if lane is None:
            # A rank's ALLOC comes before its RESUMEs on the ordered channel, so
            # this one is a late message of an earlier room of this id, whose id
            # was reused here before it arrived: answered, this room untouched.
            return [self.refuse(lang, r.room, "RESUME for an earlier room of this id, which "
                                              "already ended", grant)]
        if why is None:
            if grant.key in lane.keys:
                return []  # a repeat of a grant already accepted: resume is idempotent
            total = lane_total(r, lane)
            if lane.pending is not None:
                why = "RESUME while the previous allocation is still unanswered"
            elif grant.key != lane.sent_tokens:
                why = (f"RESUME sent_tokens={grant.key} but {lane.sent_tokens} tokens "
                       f"were sent on this pair")
            elif lane.sent_tokens >= total:
                why = f"RESUME after all {total} tokens were sent"
            elif grant.preposted and grant.expect != (
                    due := prepost_tokens(total, grant.key, grant.allocated_tokens)):
                why = f"its posted recvs expect {grant.expect} tokens, but {due} are due"
        if why is not None:
            why = f"bad RESUME from language rank {lang}: {why}"
            return [self.refuse(lang, r.room, why, grant),
                    *self.fail(r, f"embedding rank {self.rank}: {why}",
                               FailureCause.BAD_MESSAGE)]
        lane.pending = grant
        lane.keys.add(grant.key)
        r.last_progress = grant.arrived
        return [Count(resumes=1), *self._preposted(r.room, lang, grant),
                *self._schedule(r, lane)]

    def peer_abort(self, r: SendRoom, lang: int, reason: str, *,
                   cancelled: bool = False) -> list[Action]:
        if cancelled:  # the client is gone: the Language serving loop cancelled it
            return self.fail(r, f"cancelled by language rank {lang}: {reason}",
                             FailureCause.CANCELLED)
        return self.fail(r, f"aborted by language rank {lang}: {reason}", FailureCause.ABORT)

    def bad_message(self, r: SendRoom, lang: int, reason: str) -> list[Action]:
        """A message from `lang` naming this room that cannot be served: the room
        fails (pending grants are answered); `lang` learns by REJECT if no frame
        is owed to it."""
        out = self.fail(r, reason, FailureCause.BAD_MESSAGE)
        if lang not in r.lanes:
            out.append(SendReject(r.room, lang, reason))
        return out

    # -------------------------------------------------------- stream events

    def frame_done(self, r: SendRoom, lane: Lane, *, data: bool, nbytes: int,
                   err: BaseException | None, lane_down: str | None,
                   now: float) -> list[Action]:
        """A frame posted on `lane` completed (err None) or failed. A failed send
        has already torn the pair down (the engine does that first)."""
        lane.in_flight -= 1
        out: list[Action] = []
        if not data:
            lane.aborting = False
            return self._maybe_end(r)
        r.last_progress = now
        if err is not None:
            out += self.fail(r, f"embedding rank {self.rank}: send to language rank "
                                f"{lane.lang_rank} failed: {err}", FailureCause.PEER_LOST)
        elif r.failure is None:
            out.append(Count(bytes_sent=nbytes, chunks=1))
            r.bytes_sent += nbytes
            if lane.sent_tokens == lane_total(r, lane) and lane.in_flight == 0:
                lane.done = True
                out += self._maybe_succeed(r, now)
            elif lane_down is not None and lane.in_flight == 0:
                out += self.fail(r, f"embedding rank {self.rank}: language rank "
                                    f"{lane.lang_rank} is down: {lane_down}",
                                 FailureCause.PEER_LOST)
        return out + self._maybe_end(r)

    def peer_lost(self, r: SendRoom, lang: int, why: str, *, clean: bool = False) -> list[Action]:
        """Language rank `lang` is gone: a room it was part of, or whose instance
        it belongs to, can never reach SUCCESS. Declared dead (silent, its
        stream broke, or it tore the pair down), its lane is given up at once:
        the room fails now even with a frame on the wire, whose completion is
        the transport's business (the budget stays held until then). After a
        clean goodbye the frames it owed were read first, so a last chunk
        already on the wire still decides its lane."""
        lane = r.lanes.get(lang)
        if lane is not None:
            lane.pending = None  # owed, but it can no longer be answered
            if lane.done or (clean and lane.in_flight
                             and lane.sent_tokens == lane_total(r, lane)):
                return []
            lane.lost = not clean
            return self.fail(r, why, FailureCause.PEER_LOST, force=True) + self._maybe_end(r)
        if r.lanes and self.topology.instance_of(next(iter(r.lanes))) == \
                self.topology.instance_of(lang):
            return self.fail(r, why, FailureCause.PEER_LOST)
        return []

    def tick(self, r: SendRoom, now: float) -> list[Action]:
        """bootstrap_timeout: a room that waits for its data (`send()`), or with
        data for an ALLOC or RESUME. Grants it holds are answered (ABORT
        frames), so the Language side's posted recvs complete long before the
        pair's transport timeout could end the pair."""
        limit = self.bootstrap_timeout
        if r.failure is not None or r.ended:
            return []
        if now - r.last_progress <= limit or any(p.in_flight for p in r.lanes.values()):
            return []
        return self.fail(r, f"embedding rank {self.rank}: timed out after {limit:g}s waiting "
                            f"for {waiting_for(r)}", FailureCause.TIMEOUT)

    # -------------------------------------------------------- internals

    def fail(self, r: SendRoom, reason: str, cause: FailureCause, *,
             force: bool = False) -> list[Action]:
        """Fail a live room: answer pending grants with ABORT frames, tell every
        other Language rank of the room why, end it once nothing is in flight.
        A room decided on the wire (every rank's last chunk sent) is left to its
        sends' completion, whoever asks (DESIGN, "Outcomes agree"), unless
        `force`: a peer declared dead ends its rooms at once (DESIGN 0.3)."""
        if r.failure is not None or r.ended:
            return []
        if not force and decided_on_the_wire(r):
            return []
        r.failure = Failure(reason, cause, self.rank)
        out: list[Action] = [CountFailure(cause)]
        for lane in r.lanes.values():
            if lane.pending is not None:
                grant, lane.pending = lane.pending, None
                lane.in_flight += 1
                lane.aborting = True
                out.append(SendAbortFrame(r.room, lane.lang_rank, reason, lane, r,
                                          pad=grant if grant.preposted else None))
            elif not lane.done:  # no frame owed to it: the reason goes by REJECT
                out.append(SendReject(r.room, lane.lang_rank, reason))
        return out + self._maybe_end(r)

    def _maybe_succeed(self, r: SendRoom, now: float) -> list[Action]:
        done = sum(p.done for p in r.lanes.values())
        if r.instance_size is None or done != r.instance_size:
            return []
        total = None if r.sent_at is None else now - r.sent_at
        return self._end(r, TransferStatus.SUCCESS, "success", total)

    def _maybe_end(self, r: SendRoom) -> list[Action]:
        if r.failure is not None and not r.ended and all(
                p.in_flight == 0 or p.lost for p in r.lanes.values()):
            return self._end(r, TransferStatus.FAILED, r.failure)
        return []

    def _end(self, r: SendRoom, status: TransferStatus, outcome: str,
             send_total_s: float | None = None) -> list[Action]:
        r.ended = True
        return [End(r, status, outcome, send_total_s)]
