"""Language side: what the caller's handles (`Receiver`, and a room declared
as items, `items_room.ItemRoom`) need of their engine. `LanguageEngine` is
one; the handles depend on this interface, not on the engine."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..config import DisaggConfig
    from ..geometry import Geometry
    from ..items import ItemCache
    from ..liveness import Liveness
    from ..recycle import Recycler
    from ..stats import Stats
    from ..types import TransferStatus
    from ..wire import Alloc
    from .actions import Action
    from .credit import Credits
    from .machine import RecvMachine
    from .room import RecvRoom


class ReceiverHost(Protocol):
    """What a `Receiver` needs of its engine (`LanguageEngine` is one): the
    handle depends on this, not on the engine."""

    rank: int
    cfg: DisaggConfig
    geometry: Geometry
    device: torch.device
    stats: Stats
    cond: threading.Condition
    machine: RecvMachine
    credits: Credits
    liveness: Liveness
    recycler: Recycler
    rooms: dict[tuple[int, int], RecvRoom]
    scatter: bool
    instance_size: int
    membership: Callable[[int], bool] | None

    def clock(self) -> float: ...

    def execute(self, r: RecvRoom, actions: list[Action]) -> None: ...

    def first_alloc_tokens(self) -> int: ...

    def can_prepost(self, r: RecvRoom) -> bool: ...

    def ask_resume(self, r: RecvRoom, num_tokens: int | None, *, landed: int,
                   at_least: int = 1) -> bool: ...

    def post_claimed(self, src: int) -> None: ...

    def stream_lost(self, src: int) -> str | None: ...

    def poll(self, room: RecvRoom) -> TransferStatus: ...

    # rooms declared as items (`items_room.ItemRoom`)
    item_cache: ItemCache | None
    item_lock: threading.Lock
    item_shape: str

    def output_rows(self, seq_len: int) -> int: ...

    def check_source(self, src_rank: int) -> None: ...

    def new_lane(self, room: int, src_rank: int) -> RecvRoom: ...

    def untrack(self, r: RecvRoom) -> None: ...

    def tell(self, src: int, msg: Alloc) -> None: ...
