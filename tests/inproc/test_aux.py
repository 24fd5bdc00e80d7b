"""In-process layer: a room's aux values, from none to 1024 int64s (DESIGN 0.2:
e.g. mrope_position_delta, then each image's grid t, h, w). Up to eight ride
in the meta frame; more travel as one int64 tensor after the first chunk's
payload, with no extra rendezvous. Every later chunk repeats the count and
the first eight, and the Language rank checks them. Bit-exact, pool and
output modes, rooms of one chunk and of many."""

from __future__ import annotations

import dataclasses

import pytest

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

EMB = 0
EXTREMES = (-(1 << 63), (1 << 63) - 1, -1, 0, 1)


def aux_values(n: int) -> tuple[int, ...]:
    """n int64s: the extremes first, then values unique to their position."""
    return tuple((EXTREMES[i] if i < len(EXTREMES) else (i * 7919) - (1 << 40))
                 for i in range(n))


@pytest.mark.parametrize("recv_into", ["output", "pool"])
@pytest.mark.parametrize("n", [0, 1, 8, 9, 1024])
@pytest.mark.parametrize("seq", [20, 200], ids=["one_chunk", "many_chunks"])
def test_aux_values_arrive_exactly(recv_into: str, n: int, seq: int) -> None:
    cfg = DisaggConfig(hidden_size=32, block_size=16, num_blocks=16, default_alloc_tokens=48,
                       recv_into=recv_into)  # type: ignore[arg-type]
    with World(cfg, auto_control=True) as w:
        d = dataclasses.replace(room_data(w.cfg, 1, seq), aux=aux_values(n))
        s = w.emb().sender(1)
        send(s, d)
        r = w.lang().receiver(1, src_rank=EMB)
        assert r.init()
        assert w.finish(r, "the room") is TransferStatus.SUCCESS, r.failure
        assert r.result().aux == aux_values(n)
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "the sender") is TransferStatus.SUCCESS
        w.settle_whole()


def test_more_than_1024_aux_values_is_a_value_error_and_the_room_untouched() -> None:
    cfg = DisaggConfig(hidden_size=32, block_size=16, num_blocks=16)
    with World(cfg, auto_control=True) as w:
        s = w.emb().sender(2)
        d = room_data(w.cfg, 2, 20)
        with pytest.raises(ValueError, match="aux must be at most 1024 int64 values"):
            send(s, dataclasses.replace(d, aux=aux_values(1025)))
        with pytest.raises(ValueError, match="aux must be at most 1024 int64 values"):
            send(s, dataclasses.replace(d, aux=(1 << 63,)))  # not an int64
        assert s.poll() is TransferStatus.WAITING_FOR_INPUT  # untouched: the same room works
        send(s, d)
        r = w.lang().receiver(2, src_rank=EMB)
        assert r.init()
        assert w.finish(r, "the room") is TransferStatus.SUCCESS
        assert mismatches(r.result(), d) == []
        w.settle_whole()
