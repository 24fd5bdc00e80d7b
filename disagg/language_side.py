"""`ctx.language`: what a Language rank's caller holds. Receivers, the
serving-loop queue, and `recycle` for results the caller is done with; the
instance's group for the caller's own collectives."""

from __future__ import annotations

import torch.distributed as dist

from .errors import DisaggError
from .language import LanguageEngine, Receiver
from .pool import BlockPool
from .queue import MAX_WINDOW, RoomQueue
from .types import EmbeddingResult


class LanguageSide:
    """`ctx.language`: receivers, the serving-loop queue, and `recycle` for
    results the caller is done with."""

    def __init__(self, engine: LanguageEngine, instance_group: dist.ProcessGroup | None,
                 gather_group: dist.ProcessGroup | None = None) -> None:
        self.engine = engine
        self._instance_group = instance_group
        self._gather_group = gather_group or instance_group

    def receiver(self, room: int, src_rank: int) -> Receiver:
        if self.engine.scatter:
            raise DisaggError(
                "fanout='scatter': each rank receives only its slice of a room, and the "
                "instance completes it in queue().step()'s lockstep; use ctx.language.queue() "
                "(or fanout='copy' for bare receivers)", rank=self.engine.rank)
        return self.engine.receiver(room, src_rank)

    def queue(self, window: int = MAX_WINDOW) -> RoomQueue:
        return RoomQueue(self.engine, self.instance_group, window,
                         gather_group=lambda: self._gather_group)

    def recycle(self, result: EmbeddingResult) -> None:
        """Hand back a room's result once nothing needs it any more (prefill
        consumed it): later rooms of a similar size land in its memory, whose
        pages are already touched, instead of in new memory that may fault once
        per 4 KiB (a CPU win; on CUDA the caching allocator already reuses).

        `result` must be the very `EmbeddingResult` that `RoomQueue.step()` or
        `Receiver.result()` returned on this rank. The caller gives up its
        tensors: their memory holds other rooms' data later, and the room's
        `result()` / `prefix()` raise from now on. Memory is reused only once no
        tensor still views it (and, on CUDA, once the work queued on the current
        stream at this call has run), so a view kept by mistake is never
        overwritten while alive, only kept out of reuse. Idle memory is bounded by
        `recycle_limit_bytes` (the longest idle goes first). `ValueError` for a
        prefix view, a copy, another rank's result or one handed back already;
        every TP rank hands back its own results, in any order."""
        self.engine.recycle(result)

    @property
    def recycle_limit_bytes(self) -> int:
        """At most this many bytes of handed-back results wait for reuse on this
        rank (default `disagg.recycle.MAX_IDLE_BYTES`, 256 MiB; 0: keep none)."""
        return self.engine.recycler.max_bytes

    @recycle_limit_bytes.setter
    def recycle_limit_bytes(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"recycle_limit_bytes={max_bytes!r}: must be an int >= 0")
        self.engine.recycler.set_max_bytes(max_bytes)
        self.engine.stats.set_gauge("recycle_idle_bytes", self.engine.recycler.idle_bytes)

    def instance_group(self) -> dist.ProcessGroup | None:
        """The instance's Gloo group; None once the context is shut down."""
        return self._instance_group

    def release_group(self) -> None:
        self._instance_group = self._gather_group = None

    @property
    def pool(self) -> BlockPool:
        return self.engine.pool
