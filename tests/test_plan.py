"""Pure layer (cheapest first): block arithmetic and segment plans.

No processes, no sockets, no tensors: integers in, integers out. Both ends of a
pair derive their sends/recvs from `segment_plan`, so these properties are what
keeps NCCL/Gloo order-and-size matching sound.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.plan import (
    Segment,
    alloc_blocks_for,
    chunk_tokens,
    num_blocks_for,
    runs,
    segment_plan,
)

FAST = settings(max_examples=200, deadline=None)


@st.composite
def block_lists(draw, max_blocks: int = 24, max_id: int = 64):
    """Unique block ids in any order, biased towards contiguous runs (as the allocator hands out)."""
    pieces = draw(st.lists(st.tuples(st.integers(0, max_id), st.integers(1, 6)),
                           min_size=1, max_size=8))
    ids: list[int] = []
    seen: set[int] = set()
    for start, length in pieces:
        for b in range(start, start + length):
            if b not in seen and len(ids) < max_blocks:
                seen.add(b)
                ids.append(b)
    return ids


@st.composite
def plans(draw):
    ids = draw(block_lists())
    bs = draw(st.integers(1, 16))
    n = draw(st.integers(1, len(ids) * bs))
    return ids, bs, n


# ------------------------------------------------------------------ num_blocks_for


@pytest.mark.parametrize(("tokens", "bs", "blocks"), [
    (0, 128, 0), (1, 128, 1), (127, 128, 1), (128, 128, 1), (129, 128, 2),
    (8000, 128, 63), (8064, 128, 63), (8065, 128, 64), (8192, 128, 64), (5, 1, 5),
])
def test_num_blocks_for_examples(tokens, bs, blocks):
    assert num_blocks_for(tokens, bs) == blocks


@FAST
@given(st.integers(0, 10**6), st.integers(1, 4096))
def test_num_blocks_for_is_ceil(tokens, bs):
    nb = num_blocks_for(tokens, bs)
    assert nb * bs >= tokens
    assert (nb - 1) * bs < tokens or nb == 0


@pytest.mark.parametrize(("tokens", "bs"), [(-1, 128), (10, 0), (10, -3)])
def test_num_blocks_for_rejects_bad_input(tokens, bs):
    with pytest.raises(ValueError):
        num_blocks_for(tokens, bs)


# ------------------------------------------------------------------ alloc_blocks_for


def test_regression_8000_tokens_block_128_is_63_blocks_8064_tokens():
    # Asking 8000 tokens takes whole blocks: 63 of them, i.e. 8064 tokens, never 8000.
    blocks = alloc_blocks_for(8000, 128, None, 512)
    assert blocks == 63
    assert blocks * 128 == 8064
    assert num_blocks_for(8000, 128) * 128 == 8064
    # Same when the room is known to need exactly that much.
    assert alloc_blocks_for(8000, 128, 8000, 512) == 63


@pytest.mark.parametrize(("request_", "bs", "remaining", "max_blocks", "expected"), [
    (8192, 128, None, 512, 64),
    (8192, 128, 300, 512, 3),     # never more than the rest of the room needs
    (8192, 128, None, 10, 10),    # nor the whole pool
    (100, 128, None, 512, 1),
    (0, 128, None, 512, 1),       # at least one block
    (10, 4, 0, 512, 1),
    (1, 1, None, 1, 1),
])
def test_alloc_blocks_for_examples(request_, bs, remaining, max_blocks, expected):
    assert alloc_blocks_for(request_, bs, remaining, max_blocks) == expected


@FAST
@given(st.integers(0, 10**5), st.integers(1, 512), st.none() | st.integers(0, 10**5),
       st.integers(1, 4096))
def test_alloc_blocks_for_properties(request_, bs, remaining, max_blocks):
    nb = alloc_blocks_for(request_, bs, remaining, max_blocks)
    want = request_ if remaining is None else min(request_, remaining)
    assert 1 <= nb <= max_blocks
    assert nb == max(1, min(-(-want // bs), max_blocks))
    if num_blocks_for(want, bs) <= max_blocks:
        assert nb * bs >= want  # a request that fits the pool is fully covered
        assert (nb - 1) * bs < max(want, 1)  # ...by the fewest whole blocks


# ------------------------------------------------------------------ chunk_tokens


@pytest.mark.parametrize(("seq", "sent", "alloc", "expected"), [
    (10000, 0, 8064, 8064), (10000, 8064, 8064, 1936), (100, 0, 8064, 100),
    (100, 99, 1, 1), (128, 0, 128, 128),
])
def test_chunk_tokens_examples(seq, sent, alloc, expected):
    assert chunk_tokens(seq, sent, alloc) == expected


@pytest.mark.parametrize(("seq", "sent", "alloc"), [
    (100, 100, 8),   # nothing left to send
    (100, 101, 8),
    (100, -1, 8),
    (100, 0, 0),
    (0, 0, 8),
])
def test_chunk_tokens_rejects_bad_input(seq, sent, alloc):
    with pytest.raises(ValueError):
        chunk_tokens(seq, sent, alloc)


@FAST
@given(st.integers(1, 10**5), st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_chunks_add_up_to_seq_len(seq, allocs):
    sent, i = 0, 0
    while sent < seq:
        alloc = allocs[i % len(allocs)]
        n = chunk_tokens(seq, sent, alloc)
        assert n == min(seq - sent, alloc)
        sent += n
        i += 1
    assert sent == seq


# ------------------------------------------------------------------ runs


@pytest.mark.parametrize(("ids", "expected"), [
    ([], []),
    ([7], [(7, 1)]),
    ([0, 1, 2, 3], [(0, 4)]),
    ([4, 5, 1, 2, 9], [(4, 2), (1, 2), (9, 1)]),
    ([3, 2, 1], [(3, 1), (2, 1), (1, 1)]),  # runs only go upwards, in list order
    ([0, 1, 3, 4, 5, 7], [(0, 2), (3, 3), (7, 1)]),
])
def test_runs_examples(ids, expected):
    assert runs(ids) == expected


@FAST
@given(block_lists())
def test_runs_expand_back_to_the_list(ids):
    rs = runs(ids)
    assert [b for first, n in rs for b in range(first, first + n)] == ids
    assert all(n >= 1 for _, n in rs)
    # maximal: a run never continues straight into the next one
    for (f1, n1), (f2, _) in itertools.pairwise(rs):
        assert f1 + n1 != f2


# ------------------------------------------------------------------ segment_plan


def test_segment_plan_examples():
    assert segment_plan([4, 5, 1], 4, 10) == [Segment(0, 8, 16), Segment(8, 2, 4)]
    assert segment_plan([4, 5, 1], 4, 8) == [Segment(0, 8, 16)]  # run [1] not touched
    assert segment_plan([0, 1, 2], 128, 300) == [Segment(0, 300, 0)]
    assert segment_plan([2, 0], 3, 6) == [Segment(0, 3, 6), Segment(3, 3, 0)]


@FAST
@given(plans())
def test_segments_tile_the_chunk_in_order(plan_input):
    ids, bs, n = plan_input
    plan = segment_plan(ids, bs, n)
    pos = 0
    for seg in plan:
        assert seg.chunk_start == pos  # no gap, no overlap, in order
        assert seg.num_tokens >= 1
        pos += seg.num_tokens
    assert pos == n


@FAST
@given(plans())
def test_every_token_lands_where_the_block_list_says(plan_input):
    ids, bs, n = plan_input
    plan = segment_plan(ids, bs, n)
    landed = {}
    for seg in plan:
        for k in range(seg.num_tokens):
            landed[seg.chunk_start + k] = seg.dst_token + k
    assert landed == {i: ids[i // bs] * bs + i % bs for i in range(n)}


@FAST
@given(plans())
def test_each_segment_lies_in_one_run_and_segments_match_runs_touched(plan_input):
    ids, bs, n = plan_input
    plan = segment_plan(ids, bs, n)
    touched = ids[:num_blocks_for(n, bs)]
    touched_runs = runs(touched)
    assert len(plan) == len(touched_runs)
    for seg, (first, length) in zip(plan, touched_runs, strict=True):
        assert seg.dst_token == first * bs
        assert seg.chunk_start % bs == 0
        # the whole segment stays inside blocks [first, first + length)
        assert first * bs <= seg.dst_token
        assert seg.dst_token + seg.num_tokens <= (first + length) * bs


@FAST
@given(plans())
def test_destinations_are_distinct(plan_input):
    ids, bs, n = plan_input
    dst = [s.dst_token + k for s in segment_plan(ids, bs, n) for k in range(s.num_tokens)]
    assert len(set(dst)) == n


def test_contiguous_blocks_give_one_segment():
    assert segment_plan(list(range(10, 74)), 128, 8000) == [Segment(0, 8000, 1280)]


@FAST
@given(st.lists(st.integers(0, 100), max_size=5), st.integers(1, 64), st.integers(1, 10**6),
       st.integers(0, 10**6))
def test_direct_plan_is_one_segment_at_dst_offset(ids, bs, n, offset):
    # direct: the blocks are only credit, so their number and layout do not matter
    assert segment_plan(ids, bs, n, direct=True, dst_offset=offset) == [Segment(0, n, offset)]


@FAST
@given(block_lists(), st.integers(1, 16), st.integers(1, 100))
def test_more_tokens_than_capacity_raises(ids, bs, extra):
    capacity = len(ids) * bs
    with pytest.raises(ValueError, match=f"exceeds {len(ids)} blocks"):
        segment_plan(ids, bs, capacity + extra)


def test_exact_capacity_is_fine_one_more_is_not():
    assert segment_plan([3, 4], 4, 8) == [Segment(0, 8, 12)]
    with pytest.raises(ValueError):
        segment_plan([3, 4], 4, 9)
    with pytest.raises(ValueError):
        segment_plan([], 4, 1)


@pytest.mark.parametrize("n", [0, -1])
@pytest.mark.parametrize("direct", [False, True])
def test_empty_chunk_is_rejected(n, direct):
    with pytest.raises(ValueError, match="must be >= 1"):
        segment_plan([0, 1], 4, n, direct=direct)


@FAST
@given(plans())
def test_plan_is_a_pure_function(plan_input):
    ids, bs, n = plan_input
    before = list(ids)
    assert segment_plan(ids, bs, n) == segment_plan(tuple(ids), bs, n)
    assert ids == before
