"""NCCL's rules as the code keeps them (docs/nccl.md), checked without a GPU:
every NCCL call of a device goes through one lock, completion on CUDA is
observed on the host before `Work.wait()` (which would otherwise make a
caller's stream wait for the peer), the backend pick says why, and a world
whose pair communicators could wait on each other in a cycle is refused."""

from __future__ import annotations

import contextlib
import datetime
import threading
from typing import Any

import pytest
import torch

from disagg import backend as dbackend
from disagg import transport
from disagg.config import DisaggConfig
from disagg.errors import PeerLost, TransferTimeout
from disagg.geometry import Topology
from disagg.meta import FrameKind, Meta
from disagg.transport import TorchPairTransport, device_lock

CUDA0 = torch.device("cuda", 0)  # a name only: nothing below touches a GPU
CPU = torch.device("cpu")


def test_one_lock_per_device() -> None:
    assert device_lock(CUDA0) is device_lock(torch.device("cuda", 0))
    assert device_lock(CUDA0) is not device_lock(torch.device("cuda", 1))
    assert device_lock(CPU) is device_lock(torch.device("cpu"))


def test_cuda_transports_share_the_device_lock_gloo_ones_do_not() -> None:
    a = TorchPairTransport(None, 1, CUDA0, 5.0, group_peer=1)  # type: ignore[arg-type]
    b = TorchPairTransport(None, 2, CUDA0, 5.0, group_peer=1)  # type: ignore[arg-type]
    assert a._post_lock is b._post_lock is device_lock(CUDA0)
    c = TorchPairTransport(None, 1, CPU, 5.0, group_peer=1)  # type: ignore[arg-type]
    d = TorchPairTransport(None, 2, CPU, 5.0, group_peer=1)  # type: ignore[arg-type]
    assert c._post_lock is not d._post_lock  # a busy Gloo pair never holds up another
    assert c._post_lock is not device_lock(CPU)


class FakeWork:
    """A `dist.Work` that completes after `polls` looks, and records its calls."""

    def __init__(self, polls: int, log: list[str], error: str | None = None) -> None:
        self.polls = polls
        self.log = log
        self.error = error

    def is_completed(self) -> bool:
        self.log.append("is_completed")
        self.polls -= 1
        return self.polls <= 0

    def wait(self) -> bool:
        self.log.append("wait")
        if self.error is not None:
            raise RuntimeError(self.error)
        return True


class PairGroup:
    """A pair group as `TorchPairTransport` calls it (one op per tensor); each
    op calls `on_op` first."""

    def __init__(self, on_op: Any) -> None:
        self.on_op = on_op

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeWork:
        self.on_op()
        return FakeWork(1, [])

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeWork:
        self.on_op()
        return FakeWork(1, [])


def test_cuda_posts_hold_the_device_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    # no CUDA here: the library stream's bookkeeping is tests/test_streams.py's
    monkeypatch.setattr(transport.streams, "on_library_stream",
                        lambda device: contextlib.nullcontext())
    g = PairGroup(lambda: seen.append(device_lock(CUDA0).locked()))
    t = TorchPairTransport(g, 1, CUDA0, 5.0, group_peer=1)  # type: ignore[arg-type]
    t._post(False, [torch.zeros(1)])
    assert seen == [True]
    assert not device_lock(CUDA0).locked()  # held for the call alone


def test_gloo_posts_hold_the_pairs_lock() -> None:
    seen: list[bool] = []
    g = PairGroup(lambda: seen.append(t._post_lock.locked()))
    t = TorchPairTransport(g, 1, CPU, 5.0, group_peer=1)  # type: ignore[arg-type]
    t.post_frame(Meta(FrameKind.ABORT, 7), [torch.zeros(3)])
    assert seen == [True, True] and not t._post_lock.locked()


def test_cuda_completion_is_observed_on_the_host_before_wait() -> None:
    log: list[str] = []
    t = TorchPairTransport(None, 1, CUDA0, 5.0, group_peer=1)  # type: ignore[arg-type]
    t._complete([FakeWork(3, log), FakeWork(2, log)], "payload recv")  # type: ignore[list-item]
    assert log[-2:] == ["wait", "wait"] and "wait" not in log[:-2], log
    assert log.count("is_completed") == 5


def test_cuda_completion_is_bounded_and_errors_keep_their_kind() -> None:
    t = TorchPairTransport(None, 1, CUDA0, 0.05, group_peer=1)  # type: ignore[arg-type]
    log: list[str] = []
    with pytest.raises(TransferTimeout, match="not done after"):
        t._complete([FakeWork(10**9, log)], "meta recv")  # type: ignore[list-item]
    assert "wait" not in log  # never a stream wait on a peer that did not answer
    with pytest.raises(PeerLost, match="connection reset"):
        t._complete([FakeWork(1, [], "connection reset")], "send")  # type: ignore[list-item]
    with pytest.raises(TransferTimeout, match="timed out after"):
        t._complete([FakeWork(1, [], "Timed out waiting")], "send")  # type: ignore[list-item]


