"""In-process layer: rooms declared as items (DESIGN 0.3): reuse through the
item cache, `needed()` before encoding, only the needed rows on the wire, and
fan-in of one room from several Embedding ranks, landing byte-exact with
pools whole."""

from __future__ import annotations

import pytest
import torch

from disagg import Item
from disagg import queue as queue_mod
from disagg.config import DisaggConfig
from disagg.errors import LockstepError
from disagg.queue import RoomQueue
from disagg.types import TransferStatus

from .fakes import World
from .rooms import RoomData, room_data

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def cfg(**kw: object) -> DisaggConfig:
    base: dict[str, object] = dict(num_embedding_ranks=2, hidden_size=32, block_size=16,
                                   num_blocks=64, item_cache_bytes=MiB, bootstrap_timeout=20.0)
    base.update(kw)
    return DisaggConfig(**base)  # type: ignore[arg-type]


def rows(c: DisaggConfig, key: int, n: int) -> RoomData:
    """An item's rows: the same for the same key, whichever room holds it."""
    return room_data(c, 1000 + key, n)


def cat(parts: list[RoomData]) -> RoomData:
    assert parts
    m = [p.mrope_positions for p in parts]
    return RoomData(room=-1, seq=sum(p.seq for p in parts),
                    embeddings=torch.cat([p.embeddings for p in parts]),
                    fill_ids=torch.cat([p.fill_ids for p in parts]),
                    mrope_positions=None if m[0] is None else torch.cat(m, dim=1),  # type: ignore[arg-type]
                    aux=(), extra={})


def give(s, d: RoomData, **kw: object) -> TransferStatus:
    return s.send(d.embeddings, d.fill_ids, d.mrope_positions, **kw)


def same(res, d: RoomData) -> bool:
    return (torch.equal(res.embeddings.view(torch.int16), d.embeddings.view(torch.int16))
            and torch.equal(res.fill_ids, d.fill_ids)
            and (d.mrope_positions is None or torch.equal(res.mrope_positions,
                                                          d.mrope_positions))
            and tuple(res.aux) == ())


def item(key: int, n: int, src: int | None = None) -> Item:
    return Item(b"k%d" % key, n, src)


def land(w: World, c: DisaggConfig, room: int, key: int, n: int, src: int = 0) -> None:
    """A room of one item from `src`, landed whole: the item is cached after."""
    r = w.lang().receiver(room, src_rank=src)
    assert r.init(items=[item(key, n)])
    s = w.emb(src).sender(room)
    give(s, rows(c, key, n))
    assert w.finish(r, f"room {room}") is TransferStatus.SUCCESS
    assert w.ended(s, f"sender {room}") is TransferStatus.SUCCESS


@pytest.mark.parametrize(("kw", "blocks"), [
    ({}, None), ({"recv_into": "pool"}, None),
    ({"recv_into": "pool", "auto_resume": False}, 2), ({}, 2)],
    ids=["output", "pool", "pool-resumes", "output-resumes"])
def test_fan_in_from_two_sources_lands_each_item_at_its_place(kw: dict,
                                                              blocks: int | None) -> None:
    c = cfg(**kw)
    with World(c, language_blocks=blocks) as w:
        table = [item(1, 20, 0), item(2, 33, 1), item(3, 7, 0)]  # source 0's rows are apart
        r = w.lang().receiver(9, src_rank=0)
        asked_all = r.init(items=table)  # a 2-block pool: the second lane waits for blocks
        s0, s1 = w.emb(0).sender(9), w.emb(1).sender(9)
        w.deliver_all()
        assert s0.needed() == [0, 2]
        give(s0, cat([rows(c, 1, 20), rows(c, 3, 7)]))
        if not asked_all:
            w.run_until(lambda: r.init(), "blocks for the second lane")
        w.deliver_all()
        assert s1.needed() == [1]
        give(s1, rows(c, 2, 33))
        assert w.finish(r, "the room") is TransferStatus.SUCCESS, r.failure
        assert same(r.result(), cat([rows(c, 1, 20), rows(c, 2, 33), rows(c, 3, 7)]))
        assert r.progress == (60, 60)
        if blocks:  # 27 and 33 rows through 32 tokens of pool: resume rounds
            assert w.counter(w.topology.language_ranks[0], "resumes") > 0
        for s in (s0, s1):
            assert w.ended(s, "a source") is TransferStatus.SUCCESS
        w.settle_whole()


