"""Pure layer (cheapest first): the block allocator and the Language pool's buffers.

No processes, no sockets: a stateful hypothesis model of `BlockAllocator` (exact
ids, not just counts), its misuse errors, a thread smoke test, and the shapes and
views of `BlockPool`'s landing buffers, and large result tensors' huge pages.
"""

from __future__ import annotations

import random
import resource
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from disagg.config import DisaggConfig
from disagg.errors import PoolFull
from disagg.geometry import PACKED_IDS, Geometry
from disagg.pages import empty_result
from disagg.plan import segment_plan
from disagg.pool import BlockAllocator, BlockPool

FAST = settings(max_examples=200, deadline=None)
OWNERS = st.integers(0, 4)


def free_runs(owner_of: list[int | None]) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of free blocks, by start."""
    out: list[tuple[int, int]] = []
    for b, o in enumerate(owner_of):
        if o is not None:
            continue
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def expected_ids(owner_of: list[int | None], n: int) -> list[int]:
    """The documented policy, written independently: the smallest free run that
    holds all n (lowest id on ties), else the largest runs first (lowest id on ties)."""
    rs = free_runs(owner_of)
    fits = [r for r in rs if r[1] >= n]
    if fits:
        start, _ = min(fits, key=lambda r: (r[1], r[0]))
        return list(range(start, start + n))
    ids: list[int] = []
    for start, length in sorted(rs, key=lambda r: (-r[1], r[0])):
        take = min(length, n - len(ids))
        ids.extend(range(start, start + take))
        if len(ids) == n:
            break
    return ids


# ------------------------------------------------------------------ stateful model


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(total=st.integers(1, 40))
    def setup(self, total):
        self.total = total
        self.alloc = BlockAllocator(total)
        self.owner_of: list[int | None] = [None] * total

    # -- helpers
    def owned(self, owner: int) -> list[int]:
        return [b for b, o in enumerate(self.owner_of) if o == owner]

    def free_count(self) -> int:
        return sum(o is None for o in self.owner_of)

    def assert_unchanged(self) -> None:
        assert self.alloc.num_free == self.free_count()
        for owner in range(5):
            assert self.alloc.owned_by(owner) == self.owned(owner)

    # -- rules
    @rule(n=st.integers(1, 45), owner=OWNERS)
    def allocate(self, n, owner):
        free = self.free_count()
        if n > free:
            with pytest.raises(PoolFull):
                self.alloc.allocate(n, owner)
            assert self.alloc.try_allocate(n, owner) is None
            self.assert_unchanged()
            return
        fits_one_run = any(length >= n for _, length in free_runs(self.owner_of))
        want = expected_ids(self.owner_of, n)
        ids = self.alloc.allocate(n, owner)
        assert ids == want
        assert len(ids) == n == len(set(ids))
        assert all(self.owner_of[b] is None for b in ids)
        if fits_one_run:
            assert ids == list(range(ids[0], ids[0] + n))
        for b in ids:
            self.owner_of[b] = owner

    @rule(owner=OWNERS, data=st.data())
    def free_some(self, owner, data):
        mine = self.owned(owner)
        if not mine:
            self.alloc.free([], owner)  # freeing nothing is a no-op
            self.assert_unchanged()
            return
        chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True))
        self.alloc.free(chosen, owner)
        for b in chosen:
            self.owner_of[b] = None

    @rule(n=st.integers(1, 45), owner=OWNERS)
    def free_then_reask_gives_same_ids(self, n, owner):
        if n > self.free_count():
            return
        first = self.alloc.allocate(n, owner)
        self.alloc.free(first, owner)
        again = self.alloc.allocate(n, owner)
        assert again == first
        for b in again:
            self.owner_of[b] = owner

    @precondition(lambda self: any(o is None for o in self.owner_of))
    @rule(owner=OWNERS, data=st.data())
    def double_free_raises(self, owner, data):
        free_ids = [b for b, o in enumerate(self.owner_of) if o is None]
        bad = data.draw(st.sampled_from(free_ids))
        good = self.owned(owner)[:2]
        with pytest.raises(ValueError, match="double free"):
            self.alloc.free([*good, bad], owner)
        self.assert_unchanged()

    @precondition(lambda self: any(o is not None for o in self.owner_of))
    @rule(data=st.data())
    def foreign_free_raises(self, data):
        taken = [b for b, o in enumerate(self.owner_of) if o is not None]
        b = data.draw(st.sampled_from(taken))
        other = data.draw(OWNERS.filter(lambda o: o != self.owner_of[b]))
        good = self.owned(other)[:2]
        with pytest.raises(ValueError, match=f"not owned by {other}"):
            self.alloc.free([*good, b], other)
        self.assert_unchanged()

    @rule(owner=OWNERS, bad=st.sampled_from(["neg", "total", "far"]))
    def out_of_range_free_raises(self, owner, bad):
        b = {"neg": -1, "total": self.total, "far": self.total + 1000}[bad]
        good = self.owned(owner)[:2]
        with pytest.raises(ValueError, match="out of range"):
            self.alloc.free([*good, b], owner)
        self.assert_unchanged()

    @precondition(lambda self: any(o is not None for o in self.owner_of))
    @rule(data=st.data())
    def duplicate_free_raises(self, data):
        taken = [b for b, o in enumerate(self.owner_of) if o is not None]
        b = data.draw(st.sampled_from(taken))
        owner = self.owner_of[b]
        with pytest.raises(ValueError, match="duplicate"):
            self.alloc.free([b, b], owner)
        self.assert_unchanged()

    # -- invariants
    @invariant()
    def counts_add_up(self):
        owned = sum(len(self.alloc.owned_by(o)) for o in range(5))
        assert self.alloc.num_free + owned == self.total
        assert self.alloc.num_free == self.free_count()

    @invariant()
    def no_block_owned_twice(self):
        seen: set[int] = set()
        for o in range(5):
            ids = self.alloc.owned_by(o)
            assert ids == self.owned(o)
            assert seen.isdisjoint(ids)
            seen.update(ids)


AllocatorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30,
                                              deadline=None)
TestAllocatorStateful = AllocatorMachine.TestCase


# ------------------------------------------------------------------ unit cases


def test_fresh_allocator_hands_out_from_the_start():
    a = BlockAllocator(8)
    assert a.num_free == 8
    assert a.allocate(3, owner=1) == [0, 1, 2]
    assert a.allocate(2, owner=2) == [3, 4]
    assert a.num_free == 3
    assert a.owned_by(1) == [0, 1, 2]


def test_prefers_smallest_fitting_run_then_largest_runs():
    a = BlockAllocator(10)
    a.allocate(10, owner=0)
    a.free([1, 2, 3, 4], 0)   # run of 4 at 1
    a.free([6, 7], 0)         # run of 2 at 6
    a.free([9], 0)            # run of 1 at 9
    assert a.allocate(2, owner=1) == [6, 7]           # smallest run that fits
    a.free([6, 7], 1)
    assert a.allocate(1, owner=1) == [9]
    a.free([9], 1)
    assert a.allocate(6, owner=1) == [1, 2, 3, 4, 6, 7]  # no run fits: largest first


def test_free_then_reask_same_count_gives_identical_ids():
    a = BlockAllocator(16)
    a.allocate(3, owner=7)
    first = a.allocate(5, owner=9)
    a.free(first, 9)
    assert a.allocate(5, owner=9) == first
    a.free(first, 9)
    assert a.allocate(5, owner=11) == first  # even for another room


def test_pool_full_only_beyond_free():
    a = BlockAllocator(4)
    a.allocate(3, owner=0)
    with pytest.raises(PoolFull, match="2 blocks asked, 1 of 4 free"):
        a.allocate(2, owner=1)
    assert a.try_allocate(2, owner=1) is None
    assert a.allocate(1, owner=1) == [3]
    with pytest.raises(PoolFull):
        a.allocate(1, owner=1)
    with pytest.raises(PoolFull):
        BlockAllocator(4).allocate(5, owner=0)


@pytest.mark.parametrize(("blocks", "owner", "match"), [
    ([2, 3], 1, "double free"),
    ([0, 5], 0, "not owned by 0"),     # 5 belongs to owner 1
    ([0, 0], 0, "duplicate"),
    ([0, -1], 0, "out of range"),
    ([0, 8], 0, "out of range"),
    ([0, 100], 0, "out of range"),
])
def test_bad_free_raises_and_frees_nothing(blocks, owner, match):
    a = BlockAllocator(8)
    assert a.allocate(2, owner=0) == [0, 1]
    assert a.allocate(4, owner=1) == [2, 3, 4, 5]
    a.free([2, 3, 4], 1)  # now 0,1 -> owner 0; 5 -> owner 1; 2,3,4,6,7 free
    before = (a.num_free, a.owned_by(0), a.owned_by(1))
    assert before == (5, [0, 1], [5])
    with pytest.raises(ValueError, match=match):
        a.free(blocks, owner)
    assert (a.num_free, a.owned_by(0), a.owned_by(1)) == before


def test_free_is_exactly_once():
    a = BlockAllocator(4)
    ids = a.allocate(4, owner=3)
    a.free(ids, 3)
    assert a.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        a.free(ids, 3)
    assert a.num_free == 4


@pytest.mark.parametrize(("n", "owner"), [(0, 0), (-1, 0), (1, -1)])
def test_allocate_rejects_bad_arguments(n, owner):
    a = BlockAllocator(4)
    with pytest.raises(ValueError):
        a.allocate(n, owner)
    assert a.num_free == 4


@pytest.mark.parametrize("n", [0, -5])
def test_allocator_needs_a_block(n):
    with pytest.raises(ValueError):
        BlockAllocator(n)


def test_thread_safety_smoke():
    total = 64
    a = BlockAllocator(total)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def hammer(owner: int) -> None:
        rng = random.Random(owner)
        held: list[list[int]] = []
        try:
            barrier.wait()
            for _ in range(1500):
                if held and (rng.random() < 0.5 or len(held) > 4):
                    a.free(held.pop(rng.randrange(len(held))), owner)
                else:
                    ids = a.try_allocate(rng.randint(1, 8), owner)
                    if ids is not None:
                        held.append(ids)
                mine = sorted(b for ids in held for b in ids)
                assert a.owned_by(owner) == mine  # nobody else touched my blocks
            for ids in held:
                a.free(ids, owner)
        except BaseException as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert a.num_free == total
    assert all(a.owned_by(o) == [] for o in range(4))
    assert a.allocate(total, owner=9) == list(range(total))


# ------------------------------------------------------------------ BlockPool


def geometry(**kw) -> Geometry:
    cfg = DisaggConfig(hidden_size=8, block_size=4, num_blocks=6,
                       extra_buffers={"deepstack": ((3, 8), "float32")}, **kw)
    return Geometry.from_config(cfg)


def test_pool_buffer_shapes_and_dtypes():
    pool = BlockPool(geometry(), torch.device("cpu"), with_buffers=True)
    got = {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in pool.buffers.items()}
    assert got == {  # the wire's buffers: fill_ids and positions packed side by side
        "embeddings": ((6, 4, 8), torch.bfloat16, "cpu"),
        PACKED_IDS: ((6, 4, 4), torch.int32, "cpu"),
        "deepstack": ((6, 4, 3, 8), torch.float32, "cpu"),
    }
    assert pool.allocator.num_blocks == 6 and pool.allocator.num_free == 6


def test_pool_without_mrope_has_no_mrope_buffer():
    pool = BlockPool(geometry(mrope=False), torch.device("cpu"), with_buffers=True)
    assert sorted(pool.buffers) == ["deepstack", "embeddings", "fill_ids"]


def test_pool_without_buffers_is_only_an_allocator():
    pool = BlockPool(geometry(), torch.device("cpu"), with_buffers=False)
    assert pool.buffers == {}
    assert pool.allocator.num_blocks == 6


@pytest.mark.parametrize("name", ["embeddings", PACKED_IDS, "deepstack"])
def test_token_view_is_a_contiguous_view_into_the_blocks(name):
    pool = BlockPool(geometry(), torch.device("cpu"), with_buffers=True)
    buf = pool.buffers[name]
    buf.zero_()
    v = pool.token_view(name, 5, 7)  # tokens 5..11: block 1 offset 1 .. block 2 offset 3
    assert tuple(v.shape) == (7, *buf.shape[2:])
    assert v.is_contiguous()
    token_bytes = buf[0, 0].numel() * buf.element_size()
    assert v.data_ptr() == buf.data_ptr() + 5 * token_bytes  # a view, not a copy
    v.copy_(torch.arange(1, 8).view(7, *([1] * (v.dim() - 1))).expand_as(v))
    flat = buf.reshape(24, -1)[:, 0]
    assert flat.tolist() == [0] * 5 + [1, 2, 3, 4, 5, 6, 7] + [0] * 12
    assert buf[1, 1].flatten()[0].item() == 1 and buf[2, 3].flatten()[0].item() == 7


@FAST
@given(st.permutations(range(6)), st.integers(1, 6), st.integers(1, 24))
def test_plan_and_token_views_put_every_token_in_its_block(perm, nblocks, n):
    bs = 4
    block_ids = list(perm[:nblocks])
    n = min(n, nblocks * bs)
    pool = BlockPool(geometry(mrope=False), torch.device("cpu"), with_buffers=True)
    buf = pool.buffers["fill_ids"]
    buf.fill_(-1)
    chunk = torch.arange(100, 100 + n, dtype=torch.int32)
    for seg in segment_plan(block_ids, bs, n):
        pool.token_view("fill_ids", seg.dst_token, seg.num_tokens).copy_(
            chunk[seg.chunk_start:seg.chunk_start + seg.num_tokens])
    for i in range(n):
        assert buf[block_ids[i // bs], i % bs].item() == 100 + i
    assert int((buf != -1).sum()) == n


# ------------------------------------------------------------------ result tensors


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.parametrize("shape,dtype", [((5, 7), torch.int32), ((3000, 3584), torch.bfloat16),
                                         ((0, 3), torch.int32)])
def test_empty_result_is_a_plain_tensor(shape, dtype):
    t = empty_result(shape, dtype, torch.device("cpu"))
    assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous()
    t.fill_(3)
    assert bool((t == 3).all())


@pytest.mark.skipif(_thp_mode() in ("never", "absent"),
                    reason="the kernel has transparent huge pages off")
def test_large_results_fault_in_huge_pages():
    """A 64 MiB result: touching it takes a fault per 2 MiB, not per 4 KiB page
    (16,384 of them), which is what halved large rooms' throughput."""
    nbytes = 64 << 20
    t = empty_result((nbytes // 2,), torch.bfloat16, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t.zero_()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < nbytes // 4096 // 4, f"{faults} minor faults for 64 MiB"