def test_group_creation_and_teardown_hold_the_device_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []

    def new(ranks: list[int], **kw: Any) -> str:
        seen.append(("new", device_lock(CUDA0).locked()))
        return "group"

    def destroy(group: Any = None) -> None:
        seen.append(("destroy", device_lock(CUDA0).locked()))

    monkeypatch.setattr(dbackend.dist, "new_group", new)
    monkeypatch.setattr(dbackend.dist, "destroy_process_group", destroy)
    g = dbackend.new_group([0, 1], backend="nccl", timeout=datetime.timedelta(seconds=1),
                          device=CUDA0)
    dbackend.destroy_group(g, CUDA0)
    assert seen == [("new", True), ("destroy", True)]


def test_the_gather_groups_first_collective_is_made_at_start_up_under_the_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, finding 10: NCCL creates a communicator at a group's first
    collective; `warm_up` (called by init for the instance's scatter group) makes
    it then, holding the device lock for the call, and returns once it is done."""
    seen: list[tuple[str, bool]] = []

    class Work:
        def wait(self) -> bool:
            seen.append(("wait", device_lock(CPU).locked()))
            return True

    def all_reduce(t: Any, group: Any = None, async_op: bool = False) -> Work:
        seen.append(("all_reduce", device_lock(CPU).locked()))
        assert async_op and group == "instance"
        return Work()

    monkeypatch.setattr(dbackend.dist, "all_reduce", all_reduce)
    dbackend.warm_up("instance", CPU, 5.0)  # type: ignore[arg-type]
    assert seen == [("all_reduce", True), ("wait", False)]  # never waits under the lock


def test_the_lock_serialises_posts_from_several_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Posts of different pairs from different threads never overlap on a device."""
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    posts = 0

    def op() -> None:
        nonlocal inside, overlaps, posts
        with guard:
            inside += 1
            overlaps += inside > 1
        for _ in range(200):
            pass
        with guard:
            inside -= 1
            posts += 1

    monkeypatch.setattr(transport.streams, "on_library_stream",
                        lambda device: contextlib.nullcontext())
    pairs = [TorchPairTransport(PairGroup(op), p, CUDA0, 5.0,  # type: ignore[arg-type]
                                group_peer=1) for p in range(4)]

    def run(t: TorchPairTransport) -> None:
        for _ in range(300):
            t._post(True, [torch.zeros(1)])

    threads = [threading.Thread(target=run, args=(t,)) for t in pairs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert posts == 4 * 300 and overlaps == 0  # every post made, none overlapping


@pytest.mark.parametrize(("world", "e", "t", "refused"), [
    (2, 1, 1, False),   # one pair
    (5, 1, 2, False),   # one Embedding rank, two instances of TP 2: a star
    (3, 2, 1, False),   # two Embedding ranks, one Language rank: a star
    (9, 8, 1, False),
    (4, 2, 1, True),    # 2 x 2: a cycle of four pairs
    (4, 2, 2, True),    # two Embedding ranks, one instance of TP 2
    (7, 3, 2, True),
])
def test_nccl_layouts_that_rest_on_concurrent_kernels_are_allowed_and_logged(
        world: int, e: int, t: int, refused: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27: 2 x 2 and larger run by default, with a log line that names the
    assumption; a star never needs it."""
    topo = Topology(world, e, t)
    with caplog.at_level("INFO", logger=dbackend.log.name):
        dbackend.check_nccl_topology(topo, env={})
    assert ("assume that each device runs the kernels" in caplog.text) is refused


def test_layouts_that_could_form_a_cycle_are_refused_where_kernels_run_one_at_a_time() -> None:
    topo = Topology(4, 2, 1)
    for k in ("CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_LAUNCH_BLOCKING"):
        with pytest.raises(ValueError, match=f"{k}=1") as info:
            dbackend.check_nccl_topology(topo, env={k: "1"})
        msg = str(info.value)
        assert "can deadlock" in msg and "docs/nccl.md" in msg
        assert "num_embedding_ranks=1" in msg and "backend='gloo'" in msg  # says what to change
    with pytest.raises(ValueError, match=f"{dbackend.NCCL_CONCURRENT_ENV}=0"):
        dbackend.check_nccl_topology(topo, env={dbackend.NCCL_CONCURRENT_ENV: "0"})
    dbackend.check_nccl_topology(topo, env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"})
    dbackend.check_nccl_topology(Topology(3, 2, 1), env={"CUDA_LAUNCH_BLOCKING": "1"})  # star


@pytest.mark.parametrize(("backend", "gpus", "local_world", "expect", "why"), [
    (None, 0, 1, "gloo", "no CUDA GPU"),
    (None, 1, 1, "nccl", "one GPU per rank"),
    (None, 1, 2, "gloo", "NCCL refuses two ranks on one GPU"),
    (None, 4, 8, "gloo", "8 ranks on this node but 4 GPU(s)"),
    ("gloo", 8, 2, "gloo", "in the config"),
    ("nccl", 2, 2, "nccl", "in the config"),
])
def test_the_backend_pick_says_why(backend: Any, gpus: int, local_world: int, expect: str,
                                   why: str) -> None:
    got, reason = dbackend.backend_choice(DisaggConfig(backend=backend), gpus=gpus,
                                         local_world=local_world)
    assert got == expect and why in reason, reason


def test_the_world_backend_carries_gloo_for_cpu_tensors() -> None:
    assert dbackend.world_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert dbackend.world_backend("gloo") == "gloo"
