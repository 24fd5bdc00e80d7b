"""Pairs made on demand, at the cap, on real Gloo ranks (issue 28): rooms keep
flowing byte-exact while pair groups are closed and made again, a room that
needs a pair at the cap waits for one to idle, an Embedding rank at its cap
asks a Language rank to close one, idle pairs close by themselves, and the
pools end whole. `pairs_live` never exceeds `max_pairs`."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
import torch.distributed as dist
from harness import check_whole, spawn
from test_operations_gloo import BS, H, exact, tensors

import disagg
from disagg.types import TERMINAL

pytestmark = pytest.mark.timeout(180)

SEQ = 40  # test_operations_gloo's rooms
ROUNDS = 6


def cfg(num_embedding_ranks: int, max_pairs: int, idle_s: float = 300.0) -> disagg.DisaggConfig:
    return disagg.DisaggConfig(num_embedding_ranks=num_embedding_ranks, hidden_size=H,
                               block_size=BS, num_blocks=32, bootstrap_timeout=60,
                               peer_timeout=10, max_pairs=max_pairs, pair_idle_s=idle_s)


def store() -> Any:
    return dist.distributed_c10d._get_default_store()


def serve(ctx: disagg.Context, rooms: list[int]) -> list[str]:
    out = []
    for room in rooms:
        s = ctx.embedding.sender(room)
        s.send(*tensors(room))
        out.append(s.wait(60).name)
    return out


def receive(ctx: disagg.Context, rooms: list[tuple[int, int]],
            peak: list[int]) -> dict[int, bool]:
    """Rooms (room, src) at once; the most pairs live seen meanwhile in `peak`."""
    rs = {room: ctx.language.receiver(room, src_rank=src) for room, src in rooms}
    for r in rs.values():
        assert r.init(seq_len=SEQ)
    deadline = time.monotonic() + 60
    while any(r.poll() not in TERMINAL for r in rs.values()):
        peak.append(int(ctx.stats()["pairs_live"]))  # type: ignore[call-overload]
        assert time.monotonic() < deadline, "rooms did not end"
        time.sleep(0.002)
    return {room: r.poll() is disagg.TransferStatus.SUCCESS and exact(r.result(), room)
            for room, r in rs.items()}


def pair_stats(ctx: disagg.Context) -> dict[str, Any]:
    st = ctx.stats()
    return {k: st[k] for k in ("pairs_live", "pairs_created", "pairs_closed")}


def run_language_cap(rank: int, world: int, init_method: str) -> dict[str, Any]:
    """E0, E1 and one Language rank with max_pairs=1: one room to each encoder in
    turn (every switch closes a pair and makes another), then one room to each
    at once (the second waits for the first's pair to idle)."""
    ctx = disagg.init(cfg(2, 1), rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {}
    try:
        turns = [(100 + i, i % 2) for i in range(ROUNDS)] + [(200, 0), (201, 1)]
        if ctx.role == "embedding":
            out["sent"] = serve(ctx, [room for room, src in turns if src == rank])
            store().wait(["pairs/done"], datetime.timedelta(seconds=90))
        else:
            peak: list[int] = []
            out["exact"] = {}
            for room, src in turns[:ROUNDS]:
                out["exact"].update(receive(ctx, [(room, src)], peak))
            out["exact"].update(receive(ctx, turns[ROUNDS:], peak))
            out["peak"] = max(peak)
            store().set("pairs/done", "1")
        out["whole"] = check_whole(ctx, "at the end")["pool_free_blocks"]
        out["pairs"] = pair_stats(ctx)
        return out
    finally:
        ctx.shutdown()


def test_a_language_rank_at_its_cap_closes_idle_pairs_and_rooms_flow() -> None:
    res = spawn(3, run_language_cap, timeout=150)
    lang = res[2]
    assert all(lang["exact"].values()) and len(lang["exact"]) == ROUNDS + 2, lang
    assert lang["peak"] <= 1, lang
    assert lang["pairs"]["pairs_live"] <= 1
    # every switch of encoder made a pair again: the cap closed the other first
    assert lang["pairs"]["pairs_created"] >= ROUNDS + 1, lang
    assert lang["pairs"]["pairs_closed"] >= ROUNDS, lang
    for e in (0, 1):
        assert set(res[e]["sent"]) == {"SUCCESS"}, res[e]
        assert res[e]["pairs"]["pairs_created"] >= ROUNDS // 2, res[e]
        assert res[e]["pairs"]["pairs_closed"] >= ROUNDS // 2 - 1, res[e]
    assert [r["whole"] for r in res] == [32, 32, 32]


def run_embedding_cap(rank: int, world: int, init_method: str) -> dict[str, Any]:
    """One Embedding rank with max_pairs=1 and two Language ranks (TP 1, two
    instances), whose rooms alternate, then come at once: the Embedding rank
    asks the idle pair's Language rank to close it."""
    c = cfg(1, 1 if rank == 0 else 24)
    ctx = disagg.init(c, rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {}
    try:
        turns = [(300 + i, 1 + i % 2) for i in range(ROUNDS)] + [(400, 1), (401, 2)]
        if ctx.role == "embedding":
            out["sent"] = serve(ctx, [turns[i][0] for i in range(ROUNDS)])
            # both at once, as an encoder serving several instances does: 401 goes on
            # the open pair, which then idles, is asked to close, and 400's is made
            ss = [ctx.embedding.sender(room) for room in (400, 401)]
            for room, snd in zip((400, 401), ss, strict=True):
                snd.send(*tensors(room))
            out["sent"] += [snd.wait(60).name for snd in ss]
            out["pairs"] = pair_stats(ctx)
            store().wait(["pairs/e/done/1", "pairs/e/done/2"], datetime.timedelta(seconds=90))
        else:
            peak: list[int] = []
            out["exact"] = {}
            for i, (room, lang) in enumerate(turns[:ROUNDS]):
                if lang == rank:
                    out["exact"].update(receive(ctx, [(room, 0)], peak))
                store().set(f"pairs/e/turn/{i}/{rank}", "1")
                store().wait([f"pairs/e/turn/{i}/{3 - rank}"], datetime.timedelta(seconds=60))
            room = 400 if rank == 1 else 401
            out["exact"].update(receive(ctx, [(room, 0)], peak))
            out["pairs"] = pair_stats(ctx)
            store().set(f"pairs/e/done/{rank}", "1")
        out["whole"] = check_whole(ctx, "at the end")["pool_free_blocks"]
        return out
    finally:
        ctx.shutdown()


def test_an_embedding_rank_at_its_cap_asks_for_idle_pairs_to_close() -> None:
    res = spawn(3, run_embedding_cap, timeout=150)
    assert set(res[0]["sent"]) == {"SUCCESS"} and len(res[0]["sent"]) == ROUNDS + 2, res[0]
    assert res[0]["pairs"]["pairs_live"] <= 1
    assert res[0]["pairs"]["pairs_created"] >= ROUNDS + 1, res[0]
    for lang in (1, 2):
        assert all(res[lang]["exact"].values()), res[lang]
        assert len(res[lang]["exact"]) == ROUNDS // 2 + 1, res[lang]
    assert [r["whole"] for r in res] == [32, 32, 32]


def run_idle(rank: int, world: int, init_method: str) -> dict[str, Any]:
    """pair_idle_s=0.3: after a room the pair closes by itself on both sides
    (heartbeats stop), and the next room makes it again."""
    ctx = disagg.init(cfg(1, 24, idle_s=0.3), rank=rank, world_size=world,
                      init_method=init_method)
    out: dict[str, Any] = {}
    try:
        if ctx.role == "embedding":
            out["sent"] = serve(ctx, [1])
            store().wait(["idle/closed"], datetime.timedelta(seconds=60))
            deadline = time.monotonic() + 30  # its end goes when the PAIR_CLOSE comes
            while ctx.stats()["pairs_live"]:
                assert time.monotonic() < deadline, "this end of the idle pair stayed"
                time.sleep(0.01)
            out["after_idle"] = pair_stats(ctx)
            out["sent"] += serve(ctx, [2])
            store().wait(["idle/done"], datetime.timedelta(seconds=60))
        else:
            assert ctx.stats()["pairs_live"] == 1  # warmed at init: within the cap
            out["exact"] = receive(ctx, [(1, 0)], [])
            deadline = time.monotonic() + 30
            while ctx.stats()["pairs_live"]:
                assert time.monotonic() < deadline, "the idle pair never closed"
                time.sleep(0.05)
            out["health"] = ctx.health()[0]
            store().set("idle/closed", "1")
            out["exact"].update(receive(ctx, [(2, 0)], []))
            out["pairs"] = pair_stats(ctx)
            store().set("idle/done", "1")
        out["whole"] = check_whole(ctx, "at the end")["pool_free_blocks"]
        return out
    finally:
        ctx.shutdown()


def test_idle_pairs_close_on_both_sides_and_are_made_again() -> None:
    e, lang = spawn(2, run_idle, timeout=120)
    assert e["sent"] == ["SUCCESS", "SUCCESS"]
    assert e["after_idle"]["pairs_live"] == 0 and e["after_idle"]["pairs_closed"] == 1, e
    assert lang["exact"] == {1: True, 2: True}
    assert lang["health"]["alive"] and lang["health"]["pair"] == "ok", lang
    assert lang["pairs"]["pairs_created"] == 2 and lang["pairs"]["pairs_closed"] >= 1, lang
    assert e["whole"] == lang["whole"] == 32
