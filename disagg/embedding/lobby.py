"""What an Embedding rank knows of rooms it has no `sender()` for: ALLOCs that
came first (the Language side was quicker than the encoder), ABORTs that came
first, and tombstones of rooms that ended. Every table is bounded: a flood of
ALLOCs for rooms that never come is refused, not stored.

A room id may be reused once its room has ended on every rank, in either order
of ALLOC and `sender()`, by the same Language instance or another one (a
router retries a dead instance's rooms elsewhere under the same ids). A
tombstone therefore remembers the instance the room was received by and which
of its ranks know the room ended (its lanes got their last chunk, an ABORT
frame or a REJECT; a late ALLOC was refused): a message from such a rank, or
from another instance, is about a new room of the same id; from any other
rank it is a late one for the old room. An ABORT that came before the room's
`sender()` is kept with its instance the same way: it refuses that instance's
ALLOCs, whichever comes first, and no other instance's.

Pure bookkeeping: decisions come back as refusals `(lang_rank, room, reason)`
that the engine answers with ABORT frames.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from .machine import Grant
from .rules import alloc_conflict

MAX_EARLY_ALLOCS = 1 << 14
MAX_TOMBSTONES = 1 << 14


@dataclass(frozen=True)
class Refusal:
    lang_rank: int
    room: int
    reason: str
    grant: Grant | None = None  # the ALLOC refused (its answer is padded if pre-posted)


@dataclass
class Tombstone:
    outcome: str
    ended_on: set[int]  # Language ranks that know the room ended
    instance: int | None  # the instance that received it (None: no rank asked)


@dataclass(frozen=True)
class EarlyAbort:
    reason: str
    at: float
    lang: int  # the aborting rank
    instance: int | None  # its instance


@dataclass(frozen=True)
class Claimed:
    """What `sender(room)` takes over from the lobby."""

    early_abort: str | None  # the room was aborted before it existed here
    instance_size: int | None
    grants: dict[int, Grant]  # early ALLOCs the room takes over (none if aborted)
    refused: list[Refusal]  # early ALLOCs of an aborted room: each is answered


class Lobby:
    def __init__(self, bootstrap_timeout: float,
                 instance_of: Callable[[int], int | None]) -> None:
        self._timeout = bootstrap_timeout
        self._instance_of = instance_of
        self._early: dict[int, dict[int, Grant]] = {}  # room -> lang rank -> ALLOC
        self._early_instance: dict[int, int] = {}
        self._early_total = 0
        self._tombstones: collections.OrderedDict[int, Tombstone] = collections.OrderedDict()
        self._early_aborts: collections.OrderedDict[int, EarlyAbort] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        """Rooms with an ALLOC waiting here."""
        return len(self._early)

    def holds(self, room: int, lang: int | None = None) -> bool:
        grants = self._early.get(room)
        return grants is not None and (lang is None or lang in grants)

    def complete_from(self, lang: int) -> set[int]:
        """Rooms whose early ALLOC from `lang` asks for nothing: its part of them
        is complete, as a lane all sent is, whatever becomes of `lang`."""
        return {room for room, grants in self._early.items()
                if (g := grants.get(lang)) is not None and g.asks_nothing}

    def waiting_from(self, lang: int) -> bool:
        """Whether an ALLOC of Language rank `lang` waits for its room's `sender()`."""
        return any(lang in grants for grants in self._early.values())

    def ended(self, room: int) -> str | None:
        """How a room that ended here ended, while remembered."""
        t = self._tombstones.get(room)
        return None if t is None else t.outcome

    def late(self, room: int, lang: int) -> str | None:
        """How the ended room ended, if a message from `lang` naming it belongs
        to it (`lang` did not know it ended; it will learn from the answer), or
        None: no such room, or `lang` speaks of a new room of the same id."""
        t = self._tombstones.get(room)
        if t is None or lang in t.ended_on or (
                t.instance is not None and self._instance_of(lang) != t.instance):
            return None
        t.ended_on.add(lang)
        return t.outcome

    def claim(self, room: int, now: float) -> Claimed:
        """`sender(room)`: the room's early ALLOCs are the room's from now on, so
        every way it can end answers them."""
        self._tombstones.pop(room, None)
        abort = self._early_aborts.pop(room, None)
        grants = self._early.pop(room, {})
        self._early_total -= len(grants)
        instance = self._early_instance.pop(room, None)
        if abort is None or now - abort.at >= self._timeout or (
                grants and self._instance_of(next(iter(grants))) != abort.instance):
            # no abort, or one for an earlier room of this id received by another
            # instance: the room is the asking instance's
            return Claimed(None, instance, grants, [])
        # the room starts FAILED: it ended for the aborting rank and for every
        # rank whose ALLOC is answered now; a later ALLOC of its instance is late
        self.bury(room, abort.reason, {abort.lang, *grants})
        return Claimed(abort.reason, None, {}, [Refusal(lang, room, abort.reason, g)
                                                for lang, g in grants.items()])

    def aborted(self, room: int, lang: int, now: float) -> str | None:
        """Why an ALLOC from `lang` for a room without a sender is refused at once:
        a rank of its instance aborted the room first (so its blocks are not held
        until a timeout, nor dropped unanswered when `sender()` comes), or None."""
        abort = self._early_aborts.get(room)
        if (abort is None or now - abort.at >= self._timeout
                or abort.instance != self._instance_of(lang)):
            return None
        return abort.reason

    def add_alloc(self, lang: int, room: int, instance_size: int, grant: Grant,
                  other_instance: Callable[[int, int], str | None]) -> list[Refusal]:
        """An ALLOC before its room: kept (no refusal), or refused. It meets the
        room's other early ALLOCs by the same rule as after `sender()`
        (`rules.alloc_conflict`): where that fails the room, every early ALLOC
        of it is answered and a later `sender()` starts FAILED."""
        pending = self._early.get(room, {})
        conflict = alloc_conflict({rank: g.scatter for rank, g in pending.items()},
                                  self._early_instance.get(room), lang, grant.scatter,
                                  instance_size, other_instance)
        if conflict is not None:
            reason = f"bad ALLOC from language rank {lang}: {conflict[0]}"
            out = [Refusal(lang, room, reason, grant)]
            if conflict[1]:  # the room fails, as it would with its sender
                out += self.drop(lambda rm, _lang, _g: rm == room, reason)
                self._note_abort(room, EarlyAbort(reason, grant.arrived, lang,
                                                  self._instance_of(lang)))
            return out
        if self._early_total >= MAX_EARLY_ALLOCS:
            return [Refusal(lang, room, f"bad ALLOC from language rank {lang}: too many "
                                        f"ALLOCs waiting for data ({self._early_total})", grant)]
        self._early.setdefault(room, {})[lang] = grant
        self._early_instance[room] = instance_size
        self._early_total += 1
        return []

    def drop(self, match: Callable[[int, int, Grant], bool],
             reason: str = "") -> list[Refusal]:
        """Forget the early ALLOCs `match(room, lang, grant)` selects; with a reason,
        each is answered (refused)."""
        out: list[Refusal] = []
        for room in list(self._early):
            grants = self._early[room]
            for lang in [lang for lang, g in grants.items() if match(room, lang, g)]:
                grant = grants.pop(lang)
                self._early_total -= 1
                if reason:
                    out.append(Refusal(lang, room, reason, grant))
            if not grants:
                del self._early[room]
                self._early_instance.pop(room, None)
        return out

    def expired(self, now: float) -> list[Refusal]:
        limit = self._timeout
        return self.drop(lambda room, lang, g: now - g.arrived > limit,
                         f"no data for this room within bootstrap_timeout={limit:g}s")

    def abort(self, room: int, lang: int, reason: str, now: float,
              other_instance: Callable[[int, int], str | None]) -> list[Refusal]:
        """An ABORT for a room without a sender. If the room has early ALLOCs from
        the aborting rank's instance, every rank that asked gets its answer with
        the reason (not only the aborting one: its TP peers would otherwise hold
        their blocks until bootstrap_timeout); a later `sender()` starts FAILED,
        unless the ABORT was a late one for a room that already ended here."""
        out: list[Refusal] = []
        grants = self._early.get(room)
        if grants and other_instance(lang, next(iter(grants))) is None:
            out = self.drop(lambda rm, _lang, _g: rm == room,
                            f"aborted by language rank {lang}: {reason}")
        elif self.late(room, lang) is not None:
            return out
        self._note_abort(room, EarlyAbort(
            f"aborted by language rank {lang} before this rank had the room's data: {reason}",
            now, lang, self._instance_of(lang)))
        return out

    def _note_abort(self, room: int, abort: EarlyAbort) -> None:
        self._early_aborts[room] = abort
        while len(self._early_aborts) > MAX_TOMBSTONES:  # bounded, like the tombstones
            self._early_aborts.popitem(last=False)

    def bury(self, room: int, outcome: str, ended_on: set[int]) -> None:
        instance = self._instance_of(next(iter(ended_on))) if ended_on else None
        self._tombstones[room] = Tombstone(outcome, ended_on, instance)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    @property
    def num_early_aborts(self) -> int:
        return len(self._early_aborts)
