"""In-process layer: `RoomQueue`'s agreement across a TP instance, with the
instance's all-reduce replaced by the MIN of this rank's buffer and a scripted
other rank's, so every outcome of a step is driven exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from disagg import queue as queue_mod
from disagg.config import DisaggConfig
from disagg.errors import Failure, FailureCause
from disagg.queue import NOBODY, RoomQueue, pack_failed_on
from disagg.types import TransferStatus

from .fakes import World
from .rooms import room_data, send

pytestmark = pytest.mark.timeout(60)

EMB = 0


def other_rank(monkeypatch: pytest.MonkeyPatch,
               fill: Callable[[torch.Tensor, int], None]) -> None:
    """The instance's all-reduce as MIN with a buffer the other TP rank would
    send: the same header, and what `fill(buf, header_len)` writes after it."""

    def all_reduce(buf: torch.Tensor, op: Any = None, group: Any = None) -> None:
        theirs = buf.clone()
        fill(theirs, queue_mod._HEADER)
        torch.minimum(buf, theirs, out=buf)

    monkeypatch.setattr(queue_mod.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)


def test_a_rank_that_did_not_fail_names_the_tp_rank_that_did(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DisaggConfig(hidden_size=32, block_size=16, num_blocks=16, bootstrap_timeout=20.0,
                       peer_timeout=4.0)
    with World(cfg, auto_control=True) as w:
        window = 8
        q = RoomQueue(w.lang(), object(), window=window)  # the group is never touched

        def rank_7_failed_room_0(buf: torch.Tensor, h: int) -> None:
            buf[h] = int(TransferStatus.FAILED)  # the first room of the window
            buf[h + window] = pack_failed_on(7, Failure("x", FailureCause.TIMEOUT))  # on rank 7
        other_rank(monkeypatch, rank_7_failed_room_0)
        s = w.emb().sender(3)
        send(s, room_data(w.cfg, 3, 20))
        q.add(3, src_rank=EMB)
        done, failed = q.step()
        assert done == [] and failed == [(3, "room 3 failed on language rank 7 of the TP "
                                              "instance (timeout)")]
        assert failed[0][1].cause is FailureCause.TIMEOUT and failed[0][1].rank == 7
        assert len(q) == 0
        w.ended(s, "the sender")  # this rank aborted its receiver: the room ends
        w.settle_whole()


def test_nobody_failed_leaves_the_room_moving(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DisaggConfig(hidden_size=32, block_size=16, num_blocks=16)
    with World(cfg, auto_control=True) as w:
        q = RoomQueue(w.lang(), object(), window=4)

        def still_waiting(buf: torch.Tensor, h: int) -> None:
            buf[h] = int(TransferStatus.WAITING_FOR_INPUT)
            buf[h + 4] = NOBODY
        other_rank(monkeypatch, still_waiting)
        s = w.emb().sender(4)
        send(s, room_data(w.cfg, 4, 20))
        q.add(4, src_rank=EMB)
        for _ in range(3):
            assert q.step() == ([], [])  # the other rank has not got it yet
        monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 1)
        w.run_until(lambda: bool(q.step()[0]) or len(q) == 0, "the room done")
        w.ended(s, "the sender")
        w.settle_whole()
