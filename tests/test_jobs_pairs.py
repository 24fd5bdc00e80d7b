"""Jobs mode past the cap (issue 28): two encoder jobs and one LLM process, all
with `max_pairs=1`, so no pair is warmed and each is made when a room needs
it. The LLM alternates rooms between the encoders: every switch closes the
idle pair (PAIR_CLOSE) and makes the other again, a control socket is
connected on first use, and an encoder may get an ALLOC before its own
roster has met the LLM (it reads the record from the store then). Every
byte checked; pools whole; `pairs_live` never above 1."""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any

import pytest
from harness import free_port
from test_faults import aux_of, make_data, mismatches

import disagg
from disagg.store import host_store
from disagg.types import TERMINAL, TransferStatus

pytestmark = pytest.mark.timeout(150)

HIDDEN, BS, ROOMS = 32, 16, 6


def cfg() -> disagg.DisaggConfig:
    return disagg.DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=32,
                               backend="gloo", host="127.0.0.1", bootstrap_timeout=30.0,
                               peer_timeout=5.0, max_pairs=1)


def seq_of(room: int) -> int:
    return 20 + (room * 37) % 90


def encoder(port: int, name: str, rooms: list[int], out: Any) -> None:
    try:
        ctx = disagg.join(cfg(), f"tcp://127.0.0.1:{port}", role="embedding", name=name)
        out.put((f"{name}/id", ctx.rank))
        res = []
        for room in rooms:
            s = ctx.embedding.sender(room)
            s.send(*make_data(room, seq_of(room), HIDDEN), aux=aux_of(room))
            res.append(s.wait(60.0).name)
        st = ctx.stats()
        out.put((name, {"sent": res, "pairs_live": st["pairs_live"],
                        "pairs_created": st["pairs_created"],
                        "whole": st["pool_free_blocks"] == st["pool_total_blocks"]}))
        ctx.shutdown(5.0)
    except BaseException:
        out.put((name, traceback.format_exc()))


def language(port: int, ids: dict[str, int], plan: list[tuple[int, str]], out: Any) -> None:
    try:
        ctx = disagg.join(cfg(), f"tcp://127.0.0.1:{port}", role="language", name="llm")
        deadline = time.monotonic() + 30
        while set(ctx.peers()) != set(ids.values()):
            assert time.monotonic() < deadline, ctx.peers()
            time.sleep(0.01)
        at_start = ctx.stats()["pairs_live"]
        bad: dict[int, Any] = {}
        peak = 0
        for room, name in plan:
            r = ctx.language.receiver(room, src_rank=ids[name])
            assert r.init()
            deadline = time.monotonic() + 60
            while r.poll() not in TERMINAL:
                peak = max(peak, int(ctx.stats()["pairs_live"]))  # type: ignore[call-overload]
                assert time.monotonic() < deadline, f"room {room} did not end"
                time.sleep(0.002)
            bad[room] = (mismatches(r.result(), room, seq_of(room), HIDDEN)
                         if r.poll() is TransferStatus.SUCCESS else r.failure)
        st = ctx.stats()
        out.put(("llm", {"bad": bad, "at_start": at_start, "peak": peak,
                         "pairs_created": st["pairs_created"], "pairs_closed": st["pairs_closed"],
                         "sockets": len(ctx._control._dealers),  # type: ignore[union-attr]
                         "whole": st["pool_free_blocks"] == st["pool_total_blocks"]}))
        ctx.shutdown(5.0)
    except BaseException:
        out.put(("llm", traceback.format_exc()))


def test_jobs_pairs_past_the_cap_are_made_and_closed_as_rooms_alternate() -> None:
    port = free_port()
    store = host_store(port, "127.0.0.1")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    plan = [(100 + i, "enc-a" if i % 2 == 0 else "enc-b") for i in range(ROOMS)]
    procs = [ctx.Process(target=encoder, daemon=True,
                         args=(port, n, [room for room, m in plan if m == n], out))
             for n in ("enc-a", "enc-b")]
    got: dict[str, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while not all(f"{n}/id" in got for n in ("enc-a", "enc-b")):
            who, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            assert not isinstance(value, str), f"{who}:\n{value}"
            got[who] = value
        ids = {n: got[f"{n}/id"] for n in ("enc-a", "enc-b")}
        procs.append(ctx.Process(target=language, args=(port, ids, plan, out), daemon=True))
        procs[-1].start()
        deadline = time.monotonic() + 120
        while not all(n in got for n in ("llm", "enc-a", "enc-b")):
            who, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            assert not isinstance(value, str), f"{who}:\n{value}"
            got[who] = value
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        del store
    llm = got["llm"]
    assert llm["bad"] == {room: [] for room, _ in plan}, llm["bad"]
    assert llm["at_start"] == 0 and llm["peak"] <= 1, llm  # past the cap: nothing warmed
    assert llm["pairs_created"] == ROOMS and llm["pairs_closed"] >= ROOMS - 1, llm
    assert llm["sockets"] == 2 and llm["whole"], llm
    for n in ("enc-a", "enc-b"):
        e = got[n]
        assert e["sent"] == ["SUCCESS"] * (ROOMS // 2) and e["whole"], e
        assert e["pairs_live"] <= 1 and e["pairs_created"] == ROOMS // 2, e
