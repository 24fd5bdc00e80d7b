"""Result buffers the caller hands back, so that later rooms land in memory
whose pages are already touched.

Each room's result is allocated when its first chunk's meta frame arrives
(`results.make_outputs`). Where glibc has returned that memory to the kernel,
every 4 KiB page of the new result faults on first touch, during the receive:
on the 2-core VM we test on that is 1.5-2.1 us a page, 0.6-0.7 ms for a
1.75 MiB room, about half its raw transfer time (`pages.py` says more). A
caller that hands a result back once it no longer needs it
(`ctx.language.recycle(result)`) lets the next rooms of a similar size land
in that result's memory instead.

The rules, in the order `Recycler` applies them:

- A buffer set (one tensor per wire buffer, `rows` rows each) belongs to one
  room from `take` until the caller hands its result back; only then is it
  idle, here, and only an idle set is ever given to a room. A hand-back is
  accepted only for the `EmbeddingResult` object that `result()` (or
  `RoomQueue.step()`) returned: a prefix view, a copy, another rank's result
  or one already handed back is a `ValueError`.
- An idle set is reused only once nothing outside this module still views its
  memory (storage use counts back to what they were when it was made: a caller
  that kept `result.embeddings` somewhere keeps it out of reuse until it lets
  go) and, on CUDA, once the work the caller had queued on its current stream
  at hand-back has finished.
- Best fit, bucketed: a room takes the smallest idle set of at least its rows,
  but never one more than `MAX_SLACK` times its (rounded) size, so small rooms
  do not pin large sets. Once anything was handed back, new sets are rounded
  up to one of `STEPS` sizes per octave (at most 25 % more rows) so that rooms
  of nearby lengths fit each other's sets.
- Bounded: idle sets hold at most `max_bytes` (default `MAX_IDLE_BYTES`); the
  set handed back longest ago is dropped first, and a set larger than the
  bound is not kept at all.

On CUDA the caching allocator already reuses device memory without faults, so
recycling saves little there; it is a CPU win.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .geometry import Geometry
from .results import make_outputs
from .types import EmbeddingResult

MAX_IDLE_BYTES = 256 << 20  # default bound on idle sets per Language rank
STEPS = 4  # set sizes per octave once recycling is in use: rounding adds <= 25 %
MAX_SLACK = 2  # a room takes an idle set of at most this many times its rounded rows
MIN_ROWS = 16

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    """References to `t`'s storage (tensors and storage objects); -1 if torch
    cannot say, which then never blocks reuse."""
    if _use_count is None:
        return -1
    return int(_use_count(t.untyped_storage()._cdata))


def bucket(rows: int) -> int:
    """`rows` rounded up to one of STEPS sizes per octave (and at least MIN_ROWS)."""
    if rows <= MIN_ROWS:
        return MIN_ROWS
    step = max(1, (1 << (rows.bit_length() - 1)) // STEPS)
    return -(-rows // step) * step


def storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


@dataclass(eq=False)
class BufferSet:
    """One tensor per wire buffer, `rows` rows each: where rooms land."""

    tensors: dict[str, torch.Tensor]
    rows: int
    nbytes: int
    serial: int
    # storage use counts when only this set held them: reusable when back to these
    baseline: tuple[int, ...] = ()
    ready: torch.cuda.Event | None = None  # CUDA: the caller's queued work, at hand-back
    # the room it was last given to (weak: a room must not outlive its caller's interest)
    owner: weakref.ref[object] | None = None
    reused: int = 0  # rooms that landed in it after the first

    def views(self, rows: int) -> dict[str, torch.Tensor]:
        """The first `rows` rows of every buffer (contiguous views)."""
        return {n: t if t.shape[0] == rows else t[:rows] for n, t in self.tensors.items()}

    def free_of_views(self) -> bool:
        return all(b < 0 or _uses(t) == b
                   for t, b in zip(self.tensors.values(), self.baseline, strict=True))

    def idle_done(self) -> bool:
        return self.ready is None or bool(self.ready.query())


@dataclass
class _Issued:
    """A result handed to the caller, and the set its tensors view."""

    bufs: BufferSet
    ref: weakref.ref[EmbeddingResult]


class Recycler:
    """The idle buffer sets of one Language rank, and the results made from
    sets that may be handed back. Its lock is a leaf: taken under the engine
    lock (never the other way round), nothing is called out while held."""

    def __init__(self, geometry: Geometry, device: torch.device,
                 max_bytes: int = MAX_IDLE_BYTES) -> None:
        self.geometry = geometry
        self.device = device
        self.max_bytes = max_bytes
        self.active = False  # something was handed back: new sets are rounded up
        self._lock = threading.RLock()  # RLock: a weakref callback may run under it
        self._serial = itertools.count()
        self._idle: list[tuple[int, int, BufferSet]] = []  # sorted by (rows, serial)
        self._order: collections.OrderedDict[int, BufferSet] = collections.OrderedDict()
        self.idle_bytes = 0
        self._issued: dict[int, _Issued] = {}  # id(result) -> its set, while alive
        # sets given to rooms, by storage address, to name a prefix view as one
        self._live: weakref.WeakValueDictionary[int, BufferSet] = weakref.WeakValueDictionary()
        self._handed_back: weakref.WeakValueDictionary[int, EmbeddingResult] = (
            weakref.WeakValueDictionary())

    # ------------------------------------------------------------ rooms (receiver thread)

    def take(self, rows: int, owner: object) -> tuple[BufferSet, bool]:
        """A set of at least `rows` rows for `owner` (a room): an idle one when
        one fits (True), else a new one (False)."""
        with self._lock:
            bufs = self._take_idle(rows)
            fresh = bufs is None
            if bufs is None:
                bufs = self._make(bucket(rows) if self.active else rows)
            bufs.owner = weakref.ref(owner)
            self._live[storage_key(bufs.tensors["embeddings"])] = bufs
            return bufs, not fresh

    def _take_idle(self, rows: int) -> BufferSet | None:
        limit = MAX_SLACK * bucket(rows)
        i = bisect.bisect_left(self._idle, (rows, -1))
        while i < len(self._idle) and self._idle[i][0] <= limit:
            bufs = self._idle[i][2]
            if bufs.idle_done() and bufs.free_of_views():
                del self._idle[i]
                del self._order[bufs.serial]
                self.idle_bytes -= bufs.nbytes
                bufs.ready = None
                bufs.reused += 1
                return bufs
            i += 1
        return None

    def _make(self, rows: int) -> BufferSet:
        tensors = make_outputs(self.geometry, rows, self.device)
        return BufferSet(tensors, rows, sum(t.nbytes for t in tensors.values()),
                         next(self._serial), tuple(_uses(t) for t in tensors.values()))

    def issue(self, result: EmbeddingResult, bufs: BufferSet) -> None:
        """`result` (made by `result()`) views `bufs`: it may be handed back."""
        key = id(result)

        def forget(_: object, key: int = key) -> None:  # the caller dropped it
            with self._lock:
                rec = self._issued.get(key)
                if rec is not None and rec.ref() is None:
                    del self._issued[key]

        with self._lock:
            self._issued[key] = _Issued(bufs, weakref.ref(result, forget))

    # ------------------------------------------------------------ the caller's thread

    def claim(self, result: object) -> BufferSet:
        """The set behind a result being handed back, no longer the caller's
        (`ValueError`, with the reason, for anything but a result this rank
        made and has not had back yet)."""
        if not isinstance(result, EmbeddingResult):
            raise ValueError(f"recycle() takes the EmbeddingResult that result() or "
                             f"RoomQueue.step() returned, not {type(result).__name__}")
        with self._lock:
            if self._handed_back.get(id(result)) is result:
                raise ValueError("recycle(): this result was already handed back; its "
                                 "memory may hold another room's data by now")
            rec = self._issued.get(id(result))
            if rec is None or rec.ref() is not result:
                key = storage_key(result.embeddings) if result.embeddings.numel() else 0
                if key and key in self._live:
                    raise ValueError(
                        "recycle(): this shares memory with a room's result on this rank but "
                        "is not the EmbeddingResult that result() or RoomQueue.step() "
                        "returned (a prefix view, or a copy of one?); hand back the result "
                        "itself, once the room is done")
                raise ValueError("recycle(): not a result received on this language rank "
                                 "(another rank's, or tensors made elsewhere)")
            del self._issued[id(result)]
            self._handed_back[id(result)] = result
            self._live.pop(storage_key(rec.bufs.tensors["embeddings"]), None)
            return rec.bufs

    def put(self, bufs: BufferSet) -> bool:
        """Keep a claimed set for later rooms, within `max_bytes` (dropping the
        longest idle first). False: larger than the bound, not kept."""
        if self.device.type == "cuda":
            bufs.ready = torch.cuda.Event()
            bufs.ready.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self.active = True
            bufs.owner = None
            if bufs.nbytes > self.max_bytes:
                return False
            while self.idle_bytes + bufs.nbytes > self.max_bytes:
                self._drop_oldest()
            bisect.insort(self._idle, (bufs.rows, bufs.serial, bufs))
            self._order[bufs.serial] = bufs
            self.idle_bytes += bufs.nbytes
            return True

    def _drop_oldest(self) -> None:
        _, old = self._order.popitem(last=False)
        i = bisect.bisect_left(self._idle, (old.rows, old.serial))
        assert self._idle[i][2] is old
        del self._idle[i]
        self.idle_bytes -= old.nbytes

    def set_max_bytes(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            while self.idle_bytes > max_bytes:
                self._drop_oldest()

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._order.clear()
            self.idle_bytes = 0

    @property
    def idle_sets(self) -> int:
        return len(self._idle)


__all__ = ["MAX_IDLE_BYTES", "BufferSet", "Recycler", "bucket"]
