"""Operations on real Gloo ranks (issue 27): a cancel on one TP rank ends the
room on every rank and at its source; a dead TP rank fails its instance's
queued rooms instead of keeping them; a killed peer reads not alive; after
shutdown nothing reads alive. Pools whole, rooms byte-exact."""

from __future__ import annotations

import datetime
import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import check_whole, spawn

import disagg
from disagg import FailureCause

pytestmark = pytest.mark.timeout(180)

H, BS, SEQ = 32, 16, 40


def tensors(room: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(room)
    return (torch.randn(SEQ, H, generator=g).to(torch.bfloat16),
            torch.randint(0, 1 << 20, (SEQ,), generator=g, dtype=torch.int32),
            torch.randint(0, 1 << 12, (3, SEQ), generator=g, dtype=torch.int32))


def exact(res: disagg.EmbeddingResult, room: int) -> bool:
    emb, ids, pos = tensors(room)
    return (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))
            and torch.equal(res.fill_ids, ids) and torch.equal(res.mrope_positions, pos))


def store() -> Any:
    return dist.distributed_c10d._get_default_store()


def wait_key(key: str, timeout: float = 60.0) -> None:
    store().wait([key], datetime.timedelta(seconds=timeout))


def whole_soon(ctx: disagg.Context, timeout: float = 20.0) -> int:
    """Free blocks once every block is back (an aborted room's come back when
    the frame owed for them arrives)."""
    deadline = time.monotonic() + timeout
    while True:
        st = ctx.stats()
        if st["pool_free_blocks"] == st["pool_total_blocks"] and not st["rooms_live"]:
            return int(st["pool_free_blocks"])  # type: ignore[call-overload]
        if time.monotonic() > deadline:
            return int(check_whole(ctx, "at the end")["pool_free_blocks"])  # raises
        time.sleep(0.01)


def drain(q: disagg.RoomQueue, deadline: float) -> tuple[dict[int, bool], dict[int, Any]]:
    done: dict[int, bool] = {}
    failed: dict[int, Any] = {}
    while len(q):
        d, f = q.step()
        done.update({room: exact(res, room) for room, res in d})
        failed.update({room: (str(why), why.cause.name, why.rank) for room, why in f})
        assert time.monotonic() < deadline, "rooms did not end"
        time.sleep(0.001)
    return done, failed


def run_cancel(rank: int, world: int, init_method: str) -> dict[str, Any]:
    cfg = disagg.DisaggConfig(language_tp_size=2, hidden_size=H, block_size=BS, num_blocks=32,
                              bootstrap_timeout=60, peer_timeout=10)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    try:
        if ctx.role == "embedding":
            s1, s2, s3 = (ctx.embedding.sender(r) for r in (1, 2, 3))
            keep = [tensors(1), tensors(3)]
            s1.send(*keep[0])
            s3.send(*keep[1])  # room 2's data never comes: its client goes away
            out["room_2"] = (s2.wait(60).name, s2.failure.cause.name if s2.failure else None)
            out["rooms_1_3"] = (s1.wait(60).name, s3.wait(60).name)
            wait_key("ops/cancel/again")
            # the pair and the queue carry on after a cancel. (Reusing id 2 here at
            # once would race a TP rank's late ABORT for the old room, a known
            # limitation until rooms carry an incarnation; the in-process test
            # reuses the id once every message of the old room was delivered.)
            s2b = ctx.embedding.sender(4)
            s2b.send(*tensors(4))
            out["room_2_again"] = s2b.wait(60).name
            wait_key("ops/cancel/done")
            out["whole"] = check_whole(ctx, "at the end")["pool_free_blocks"]
        else:
            q = ctx.language.queue()
            for room in (1, 2, 3):
                q.add(room, src_rank=0, seq_len=SEQ)
            q.step()
            if rank == 1:  # only TP rank 0 cancels
                q.cancel(2, "client disconnected")
            out["done"], out["failed"] = drain(q, deadline)
            if rank == 1:
                store().set("ops/cancel/again", "1")
            q.add(4, src_rank=0, seq_len=SEQ)
            again, _ = drain(q, deadline)
            out["again"] = again
            out["whole"] = check_whole(ctx, "at the end")["pool_free_blocks"]
            if rank == 2:
                store().set("ops/cancel/done", "1")
        return out
    finally:
        ctx.shutdown()
        out["after_shutdown"] = (ctx.health(), ctx.readiness())


