"""fanout="scatter" on real ranks (Gloo over 127.0.0.1): what `disagg.init`
and `ctx.language` refuse. Transfers through scatter instances are in
test_topology.py (bit-exact on TP 2, 3 and 4, beside a copy instance)."""

from __future__ import annotations

from typing import Any

import pytest
from harness import spawn

import disagg

pytestmark = pytest.mark.timeout(120)


def _cfg(rank: int, fanouts: dict[int, str]) -> disagg.DisaggConfig:
    return disagg.DisaggConfig(language_tp_size=2, hidden_size=16, block_size=8, num_blocks=8,
                               fanout=fanouts.get(rank, "copy"), peer_timeout=5.0)  # type: ignore[arg-type]


def _init(rank: int, world: int, init_method: str, fanouts: dict[int, str]) -> dict[str, Any]:
    try:
        ctx = disagg.init(_cfg(rank, fanouts), rank=rank, world_size=world,
                          init_method=init_method)
    except disagg.DisaggError as e:
        return {"error": type(e).__name__, "message": str(e)}
    out: dict[str, Any] = {"error": None}
    try:
        if ctx.role == "language":
            try:
                ctx.language.receiver(1, src_rank=0)
            except disagg.DisaggError as e:
                out["receiver"] = str(e)
            ctx.language.queue()  # the way in for scatter
    finally:
        ctx.shutdown()
    return out


def test_ranks_of_one_instance_must_agree_on_fanout() -> None:
    """Every rank stops at init with the same message, none waits in new_group."""
    res = spawn(3, _init, {1: "scatter", 2: "copy"}, timeout=60.0)
    for r in res:
        assert r["error"] == "GeometryMismatch", res
        assert "fanout differs inside language instance 0" in r["message"], r


def test_bare_receiver_on_a_scatter_instance_says_to_use_the_queue() -> None:
    emb, a, b = spawn(3, _init, {1: "scatter", 2: "scatter"}, timeout=60.0)
    assert emb == {"error": None}
    for x in (a, b):
        assert x["error"] is None
        assert "fanout='scatter'" in x["receiver"] and "queue()" in x["receiver"], x