def test_the_prefix_grows_over_landed_items_whichever_source_is_slow() -> None:
    c = cfg()
    with World(c) as w:
        # the second item's encoder is slow: prefill may start on the first
        r = w.lang().receiver(4, src_rank=0)
        assert r.init(items=[item(1, 16, 0), item(2, 16, 1)])
        s0, s1 = w.emb(0).sender(4), w.emb(1).sender(4)
        give(s0, rows(c, 1, 16))
        w.run_until(lambda: r.progress[0] == 16, "the first item landed")
        assert r.poll() is TransferStatus.TRANSFERRING
        assert same(r.prefix(), rows(c, 1, 16))
        give(s1, rows(c, 2, 16))
        assert w.finish(r, "room 4") is TransferStatus.SUCCESS
        w.ended(s0, "source 0")
        w.ended(s1, "source 1")
        # the first item's encoder is slow: nothing is a prefix until it lands
        r = w.lang().receiver(5, src_rank=0)
        assert r.init(items=[item(3, 16, 0), item(4, 16, 1)])
        s0, s1 = w.emb(0).sender(5), w.emb(1).sender(5)
        give(s1, rows(c, 4, 16))
        w.ended(s1, "source 1")
        assert r.progress == (0, 32) and len(r.prefix().embeddings) == 0
        give(s0, rows(c, 3, 16))
        assert w.finish(r, "room 5") is TransferStatus.SUCCESS
        assert same(r.prefix(), cat([rows(c, 3, 16), rows(c, 4, 16)]))
        w.ended(s0, "source 0")
        w.settle_whole()


def test_a_repeated_item_is_a_hit_copied_locally_and_never_sent() -> None:
    c = cfg()
    with World(c) as w:
        r = w.lang().receiver(1, src_rank=0)
        assert r.init(items=[item(1, 24), item(2, 40)])
        s = w.emb(0).sender(1)
        w.deliver_all()
        assert s.needed() == [0, 1]
        give(s, cat([rows(c, 1, 24), rows(c, 2, 40)]))
        assert w.finish(r, "room 1") is TransferStatus.SUCCESS
        r.result()
        w.ended(s, "sender 1")
        sent = w.counter(0, "bytes_sent")
        # the same image again, then a new one
        r2 = w.lang().receiver(2, src_rank=0)
        assert r2.init(items=[item(2, 40), item(3, 8)])
        assert r2.hits == [0]
        s2 = w.emb(0).sender(2)
        w.deliver_all()
        assert s2.needed() == [1]  # the encoder may skip the first image
        give(s2, rows(c, 3, 8))
        assert w.finish(r2, "room 2") is TransferStatus.SUCCESS
        assert same(r2.result(), cat([rows(c, 2, 40), rows(c, 3, 8)]))
        assert w.ended(s2, "sender 2") is TransferStatus.SUCCESS
        assert w.counter(0, "bytes_sent") - sent == 8 * c.hidden_size * 2 + 8 * 16
        snap = w.snapshot(w.topology.language_ranks[0])
        assert snap["item_hits"] == 1 and snap["item_misses"] == 3
        assert snap["item_bytes_reused"] == 40 * (c.hidden_size * 2 + 16)
        w.settle_whole()


def test_a_caller_that_does_not_ask_gives_every_row_and_only_the_needed_ones_leave() -> None:
    c = cfg()
    with World(c) as w:
        land(w, c, 1, 5, 30)
        sent = w.counter(0, "bytes_sent")
        # progressive, without needed(): three parts over [new 6][hit 30][new 10]
        s2 = w.emb(0).sender(2)
        whole = cat([rows(c, 6, 6), rows(c, 5, 30), rows(c, 7, 10)])
        r = w.lang().receiver(2, src_rank=0)
        assert r.init(items=[item(6, 6), item(5, 30), item(7, 10)])
        w.deliver_all()
        for lo, hi in ((0, 20), (20, 40), (40, 46)):
            part = RoomData(2, hi - lo, whole.embeddings[lo:hi], whole.fill_ids[lo:hi],
                            whole.mrope_positions[:, lo:hi].contiguous(), (), {})  # type: ignore[index]
            give(s2, part, **({"seq_len": 46} if lo == 0 else {}))
        assert w.finish(r, "room 2") is TransferStatus.SUCCESS
        assert same(r.result(), whole)
        assert w.ended(s2, "sender 2") is TransferStatus.SUCCESS
        assert w.counter(0, "bytes_sent") - sent == 16 * (c.hidden_size * 2 + 16)
        w.settle_whole()


