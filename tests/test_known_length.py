"""Declared lengths on real ranks (Gloo over 127.0.0.1): rooms with and without
`seq_len=` mixed on one pair, two of them declared wrong (shorter, longer);
every other room bit-exact, the wrong ones FAILED on both sides with both
numbers, the pools whole. The interleavings are in tests/inproc."""

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


def _run(rank: int, world: int, init_method: str) -> dict[str, Any]:
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
            for room, (_, declared) in ROOMS.items():
                q.add(room, src_rank=0, seq_len=declared)
            deadline = time.monotonic() + 30
            while len(q) and time.monotonic() < deadline:
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
        return out
    finally:
        ctx.shutdown()


def test_declared_lengths_mixed_on_one_pair() -> None:
    emb, lang = spawn(2, _run, timeout=90.0)
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
