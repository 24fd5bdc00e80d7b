"""`disagg.affinity`: rendezvous hashing of an instance (or request) onto k
Embedding ranks. Pure: deterministic, k distinct peers, and few choices move
when a peer joins or leaves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import disagg


def test_k_distinct_peers_best_first_and_deterministic() -> None:
    peers = {i: f"encoder-{i}" for i in range(16)}
    got = disagg.affinity(b"instance-3", peers, 4)
    assert len(got) == len(set(got)) == 4 and set(got) <= set(peers)
    assert disagg.affinity(b"instance-3", peers, 4) == got
    assert disagg.affinity(b"instance-3", peers, 2) == got[:2]  # best first
    assert disagg.affinity("instance-3", peers, 4) == got  # str and bytes keys agree
    assert disagg.affinity(b"x", {1: "a"}, 3) == [1]  # fewer peers than k: all
    assert sorted(disagg.affinity(7, [5, 6, 7], 3)) == [5, 6, 7]  # plain ranks work too


def test_a_rank_that_rejoins_under_its_name_keeps_its_keys() -> None:
    before = {0: "enc-a", 1: "enc-b", 2: "enc-c"}
    after = {0: "enc-a", 1: "enc-b", 9: "enc-c"}  # enc-c restarted with a new id
    for key in range(50):
        mapped = [{0: 0, 1: 1, 2: 9}[p] for p in disagg.affinity(key, before, 2)]
        assert disagg.affinity(key, after, 2) == mapped


@pytest.mark.parametrize(("kw", "why"), [({"k": 0}, "k=0"), ({"k": True}, "k=True")])
def test_bad_arguments_are_value_errors(kw: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        disagg.affinity(b"x", [1, 2], **kw)
    with pytest.raises(ValueError, match="no peers"):
        disagg.affinity(b"x", {}, 1)
    with pytest.raises(ValueError, match="key must be"):
        disagg.affinity(1.5, [1], 1)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 40), st.integers(1, 3), st.integers(0, 10**6))
def test_a_join_moves_few_choices_and_a_leave_only_the_ones_that_used_it(n: int, k: int,
                                                                          seed: int) -> None:
    peers = list(range(n))
    keys = [f"{seed}-{i}".encode() for i in range(400)]
    before = {key: set(disagg.affinity(key, peers, k)) for key in keys}
    joined = {key: set(disagg.affinity(key, [*peers, n], k)) for key in keys}
    moved = 0
    for key in keys:
        gone = before[key] - joined[key]
        assert len(gone) <= 1 and (not gone or joined[key] - before[key] == {n})
        moved += bool(gone)
    assert moved <= 400 * (k / (n + 1)) * 2 + 20  # about a k/(n+1) share
    left = {key: set(disagg.affinity(key, peers[1:], k)) for key in keys}
    for key in keys:
        if 0 not in before[key]:
            assert left[key] == before[key]  # untouched unless it used the leaver
        else:
            assert len(left[key] - before[key]) <= 1