def test_cancel_on_one_tp_rank_ends_the_room_everywhere_and_at_its_source() -> None:
    e, l1, l2 = spawn(3, run_cancel, timeout=120.0)
    assert e["room_2"] == ("FAILED", "CANCELLED")
    assert e["rooms_1_3"] == ("SUCCESS", "SUCCESS") and e["room_2_again"] == "SUCCESS"
    for lang in (l1, l2):
        assert lang["done"] == {1: True, 3: True}
        _, cause, where = lang["failed"][2]
        assert cause == "CANCELLED" and where == 1, lang["failed"]
        assert lang["again"] == {4: True}
    assert "client disconnected" in l1["failed"][2][0]
    # the other rank's own text: the queue naming rank 1, or the source's answer to
    # its allocation, which says who cancelled (whichever reached it first)
    assert "language rank 1" in l2["failed"][2][0], l2["failed"]
    for r in (e, l1, l2):  # after shutdown no peer reads alive, and the rank is not ready
        health, ready = r["after_shutdown"]
        assert health and not any(h["alive"] for h in health.values()), health
        assert ready["ready"] is False and ready["reason"] == "this rank shut down"


# ------------------------------------------------------------------ a TP rank dies


def run_dead_tp_rank(rank: int, world: int, init_method: str) -> dict[str, Any]:
    cfg = disagg.DisaggConfig(language_tp_size=2, hidden_size=H, block_size=BS, num_blocks=32,
                              bootstrap_timeout=60, peer_timeout=2.0, step_timeout=3.0)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {}
    try:
        if ctx.role == "embedding":
            senders = [ctx.embedding.sender(r) for r in (1, 2)]  # no data yet
            killed_at = float(store().get("ops/dead/killed").decode()) \
                if wait_key("ops/dead/killed") is None else 0.0
            while ctx.health()[2]["alive"]:
                time.sleep(0.005)
            out["detect_s"] = time.time() - killed_at
            out["senders"] = [(s.wait(30).name, s.failure.cause.name if s.failure else None)
                              for s in senders]
            wait_key("ops/dead/done")
            out["whole"] = whole_soon(ctx)
            return out
        q = ctx.language.queue()
        for room in (1, 2):
            q.add(room, src_rank=0, seq_len=SEQ)
        q.step()
        if rank == 2:
            store().set("ops/dead/killed", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        wait_key("ops/dead/killed")
        t0 = time.monotonic()
        try:
            while True:
                q.step()
                time.sleep(0.001)
        except disagg.LockstepError as err:
            out["error_after_s"] = time.monotonic() - t0
            out["error"] = str(err)
        out["queued"] = len(q)
        out["readiness"] = ctx.readiness()
        store().set("ops/dead/done", "1")
        out["whole"] = whole_soon(ctx)
        return out
    finally:
        if rank != 2:
            ctx.shutdown()


def test_a_dead_tp_rank_fails_its_instance_s_queued_rooms() -> None:
    e, l1, dead = spawn(3, run_dead_tp_rank, timeout=120.0, expect_dead={2})
    assert dead is None
    assert l1["queued"] == 0
    assert "step_timeout=3s" in l1["error"] or "Connection" in l1["error"], l1["error"]
    assert l1["error_after_s"] < 3.0 + 10.0
    ready = l1["readiness"]
    assert ready["ready"] is False and ready["instance"].startswith("lost: ")
    # the source of the failed rooms ended them: told by the surviving rank's abort,
    # or on its own when it saw the dead rank first (either may come first per room)
    assert all(status == "FAILED" and cause in (FailureCause.PEER_LOST.name,
                                                FailureCause.ABORT.name)
               for status, cause in e["senders"]), e["senders"]
    assert e["detect_s"] < 2.0 + 1.5, e["detect_s"]  # a killed peer reads not alive in time
