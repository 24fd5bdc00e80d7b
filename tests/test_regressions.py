"""Regressions of issue 14 that need real ranks: a real Gloo pair timeout,
real sockets and process groups (multi-process, Gloo over 127.0.0.1). The
others are in `tests/inproc/test_regressions.py`.

Each test failed before its fix; each names the bug it guards.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from harness import free_port, spawn
from roomdata import mismatches, room_data

import disagg
from disagg import TransferStatus

pytestmark = pytest.mark.timeout(120)

TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)
HIDDEN = 32


def _cfg(**kw: Any) -> disagg.DisaggConfig:
    return disagg.DisaggConfig(hidden_size=HIDDEN, block_size=16, num_blocks=32,
                               default_alloc_tokens=64, **kw)


def _wait(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.002)


def _send(ctx: Any, room: int, seq: int) -> Any:
    d = room_data(room, seq, HIDDEN)
    s = ctx.embedding.sender(room)
    s.send(d["embeddings"], d["fill_ids"], d["mrope_positions"], aux=(room,))
    return s


def _recv(ctx: Any, room: int, seq: int) -> list[str]:
    r = ctx.language.receiver(room, src_rank=0)
    _wait(r.init, f"room {room}: blocks")
    _wait(lambda: r.poll() in TERMINAL, f"room {room} to end")
    if r.poll() is not TransferStatus.SUCCESS:
        return [f"room {room}: {r.failure}"]
    d = room_data(room, seq, HIDDEN)
    return mismatches(r.result(), d, (room,), room, seq)


def test_init_outside_torchrun_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: every entry point run without torchrun died with torch's
    "environment variable RANK expected"; now the error says what to do."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(disagg.DisaggError, match=r"run under torchrun.*or pass rank="):
        disagg.init(_cfg())


# ---------------------------------------------------------------- bug 1

BOOT, PEER = 2.0, 1.0  # the pair groups' Gloo timeout is BOOT + 2 * PEER = 4 s


def _late_request(rank: int, world: int, init_method: str) -> dict[str, Any]:
    ctx = disagg.init(_cfg(bootstrap_timeout=BOOT, peer_timeout=PEER), rank=rank,
                      world_size=world, init_method=init_method)
    store = disagg.context.dist.distributed_c10d._get_default_store()
    out: dict[str, Any] = {}
    try:
        if rank == 0:
            s = ctx.embedding.sender(1)  # the encoder is slow: its data comes far too late
            store.wait(["late/asked"])
            time.sleep(BOOT + 2 * PEER + 1.0)  # past the pair's transport timeout, pair idle
            d = room_data(1, 40, HIDDEN)
            s.send(d["embeddings"], d["fill_ids"], d["mrope_positions"])
            out["late"] = (s.poll().name, s.failure)
            store.set("late/sent", "1")
            out["next"] = _send(ctx, 2, 50).wait(20.0).name
        else:
            r = ctx.language.receiver(1, src_rank=0)
            assert r.init()
            store.set("late/asked", "1")
            _wait(lambda: r.poll() in TERMINAL, "the late room to end")
            out["late"] = (r.poll().name, r.failure)
            store.wait(["late/sent"])
            out["next"] = _recv(ctx, 2, 50)
        return out
    finally:
        ctx.shutdown()


def test_late_request_ends_its_room_not_the_pair() -> None:
    """Bug 1: a room whose data comes after the pair's transport timeout, on an
    otherwise idle pair, fails on both sides at bootstrap_timeout (its ALLOC
    answered by an ABORT frame), and the next room on the same pair is
    bit-exact. Before, the Language rank's posted meta recv hit the Gloo
    timeout, the pair was dead for good, and the Embedding rank never knew."""
    emb, lang = spawn(2, _late_request, timeout=90.0)
    assert emb["late"][0] == "FAILED" and "send()" in emb["late"][1], emb
    assert lang["late"][0] == "FAILED" and "send()" in lang["late"][1], lang
    assert emb["next"] == "SUCCESS", emb
    assert lang["next"] == [], lang


# ---------------------------------------------------------------- bug 5


def _socket_count() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


def _file_barrier(tag: str, rank: int, world: int, timeout: float = 30.0) -> None:
    """Every rank reaches `tag` before any goes on, through files: between two
    worlds there is no store to meet in. Without it a rank that shut down
    first could connect to the other's old store, still up on the same
    address, and the test would measure that race instead of shutdown."""
    import tempfile
    d = Path(tempfile.gettempdir()) / "disagg-twice"
    d.mkdir(exist_ok=True)
    (d / f"{tag}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all((d / f"{tag}.{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tag}: not every rank arrived within {timeout:g}s")
        time.sleep(0.01)


def _twice(rank: int, world: int, init_method: str, port: int) -> dict[str, Any]:
    """init -> one room -> shutdown, twice, on the same TCP address, with no
    garbage collection in between."""
    import gc
    gc.disable()  # what a caller may not rely on: shutdown alone must free everything
    out: dict[str, Any] = {"before": _socket_count(), "after": []}
    for round_ in range(2):
        if round_:  # both ranks shut the first world down before either starts the next
            _file_barrier(f"{port}-{round_}", rank, world)
        ctx = disagg.init(_cfg(peer_timeout=5.0), rank=rank, world_size=world,
                          init_method=f"tcp://127.0.0.1:{port}")
        room = 10 + round_
        if rank == 0:
            out.setdefault("status", []).append(_send(ctx, room, 30).wait(20.0).name)
        else:
            out.setdefault("bad", []).extend(_recv(ctx, room, 30))
        ctx.shutdown()
        out["after"].append(_socket_count())
    return out


def test_shutdown_closes_every_socket_and_group_without_gc() -> None:
    """Bug 5: ctx.shutdown() left sockets (the TCPStore server's among them) and
    process groups alive until garbage collection, so a second init on the
    same address hung or failed. Now shutdown alone frees them."""
    port = free_port()
    emb, lang = spawn(2, _twice, port, timeout=90.0)
    assert emb["status"] == ["SUCCESS", "SUCCESS"], emb
    assert lang["bad"] == [], lang
    for who, o in (("embedding", emb), ("language", lang)):
        assert o["after"] == [o["before"], o["before"]], (who, o)


# ---------------------------------------------------------------- a frozen peer


def _frozen_peer(rank: int, world: int, init_method: str) -> dict[str, Any]:
    import datetime
    import signal
    peer_timeout = 2.0
    ctx = disagg.init(_cfg(peer_timeout=peer_timeout, bootstrap_timeout=30.0), rank=rank,
                      world_size=world, init_method=init_method)
    store = disagg.context.dist.distributed_c10d._get_default_store()
    if rank == 0:
        store.set("frozen/pid", str(os.getpid()))
        store.wait(["frozen/done"], datetime.timedelta(seconds=60))
        ctx.shutdown()
        return {}
    r = ctx.language.receiver(1, src_rank=0)
    assert r.init()  # a frame is owed: the receiver thread waits in a Gloo recv
    pid = int(store.get("frozen/pid"))
    os.kill(pid, signal.SIGSTOP)  # stopped, not dead: its sockets stay open
    try:
        t0 = time.monotonic()
        ctx.shutdown()
        took = time.monotonic() - t0
        health = ctx.health()
    finally:
        os.kill(pid, signal.SIGCONT)
    store.set("frozen/done", "1")
    return {"took": took, "health": health, "status": r.poll().name, "failure": r.failure,
            "peer_timeout": peer_timeout}


def test_shutdown_with_a_frozen_peer_returns_within_peer_timeout() -> None:
    """Decided in DESIGN: shutdown() with a frozen (SIGSTOPped) Embedding rank
    returns within peer_timeout; the receiver thread blocked in a Gloo recv
    that cannot be cancelled is reported by ctx.health() (it is a daemon that
    ends at the pair's timeout, or when the peer goes)."""
    _, lang = spawn(2, _frozen_peer, timeout=90.0)
    assert lang["took"] < lang["peer_timeout"] + 1.5, lang
    assert lang["status"] == "FAILED" and "shut down" in (lang["failure"] or ""), lang
    assert "blocked in a recv" in str(lang["health"][0].get("receiver")), lang["health"]


# ---------------------------------------------------------------- contexts in one world


def _contexts_in_one_world(rank: int, world: int, init_method: str) -> dict[str, Any]:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    out: dict[str, Any] = {"status": [], "bad": []}
    try:
        for round_, hidden in enumerate((HIDDEN, 2 * HIDDEN)):  # another geometry the 2nd time
            ctx = disagg.init(_cfg(peer_timeout=5.0).replace(hidden_size=hidden))
            room, seq = 20 + round_, 30
            d = room_data(room, seq, hidden)
            if rank == 0:
                s = ctx.embedding.sender(room)
                s.send(d["embeddings"], d["fill_ids"], d["mrope_positions"], aux=(room,))
                out["status"].append(s.wait(20.0).name)
            else:
                r = ctx.language.receiver(room, src_rank=0)
                _wait(r.init, "blocks")
                _wait(lambda r=r: r.poll() in TERMINAL, f"room {room}")
                out["status"].append(r.poll().name)
                if r.poll() is TransferStatus.SUCCESS:
                    out["bad"] += mismatches(r.result(), d, (room,), room, seq)
            ctx.shutdown()
        out["world_still_up"] = dist.is_initialized()
    finally:
        dist.destroy_process_group()
    return out


def test_init_shutdown_init_in_one_world() -> None:
    """Issue 18: a second disagg.init in the same torch.distributed world read the
    first context's start-up entries in the c10d store (its address, its
    geometry): rooms failed, or a spurious GeometryMismatch. Each context now
    has its own keys."""
    emb, lang = spawn(2, _contexts_in_one_world, timeout=90.0)
    assert emb["status"] == lang["status"] == ["SUCCESS", "SUCCESS"], (emb, lang)
    assert lang["bad"] == []
    assert emb["world_still_up"] and lang["world_still_up"]  # the caller's world is left alone
