"""In-process layer: the landed prefix of a room (DESIGN 0.2), for chunked
prefill that starts before the whole room is here. `Receiver.prefix()` gives
views (no copy) of the tokens landed so far; `RoomQueue.ready_tokens()` is
what every TP rank holds (the MIN, agreed in `step()`'s one all-reduce), and
`RoomQueue.prefix()` this rank's views of exactly those tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from disagg import queue as queue_mod
from disagg.config import DisaggConfig
from disagg.errors import DisaggError
from disagg.queue import RoomQueue
from disagg.types import EmbeddingResult, TransferStatus

from .fakes import World
from .rooms import RoomData, room_data, send

pytestmark = pytest.mark.timeout(60)

EMB, BS = 0, 16


def cfg(recv_into: str = "output") -> DisaggConfig:
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=16, default_alloc_tokens=BS,
                        auto_resume=False, recv_into=recv_into)  # type: ignore[arg-type]


def same_prefix(p: EmbeddingResult, d: RoomData, n: int) -> bool:
    """`p` holds exactly the first n tokens of what was sent, bit for bit."""
    assert d.mrope_positions is not None and p.mrope_positions is not None
    return (p.embeddings.shape[0] == n
            and torch.equal(p.embeddings.view(torch.int16), d.embeddings[:n].view(torch.int16))
            and torch.equal(p.fill_ids, d.fill_ids[:n])
            and torch.equal(p.mrope_positions, d.mrope_positions[:, :n]))


@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_receiver_prefix_grows_chunk_by_chunk_without_a_copy(recv_into: str) -> None:
    with World(cfg(recv_into), auto_control=True) as w:
        d = room_data(w.cfg, 1, 3 * BS + 5)
        r = w.lang().receiver(1, src_rank=EMB)
        empty = r.prefix()
        assert empty.embeddings.shape == (0, 32) and empty.aux == ()
        s = w.emb().sender(1)
        send(s, d)
        assert r.init(num_tokens=BS)
        seen = []
        while True:
            w.run_until(lambda: r.needs_resume or r.poll() is TransferStatus.SUCCESS,
                        "the next chunk")
            n = r.progress[0]
            p = r.prefix()
            assert same_prefix(p, d, n) and p.aux == d.aux
            seen.append(n)
            if r.poll() is TransferStatus.SUCCESS:
                break
            if seen[-1] > BS:  # a view of the room's own output: no copy was made
                assert p.embeddings.data_ptr() == r.prefix().embeddings.data_ptr()
            assert r.resume(num_tokens=BS)
        assert seen == [BS, 2 * BS, 3 * BS, 3 * BS + 5]
        assert r.prefix() is r.result()  # after SUCCESS: the very tensors of result()
        assert w.ended(s, "the sender") is TransferStatus.SUCCESS
        w.settle_whole()


def test_prefix_of_a_failed_room_is_an_error() -> None:
    with World(cfg(), auto_control=True) as w:
        r = w.lang().receiver(2, src_rank=EMB)
        r.abort("gone")
        with pytest.raises(DisaggError, match="no prefix: it failed"):
            r.prefix()
        w.settle_whole()


def test_queue_ready_tokens_is_what_every_tp_rank_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other TP rank (scripted) holds fewer tokens: ready_tokens is its count,
    identical to what it would compute, never decreasing; q.prefix is this
    rank's views of exactly that many tokens."""
    window, seq = 4, 3 * BS
    other = {"landed": 0}

    def all_reduce(buf: torch.Tensor, op: Any = None, group: Any = None) -> None:
        h = queue_mod._HEADER
        theirs = buf.clone()
        if other["landed"] < seq:  # the other rank's room is still transferring
            theirs[h] = int(TransferStatus.TRANSFERRING)
        theirs[h + 2 * window] = other["landed"]  # the first room of the window
        torch.minimum(buf, theirs, out=buf)

    monkeypatch.setattr(queue_mod.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)
    with World(cfg(), auto_control=True) as w:
        q = RoomQueue(w.lang(), object(), window=window)
        d = room_data(w.cfg, 3, seq)
        send(w.emb().sender(3), d)
        q.add(3, src_rank=EMB)
        history = []
        for other_has in (0, BS, BS, 2 * BS):
            other["landed"] = other_has

            def agreed(target: int = other_has) -> bool:
                q.step()
                return q.ready_tokens(3) >= target
            w.run_until(agreed, f"{other_has} tokens agreed")
            n = q.ready_tokens(3)
            history.append(n)
            assert n == other_has  # what every rank holds: never ahead of any
            assert same_prefix(q.prefix(3), d, n)
        assert history == [0, BS, BS, 2 * BS]
        other["landed"] = seq
        done: list[Any] = []
        w.run_until(lambda: bool(done.extend(q.step()[0]) or done), "the room done")
        assert done[0][0] == 3 and same_prefix(done[0][1], d, seq)
        with pytest.raises(ValueError, match="not in this queue"):
            q.ready_tokens(3)
        w.settle_whole()
