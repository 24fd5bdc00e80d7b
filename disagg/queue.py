"""Serving-loop helper for Language ranks: init / resume / retry, and agreement
across the tensor-parallel instance.

Lockstep contract: every TP rank of an instance calls `add` with the same rooms
in the same order and calls `step` the same number of times. Each `step` does
one fixed-size all-reduce (MIN) over the instance's Gloo group holding a header
(number of rooms and a checksum of the room list, each with its negation so MIN
yields both the least and the greatest value) and, per room, its status, the
lowest rank it failed on and the tokens landed (so `ready_tokens` is what
every rank holds). FAILED wins, a room is done only when every
rank holds all of it, and so every rank returns the same `done` and `failed`
lists in the same order; each rank's reason is its own, and a rank that did not
fail names the TP rank that did. A rank that broke
the contract gets `LockstepError` on every rank instead of a hang or a silently
different answer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from .errors import DisaggError, Failure, FailureCause, LockstepError
from .items import Item
from .language import LanguageEngine, Receiver
from .language.item_lanes import resolve
from .language.receiver import check_tokens
from .types import EmbeddingResult, TransferStatus

MAX_WINDOW = 1024  # rooms agreed on per step; later ones keep moving and wait their turn
_HEADER = 8  # rooms, room-list checksum (2 words), item-cache digest; each negated too
NOBODY = 1 << 62  # "failed on no rank": above every rank, so MIN finds the lowest that did
_CAUSES = list(FailureCause)
_FINAL = (int(TransferStatus.SUCCESS), int(TransferStatus.FAILED))


# Causes that only echo another's (the Embedding rank ended the room because
# something else did): MIN prefers the cause they echo, wherever it happened.
_ECHOES = (FailureCause.ABORTED_BY_PEER, FailureCause.REJECTED)


def pack_failed_on(rank: int, failure: Failure | None) -> int:
    """The rank a room failed on and why, as one word: MIN over the instance
    gives the root cause (one that is not an echo of another rank's, e.g. the
    CANCELLED of the rank that cancelled rather than the ABORT frame another
    rank got for it), then the lowest rank with it."""
    cause = failure.cause if isinstance(failure, Failure) else FailureCause.ABORT
    return ((cause in _ECHOES) << 40) | rank << 6 | _CAUSES.index(cause)


def unpack_failed_on(word: int) -> tuple[int, FailureCause]:
    return (word >> 6) & ((1 << 34) - 1), _CAUSES[word & 63]


@dataclass
class _Entry:
    receiver: Receiver
    started: bool = False  # init() has succeeded
    seq_len: int | None = None  # declared by the caller
    ready: int = 0  # tokens every TP rank holds, as agreed at the last step()


class RoomQueue:
    def __init__(self, engine: LanguageEngine,
                 group: dist.ProcessGroup | Callable[[], dist.ProcessGroup | None] | None,
                 window: int = MAX_WINDOW, *,
                 gather_group: Callable[[], dist.ProcessGroup | None] | None = None) -> None:
        self._engine = engine
        # a callable: the context's, which lets go of the group at shutdown
        self._group_of = group if callable(group) else (lambda: group)
        # fanout="scatter": the instance's group on the device, for the all-gather
        # (the Gloo group above on CPU)
        self._gather_group_of = gather_group or self._group_of
        self._window = window
        self._entries: list[_Entry] = []  # in the order added: the lockstep order
        self._by_room: dict[int, _Entry] = {}
        # header, then per room of the window: its status, the lowest rank it FAILED
        # on, and the tokens landed (MIN: what every rank holds)
        self._buf = torch.empty(_HEADER + 3 * window, dtype=torch.int64)
        self._view = self._buf.numpy()
        self._version = 0  # bumped whenever rooms are added or leave (the window's checksum)
        self._checksum_key = -1
        self._checksum = (0, 0)
        self._lost: str | None = None  # the agreement is gone for good: why

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, room: int, src_rank: int | None = None, seq_len: int | None = None,
            items: list[Item] | None = None) -> None:
        if self._lost is not None:
            raise LockstepError(self._lost)
        self._add(room, src_rank, seq_len, items)

    def _add(self, room: int, src_rank: int | None, seq_len: int | None,
             items: list[Item] | None) -> None:
        """Queue a room from Embedding rank `src_rank` (same rooms, same order,
        on every TP rank of the instance); `seq_len` as for `Receiver.init`.

        `items` (DESIGN 0.3): the room's `disagg.Item`s in prompt order; each
        names its source (default `src_rank`, which may then be omitted). Hits
        in the item cache are decided here, in the order every TP rank shares,
        so they are the same on every rank (`hits(room)`)."""
        check_tokens("add", seq_len, name="seq_len")
        if items is not None:  # checked before anything changes
            resolved = resolve(items, src_rank)
            for src in {it.src_rank for it in resolved}:
                assert src is not None
                self._engine.check_source(src)
            total = sum(it.num_tokens for it in resolved)
            if seq_len is not None and seq_len != total:
                raise ValueError(f"add(room={room}, seq_len={seq_len}): its items sum to "
                                 f"{total} tokens")
            src_rank = resolved[0].src_rank if src_rank is None else src_rank
        if src_rank is None:
            raise ValueError(f"add(room={room}): src_rank is needed for a room without items")
        receiver = self._engine.receiver(room, src_rank)
        if items is not None:
            receiver.declare(items, queued=True)
        e = _Entry(receiver, seq_len=None if items is not None else seq_len)
        self._entries.append(e)
        self._by_room[room] = e
        self._version += 1

    def hits(self, room: int) -> list[int]:
        """Indices of `room`'s items served from the item cache (copied locally,
        never sent): the same on every TP rank. `ValueError` for a room not
        in the queue."""
        return self._entry(room).receiver.hits

    def ready_tokens(self, room: int) -> int:
        """Tokens of `room` every TP rank of the instance holds, as agreed at the
        last `step()`: identical on every rank, never decreasing, never ahead of
        any rank. `ValueError` for a room not in the queue (returned, or never added)."""
        return self._entry(room).ready

    def prefix(self, room: int) -> EmbeddingResult:
        """Views (no copy) of this rank's first `ready_tokens(room)` tokens of the
        room: what chunked prefill may start on. Agreed like `ready_tokens`: the
        same on every TP rank until the next `step()`, even if the room failed
        on some rank since (that `step()` returns it in `failed` everywhere)."""
        e = self._entry(room)
        return e.receiver.agreed_prefix(e.ready)

    def _entry(self, room: int) -> _Entry:
        e = self._by_room.get(room)
        if e is not None:
            return e
        raise ValueError(f"room {room} is not in this queue (returned by step(), or never "
                         f"added)")

    def cancel(self, room: int, reason: str = "cancelled") -> None:
        """End a queued room (its client is gone): it comes back in `failed` at the
        next `step()` on every TP rank, cause CANCELLED. Calling it on one TP
        rank is enough; on several, the same. Its Embedding rank is told (its
        sender ends FAILED, cause CANCELLED, its budget back); its blocks come
        back as for any abort (when the frame owed for them arrived), and its id
        may be reused once it was returned. `ValueError` for a room not in the
        queue."""
        if not isinstance(reason, str):
            raise ValueError(f"cancel(reason={reason!r}): a str")
        self._entry(room).receiver.abort(reason, cause=FailureCause.CANCELLED)

    def step(self) -> tuple[list[tuple[int, EmbeddingResult]], list[tuple[int, Failure]]]:
        """Advance every queued room once; return the rooms finished on every TP
        rank: `done` (room, result) and `failed` (room, `disagg.Failure`)."""
        if self._engine.closed:
            raise DisaggError("context is shut down: step() has nothing to agree on",
                              rank=self._engine.rank)
        if self._lost is not None:
            raise LockstepError(self._lost)
        # FIFO: earlier rooms get blocks first, and no room starts while an earlier
        # one waits for blocks (a long room is never starved by short ones behind it).
        admit = True
        for e in self._entries:
            if not e.started:
                if admit:
                    e.started = (e.receiver.init() if e.seq_len is None
                                 else e.receiver.init(seq_len=e.seq_len))
                admit = admit and e.started
            elif e.receiver.needs_resume and not e.receiver.resume():
                admit = False
        window = self._entries[:self._window]
        statuses = [int(e.receiver.status_now()) for e in window]
        group = self._group_of()
        solo = group is None or dist.get_world_size(group) == 1
        if solo and any(s not in _FINAL for s in statuses):
            # no all-reduce to wait in: one pause, as poll() would, so a loop
            # that spins on step() lets the library's threads run
            self._engine.progress.pause()
            statuses = [int(e.receiver.status_now()) for e in window]
        # read after the statuses; a scatter slice is no prefix until gathered
        landed = [0 if self._engine.scatter else e.receiver.progress[0] for e in window]
        try:
            agreed, failed_on, ready = self._agree(window, statuses, landed)
        except LockstepError as err:
            self._lose(err)
        for e, n in zip(window, ready, strict=True):
            e.ready = max(e.ready, n)
        done: list[tuple[int, EmbeddingResult]] = []
        failed: list[tuple[int, Failure]] = []
        finished: set[int] = set()
        for i, e in enumerate(window):
            s = agreed[i]
            if s == TransferStatus.SUCCESS:
                if self._engine.scatter:
                    try:
                        self._gather(e.receiver)
                    except LockstepError as err:
                        self._lose(err)
                done.append((e.receiver.room, e.receiver.result()))
                e.receiver.settle(keep=True)  # its items enter the cache here, on every rank
            elif s == TransferStatus.FAILED:
                # every rank reports the root cause and where it happened; the text
                # is the rank's own (a rank that did not fail names the rank that did)
                rank, cause = unpack_failed_on(failed_on[i])
                own = e.receiver.failure
                if own is None:
                    own = Failure(f"room {e.receiver.room} failed on language rank {rank} of "
                                  f"the TP instance ({cause.value})", cause, rank)
                    e.receiver.abort(own, cause=cause)
                reason = Failure(str(own), cause, rank)
                failed.append((e.receiver.room, reason))
                e.receiver.settle(keep=False)
            else:
                continue
            finished.add(i)
        if finished:
            for i in finished:
                del self._by_room[window[i].receiver.room]
            self._entries = [e for i, e in enumerate(self._entries) if i not in finished]
            self._version += 1
        return done, failed

    def _lose(self, err: LockstepError) -> NoReturn:
        """The instance's agreement is gone for good (a TP rank died, stalled past
        step_timeout, or broke the contract): every queued room fails here now
        (cause PEER_LOST; their Embedding ranks are told), the queue refuses
        further use, and `ctx.readiness()` says why. Recover by restarting the
        instance (in jobs mode, its job only)."""
        why = str(err)
        self._lost = why
        self._engine.instance_lost = why
        for e in self._entries:
            e.receiver.abort(f"the TP instance's agreement is lost: {why}",
                             cause=FailureCause.PEER_LOST)
            e.receiver.settle(keep=False)
        self._entries, self._by_room = [], {}
        self._version += 1
        raise err

    def _gather(self, receiver: Receiver) -> None:
        """fanout="scatter": every rank holds its slice (agreed this step); make
        the whole room on every rank, in the queue's order on every rank."""
        eng = self._engine
        group = self._gather_group_of() if eng.instance_size > 1 else None
        if group is None and eng.instance_size > 1:
            raise DisaggError("context is shut down: no group to gather on", rank=eng.rank)
        try:
            receiver.gather(group)
        except RuntimeError as err:  # the group's timeout is step_timeout
            raise LockstepError(
                f"language rank {eng.rank}: all-gather of room {receiver.room} failed (a TP "
                f"rank died, or stepped differently): {err}") from err

    def _window_checksum(self, window: list[_Entry]) -> tuple[int, int]:
        """A checksum of the window's rooms and sources, in order (two int32):
        computed again only when the window changed."""
        key = self._version
        if key != self._checksum_key:
            raw = struct.pack(f"<{2 * len(window)}q",
                              *[v for e in window for v in (e.receiver.room, e.receiver.src_rank)])
            h = hashlib.blake2b(raw, digest_size=8).digest()
            self._checksum_key, self._checksum = key, struct.unpack("<ii", h)
        return self._checksum

    def _cache_digest(self) -> int:
        """The item cache's state as a number (0: no cache): equal on TP ranks
        whose caches made the same decisions."""
        eng = self._engine
        if eng.item_cache is None:
            return 0
        with eng.item_lock:
            return eng.item_cache.digest()

    def _agree(self, window: list[_Entry], statuses: list[int],
               landed: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Per room of the window: the least advanced status on any TP rank, the
        lowest rank on which it FAILED (`NOBODY` if none), and the fewest tokens
        any rank holds; in one all-reduce."""
        me = self._engine.rank
        failed_on = [NOBODY if st != TransferStatus.FAILED else pack_failed_on(
            me, e.receiver.failure) for st, e in zip(statuses, window, strict=True)]
        group = self._group_of()
        if group is None or dist.get_world_size(group) == 1:
            return statuses, failed_on, landed
        n, w = len(window), self._window
        lo, hi = self._window_checksum(window)
        d = self._cache_digest()
        buf = self._buf
        view = self._view  # the buffer's memory, written without making tensors
        view.fill(NOBODY)
        view[:_HEADER] = (n, -n, lo, -lo, hi, -hi, d, -d)
        if n:
            view[_HEADER:_HEADER + n] = statuses
            view[_HEADER + w:_HEADER + w + n] = failed_on
            view[_HEADER + 2 * w:_HEADER + 2 * w + n] = landed
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
        except RuntimeError as e:  # the group's timeout is step_timeout
            raise LockstepError(
                f"language rank {self._engine.rank}: the instance's step() agreement failed: "
                f"a TP rank died, stalled past step_timeout={self._engine.cfg.step_timeout:g}s, "
                f"or stepped fewer times ({e})") from e
        head = view[:_HEADER].tolist()
        if head[6] != -head[7]:
            raise LockstepError(
                f"language rank {self._engine.rank}: the TP ranks' item caches differ (their "
                f"hits would differ): every TP rank must add the same rooms with the same "
                f"items in the same order, and use items only through queue() when TP > 1")
        if any(head[i] != -head[i + 1] for i in (0, 2, 4)):
            raise LockstepError(
                f"language rank {self._engine.rank}: TP ranks disagree on the queue "
                f"(rooms between {head[0]} and {-head[1]} in the window, or different "
                f"rooms/order): every TP rank must add the same rooms in the same order and "
                f"step the same number of times")
        return (view[_HEADER:_HEADER + n].tolist(), view[_HEADER + w:_HEADER + w + n].tolist(),
                view[_HEADER + 2 * w:_HEADER + 2 * w + n].tolist())
