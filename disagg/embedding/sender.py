"""Embedding side: the public `Sender` handle and the checks on what a caller
hands it (shapes, dtypes, devices, contiguity: a bad tensor is a `ValueError`
that names it, and leaves the room untouched)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

import torch

from .. import streams
from ..config import DisaggConfig
from ..errors import DisaggError, Failure, FailureCause, PoolFull
from ..geometry import Geometry
from ..types import TERMINAL, TransferStatus
from ..wire import MAX_AUX
from .admission import budget_blocks
from .rows import RowMap, item_tokens, needed_indices, needed_tokens

if TYPE_CHECKING:
    from ..pool import BlockAllocator
    from ..stats import Stats
    from .actions import Action
    from .machine import SendMachine, SendRoom


class SenderHost(Protocol):
    """What a `Sender` needs of its engine (`EmbeddingEngine` is one): the handle
    depends on this, not on the engine."""

    cfg: DisaggConfig
    geometry: Geometry
    device: torch.device
    rank: int
    cond: threading.Condition
    machine: SendMachine
    budget: BlockAllocator
    stats: Stats

    def clock(self) -> float: ...

    def execute(self, actions: list[Action]) -> None: ...

    def flush(self) -> None: ...

    def poll(self, room: SendRoom) -> TransferStatus: ...


class Sender:
    """One room on an Embedding rank (see `disagg.embedding.machine` for its
    states). `send` once, then `poll`/`wait` until SUCCESS or FAILED. The
    caller's side of the shell: each call takes the engine lock, asks the room's
    machine, has the engine execute what it returns, and posts the frames it
    scheduled once the lock is released."""

    def __init__(self, engine: SenderHost, state: SendRoom) -> None:
        self._engine = engine
        self._r = state
        self.room = state.room

    def send(self, embeddings: torch.Tensor, fill_ids: torch.Tensor,
             mrope_positions: torch.Tensor | None = None, aux: tuple[int, ...] | None = None,
             *, seq_len: int | None = None, **extra: torch.Tensor) -> TransferStatus:
        """Hand the room's tensors over, without a copy of the embeddings; the
        room's status after (FAILED if it had already failed, e.g. aborted by
        the Language side before its data came: `failure` says why).

        embeddings [n, hidden]; fill_ids [n] int32; mrope_positions [3, n]
        int32; extra buffers [n, *per_token_shape]; aux: at most 1024 int64s.
        Do not modify them until `poll()` is SUCCESS or FAILED.

        Progressive send: the first call may give only the room's first part
        and declare its whole length with `seq_len=`; later calls give the next
        parts, in order, until seq_len tokens were given (e.g. one image at a
        time as the encoder produces it). `aux` and `seq_len` only on the first
        call. The budget for seq_len is taken at the first call, so later parts
        never raise PoolFull; whatever waiting allocations can take of a part
        leaves at once (parts given already coalesce into one chunk).

        Raises `PoolFull` when the budget cannot take the room now (retry
        later), `ValueError` for bad input (the room untouched: wrong shapes or
        dtypes, a part after the room is complete, parts past seq_len, aux or
        seq_len on a later part), or for a room longer than the whole budget
        (which can never be sent: the room fails on both sides at once).
        """
        e, r = self._engine, self._r
        sources, n, aux_t = validate_send(e.cfg, e.geometry, e.device, self.room,
                                          embeddings, fill_ids, mrope_positions, aux, extra)
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                    or seq_len < n):
            raise ValueError(f"send(room={r.room}): seq_len={seq_len!r} must be an int >= the "
                             f"{n} tokens given")
        ready = streams.producer_event(e.device)  # the sends wait for it (CUDA)
        too_long: ValueError | None = None
        with e.cond:  # one hold: an ALLOC may set the room's item table at any time
            if r.items is not None and r.sources is None:
                if needed_tokens(r.items) == 0:
                    return r.status  # every item of this rank was a hit: nothing to send
                self._check_item_rows(n if seq_len is None else seq_len, aux)
                if not r.asked:
                    r.rows = RowMap(r.items, item_tokens(r.items))
            if r.failure is not None:
                return r.status  # e.g. aborted by the Language side before its data came
            if r.ended:
                raise DisaggError(f"room {r.room} already ended: success", rank=e.rank,
                                  room=r.room)
            if r.sources is not None:
                e.execute(self._next_part(sources, n, aux, seq_len, ready))
            else:
                total = n if seq_len is None else seq_len
                if r.rows is not None:  # all of its items given: send the needed ones
                    total = needed_tokens(r.rows.items)
                try:
                    need = budget_blocks(e.geometry, r.room, total, e.budget.num_blocks)
                except ValueError as err:  # it can never be sent: end it on both sides now
                    too_long = err
                    e.execute(e.machine.fail(r, f"embedding rank {e.rank}: {err}",
                                             FailureCause.TOO_LONG))
                else:
                    try:
                        budget = e.budget.allocate(need, owner=r.room)
                    except PoolFull as err:
                        raise PoolFull(f"embedding budget full: room {r.room} needs {need} "
                                       f"blocks, {e.budget.num_free} of {e.budget.num_blocks} "
                                       f"free", rank=e.rank, room=r.room) from err
                    e.stats.set_gauge("pool_free_blocks", e.budget.num_free)
                    e.execute(e.machine.data(r, self._select(sources, n), total, aux_t,
                                             ready, budget, e.clock()))
        e.flush()
        if too_long is not None:
            raise too_long
        return r.status

    def _next_part(self, sources: list[torch.Tensor], n: int, aux: object, seq_len: int | None,
                   ready: torch.cuda.Event | None) -> list[Action]:
        """A later part (engine lock held): checked before anything changes."""
        e, r = self._engine, self._r
        given, total = (r.given, r.seq_len) if r.rows is None else (r.rows.given, r.rows.total)
        if given >= total:
            raise ValueError(f"room {r.room}: send() was already called for all {total} "
                             f"tokens")
        if aux is not None or seq_len is not None:
            raise ValueError(f"send(room={r.room}): aux and seq_len go with the first part only")
        if given + n > total:
            raise ValueError(f"send(room={r.room}): parts would sum to {given + n} tokens, "
                             f"past seq_len={total}")
        return e.machine.part(r, self._select(sources, n), ready, e.clock())

    def _select(self, sources: list[torch.Tensor],
                n: int) -> list[tuple[list[torch.Tensor], int]]:
        """The rows of a part that go on the wire (lock held): all of them, or
        for a caller that gave all of its items the needed ones (views)."""
        rows = self._r.rows
        return [(sources, n)] if rows is None else rows.select(sources, n)

    def _check_item_rows(self, total: int, aux: object) -> None:
        """A first send() of a room whose items are known (lock held)."""
        r = self._r
        assert r.items is not None
        if aux is not None:
            raise ValueError(f"send(room={r.room}): the room is declared as items, which carry "
                             f"no aux (the Language caller knows its items' metadata)")
        want = needed_tokens(r.items) if r.asked else item_tokens(r.items)
        if total != want:
            which = ("the needed items' rows (needed() said which)" if r.asked
                     else "all of this rank's items' rows")
            raise ValueError(f"send(room={r.room}): {total} rows given (seq_len), but "
                             f"{which} are {want}")

    def needed(self, timeout_s: float = 0.0) -> list[int] | None:
        """The indices (into the room's item list) of the items this rank must
        send, once every Language rank of the instance has asked for the room
        (their ALLOCs say which items they hold already); None if that is not
        known within `timeout_s`, or the room failed (see `failure`). `[]`: every
        item of this rank was a hit, and the room ended SUCCESS here without
        data. A room without items: `[0]` (the whole room is one item).

        Asked before the first `send()`, the answer is what `send()` then takes:
        exactly these items' rows, in room order. Otherwise `send()` takes all
        of this rank's items' rows and sends only the needed ones."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or timeout_s < 0:
            raise ValueError(f"needed(timeout_s={timeout_s!r}): a number >= 0")
        e, r = self._engine, self._r
        with e.cond:
            e.cond.wait_for(lambda: r.failure is not None or (
                r.instance_size is not None and len(r.lanes) >= r.instance_size), timeout_s)
            if r.failure is not None or r.instance_size is None \
                    or len(r.lanes) < r.instance_size:
                return None
            if r.sources is None:
                r.asked = True
            return [0] if r.items is None else needed_indices(r.items)

    def poll(self) -> TransferStatus:
        """The room's status. A room not yet ended may take up to 0.2 ms to say
        so (at most once per 0.2 ms per thread): a caller spinning on poll()
        thus lets the library's threads run."""
        return self._engine.poll(self._r)

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until SUCCESS or FAILED, or `timeout_s` (default: bootstrap_timeout
        + peer_timeout) passed; return the status then. For loops that would
        rather sleep than poll."""
        e, r = self._engine, self._r
        bound = e.cfg.bootstrap_timeout + e.cfg.peer_timeout if timeout_s is None else timeout_s
        with e.cond:
            e.cond.wait_for(lambda: r.status in TERMINAL, bound)
        return r.status

    @property
    def failure(self) -> Failure | None:
        """Why the room failed (a `str` with `.cause` and `.rank`), or None."""
        return self._r.failure

    def abort(self, reason: str = "aborted") -> None:
        """Fail the room; frames already on the wire complete first."""
        e = self._engine
        with e.cond:
            e.execute(e.machine.abort(self._r, reason))
        e.flush()


def validate_send(cfg: DisaggConfig, geometry: Geometry, device: torch.device, room: int,
                  embeddings: torch.Tensor, fill_ids: torch.Tensor,
                  mrope_positions: torch.Tensor | None, aux: tuple[int, ...] | None,
                  extra: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int,
                                                           tuple[int, ...]]:
    """Check every tensor against the geometry; return them in wire order
    (`Geometry.wire_buffers`)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"send(room={room}): {msg}")

    def check(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise bad(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise bad(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype != dtype:
            raise bad(f"{name} has dtype {t.dtype}, expected {dtype}")
        if t.device.type != device.type or (device.index is not None
                                            and t.device.index not in (None, device.index)):
            raise bad(f"{name} is on {t.device}, expected {device}")
        return t

    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        got = (list(embeddings.shape) if isinstance(embeddings, torch.Tensor)
               else type(embeddings).__name__)
        raise bad(f"embeddings must be a 2-D [seq, hidden] tensor, got {got}")
    seq = embeddings.shape[0]
    if seq == 0:
        raise bad("seq_len is 0: nothing to send")
    by_name = {b.name: b for b in geometry.buffers}
    hidden = by_name["embeddings"].per_token_shape[0]
    out = [check("embeddings", embeddings, (seq, hidden), by_name["embeddings"].dtype)]
    if not embeddings.is_contiguous():
        raise bad("embeddings must be contiguous (no copy is made); pass .contiguous()")
    ids = check("fill_ids", fill_ids, (seq,), torch.int32)
    if "mrope_positions" in by_name:
        if mrope_positions is None:
            raise bad("mrope_positions [3, seq] is required (config mrope=True)")
        m = check("mrope_positions", mrope_positions, (3, seq), torch.int32)
        # one [seq, 4] wire buffer (geometry.PACKED_IDS): 16 bytes a token, the only copy made
        out.append(torch.cat([ids[:, None], m.t()], dim=1))
    elif mrope_positions is not None:
        raise bad("mrope_positions given but the config has mrope=False")
    else:
        out.append(ids.contiguous())
    names = geometry.extra_names
    unknown = sorted(set(extra) - set(names))
    missing = sorted(set(names) - set(extra))
    if unknown or missing:
        raise bad(f"extra buffers: unknown {unknown}, missing {missing} "
                  f"(config declares {list(names)})")
    for name in names:
        b = by_name[name]
        t = check(name, extra[name], (seq, *b.per_token_shape), b.dtype)
        if not t.is_contiguous():
            raise bad(f"{name} must be contiguous")
        out.append(t)
    aux_t: tuple[int, ...] = ()
    if aux is not None:
        aux_t = tuple(aux)
        if len(aux_t) > MAX_AUX or not all(
                isinstance(a, int) and not isinstance(a, bool) and -(1 << 63) <= a < (1 << 63)
                for a in aux_t):
            raise bad(f"aux must be at most {MAX_AUX} int64 values, got {aux!r}")
    return out, seq, aux_t
