"""Embedding side: what a control message from a Language rank means, before
any room's machine sees it. Pure: an ALLOC, RESUME or ABORT becomes a machine
event for the live room it names, an entry in the lobby (no `sender()` yet),
or a refusal answered by an ABORT frame; and the checks every grant must pass
(block ids in the peer's pool, unique, `allocated_tokens == len(blocks) *
block_size`, an instance size that fits the topology, one instance per room).
"""

from __future__ import annotations

from ..errors import FailureCause
from ..geometry import Geometry
from ..plan import num_blocks_for, prepost_tokens, span
from ..topology import Topology
from ..wire import Abort, Alloc, Resume
from .actions import Action, CountFailure, DropPair, Preposted, SendReject
from .lobby import Lobby, Refusal
from .machine import SendMachine
from .room import Grant, SendRoom


class Admission:
    def __init__(self, machine: SendMachine, lobby: Lobby, geometry: Geometry,
                 topology: Topology, peer_num_blocks: dict[int, int]) -> None:
        self.machine = machine
        self.lobby = lobby
        self.geometry = geometry
        self.topology = topology
        self.peer_num_blocks = peer_num_blocks

    # -------------------------------------------------------- messages

    def alloc(self, r: SendRoom | None, m: Alloc, now: float) -> list[Action]:
        lang, room = m.lang_rank, m.room
        grant = Grant(0, m.block_ids, m.allocated_tokens, m.direct, now, m.seq_len, m.scatter,
                      m.preposted, self.alloc_expect(m) if m.preposted else -1, m.items)
        if grant.asks_nothing:
            why = (("an ALLOC that needs no item carries blocks or posted recvs"
                    if m.block_ids or m.allocated_tokens or m.preposted else None)
                   or self.check_instance_size(m.instance_size, scatter=m.scatter))
        else:
            why = (self.check_grant(lang, m.block_ids, m.allocated_tokens, m.direct,
                                    allow_empty=False)
                   or self.check_instance_size(m.instance_size, scatter=m.scatter))
        if r is not None:
            return self.machine.alloc(r, lang, grant, m.instance_size, why,
                                      self.other_instance)
        ended = self.lobby.late(room, lang)
        if ended is not None:
            return [self.machine.refuse(lang, room, f"ALLOC for a room that already ended: "
                                                    f"{ended}", grant)]
        if why is not None:
            return [self.machine.refuse(lang, room, f"bad ALLOC from language rank {lang}: "
                                                    f"{why}", grant)]
        aborted = self.lobby.aborted(room, lang, now)
        if aborted is not None:
            return [self.machine.refuse(lang, room, aborted, grant)]
        refused = self.lobby.add_alloc(lang, room, m.instance_size, grant, self.other_instance)
        if not refused:  # kept until sender(room), or bootstrap_timeout
            return [Preposted(room, lang, grant)] if grant.preposted else []
        return [CountFailure(FailureCause.BAD_MESSAGE), *self.refusals(refused)]

    def resume(self, r: SendRoom | None, m: Resume, now: float) -> list[Action]:
        lang, room = m.lang_rank, m.room
        # A pre-posted RESUME says how many tokens its posted recvs expect, so
        # every answer, a refusal in any state included, is sized from it.
        grant = Grant(m.sent_tokens, m.block_ids, m.allocated_tokens, m.direct, now,
                      preposted=m.preposted, expect=m.posted_tokens if m.preposted else -1)
        # A Language rank's resume credit always lands straight in the room's
        # output: the recvs it posts are one contiguous run, whatever the rest
        # of the message says, and so is every padded answer to it.
        grant.direct = grant.direct or m.preposted
        pool = self.peer_num_blocks[lang] * self.geometry.block_size
        if m.preposted and m.posted_tokens > pool:
            # no answer of a size it could have posted: give the pair up rather
            # than send a size its recvs do not expect
            return [DropPair(lang, f"pre-posted RESUME for room {room} expects "
                                   f"{m.posted_tokens} tokens, more than its pool of {pool}")]
        if r is None:
            ended = self.lobby.ended(room)
            gone = ("RESUME for a room that is unknown here" if ended is None
                    else f"RESUME for a room that already ended: {ended}")
            return [self.machine.refuse(lang, room, gone, grant)]
        why = self.check_grant(lang, m.block_ids, m.allocated_tokens, m.direct,
                               allow_empty=True)
        if why is None and m.preposted and not m.direct:
            why = "a pre-posted RESUME must be direct (its recvs are one run into the output)"
        return self.machine.resume(r, lang, grant, why)

    def abort(self, r: SendRoom | None, m: Abort, now: float) -> list[Action]:
        if r is not None:
            return self.machine.peer_abort(r, m.lang_rank, m.reason, cancelled=m.cancelled)
        return self.refusals(self.lobby.abort(m.room, m.lang_rank, m.reason, now,
                                              self.other_instance))

    def bad_message(self, r: SendRoom | None, lang: int, room: int,
                    reason: str) -> list[Action]:
        """A message from `lang` naming `room` that cannot be served: a live room
        fails (its pending grants are answered); otherwise `lang` learns by REJECT."""
        if r is not None:
            return self.machine.bad_message(r, lang, reason)
        return [SendReject(room, lang, reason)]

    def refusals(self, refusals: list[Refusal]) -> list[Action]:
        return [self.machine.refuse(f.lang_rank, f.room, f.reason, f.grant) for f in refusals]

    def alloc_expect(self, m: Alloc) -> int:
        """The first chunk a pre-posted ALLOC's rank sized its recvs for: its
        span of a room of the declared length, as far as the allocation goes."""
        tp = m.instance_size
        index = self.topology.index_in_instance(m.lang_rank) if m.scatter else None
        if index is not None and not 0 <= index < tp:
            index = None  # a bad instance_size: the ALLOC is refused (padded to the whole room)
        lo, hi = span(m.seq_len, tp, index)
        return prepost_tokens(hi - lo, 0, max(1, m.allocated_tokens))

    # -------------------------------------------------------- checks

    def check_grant(self, lang: int, block_ids: tuple[int, ...], allocated: int,
                    direct: bool, *, allow_empty: bool) -> str | None:
        """Why these blocks cannot be a destination on `lang`, or None."""
        bs = self.geometry.block_size
        num = self.peer_num_blocks[lang]
        if allocated < 1:
            return f"allocated_tokens={allocated} must be >= 1"
        if not block_ids:
            if direct and allow_empty:
                return None
            return "no blocks"
        if allocated != len(block_ids) * bs:
            return f"allocated_tokens={allocated} != {len(block_ids)} blocks x block_size {bs}"
        bad = [b for b in block_ids if not 0 <= b < num]
        if bad:
            return f"block ids {bad[:8]} out of range [0, {num})"
        if len(set(block_ids)) != len(block_ids):
            return "duplicate block ids"
        return None

    def check_instance_size(self, instance_size: int, *, scatter: bool = False) -> str | None:
        tp = self.topology.language_tp_size
        if not 1 <= instance_size <= tp:
            return f"instance_size={instance_size} outside [1, {tp}]"
        if scatter and instance_size != tp:
            # the slices are cut by the instance's real size: any other would
            # leave tokens that no rank asks for
            return f"fanout=scatter with instance_size={instance_size}, not {tp}"
        return None

    def other_instance(self, lang: int, first: int) -> str | None:
        """A room is received by one Language instance: why `lang` may not join a
        room that `first` already asked for, or None."""
        mine, theirs = self.topology.instance_of(lang), self.topology.instance_of(first)
        if mine == theirs:
            return None
        return (f"room already claimed by language instance {theirs} (rank {first}); "
                f"rank {lang} is in instance {mine}")


def budget_blocks(geometry: Geometry, room: int, seq_len: int, total: int) -> int:
    """Budget blocks a room of `seq_len` tokens takes; a room longer than the
    whole budget can never be sent."""
    need = num_blocks_for(seq_len, geometry.block_size)
    if need > total:
        raise ValueError(f"send(room={room}): seq_len={seq_len} needs {need} blocks of "
                         f"{geometry.block_size} tokens, more than the whole budget of "
                         f"{total} blocks")
    return need
