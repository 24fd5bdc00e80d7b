"""Pure layer (cheapest first): configuration, geometry, topology and stats.

No processes, no sockets: `DisaggConfig` validation (every field, by name),
`Geometry` JSON round trips and compatibility checks, the `Topology` role split,
and the `Stats` snapshot.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.config import DTYPES, EMBEDDING_DTYPES, DisaggConfig
from disagg.errors import GeometryMismatch
from disagg.geometry import PACKED_IDS, BufferSpec, Geometry, Topology
from disagg.stats import MAX_SAMPLES, Stats

FAST = settings(max_examples=200, deadline=None)

# ------------------------------------------------------------------ DisaggConfig

INVALID: dict[str, list[object]] = {
    "num_embedding_ranks": [0, -1, 1.0, True, "1", None],
    "language_tp_size": [0, -2, 2.0, False, "2", None],
    "hidden_size": [0, -3584, 3584.0, True, "3584", None],
    "dtype": ["bf16", "float8", "", None, torch.bfloat16, 3, "int8", "int32", "uint8"],
    "block_size": [0, -128, 128.0, True, "128", None],
    "num_blocks": [0, -1, 256.5, True, "256", None, (1 << 20) + 1],
    "default_alloc_tokens": [0, -8192, 8192.0, True, "8192", "AUTO", None],
    "auto_resume": [1, 0, "True", None],
    "mrope": [1, 0, "yes", None],
    "extra_buffers": [[], "deepstack", None,
                      {"embeddings": ((3,), "float32")},
                      {"fill_ids": ((1,), "int32")},
                      {"mrope_positions": ((3,), "int32")},
                      {"not an identifier": ((3,), "float32")},
                      {"": ((3,), "float32")},
                      {1: ((3,), "float32")},
                      {"deepstack": ((3, 0), "bfloat16")},
                      {"deepstack": ((3, -1), "bfloat16")},
                      {"deepstack": ((3.0,), "bfloat16")},
                      {"deepstack": ((True,), "bfloat16")},
                      {"deepstack": (3, "bfloat16")},
                      {"deepstack": ((3,), "bf16")},
                      {"deepstack": ((3,), torch.bfloat16)},
                      {"deepstack": ((3,),)},
                      {"deepstack": ((3,), "bfloat16", "extra")},
                      {"deepstack": "bfloat16"}],
    "recv_into": ["", "pool ", "device", None, 1],
    "fanout": ["broadcast", "", None, 1],
    "backend": ["mpi", "NCCL", "", 1],
    "host": ["", "0.0.0.0", 127, b"127.0.0.1"],
    "bootstrap_timeout": [0, 0.0, -1, float("nan"), "300", None, True],
    "peer_timeout": [0, -0.5, float("nan"), "10", None, False],
    "slow_room_s": [0, -1.0, float("nan"), "10", True],
    "item_cache_bytes": [-1, 1.5, "1", True, None],
    "max_pairs": [0, -1, 1.5, "24", True, None],
    "pair_idle_s": [0, -1.0, "300", True, None],
    "step_timeout": [0, -1.0, "10", True, None],
}

VALID: dict[str, list[object]] = {
    "num_embedding_ranks": [1, 4],
    "language_tp_size": [1, 8],
    "hidden_size": [1, 4096],
    "dtype": list(EMBEDDING_DTYPES),
    "block_size": [1, 16, 128],
    "num_blocks": [1, 4096],
    "default_alloc_tokens": [1, 8192, "auto"],
    "auto_resume": [True, False],
    "mrope": [True, False],
    "extra_buffers": [{}, {"deepstack": ((3, 3584), "bfloat16")},
                      {"a": ([2], "float32"), "b": ((), "int64")}],
    "recv_into": ["output", "pool"],
    "fanout": ["copy", "scatter"],
    "backend": [None, "gloo", "nccl"],
    "host": [None, "127.0.0.1", "node-3.cluster", "::1"],
    "bootstrap_timeout": [0.001, 1, 300.0, float("inf")],
    "peer_timeout": [0.5, 10, 10.0],
    "slow_room_s": [None, 0.5, 10],
    "item_cache_bytes": [0, 1 << 30],
    "max_pairs": [1, 24],
    "pair_idle_s": [0.5, 300],
    "step_timeout": [0.5, 300],
}


def test_every_field_is_covered_here():
    names = {f.name for f in dataclasses.fields(DisaggConfig)}
    assert set(INVALID) == names
    assert set(VALID) == names


@pytest.mark.parametrize(("name", "value"),
                         [(n, v) for n, vs in INVALID.items() for v in vs],
                         ids=lambda x: repr(x)[:40])
def test_invalid_value_raises_value_error_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^DisaggConfig\.{name}="):
        DisaggConfig(**{name: value})


@pytest.mark.parametrize(("name", "value"),
                         [(n, v) for n, vs in VALID.items() for v in vs],
                         ids=lambda x: repr(x)[:40])
def test_valid_value_is_kept(name, value):
    cfg = DisaggConfig(**{name: value})
    assert getattr(cfg, name) == value


@pytest.mark.parametrize(("name", "value"), [(n, vs[0]) for n, vs in INVALID.items()])
def test_replace_validates_too(name, value):
    with pytest.raises(ValueError, match=rf"DisaggConfig\.{name}="):
        DisaggConfig().replace(**{name: value})


def test_num_blocks_one_alloc_cannot_carry_is_refused_at_construction():
    """Issue 14, bug 7: a pool whose whole-pool first allocation needs more block
    ids than one ALLOC carries used to be accepted; init() then took the blocks,
    failed to encode the message and left the room stuck. Refused up front."""
    with pytest.raises(ValueError, match=r"num_blocks=1048577.*one ALLOC"):
        DisaggConfig(num_blocks=(1 << 20) + 1)
    assert DisaggConfig(num_blocks=1 << 20).num_blocks == 1 << 20


def test_defaults_match_the_design():
    cfg = DisaggConfig()
    assert dataclasses.asdict(cfg) == {
        "num_embedding_ranks": 1, "language_tp_size": 1, "hidden_size": 3584,
        "dtype": "bfloat16", "block_size": 128, "num_blocks": 256,
        "default_alloc_tokens": 8192, "auto_resume": True, "mrope": True,
        "extra_buffers": {}, "recv_into": "output", "fanout": "copy", "backend": None,
            "host": None,
        "bootstrap_timeout": 300.0, "peer_timeout": 10.0, "slow_room_s": 10.0,
        "item_cache_bytes": 0, "step_timeout": 120.0, "max_pairs": 24, "pair_idle_s": 300.0,
    }
    assert cfg.torch_dtype is torch.bfloat16


def test_defaults_are_not_shared_between_instances():
    a, b = DisaggConfig(), DisaggConfig()
    assert a.extra_buffers is not b.extra_buffers


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        DisaggConfig(1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        DisaggConfig(1, 2, 3584)  # type: ignore[misc]


def test_config_is_frozen():
    cfg = DisaggConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 64  # type: ignore[misc]


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError):
        DisaggConfig(blocksize=64)  # type: ignore[call-arg]


def test_replace_keeps_other_fields():
    cfg = DisaggConfig(hidden_size=16, block_size=4).replace(num_blocks=9)
    assert (cfg.hidden_size, cfg.block_size, cfg.num_blocks) == (16, 4, 9)


@pytest.mark.parametrize(("name", "dt"), [(n, DTYPES[n]) for n in EMBEDDING_DTYPES])
def test_torch_dtype(name, dt):
    assert DisaggConfig(dtype=name).torch_dtype is dt


# ------------------------------------------------------------------ Geometry


def test_geometry_from_config_default():
    g = Geometry.from_config(DisaggConfig())
    assert g == Geometry(128, 256, (
        BufferSpec("embeddings", (3584,), torch.bfloat16),
        BufferSpec("fill_ids", (), torch.int32),
        BufferSpec("mrope_positions", (3,), torch.int32),
    ))
    assert g.token_nbytes == 3584 * 2 + 4 + 12
    assert g.extra_names == ()


def test_geometry_orders_extras_by_name_and_skips_mrope_when_off():
    cfg = DisaggConfig(hidden_size=8, dtype="float16", block_size=16, num_blocks=4, mrope=False,
                       extra_buffers={"zeta": ([2], "int8"), "deepstack": ((3, 8), "float32")})
    g = Geometry.from_config(cfg)
    assert [(b.name, b.per_token_shape, b.dtype) for b in g.buffers] == [
        ("embeddings", (8,), torch.float16),
        ("fill_ids", (), torch.int32),
        ("deepstack", (3, 8), torch.float32),
        ("zeta", (2,), torch.int8),
    ]
    assert g.extra_names == ("deepstack", "zeta")
    assert g.token_nbytes == 8 * 2 + 4 + 24 * 4 + 2
    assert g.buffers[2].token_numel == 24 and g.buffers[2].token_nbytes == 96


def test_extra_names_with_mrope():
    g = Geometry.from_config(DisaggConfig(extra_buffers={"deepstack": ((2,), "bfloat16")}))
    assert [b.name for b in g.buffers] == ["embeddings", "fill_ids", "mrope_positions",
                                           "deepstack"]
    assert g.extra_names == ("deepstack",)


def test_wire_packs_fill_ids_and_positions_into_one_buffer():
    g = Geometry.from_config(DisaggConfig(hidden_size=8, extra_buffers={"deepstack": ((2,), "bfloat16")}))
    assert [(b.name, b.per_token_shape, b.dtype) for b in g.wire_buffers] == [
        ("embeddings", (8,), torch.bfloat16),
        (PACKED_IDS, (4,), torch.int32),
        ("deepstack", (2,), torch.bfloat16),
    ]
    assert sum(b.token_nbytes for b in g.wire_buffers) == g.token_nbytes
    plain = Geometry.from_config(DisaggConfig(hidden_size=8, mrope=False))
    assert plain.wire_buffers == plain.buffers  # nothing to pack


extra_specs = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
        lambda n: n not in ("embeddings", "fill_ids", "mrope_positions")),
    st.tuples(st.lists(st.integers(1, 64), max_size=3).map(tuple), st.sampled_from(sorted(DTYPES))),
    max_size=3)

configs = st.builds(DisaggConfig, hidden_size=st.integers(1, 8192),
                    dtype=st.sampled_from(EMBEDDING_DTYPES), block_size=st.integers(1, 1024),
                    num_blocks=st.integers(1, 10**5), mrope=st.booleans(),
                    extra_buffers=extra_specs)


@FAST
@given(configs)
def test_geometry_json_round_trip(cfg):
    g = Geometry.from_config(cfg)
    text = g.to_json()
    assert Geometry.from_json(text) == g
    assert json.loads(text)["block_size"] == cfg.block_size
    assert json.loads(text)["num_blocks"] == cfg.num_blocks
    assert g.to_json() == Geometry.from_json(text).to_json()  # stable text
    g.check_compatible(Geometry.from_json(text), rank=0, peer=1)


def test_geometry_json_is_plain_json():
    g = Geometry.from_config(DisaggConfig(hidden_size=4, block_size=2, num_blocks=3))
    assert json.loads(g.to_json()) == {
        "block_size": 2, "num_blocks": 3,
        "buffers": [["embeddings", [4], "bfloat16"], ["fill_ids", [], "int32"],
                    ["mrope_positions", [3], "int32"]],
    }


def test_compatible_with_different_num_blocks():
    a = Geometry.from_config(DisaggConfig(num_blocks=16))
    b = Geometry.from_config(DisaggConfig(num_blocks=4096))
    a.check_compatible(b, rank=0, peer=3)
    b.check_compatible(a, rank=3, peer=0)


def test_block_size_mismatch_names_both_ranks_values():
    a = Geometry.from_config(DisaggConfig(block_size=128))
    b = Geometry.from_config(DisaggConfig(block_size=64))
    with pytest.raises(GeometryMismatch,
                       match=r"block_size differs: rank 0 has 128, rank 2 has 64") as ei:
        a.check_compatible(b, rank=0, peer=2)
    assert (ei.value.rank, ei.value.peer) == (0, 2)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(("mine", "theirs", "fragments"), [
    (dict(hidden_size=3584), dict(hidden_size=4096),
     ["rank 1 has [embeddings[3584]:bfloat16", "rank 5 has [embeddings[4096]:bfloat16"]),
    (dict(dtype="bfloat16"), dict(dtype="float16"),
     ["embeddings[3584]:bfloat16", "embeddings[3584]:float16"]),
    (dict(mrope=True), dict(mrope=False),
     ["mrope_positions[3]:int32]", "fill_ids[]:int32]"]),
    (dict(extra_buffers={"deepstack": ((3, 8), "bfloat16")}), dict(),
     ["deepstack[3, 8]:bfloat16"]),
    (dict(extra_buffers={"deepstack": ((3, 8), "bfloat16")}),
     dict(extra_buffers={"deepstack": ((3, 8), "float32")}),
     ["deepstack[3, 8]:bfloat16", "deepstack[3, 8]:float32"]),
    (dict(extra_buffers={"deepstack": ((3, 8), "bfloat16")}),
     dict(extra_buffers={"deepstack": ((2, 8), "bfloat16")}),
     ["deepstack[3, 8]:bfloat16", "deepstack[2, 8]:bfloat16"]),
    (dict(extra_buffers={"a": ((1,), "int8")}), dict(extra_buffers={"b": ((1,), "int8")}),
     ["a[1]:int8", "b[1]:int8"]),
])
def test_buffer_mismatch_names_both_ranks_values(mine, theirs, fragments):
    a = Geometry.from_config(DisaggConfig(**mine))
    b = Geometry.from_config(DisaggConfig(**theirs))
    with pytest.raises(GeometryMismatch) as ei:
        a.check_compatible(b, rank=1, peer=5)
    msg = str(ei.value)
    assert msg.startswith("pool buffers differ: rank 1 has [")
    assert ", rank 5 has [" in msg
    for f in fragments:
        assert f in msg
    assert a.to_json() != b.to_json()


# ------------------------------------------------------------------ Topology


@pytest.mark.parametrize(("world", "e", "t"), [
    (1, 1, 1), (0, 1, 1), (2, 2, 1), (3, 1, 4), (4, 1, 2), (6, 2, 3), (1, 2, 1),
])
def test_topology_rejects_world_sizes_that_do_not_fit(world, e, t):
    with pytest.raises(ValueError) as ei:
        Topology(world, e, t)
    msg = str(ei.value)
    assert f"world_size={world}" in msg
    assert f"num_embedding_ranks={e}" in msg and f"language_tp_size={t}" in msg
    assert f"world_size must be {e} + k*{t} with k >= 1 (e.g. {e + t} or {e + 2 * t})" in msg


@FAST
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 6))
def test_topology_role_split(e, t, k):
    topo = Topology(e + k * t, e, t)
    assert topo.num_instances == k
    assert list(topo.embedding_ranks) == list(range(e))
    assert list(topo.language_ranks) == list(range(e, e + k * t))
    for r in range(e):
        assert topo.role(r) == "embedding"
        assert topo.instance_of(r) is None
    seen = []
    for i in range(k):
        ranks = topo.instance_ranks(i)
        assert ranks == list(range(e + i * t, e + (i + 1) * t))
        for r in ranks:
            assert topo.role(r) == "language"
            assert topo.instance_of(r) == i
        seen += ranks
    assert seen == list(topo.language_ranks)
    # one more or one fewer rank (short of a whole instance) does not fit
    if t > 1:
        with pytest.raises(ValueError):
            Topology(e + k * t + 1, e, t)
        with pytest.raises(ValueError):
            Topology(e + k * t - 1, e, t)


def test_topology_example_one_embedder_two_instances_of_tp2():
    topo = Topology(5, 1, 2)
    assert [topo.role(r) for r in range(5)] == ["embedding"] + ["language"] * 4
    assert [topo.instance_of(r) for r in range(5)] == [None, 0, 0, 1, 1]
    assert topo.instance_ranks(1) == [3, 4]


# ------------------------------------------------------------------ Stats


def test_stats_snapshot_starts_at_zero_with_gauges():
    s = Stats(pool_total_blocks=16, pool_free_blocks=16, rooms_live=0)
    assert s.snapshot() == {
        "pool_total_blocks": 16, "pool_free_blocks": 16, "rooms_live": 0,
        "bytes_sent": 0, "bytes_received": 0, "chunks": 0, "resumes": 0, "failures": 0,
        "auto_alloc_resumes_avoided": 0, "auto_alloc_overallocated_blocks": 0,
        "failures_by_cause": {}, "latency_s": {}, "bytes_per_room": {},
    }


def test_stats_sources_add_fields_at_read_time():
    s = Stats()
    live = {"n": 1}
    s.add_source(lambda: {"rooms_live_by_peer": {0: live["n"]}})
    assert s.snapshot()["rooms_live_by_peer"] == {0: 1}
    live["n"] = 5
    assert s.snapshot()["rooms_live_by_peer"] == {0: 5}


def test_stats_counters_gauges_and_failure_causes():
    s = Stats(pool_total_blocks=16, pool_free_blocks=16)
    s.add(bytes_sent=100, chunks=1)
    s.add(bytes_sent=50, chunks=2, resumes=1)
    s.add(custom=3)
    s.set_gauge("pool_free_blocks", 9)
    s.set_gauge("rooms_live", 2)
    s.failure("peer_lost")
    s.failure("timeout")
    s.failure("peer_lost")
    snap = s.snapshot()
    assert snap["bytes_sent"] == 150 and snap["chunks"] == 3 and snap["resumes"] == 1
    assert snap["bytes_received"] == 0 and snap["custom"] == 3
    assert snap["pool_free_blocks"] == 9 and snap["rooms_live"] == 2
    assert snap["pool_total_blocks"] == 16
    assert snap["failures"] == 3
    assert snap["failures_by_cause"] == {"peer_lost": 2, "timeout": 1}


def test_stats_snapshot_is_a_copy():
    s = Stats()
    s.failure("x")
    snap = s.snapshot()
    snap["failures_by_cause"]["x"] = 99
    snap["chunks"] = 7
    assert s.snapshot()["failures_by_cause"] == {"x": 1}
    assert s.snapshot()["chunks"] == 0


def test_stats_latency_percentiles():
    s = Stats()
    for v in range(1, 101):
        s.observe("transfer", float(v))
    s.observe("resume", 0.25)
    lat = s.snapshot()["latency_s"]
    assert lat["transfer"] == {"count": 100.0, "p50": 50.5, "p99": pytest.approx(99.01),
                               "max": 100.0}
    assert lat["resume"] == {"count": 1.0, "p50": 0.25, "p99": 0.25, "max": 0.25}


def test_stats_latency_window_is_bounded():
    s = Stats()
    for v in range(MAX_SAMPLES + 10):
        s.observe("t", float(v))
    lat = s.snapshot()["latency_s"]["t"]
    assert lat["count"] == float(MAX_SAMPLES)
    assert lat["max"] == float(MAX_SAMPLES + 9)
    # oldest 10 samples dropped: window is [10, MAX_SAMPLES + 9]
    assert lat["p50"] == pytest.approx((10 + MAX_SAMPLES + 9) / 2)


@pytest.mark.parametrize(("backend", "gpus", "local_world", "expect"), [
    (None, 0, 2, "gloo"),           # no GPU: CPU
    (None, 2, 2, "nccl"),           # one GPU per rank
    (None, 1, 2, "gloo"),           # fewer GPUs than ranks on the node: not NCCL
    ("gloo", 8, 2, "gloo"),
    ("nccl", 2, 2, "nccl"),
    ("nccl", 0, 2, "sees no CUDA GPU"),
    ("nccl", 1, 2, "refuses two ranks on one GPU"),
])
def test_backend_choice_and_impossible_nccl(monkeypatch, backend, gpus, local_world, expect):
    from disagg import backend as dbackend

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(dbackend.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(dbackend.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = DisaggConfig(backend=backend)
    if expect in ("gloo", "nccl"):
        assert dbackend._pick_backend(cfg) == expect
    else:
        with pytest.raises(ValueError, match=expect) as info:
            dbackend._pick_backend(cfg)
        assert "backend='gloo'" in str(info.value)  # says what to change


@pytest.mark.parametrize(("visible", "backend", "expect"), [
    ("3", None, "nccl"),            # SLURM --gpus-per-task=1: each process its own GPU
    ("3", "nccl", "nccl"),
    ("GPU-1f2e", None, "nccl"),     # by UUID, as Kubernetes device plugins set it
    ("0,1", None, "gloo"),          # two visible, eight ranks: they would share
    (None, None, "gloo"),           # one GPU for the whole node, nothing says it is ours
    ("", None, "gloo"),             # set but empty: no GPU named
])
def test_one_visible_gpu_per_process_means_nccl(monkeypatch, visible, backend, expect):
    """Issue 29, finding 11: with one GPU visible to each process (the usual SLURM
    or Kubernetes layout) the node's ranks each have a GPU of their own, and
    NCCL is the choice, on cuda:0 of each; start-up then checks that the ranks'
    GPUs really differ."""
    from disagg import backend as dbackend

    env = {"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}
    got, why = dbackend.backend_choice(DisaggConfig(backend=backend), gpus=1, local_world=8,
                                       env=env)
    assert got == expect, why
    if expect == "nccl":
        assert "checked at start-up" in why
        assert dbackend.cuda_index(5, 1) == 0  # the one it sees
    assert dbackend.cuda_index(5, 8) == 5
    with pytest.raises(ValueError, match="no GPU of its own"):
        dbackend.cuda_index(5, 4)


def test_two_ranks_of_one_host_on_one_gpu_are_refused_at_start_up():
    from disagg import backend as dbackend

    dbackend.check_distinct_gpus({0: ("a", "GPU-1"), 1: ("a", "GPU-2"), 2: ("b", "GPU-1")})
    with pytest.raises(ValueError, match="ranks 0 and 2 on host a use the same GPU"):
        dbackend.check_distinct_gpus({0: ("a", "GPU-1"), 1: ("a", "GPU-2"), 2: ("a", "GPU-1")})