def test_a_source_whose_items_are_all_hits_needs_nothing_and_ends_without_data() -> None:
    c = cfg()
    with World(c) as w:
        land(w, c, 1, 1, 16, src=1)
        r2 = w.lang().receiver(2, src_rank=0)
        assert r2.init(items=[item(1, 16, 1), item(9, 16, 0)])
        s1, s0 = w.emb(1).sender(2), w.emb(0).sender(2)
        w.deliver_all()
        assert s1.needed() == [] and s1.poll() is TransferStatus.SUCCESS
        assert give(s1, rows(c, 1, 16)) is TransferStatus.SUCCESS  # not asked: ignored
        give(s0, rows(c, 9, 16))
        assert w.finish(r2, "room 2") is TransferStatus.SUCCESS
        assert same(r2.result(), cat([rows(c, 1, 16), rows(c, 9, 16)]))
        w.ended(s0, "sender 0")
        w.settle_whole()


def test_a_key_seen_with_another_length_is_a_miss() -> None:
    c = cfg()
    with World(c) as w:
        land(w, c, 1, 1, 16)
        r2 = w.lang().receiver(2, src_rank=0)
        assert r2.init(items=[Item(b"k1", 17)])
        assert r2.hits == []
        s2 = w.emb(0).sender(2)
        w.deliver_all()
        assert s2.needed() == [0]
        give(s2, rows(c, 11, 17))
        assert w.finish(r2, "room 2") is TransferStatus.SUCCESS
        assert same(r2.result(), rows(c, 11, 17))
        w.ended(s2, "sender 2")
        w.settle_whole()


def test_one_source_failing_fails_the_room_and_ends_the_other_source() -> None:
    c = cfg()
    with World(c) as w:
        r = w.lang().receiver(3, src_rank=0)
        assert r.init(items=[item(1, 16, 0), item(2, 16, 1)])
        s0, s1 = w.emb(0).sender(3), w.emb(1).sender(3)
        w.deliver_all()
        give(s0, rows(c, 1, 16))
        s1.abort("encoder crashed")
        assert w.finish(r, "the room") is TransferStatus.FAILED
        assert "embedding rank 1" in r.failure and "encoder crashed" in r.failure
        assert w.ended(s0, "source 0") in (TransferStatus.FAILED, TransferStatus.SUCCESS)
        assert w.ended(s1, "source 1") is TransferStatus.FAILED
        w.settle_whole()


def test_bad_item_calls_raise_and_leave_the_room_untouched() -> None:
    c = cfg()
    with World(c) as w:
        r = w.lang().receiver(1, src_rank=0)
        with pytest.raises(ValueError, match=r"disagg\.Item"):
            r.init(items=["image"])
        with pytest.raises(ValueError, match="not an embedding rank"):
            r.init(items=[item(1, 4, 7)])
        with pytest.raises(ValueError, match="num_tokens"):
            r.init(8, items=[item(1, 4)])
        with pytest.raises(ValueError, match="sum to 4"):
            r.init(seq_len=5, items=[item(1, 4)])
        assert r.init(seq_len=4)  # the items were refused: the receiver still works
        s = w.emb(0).sender(1)
        w.deliver_all()
        assert s.needed() == [0]
        give(s, rows(c, 1, 4))
        assert w.finish(r, "room 1") is TransferStatus.SUCCESS
        w.ended(s, "sender 1")
        r2 = w.lang().receiver(2, src_rank=0)
        assert r2.init(items=[item(2, 8)])
        s2 = w.emb(0).sender(2)
        w.deliver_all()
        with pytest.raises(ValueError, match="no aux"):
            give(s2, rows(c, 2, 8), aux=(1,))
        with pytest.raises(ValueError, match="9 rows given"):
            give(s2, rows(c, 2, 9))
        give(s2, rows(c, 2, 8))
        assert w.finish(r2, "room 2") is TransferStatus.SUCCESS
        w.ended(s2, "sender 2")
        w.settle_whole()


def test_the_queue_decides_hits_at_add_and_catches_diverged_caches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(num_embedding_ranks=1)
    with World(c, auto_control=True) as w:
        q = RoomQueue(w.lang(), None)
        s = w.emb().sender(1)
        q.add(1, items=[item(1, 16, 0)])
        give(s, rows(c, 1, 16))
        done = w.run_until(lambda: q.step()[0], "room 1")
        assert same(done[0][1], rows(c, 1, 16))
        q.add(2, items=[item(1, 16, 0), item(2, 8, 0)])
        assert q.hits(2) == [0]
        s2 = w.emb().sender(2)
        assert q.step() == ([], [])  # its ALLOC leaves at the step
        assert s2.needed(timeout_s=5.0) == [1]
        give(s2, rows(c, 2, 8))
        done = w.run_until(lambda: q.step()[0], "room 2")
        assert same(done[0][1], cat([rows(c, 1, 16), rows(c, 2, 8)]))

        def all_reduce(buf: torch.Tensor, op: object = None, group: object = None) -> None:
            buf[6] = min(int(buf[6]), 12345)  # another rank's cache holds something else
        monkeypatch.setattr(queue_mod.dist, "all_reduce", all_reduce)
        monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)
        q2 = RoomQueue(w.lang(), object())
        with pytest.raises(LockstepError, match="item caches differ"):
            q2.step()
        w.settle_whole()


