"""Language side: a room declared as items (DESIGN 0.3, "Items: reuse and
fan-in"). Its result is made of three kinds of rows:

- hits, the item cache's rows, copied in at `init` (nothing crosses the wire);
- each source's needed items, which arrive over that source's lane: an
  ordinary room (`RecvRoom`, its own credit, pre-posting, DEFER and padded
  ABORT) whose tokens are the source's needed rows back to back. A lane
  whose rows are one run of the room lands in place (its outputs are views
  of the room's); otherwise in its own tensors, from which `sync` copies
  what landed to each item's place;
- nothing else: a room with items carries no aux.

`progress`/`prefix` cover the contiguous prefix of landed items, so prefill
may start on the first images while a slow source finishes the last. Any
lane failing fails the room and aborts its other lanes, so every source
learns the cause. A source all of whose items are hits gets an ALLOC that
asks for nothing: its `needed()` answers `[]`.

Hits are claimed before the room exists (`claim`, by `RoomQueue.add` in the
order every TP rank shares, or by `Receiver.init` on a rank without TP
peers) and released when the room ends; landed items enter the cache when
the room's success is seen (`settle`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import DisaggError, Failure, FailureCause
from ..items import Item, offsets
from ..recycle import BufferSet
from ..results import make_outputs, no_result, prefix_views, to_result
from ..types import TERMINAL, EmbeddingResult, TransferStatus, advance
from ..wire import Alloc
from .item_lanes import lanes_of
from .room import RecvRoom, needs_resume

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .host import ReceiverHost


class LaneHandle(Protocol):
    """The caller's calls on one lane (a `Receiver` of its `RecvRoom` is one)."""

    def init(self, num_tokens: int | None = None, *, seq_len: int | None = None) -> bool: ...

    def resume(self, num_tokens: int | None = None) -> bool: ...

    def gather(self, group: ProcessGroup | None) -> None: ...


