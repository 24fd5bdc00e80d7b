"""Language side: the public `Receiver` handle. Every TP rank of an instance
makes the same calls on it (see `disagg.language.machine` for its states)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from torch.distributed import ProcessGroup

from ..errors import DisaggError, Failure, FailureCause
from ..gather import gather_slices
from ..results import no_result, prefix_views, to_result
from ..types import TERMINAL, EmbeddingResult, TransferStatus
from .item_lanes import claim, hit_indices, resolve
from .items_room import ItemRoom
from .room import needs_resume

if TYPE_CHECKING:
    from .host import ReceiverHost
    from .room import RecvRoom


def check_tokens(call: str, num_tokens: object, name: str = "num_tokens") -> None:
    if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(
            num_tokens, int) or num_tokens < 1):
        raise ValueError(f"{call}({name}={num_tokens!r}): must be an int >= 1 or None")


class Receiver:
    """One room on a Language rank: `init`, then `poll` (and `resume` when
    `needs_resume`) until SUCCESS or FAILED, then `result`. The caller's side of
    the shell: each call takes the engine lock, asks the room's machine, and
    has the engine execute what it returns."""

    def __init__(self, engine: ReceiverHost, state: RecvRoom) -> None:
        self._engine = engine
        self._r = state
        self.room = state.room
        self.src_rank = state.src_rank
        self._items: ItemRoom | None = None  # a room declared as items: it does the work

    def declare(self, items: object, *, queued: bool = False) -> None:
        """Make this a room declared as items (`init(items=)`, or `RoomQueue.add`).
        Its hits must be the same on every TP rank: the queue's order makes the
        caches' decisions so, and the queue releases them where every rank
        agrees (`queued`). Bare receivers claim hits only on a rank without TP
        peers. `ValueError` for bad items; the room is untouched then."""
        e, r = self._engine, self._r
        resolved = resolve(items, r.src_rank)
        for it in resolved:
            assert it.src_rank is not None
            e.check_source(it.src_rank)
        with e.cond:
            if self._items is not None or r.alloc_sent or r.failure is not None:
                raise ValueError(f"room {r.room}: items are declared once, before init() "
                                 f"sends anything")
            hits = ([False] * len(resolved) if e.instance_size > 1 and not queued
                    else claim(e.item_cache, e.item_lock, resolved, e.item_shape))
            e.untrack(r)  # its lanes, one per source, stand in its place
            self._items = ItemRoom(e, lambda lane: Receiver(e, lane), r.room, resolved, hits,
                                   settle_on_end=not queued)

    @property
    def hits(self) -> list[int]:
        """Indices of the items served from the item cache (none: no items)."""
        return [] if self._items is None else hit_indices(self._items.hits)

    @property
    def items_room(self) -> ItemRoom | None:
        return self._items

    def init(self, num_tokens: int | None = None, *, seq_len: int | None = None,
             items: object = None) -> bool:
        """Allocate and send ALLOC: `num_tokens`, else the declared `seq_len`,
        else default_alloc_tokens. `seq_len`: the room's exact length, when the
        caller knows it (it built the prompt's image-pad tokens): the first
        allocation then covers it where the pool allows, and a room whose real
        length differs fails on both sides with both numbers in the reason (the
        stream stays aligned, other rooms carry on). False: no free blocks yet,
        or the room failed (see poll()); call again later. A repeat after
        success does nothing.

        `items` (DESIGN 0.3): the room's `disagg.Item`s in prompt order; their
        token counts sum to the room's length (a `seq_len` must agree). Each
        source (an item's `src_rank`, default this receiver's) gets a lane of
        its own and sends only its needed items; items the cache holds (TP 1;
        with TP > 1 hits come through `queue()`) are copied in locally."""
        check_tokens("init", num_tokens)
        check_tokens("init", seq_len, name="seq_len")
        if items is not None and self._items is None:
            if num_tokens is not None:
                raise ValueError("init(num_tokens=...) does not apply to a room declared as "
                                 "items: each source's lane asks for its rows")
            self.declare(items)
        if self._items is not None:
            if seq_len is not None and seq_len != self._items.seq_len:
                raise ValueError(f"init(seq_len={seq_len}): the items sum to "
                                 f"{self._items.seq_len} tokens")
            return self._items.init()
        e, r = self._engine, self._r
        if num_tokens is not None:
            want = num_tokens
        elif seq_len is not None:  # what this rank receives of it (scatter: its slice)
            lo, hi = e.machine.span(seq_len)
            want = max(1, hi - lo)
        else:
            want = e.first_alloc_tokens()
        joining = None
        if e.membership is not None and r.src_rank not in e.liveness.known:
            # jobs mode: a member whose pair with this rank is still forming (another
            # TP rank may have met it first) waits; one that is no member fails
            joining = e.membership(r.src_rank)
        with e.cond:
            if r.failure is not None:
                return False
            if r.alloc_sent:
                return True
            r.declared_seq_len = seq_len or 0
            if r.src_rank not in e.liveness.known:
                if joining:
                    return False  # its pair is forming: call again
                e.execute(r, e.machine.fail(
                    r, f"language rank {e.rank}: embedding rank {r.src_rank} is no member of "
                       f"the deployment (it left, or never joined)", FailureCause.PEER_LOST))
                return False
            down = e.liveness.dead.get(r.src_rank) or e.stream_lost(r.src_rank)
            if down is not None:
                e.execute(r, e.machine.fail(
                    r, f"language rank {e.rank}: embedding rank {r.src_rank} is down: {down}",
                    FailureCause.PEER_LOST))
                return False
            # a new room leaves a block for each room waiting to resume (credit.py)
            c = e.credits.take(r.room, want, key=0, remaining=None, resume=False,
                               reserve=sum(1 for x in e.rooms.values()
                                           if x is not r and needs_resume(x)))
            if c is None:
                r.init_refused = True
                return False
            auto = (num_tokens is None and seq_len is None
                    and e.cfg.default_alloc_tokens == "auto")
            e.execute(r, e.machine.asked(r, c, e.clock(), auto=auto,
                                         prepost=e.can_prepost(r)))
            ok = r.failure is None
        e.post_claimed(r.src_rank)  # a pre-posted frame's recvs, without the lock
        return ok

    def poll(self) -> TransferStatus:
        """This rank's status of the room. A room not yet ended may take up to
        0.2 ms to say so (at most once per 0.2 ms per thread): a caller spinning
        on poll() thus lets the library's threads run."""
        if self._items is not None:
            return self._items.poll()
        return self._engine.poll(self._r)

    def status_now(self) -> TransferStatus:
        """This rank's status, without `poll()`'s pause (`RoomQueue.step`, whose
        all-reduce lets the library's threads run)."""
        if self._items is not None:
            with self._engine.cond:
                return self._items.advance()
        return self._r.status

    @property
    def needs_resume(self) -> bool:
        """A partial chunk landed and nothing is asked for the rest yet."""
        with self._engine.cond:
            if self._items is not None:
                return self._items.needs_resume()
            return needs_resume(self._r)

    @property
    def progress(self) -> tuple[int, int | None]:
        """(tokens received, seq_len once the first chunk told it). With
        fanout="scatter" the first is of this rank's slice. A room declared as
        items: its contiguous prefix landed, and its length."""
        if self._items is not None:
            return self._items.progress()
        return self._r.received, self._r.seq_len

    @property
    def failure(self) -> Failure | None:
        """Why the room failed (a `str` with `.cause` and `.rank`), or None."""
        return self._r.failure if self._items is None else self._items.failure

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until the room is SUCCESS or FAILED or `needs_resume`, or
        `timeout_s` (default: bootstrap_timeout + peer_timeout) passed; return
        the status then. For loops that would rather sleep than poll."""
        e, r = self._engine, self._r
        bound = e.cfg.bootstrap_timeout + e.cfg.peer_timeout if timeout_s is None else timeout_s
        if self._items is not None:
            return self._items.wait(bound)
        with e.cond:
            e.cond.wait_for(lambda: r.status in TERMINAL or needs_resume(r), bound)
        return r.status

    def resume(self, num_tokens: int | None = None) -> bool:
        """Allocate for the rest (or num_tokens of it) and send RESUME. False: no
        blocks yet (or the room failed); a repeat in the same round does nothing."""
        check_tokens("resume", num_tokens)
        if self._items is not None:
            return self._items.resume(num_tokens)
        e, r = self._engine, self._r
        with e.cond:
            if r.failure is not None:
                return False
            if not needs_resume(r):
                return True  # nothing to do this round: in flight, done, or a repeat
            ok = e.ask_resume(r, num_tokens, landed=r.received)
        e.post_claimed(r.src_rank)  # a pre-posted frame's recvs, without the lock
        return ok

    def result(self) -> EmbeddingResult:
        """The received tensors (the same ones at every call); raises
        `DisaggError` unless SUCCESS, or once they were handed back with
        `ctx.language.recycle()`."""
        if self._items is not None:
            return self._items.get_result()
        e, r = self._engine, self._r
        with e.cond:
            why = no_result(r.room, r.status, r.failure, r.handed_back,
                            e.scatter and not r.gathered)
            if why is not None:
                raise DisaggError(why, rank=e.rank, room=r.room)
            if r.result is None:
                assert r.outputs is not None and r.buffers is not None
                assert r.seq_len is not None
                r.result = to_result(e.geometry, r.outputs, r.aux, r.seq_len)
                e.recycler.issue(r.result, r.buffers)  # it may be handed back
            return r.result

    def prefix(self, num_tokens: int | None = None) -> EmbeddingResult:
        """Views (no copy) of the tokens landed so far, `[0, progress[0])` (or the
        first `num_tokens` of them); `.aux` once the first chunk landed. After
        SUCCESS, the same tensors as `result()`. Raises `DisaggError` once the
        room failed (its memory may be reused), or its result was handed back."""
        if self._items is not None:
            return self._items.prefix(num_tokens)
        e, r = self._engine, self._r
        with e.cond:
            whole = num_tokens is None and (r.gathered or not e.scatter)
            if r.status == TransferStatus.SUCCESS and (r.handed_back or whole):
                pass  # result() says what there is
            elif r.failure is not None:
                raise DisaggError(f"room {r.room} has no prefix: it failed ({r.failure})",
                                  rank=e.rank, room=r.room)
            else:
                # scatter: this rank holds a slice, not a prefix, until the gather
                landed = 0 if e.scatter else r.received
                n = landed if num_tokens is None else min(num_tokens, landed)
                return prefix_views(e.geometry, r.outputs, n, r.aux if r.received else (),
                                    e.device)
        return self.result()

    def agreed_prefix(self, num_tokens: int) -> EmbeddingResult:
        """`RoomQueue.prefix`: views of the first `num_tokens` tokens, which every
        TP rank of the instance agreed it holds. They landed, so nothing writes
        them again, and a room that failed on this rank since (a REJECT, an
        abort) keeps its output until the queue returns it: every rank gives
        the same answer until the next `step()`."""
        if self._items is not None:
            return self._items.agreed_prefix(num_tokens)
        e, r = self._engine, self._r
        with e.cond:
            if r.handed_back:
                raise DisaggError(f"room {r.room}: its result was handed back (recycle())",
                                  rank=e.rank, room=r.room)
            assert num_tokens <= r.received or num_tokens == 0
            return prefix_views(e.geometry, r.outputs, num_tokens, r.aux if num_tokens else (),
                                e.device)

    def gather(self, group: ProcessGroup | None) -> None:
        """fanout="scatter", from `RoomQueue.step()` only, on every rank of the
        instance in the same order, once every rank holds its slice: all-gather
        the slices so this rank's result is the whole room (`disagg.gather`)."""
        if self._items is not None:
            self._items.gather(group)
            return
        e, r = self._engine, self._r
        with e.cond:
            assert r.status == TransferStatus.SUCCESS and not r.gathered
            assert r.outputs is not None and r.seq_len is not None
            outputs, seq_len = r.outputs, r.seq_len
        index = e.machine.slice_index
        assert index is not None
        if group is not None:  # TP > 1; without the lock: the other ranks may take a while
            t0 = time.monotonic()
            nbytes = gather_slices(outputs, seq_len, e.instance_size, index, group,
                                   e.cfg.peer_timeout)
            e.stats.add(bytes_gathered=nbytes)
            e.stats.observe_bytes("gathered", nbytes)
            e.stats.observe("gather_s", time.monotonic() - t0)
        with e.cond:
            r.gathered = True

    def abort(self, reason: str = "aborted", *, cause: FailureCause = FailureCause.ABORT) -> None:
        """Fail the room; its blocks return once the frame owed for them arrives.
        (`cause`: what the failure says, e.g. CANCELLED from `RoomQueue.cancel`.)"""
        if self._items is not None:
            self._items.abort(reason, cause)
            return
        with self._engine.cond:
            self._engine.execute(self._r, self._engine.machine.abort(self._r, reason, cause))

    def settle(self, *, keep: bool) -> None:
        """A room declared as items ended and its end was seen: release its
        hits; with `keep` offer its landed items to the cache (`ItemRoom.settle`)."""
        if self._items is not None and self._items.status in TERMINAL:
            self._items.settle(keep=keep)
