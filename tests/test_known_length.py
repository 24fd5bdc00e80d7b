"""Declared lengths on real ranks (Gloo over 127.0.0.1): rooms with and without
`seq_len=` mixed on one pair, two of them declared wrong (shorter, longer);
every other room bit-exact, the wrong ones FAILED on both sides with both
numbers, the pools whole. Added all at once (the first room's frame is
pre-posted, the others are read meta first) and one at a time (every
declared ALLOC and every RESUME of a room the sender holds whole is
pre-posted: padded ABORTs for the wrong ones, and the pair stays in step).
The interleavings are in tests/inproc."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check_whole, spawn
from roomdata import mismatches, room_data

import disagg
from disagg import TransferStatus

pytestmark = pytest.mark.timeout(120)

HIDDEN = 48
TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)
# room -> (real length, declared length or None)
ROOMS = {1: (100, 100), 2: (300, None), 3: (257, 257), 4: (64, 32), 5: (64, 128),
         6: (1000, 1000), 7: (17, None), 8: (129, 129)}


def _run(rank: int, world: int, init_method: str, one_by_one: bool = False) -> dict[str, Any]:
    cfg = disagg.DisaggConfig(hidden_size=HIDDEN, block_size=16, num_blocks=128,
                              default_alloc_tokens=32)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {}
    try:
        if rank == 0:
            senders = {}
            for room, (seq, _) in ROOMS.items():
                d = room_data(room, seq, HIDDEN)
                senders[room] = s = ctx.embedding.sender(room)
                s.send(d["embeddings"], d["fill_ids"], d["mrope_positions"], aux=(room,))
            for room, s in senders.items():
                out[room] = (s.wait(30.0).name, s.failure)
        else:
            q = ctx.language.queue()
            todo = list(ROOMS.items())
            deadline = time.monotonic() + 30
            while (todo or len(q)) and time.monotonic() < deadline:
                while todo and not (one_by_one and len(q)):
                    room, (_, declared) = todo.pop(0)
                    q.add(room, src_rank=0, seq_len=declared)
                done, failed = q.step()
                for room, res in done:
                    seq = ROOMS[room][0]
                    out[room] = ("SUCCESS", mismatches(res, room_data(room, seq, HIDDEN),
                                                       (room,), room, seq))
                for room, why in failed:
                    out[room] = ("FAILED", why)
                time.sleep(0.001)
        time.sleep(0.2)
        out["whole"] = bool(check_whole(ctx, "at the end"))
        out["preposted"] = ctx.stats().get("preposted", 0)
        return out
    finally:
        ctx.shutdown()


@pytest.mark.parametrize("one_by_one", [False, True], ids=["together", "one_by_one"])
def test_declared_lengths_mixed_on_one_pair(one_by_one: bool) -> None:
    emb, lang = spawn(2, _run, one_by_one, timeout=90.0)
    for room, (seq, declared) in ROOMS.items():
        if declared in (None, seq):
            assert emb[room] == ("SUCCESS", None), (room, emb[room])
            assert lang[room] == ("SUCCESS", []), (room, lang[room])
        else:
            for who in (emb, lang):
                status, why = who[room]
                assert status == "FAILED" and f"seq_len={declared}" in why, (room, who[room])
                assert f"{seq} tokens" in why, (room, why)
    assert emb["whole"] and lang["whole"]
    # one at a time: the 6 declared ALLOCs, and RESUMEs of rooms held whole
    assert lang["preposted"] >= (6 if one_by_one else 1), lang["preposted"]