def test_an_alloc_that_asks_for_nothing_is_never_answered_with_a_frame() -> None:
    """A source all of whose items are hits is owed no frame: when its ALLOC
    waits for a sender() that never comes, the timeout refuses it by REJECT,
    and the pair's stream stays aligned for the next room."""
    c = cfg()
    with World(c) as w:
        land(w, c, 1, 1, 16, src=1)
        frames = len(w.link(1).metas())
        r2 = w.lang().receiver(2, src_rank=1)
        assert r2.init(items=[item(1, 16)])  # all hits: source 1 only told
        assert r2.poll() is TransferStatus.SUCCESS
        w.deliver_all()
        w.advance(c.bootstrap_timeout + 1.0)  # no sender(2) on rank 1: the lobby gives up
        assert len(w.link(1).metas()) == frames  # no frame for it
        r3 = w.lang().receiver(3, src_rank=1)
        assert r3.init(items=[item(7, 16)])
        s3 = w.emb(1).sender(3)
        give(s3, rows(c, 7, 16))
        assert w.finish(r3, "room 3") is TransferStatus.SUCCESS
        assert same(r3.result(), rows(c, 7, 16))
        w.ended(s3, "sender 3")
        w.settle_whole()


def test_an_alloc_that_lands_while_send_runs_still_cuts_the_rows() -> None:
    """send() reads the room's item table and hands its rows over in one hold of
    the engine lock: an ALLOC that sets the table at any moment of the call
    finds either no rows yet (and re-cuts them when they come) or rows already
    cut, never rows taken as a room without items."""
    c = cfg()
    with World(c) as w:
        land(w, c, 1, 5, 30)
        r = w.lang().receiver(2, src_rank=0)
        assert r.init(items=[item(6, 6), item(5, 30)])  # the second is a hit
        s = w.emb(0).sender(2)
        eng = w.emb(0)
        real = eng.cond

        class DeliverOnSecondHold:
            """The engine's condition; the second time send() takes it, the
            ALLOC waiting on the control channel is delivered first (a send()
            that took the lock twice would see the table appear in between)."""

            holds = 0

            def __enter__(self) -> object:
                self.holds += 1
                if self.holds == 2:
                    w.deliver_all()
                return real.__enter__()

            def __exit__(self, *exc: object) -> object:
                return real.__exit__(*exc)

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        eng.cond = DeliverOnSecondHold()  # type: ignore[assignment]
        try:
            give(s, cat([rows(c, 6, 6), rows(c, 5, 30)]))  # all of its rows, not asked
        finally:
            eng.cond = real
        w.deliver_all()
        assert w.finish(r, "room 2") is TransferStatus.SUCCESS, r.failure
        assert same(r.result(), cat([rows(c, 6, 6), rows(c, 5, 30)]))
        assert w.ended(s, "sender 2") is TransferStatus.SUCCESS
        w.settle_whole()


@pytest.mark.parametrize("ending", ["goodbye", "death"])
def test_an_alloc_that_asks_for_nothing_outlives_the_rank_that_sent_it(ending: str) -> None:
    """A Language rank whose items from a source were all hits tells that source
    so (an ALLOC that asks for nothing), has its room, and goes away before the
    source's encoder gets to `sender()`. Its part of the room is complete, as a
    lane all sent is (`SendMachine.peer_lost`): the room ends SUCCESS there and
    `needed()` is []. (`bench_items.py` hung on it: the ALLOC was dropped with
    its rank, and `needed()` waited for one that could never come.)"""
    c = cfg(bootstrap_timeout=60.0)  # the ALLOC outlasts the silence that kills its rank
    with World(c) as w:
        land(w, c, 1, key=1, n=16)  # item 1 is in the Language rank's cache now
        r = w.lang().receiver(2, src_rank=0)
        assert r.init(items=[item(1, 16)])  # a hit: source 0 is asked for nothing
        assert w.finish(r, "room 2") is TransferStatus.SUCCESS
        w.deliver_all()  # the ALLOC waits in source 0's lobby: no sender() yet
        lang = w.topology.language_ranks[0]
        if ending == "goodbye":
            w.control.start_auto()
            w.lang().close(5.0)
            w.control.stop_auto()
            w.deliver_all()
        else:
            w.kill(lang)
            w.advance(2 * c.peer_timeout)
        assert lang in w.emb(0).lost_peers()
        s = w.emb(0).sender(2)
        assert s.needed() == []
        assert w.ended(s, "sender 2") is TransferStatus.SUCCESS, s.failure