class ItemRoom:
    """One room declared as items on this rank (see the module docstring). The
    `Receiver` that made it hands every call to it; the engine lock guards it.
    `handle(lane)` makes the caller's handle of a lane (the receiver's class)."""

    def __init__(self, host: ReceiverHost, handle: Callable[[RecvRoom], LaneHandle], room: int,
                 items: list[Item], hits: list[bool], *, settle_on_end: bool) -> None:
        self._e = host
        self._handle = handle
        self.room = room
        self.items, self.hits = items, hits
        # the hits were claimed by the room itself (no TP peers): it settles when
        # it ends; else the queue settles it where every TP rank agrees
        self._settle_on_end = settle_on_end
        self.seq_len = sum(it.num_tokens for it in items)
        self.lanes = lanes_of(items, hits)
        for lane in self.lanes.values():  # a lane per source that sends anything
            if lane.tokens:
                lane.state = host.new_lane(room, lane.src)
                lane.state.items, lane.state.group = lane.table, self
        self.status = TransferStatus.BOOTSTRAPPING
        self.failure: Failure | None = None
        self.outputs: dict[str, torch.Tensor] | None = None
        self.buffers: BufferSet | None = None
        self.result: EmbeddingResult | None = None
        self.handed_back = False
        self.gathered = False
        self.settled = False  # hits released, landed items offered to the cache

    # -------------------------------------------------------- the caller's calls

    def init(self) -> bool:
        """Make the result, copy the hits in, and ask every source (lock held by
        no one). False: a lane found no blocks yet (or the room failed): call
        again; lanes asked already are not asked twice."""
        e = self._e
        with e.cond:
            if self.failure is not None:
                return False
            if self.outputs is None:
                self._make_outputs()
            for lane in self.lanes.values():
                if lane.state is None and not lane.told:  # it sends nothing: only told so
                    lane.told = True
                    self._e.tell(lane.src, Alloc(
                        self.room, e.rank, e.instance_size, (), 0, seq_len=0,
                        scatter=e.scatter, items=lane.table))
        ok = True
        for lane in self.lanes.values():
            if lane.state is not None:
                ok = self._handle(lane.state).init(seq_len=lane.tokens) and ok
        with e.cond:
            self.advance()
            return ok and self.failure is None

    def _make_outputs(self) -> None:
        """The room's result tensors, the hits copied in, and each lane's
        landing place (lock held)."""
        e = self._e
        bufs, _ = e.recycler.take(self.seq_len, self)
        self.buffers, self.outputs = bufs, bufs.views(self.seq_len)
        if any(self.hits):
            cache = self._e.item_cache
            assert cache is not None
            with self._e.item_lock:
                for it, hit, start in zip(self.items, self.hits, offsets(self.items),
                                          strict=True):
                    if hit:
                        assert it.key is not None
                        for name, rows in cache.rows(it.key).items():
                            self.outputs[name][start:start + it.num_tokens].copy_(rows)
        for lane in self.lanes.values():
            r = lane.state
            if r is None:
                continue
            if len(lane.runs) == 1 and not e.scatter:
                _, at, n = lane.runs[0]
                r.outputs = {k: t[at:at + n] for k, t in self.outputs.items()}
                lane.in_place = True
            else:  # its rows go to several places: land apart, copied over by sync()
                r.outputs = make_outputs(e.geometry, e.output_rows(lane.tokens), e.device)

    def poll(self) -> TransferStatus:
        live = [lane.state for lane in self.lanes.values()
                if lane.state is not None and lane.state.status not in TERMINAL]
        if live:
            self._e.poll(live[0])  # one pause lets the library's threads run, as poll() does
        with self._e.cond:
            self.advance()
            return self.status

    def wait(self, timeout_s: float) -> TransferStatus:
        e = self._e
        with e.cond:
            e.cond.wait_for(lambda: self.advance() in TERMINAL or self.needs_resume(), timeout_s)
            return self.status

    def needs_resume(self) -> bool:
        return self.failure is None and any(
            lane.state is not None and needs_resume(lane.state) for lane in self.lanes.values())

    def resume(self, num_tokens: int | None) -> bool:
        ok = True
        for lane in self.lanes.values():
            if lane.state is not None:
                ok = self._handle(lane.state).resume(num_tokens) and ok
        return ok

    def progress(self) -> tuple[int, int]:
        """(tokens of the contiguous prefix landed, the room's length)."""
        with self._e.cond:
            self.sync()
            return self.landed(), self.seq_len

    def landed(self) -> int:
        """The contiguous prefix of the room that landed (lock held): hits, then
        each item as far as its lane's rows came. With fanout="scatter", 0 until
        the queue gathered it (a slice is no prefix)."""
        if self._e.scatter and not self.gathered:
            return 0
        if self.status is TransferStatus.SUCCESS:
            return self.seq_len
        n = 0
        wire = {src: 0 for src in self.lanes}
        for it, hit in zip(self.items, self.hits, strict=True):
            src = it.src_rank
            assert src is not None
            if hit:
                n += it.num_tokens
                continue
            state = self.lanes[src].state
            assert state is not None
            k = max(0, min(it.num_tokens, state.received - wire[src]))
            wire[src] += it.num_tokens
            n += k
            if k < it.num_tokens:
                break
        return n

    def sync(self) -> None:
        """Copy what landed on lanes that land apart to its places (lock held):
        rows a lane received never change, so this copies each row once."""
        if self.outputs is None or (self._e.scatter and not self.gathered):
            return
        for lane in self.lanes.values():
            r = lane.state
            # gathered (scatter): every TP rank's slice of the lane is here
            hi = lane.tokens if self.gathered else (r.received if r is not None else 0)
            if r is None or lane.in_place or r.outputs is None or lane.copied >= hi:
                continue
            lo = lane.copied
            for w, at, n in lane.runs:
                a, b = max(lo, w), min(hi, w + n)
                if a < b:
                    for name, out in self.outputs.items():
                        out[at + a - w:at + b - w].copy_(r.outputs[name][a:b])
            lane.copied = hi

    def prefix(self, num_tokens: int | None) -> EmbeddingResult:
        e = self._e
        with e.cond:
            if self.failure is not None:
                raise DisaggError(f"room {self.room} has no prefix: it failed ({self.failure})",
                                  rank=e.rank, room=self.room)
            if self.status is not TransferStatus.SUCCESS:
                self.sync()
                landed = self.landed()
                n = landed if num_tokens is None else min(num_tokens, landed)
                return prefix_views(e.geometry, self.outputs, n, (), e.device)
        return self.get_result(num_tokens)

    def agreed_prefix(self, num_tokens: int) -> EmbeddingResult:
        e = self._e
        with e.cond:
            if self.handed_back:
                raise DisaggError(f"room {self.room}: its result was handed back (recycle())",
                                  rank=e.rank, room=self.room)
            self.sync()
            return prefix_views(e.geometry, self.outputs, num_tokens, (), e.device)

    def get_result(self, num_tokens: int | None = None) -> EmbeddingResult:
        e = self._e
        with e.cond:
            self.advance()
            why = no_result(self.room, self.status, self.failure, self.handed_back,
                            e.scatter and not self.gathered)
            if why is not None:
                raise DisaggError(why, rank=e.rank, room=self.room)
            if self.result is None:
                assert self.outputs is not None and self.buffers is not None
                self.result = to_result(e.geometry, self.outputs, (), self.seq_len)
                e.recycler.issue(self.result, self.buffers)
            if num_tokens is not None:
                return prefix_views(e.geometry, self.outputs, min(num_tokens, self.seq_len), (),
                                    e.device)
            return self.result

    def gather(self, group: ProcessGroup | None) -> None:
        """fanout="scatter": every lane's slices, all-gathered in the same order on
        every TP rank, then copied to their places."""
        for lane in self.lanes.values():
            if lane.state is not None:
                self._handle(lane.state).gather(group)
        with self._e.cond:
            self.gathered = True
            self.sync()

    def abort(self, reason: str, cause: FailureCause = FailureCause.ABORT) -> None:
        with self._e.cond:
            self._fail(f"aborted on language rank {self._e.rank}: {reason}", cause, reason)

    # -------------------------------------------------------- the lanes' ends

    def lane_ended(self, lane: RecvRoom) -> None:
        """A lane's status became final (engine lock held): a failed one fails
        the room, which ends the other lanes with the cause."""
        if lane.status is TransferStatus.FAILED and self.failure is None:
            assert lane.failure is not None
            self._fail(f"embedding rank {lane.src_rank}'s items failed: {lane.failure}",
                       lane.failure.cause, f"embedding rank {lane.src_rank}'s items failed")
        self.advance()

    def _fail(self, reason: str, cause: FailureCause, told: str) -> None:
        """The room fails; its other lanes end, their sources told `told`."""
        if self.failure is not None or self.status in TERMINAL:
            return
        e = self._e
        self.failure = Failure(reason, cause, e.rank)
        for other in self.lanes.values():
            if other.state is not None and other.state.status not in TERMINAL:
                e.execute(other.state, e.machine.abort(other.state, told, cause))
        self.advance()

    def advance(self) -> TransferStatus:
        """The room's status from its lanes' (lock held)."""
        if self.status in TERMINAL:
            return self.status
        states = [lane.state for lane in self.lanes.values() if lane.state is not None]
        if self.failure is not None:
            new = TransferStatus.FAILED
        elif self.outputs is None:
            new = TransferStatus.BOOTSTRAPPING
        elif all(r.status is TransferStatus.SUCCESS for r in states) and all(
                lane.told or lane.state is not None for lane in self.lanes.values()):
            self.sync()
            new = TransferStatus.SUCCESS
        elif any(r.received or r.status is TransferStatus.TRANSFERRING
                 for r in states) or any(self.hits):  # rows landed, or hits copied in
            new = TransferStatus.TRANSFERRING
        else:
            new = max(TransferStatus.WAITING_FOR_INPUT if any(
                r.alloc_sent for r in states) or not states else TransferStatus.BOOTSTRAPPING,
                self.status)
        if new is not self.status:
            self.status = advance(self.room, self.status, new, self.failure)
            if new in TERMINAL:
                if self._settle_on_end:
                    self.settle(keep=True)
                self._e.cond.notify_all()
        return self.status

    def settle(self, *, keep: bool) -> None:
        """The room ended and its end was seen: release its hits, and with `keep`
        (it succeeded, and this is the place every TP rank agrees on) offer its
        landed items to the cache. Once."""
        cache = self._e.item_cache
        if self.settled or cache is None:
            self.settled = True
            return
        self.settled = True
        with self._e.item_lock:
            if keep and self.status is TransferStatus.SUCCESS and self.outputs is not None:
                for it, hit, start in zip(self.items, self.hits, offsets(self.items),
                                          strict=True):
                    if it.key is not None and not hit:
                        cache.put(it.key, {k: t[start:start + it.num_tokens]
                                           for k, t in self.outputs.items()})
            cache.release(self.items, self.hits)
