"""GPU verification kit: what one CUDA device (two, for the pair section) can prove
about disagg's GPU path.

    python scripts/gpu_check.py                  # every check on cuda, a table; exit 1 on a failure
    python scripts/gpu_check.py --json out.json  # the same, and one record per check
    python scripts/gpu_check.py --device cpu     # the CPU dry-run (what CI runs, < 30 s)

Sections (docs/nccl.md says what each proves, and what only several GPUs can):

  contract  the in-process layer (tests/inproc: the real Embedding and Language
            engines, a fake pair transport and control channel) with every pool,
            result and payload on the device. On CUDA each fake link moves device
            memory on a stream of its own, after a GPU-side delay, and completes
            only once its copy's event is host-observed, so the library's own
            stream and event logic runs for real: the producer's event before the
            sends (embeddings produced on a side stream behind a delay), blocks
            reused and statuses changed only after completion. Bit-exact rooms on
            2 Embedding x 2 Language ranks in both landing modes, then abort in
            every state (tests/inproc/test_device.py and test_abort.py, run
            by pytest in a subprocess on the device).
  pools     a Language pool on the device: allocation, the pool-mode copy-out
            (one copy per segment; fragmented and contiguous) in GB/s against a
            plain device-to-device copy of the same bytes, result()'s ids split,
            and the cost of host-observed completion per chunk (us).
  nccl      one rank: the backend auto-pick on this node (and why two ranks cannot
            share a GPU), the cycle guard for several Embedding and Language
            ranks, disagg.init on a world of one (which no topology fits: refused,
            and the NCCL world torn down), a world of one built as init builds it:
            group creation under the device lock, the first op (which creates the
            communicator), a batched send/recv to itself, teardown; the lock's
            uncontended cost; jobs mode's pair group (the backend's constructor on a
            PrefixStore, no default world) built and torn down on one rank; a
            frame's posts on such a group as one coalescing block (a rank paired
            with itself). On the CPU dry-run the same with Gloo, where it can.
  pair      TWO GPUs: a real Embedding/Language pair of two processes over NCCL
            (scripts/_gpu_pair_worker.py): rooms bit-exact, pre-posted or not; a
            caller's stream sync, torch.cuda.synchronize() and a CUDA-graph capture
            (thread_local, then global) while a recv stands; the Embedding rank
            SIGKILLed under a waiting room. Skipped with one GPU; on the CPU
            dry-run the same two processes over Gloo.
  model     OPTIONAL: examples/qwen_vl.py (a real model), when the file exists and
            CUDA is there; skipped otherwise.

Without CUDA it says so, runs the dry-run on the CPU and exits 0 when every
check passes. Needs the test extra (`pip install -e ".[test]"`): the contract
section runs tests/inproc's device tests with pytest, in a subprocess, on the
device (DISAGG_TEST_DEVICE); the script imports nothing of the test tree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import disagg  # noqa: E402
from disagg import backend as dbackend  # noqa: E402
from disagg.config import DisaggConfig  # noqa: E402
from disagg.geometry import Geometry, Topology  # noqa: E402
from disagg.language.landing import copy_out  # noqa: E402
from disagg.plan import segment_plan  # noqa: E402
from disagg.pool import BlockPool  # noqa: E402
from disagg.results import make_outputs, to_result  # noqa: E402
from disagg.streams import wait_until  # noqa: E402
from disagg.transport import TorchPairTransport, device_lock  # noqa: E402
from disagg.types import TransferStatus  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
MODEL_EXAMPLE = ROOT / "examples" / "qwen_vl.py"


class Skip(Exception):
    """A check that cannot run here, and why."""


@dataclass
class Row:
    section: str
    check: str
    result: str
    figure: str = ""
    detail: str = ""
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a check returns: a short figure, a longer detail, numbers for --json."""

    figure: str = ""
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    device: torch.device
    tmp: Path
    model_cmd: list[str] | None
    model_timeout: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------- contract

# The in-process layer's files this section runs (pytest, in a subprocess, on
# the device: DISAGG_TEST_DEVICE), and the tests of each row.
CONTRACT_FILES = ("tests/inproc/test_device.py", "tests/inproc/test_abort.py")
CONTRACT_ROWS = {
    "rooms": "test_device.py::test_rooms_of_two_embedding_ranks_to_tp2_bit_exact",
    "producer": "test_device.py::test_sends_wait_for_the_producer_stream",
    "aborts": "test_abort.py::",
    "threads": "test_device.py::test_every_library_thread_binds_the_ranks_device_first",
    "side": "test_device.py::test_a_caller_on_a_side_stream_under_allocator_churn",
}
_contract: dict[str, dict[str, str]] = {}  # device -> test id -> "" (passed) or why not


def _contract_results(env: Env) -> dict[str, str]:
    """Run the in-process layer's device tests once on `env.device` (the script
    runs the test tree, it does not import it): test id -> "" or what failed."""
    key = str(env.device)
    if key in _contract:
        return _contract[key]
    xml = env.tmp / "contract.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *CONTRACT_FILES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DISAGG_TEST_DEVICE": key})
    if not xml.exists():
        raise AssertionError(f"pytest wrote no report (exit {proc.returncode}): "
                             f"{(proc.stdout + proc.stderr)[-600:]}")
    out: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        out[test_id] = "" if bad is None else (
            f"{bad.tag}: {(bad.get('message') or bad.text or '').strip().splitlines()[0][:200]}")
    _contract[key] = out
    return out


def _contract_row(env: Env, row: str, what: str) -> Outcome:
    results = {k: v for k, v in _contract_results(env).items()
               if k.startswith(CONTRACT_ROWS[row])}
    assert results, f"no test matched {CONTRACT_ROWS[row]!r}"
    failed = [f"{k}: {v}" for k, v in results.items() if v]
    assert not failed, f"{len(failed)}/{len(results)} failed: " + "; ".join(failed[:4])
    return Outcome(f"{len(results)}/{len(results)} tests", what, {"tests": len(results)})


def check_rooms(env: Env) -> Outcome:
    """Every room of two Embedding ranks to a TP-2 instance, several chunks each
    (resume rounds, a pool smaller than the rooms), bit-exact on every rank."""
    return _contract_row(env, "rooms", "2 E x TP2, 40 rooms, output and pool modes, bit-exact"
                         + (", every copy on a link stream after a delay, every DATA "
                            "frame's sends after the producer's event" if env.cuda else ""))


def check_producer_stream(env: Env) -> Outcome:
    """Embeddings written on a side stream behind a GPU delay, send() called from
    that stream at once: only the producer's event keeps the sends from reading
    them before they are written."""
    return _contract_row(env, "producer", "embeddings written on a side stream ~20 ms after "
                         "send(); send() returned before they were, and the sends waited for "
                         "the producer's event" if env.cuda else
                         "CPU: no streams (the same calls)")


def check_side_stream(env: Env) -> Outcome:
    """The Language caller takes each result on a side stream, queues a slow read
    of it there and lets it go at once, while a thread churns the allocator on
    a third stream and later rooms land: every read bit-exact (issue 29,
    finding 3: result memory marked used by the caller's stream)."""
    return _contract_row(env, "side", "12 rooms read on a side stream after a GPU delay, "
                         "results dropped at once, allocator churn on another stream: "
                         "bit-exact" if env.cuda else "CPU: no streams (the same calls)")


def check_library_stream(env: Env) -> Outcome:
    """Issue 29, finding 8, on the device: with the default stream busy (the
    application's step, ~200 ms of GPU sleep), what disagg does on the host
    (a meta's read back, a meta's copy to the device, pool mode's copy-out
    and its host-observed end) returns before that step does."""
    if not env.cuda:
        raise Skip("no streams on the CPU")
    from disagg import streams
    dev = env.device
    geom, _ = _pool_geometry(env)
    pool = BlockPool(geom, dev, with_buffers=True)
    plan = segment_plan(list(range(4)), geom.block_size, 4 * geom.block_size, direct=False)
    outputs = make_outputs(geom, 4 * geom.block_size, dev)
    words = torch.arange(64, dtype=torch.int64, device=dev)
    env.sync()
    busy = torch.cuda.Event()
    default = torch.cuda.default_stream(dev)
    with torch.cuda.stream(default):
        torch.cuda._sleep(400_000_000)  # ~200 ms at 2 GHz
        busy.record(default)
    t0 = time.perf_counter()
    host = streams.to_host(words)
    read_s = time.perf_counter() - t0
    on_device = streams.to_device(torch.arange(8, dtype=torch.int64), dev)
    t0 = time.perf_counter()
    copy_out(geom, pool, outputs, plan, 0, dev)
    copy_s = time.perf_counter() - t0
    waited = busy.query()
    env.sync()
    assert not waited, "a host read or the copy-out waited for the default stream's work"
    assert torch.equal(host, torch.arange(64)), "read back: bytes differ"
    assert torch.equal(on_device.cpu(), torch.arange(8)), "to the device: bytes differ"
    return Outcome(f"read {read_s * 1e6:.0f} us, copy-out {copy_s * 1e6:.0f} us",
                   "default stream busy ~200 ms: a meta-sized read back, a copy to the "
                   "device and a pool copy-out all done before it, on the library stream",
                   {"read_us": read_s * 1e6, "copy_out_us": copy_s * 1e6})


def check_threads(env: Env) -> Outcome:
    """Every disagg thread makes the rank's device its current one first."""
    return _contract_row(env, "threads", "each pair's send and receive thread and the control "
                         "thread bind the rank's device before any CUDA call (no context on "
                         "GPU 0)")


def check_aborts(env: Env) -> Outcome:
    """tests/inproc/test_abort.py, every case, on this device."""
    return _contract_row(env, "aborts", "every state x both sides x both landing modes, then "
                         "a fresh room on the same blocks, bit-exact")


# ---------------------------------------------------------------- pools


def _pool_geometry(env: Env) -> tuple[Geometry, int]:
    """A Qwen2.5-VL-7B class geometry on the GPU (7,184 bytes a token), a small one
    on the CPU; and the tokens of one chunk."""
    if env.cuda:
        cfg = DisaggConfig(hidden_size=3584, block_size=128, num_blocks=512,
                           recv_into="pool")
        return Geometry.from_config(cfg), 8192
    cfg = DisaggConfig(hidden_size=256, block_size=16, num_blocks=64, recv_into="pool")
    return Geometry.from_config(cfg), 512


def _median_s(fn: Callable[[], object], env: Env, reps: int) -> tuple[float, float, float]:
    """Median, min and max seconds of `fn` (each run synchronised), after one warm-up."""
    fn()
    env.sync()
    times = []
    for _ in range(reps):
        env.sync()
        t0 = time.perf_counter()
        fn()
        env.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def check_pool_alloc(env: Env) -> Outcome:
    geom, _ = _pool_geometry(env)
    env.sync()
    t0 = time.perf_counter()
    pool = BlockPool(geom, env.device, with_buffers=True)
    env.sync()
    dt = time.perf_counter() - t0
    nbytes = sum(t.nbytes for t in pool.buffers.values())
    assert all(t.device.type == env.device.type for t in pool.buffers.values())
    del pool
    return Outcome(f"{nbytes / 2**20:.0f} MiB in {dt * 1e3:.1f} ms",
                   f"{geom.num_blocks} blocks x {geom.block_size} tokens x "
                   f"{geom.token_nbytes} B", {"bytes": nbytes, "seconds": dt})


def check_copy_out(env: Env) -> Outcome:
    """Pool mode's copy out of pool blocks into the room's output, per segment,
    against one plain copy of the same bytes."""
    geom, n = _pool_geometry(env)
    pool = BlockPool(geom, env.device, with_buffers=True)
    for t in pool.buffers.values():
        t.view(torch.uint8).random_(0, 256) if t.dtype != torch.int32 else t.random_()
    outputs = make_outputs(geom, n, env.device)
    nblocks = n // geom.block_size
    fragmented = list(range(0, 2 * nblocks, 2))  # every other block: one segment each
    contiguous = list(range(nblocks))
    nbytes = n * geom.token_nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=env.device).random_(0, 256)
    dst = torch.empty_like(src)
    reps = 20
    plain, _, _ = _median_s(lambda: dst.copy_(src), env, reps)
    figures: dict[str, Any] = {"bytes": nbytes, "plain_gbps": nbytes / plain / 1e9}
    parts = []
    for name, ids in (("fragmented", fragmented), ("contiguous", contiguous)):
        plan = segment_plan(ids, geom.block_size, n)
        med, lo, hi = _median_s(
            lambda p=plan: copy_out(geom, pool, outputs, p, 0, env.device), env, reps)
        # what landed is what the blocks hold
        for b in geom.wire_buffers:
            s = plan[-1]
            got = outputs[b.name][s.chunk_start:s.chunk_start + s.num_tokens]
            want = pool.token_view(b.name, s.dst_token, s.num_tokens)
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               want.reshape(-1).view(torch.uint8)), f"{name}: {b.name} differs"
        gbps = nbytes / med / 1e9
        figures[f"{name}_gbps"] = gbps
        figures[f"{name}_segments"] = len(plan)
        parts.append(f"{name} ({len(plan)} segments) {gbps:.1f} GB/s "
                     f"[{nbytes / hi / 1e9:.1f}-{nbytes / lo / 1e9:.1f}]")
    return Outcome(f"{figures['fragmented_gbps'] / figures['plain_gbps']:.2f}x / "
                   f"{figures['contiguous_gbps'] / figures['plain_gbps']:.2f}x plain",
                   f"chunk of {n} tokens ({nbytes / 2**20:.1f} MiB): " + ", ".join(parts)
                   + f"; plain copy {figures['plain_gbps']:.1f} GB/s (host-timed, synced)",
                   figures)


def check_result_split(env: Env) -> Outcome:
    """result()'s one copy: fill_ids and mrope_positions split out of the packed ids."""
    geom, n = _pool_geometry(env)
    outputs = make_outputs(geom, n, env.device)
    for t in outputs.values():
        t.view(torch.uint8).random_(0, 256) if t.dtype != torch.int32 else t.random_()
    med, _, _ = _median_s(lambda: to_result(geom, outputs, (), n), env, 20)
    res = to_result(geom, outputs, (), n)
    packed = outputs["fill_ids+mrope_positions"]
    assert torch.equal(res.fill_ids, packed[:, 0]) and res.fill_ids.is_contiguous()
    assert res.mrope_positions is not None and torch.equal(res.mrope_positions, packed[:, 1:].t())
    return Outcome(f"{med * 1e6:.0f} us / room", f"{n} tokens: two clones (16 B a token)",
                   {"seconds": med, "tokens": n})


def check_event_overhead(env: Env) -> Outcome:
    """Host-observed completion as the transport does it (an event polled with
    `wait_until`), per chunk, on an idle stream: what each chunk pays on top of
    its transfer before a block is reused or a status changes."""
    if not env.cuda:
        raise Skip("no CUDA events on the CPU (Gloo's wait() is the completion)")
    stream = torch.cuda.Stream(env.device)
    x = torch.zeros(1, device=env.device)
    times = []
    for i in range(300):
        with torch.cuda.stream(stream):
            x.add_(1)
            ev = torch.cuda.Event()
            ev.record(stream)
        t0 = time.perf_counter()
        assert wait_until(ev.query, time.monotonic() + 5.0), "event never completed"
        if i >= 20:
            times.append(time.perf_counter() - t0)
    syncs = []
    for _ in range(100):
        with torch.cuda.stream(stream):
            x.add_(1)
        t0 = time.perf_counter()
        stream.synchronize()
        syncs.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return Outcome(f"{med * 1e6:.1f} us / chunk",
                   f"a 1-element kernel, event polled (10 us doubling to 1 ms): median "
                   f"{med * 1e6:.1f}, p90 {sorted(times)[int(0.9 * len(times))] * 1e6:.1f} us; "
                   f"stream.synchronize() {statistics.median(syncs) * 1e6:.1f} us",
                   {"poll_us": med * 1e6, "sync_us": statistics.median(syncs) * 1e6})


# ---------------------------------------------------------------- nccl


def _backend(env: Env) -> str:
    return "nccl" if env.cuda else "gloo"


def check_backend_pick(env: Env) -> Outcome:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, why = dbackend.backend_choice(DisaggConfig(), gpus=gpus, local_world=1)
    assert backend == _backend(env) or (not env.cuda and backend == "nccl"), (backend, why)
    return Outcome(backend, f"one rank on this node, {gpus} GPU(s): {why}",
                   {"backend": backend, "why": why})


def check_backend_shared_gpu(env: Env) -> Outcome:
    """Two ranks on one GPU: auto picks Gloo, and says why; forcing NCCL is refused."""
    gpus = max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    backend, why = dbackend.backend_choice(DisaggConfig(), gpus=gpus, local_world=gpus + 1)
    assert backend == "gloo" and "refuses two ranks on one GPU" in why, (backend, why)
    try:
        dbackend.backend_choice(DisaggConfig(backend="nccl"), gpus=gpus, local_world=gpus + 1)
    except ValueError as e:
        refused = str(e)
    else:
        raise AssertionError("backend='nccl' with two ranks on one GPU was accepted")
    assert "backend='gloo'" in refused, refused
    return Outcome("gloo", f"{gpus + 1} ranks, {gpus} GPU(s): {why}. backend='nccl': "
                   f"ValueError: {refused}", {"why": why, "forced": refused})


def check_cycle_guard(env: Env) -> Outcome:
    """2 x 2 on NCCL runs by default with a log line naming its assumption; it is
    refused where kernels run one at a time, or when the operator opts out."""
    two_by_two = Topology(4, 2, 1)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(dbackend.__name__)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        dbackend.check_nccl_topology(two_by_two, env={})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("assume that each device" in m for m in logged), f"no log line: {logged}"
    for ok in (Topology(3, 1, 2), Topology(5, 1, 2), Topology(3, 2, 1), Topology(9, 8, 1)):
        dbackend.check_nccl_topology(ok, env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    refused = []
    for bad in ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, {"CUDA_LAUNCH_BLOCKING": "1"},
                {dbackend.NCCL_CONCURRENT_ENV: "0"}):
        try:
            dbackend.check_nccl_topology(two_by_two, env=bad)
        except ValueError as e:
            refused.append(str(e))
        else:
            raise AssertionError(f"2 x 2 accepted with {bad}")
    return Outcome("2x2 allowed, logged", f"1 x N and N x 1 always; 2 x 2 logged, refused "
                   f"under {len(refused)} settings: {refused[0][:160]}...", {})


def check_init_one_rank(env: Env) -> Outcome:
    """disagg.init(backend=...) in a world of one: no topology has zero Language
    ranks, so it must refuse, having joined (on CUDA: an NCCL world) and torn it down."""
    assert not dist.is_initialized()
    cfg = DisaggConfig(backend=_backend(env))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    try:
        ctx = disagg.init(cfg, rank=0, world_size=1,
                          init_method=f"file://{env.tmp}/init-one-rank")
    except ValueError as e:
        text = str(e)
    else:
        ctx.shutdown()
        raise AssertionError("a world of one was accepted")
    dt = time.perf_counter() - t0
    assert "does not fit" in text, text
    assert not dist.is_initialized(), "the world was left up"
    return Outcome("refused, torn down", f"{dt * 1e3:.0f} ms: {text[:120]}", {"seconds": dt})


def check_world_of_one(env: Env) -> Outcome:
    """The calls disagg.init makes, on one rank: the world, a group created under the
    device lock, its first op (NCCL creates the communicator there), a batched
    send/recv to itself (NCCL only: Gloo has no self pair), teardown; twice."""
    backend = _backend(env)
    t = {}
    t0 = time.perf_counter()
    dist.init_process_group(dbackend.world_backend(backend),
                            init_method=f"file://{env.tmp}/world-of-one", rank=0, world_size=1)
    t["world_ms"] = (time.perf_counter() - t0) * 1e3
    hung = False
    try:
        timeout = datetime.timedelta(seconds=60)
        for attempt in range(2):
            t0 = time.perf_counter()
            g = dbackend.new_group([0], backend=backend, timeout=timeout, device=env.device)
            t[f"group_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
            x = torch.ones(4, device=env.device)
            t0 = time.perf_counter()
            with device_lock(env.device):
                work = dist.all_reduce(x, group=g, async_op=True)
            assert work is not None
            if not wait_until(work.is_completed, time.monotonic() + 60):
                hung = True
                raise AssertionError("first op (communicator creation) not done in 60 s")
            work.wait()
            t[f"first_op_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
            assert x.tolist() == [1.0] * 4
            transport = TorchPairTransport(g, 0, env.device, 60.0, group_peer=0)
            if env.cuda:
                assert transport._post_lock is device_lock(env.device), "not the device's lock"
                n = 64 << 20
                src = torch.empty(n, dtype=torch.uint8, device=env.device).random_(0, 256)
                dst = torch.zeros_like(src)
                for _ in range(3):
                    torch.cuda.synchronize(env.device)
                    t0 = time.perf_counter()
                    with device_lock(env.device):
                        works = dist.batch_isend_irecv(
                            [dist.P2POp(dist.isend, src, 0, group=g),
                             dist.P2POp(dist.irecv, dst, 0, group=g)])
                    if not all(wait_until(w.is_completed, time.monotonic() + 60)
                               for w in works):
                        hung = True
                        raise AssertionError("batched send/recv to itself not done in 60 s")
                    for w in works:
                        w.wait()
                    t["self_p2p_gbps"] = n / (time.perf_counter() - t0) / 1e9
                assert torch.equal(src, dst), "send/recv to itself: bytes differ"
            t0 = time.perf_counter()
            dbackend.destroy_group(g, env.device)
            t[f"destroy_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
    finally:
        if not hung and dist.is_initialized():
            with device_lock(env.device):
                dist.destroy_process_group()
    assert not dist.is_initialized()
    p2p = (f", batched send/recv to itself {t['self_p2p_gbps']:.0f} GB/s (64 MiB)"
           if "self_p2p_gbps" in t else ", no self p2p on Gloo")
    return Outcome(
        f"{backend}: ok x2",
        f"world {t['world_ms']:.0f} ms; group {t['group_0_ms']:.0f}/{t['group_1_ms']:.0f} ms; "
        f"first op {t['first_op_0_ms']:.0f}/{t['first_op_1_ms']:.0f} ms; destroy "
        f"{t['destroy_0_ms']:.0f}/{t['destroy_1_ms']:.0f} ms{p2p}", t)


def close_coalescing(group: dist.ProcessGroup, device: torch.device) -> None:
    """End a coalescing block an exception left open on `group` (a no-op when none
    is): torch's coalescing manager has no `try/finally`, so an op that raises
    inside `batch_isend_irecv` leaves torch's pending op list and the backend's
    group launch open. disagg's pair groups take one op per tensor and never
    batch; this is the probe's own clean-up."""
    state = dist.distributed_c10d._world.pg_coalesce_state
    if state.pop(group, None) is None:
        return
    with contextlib.suppress(Exception):
        group._end_coalescing(device)


def check_int16_batch(env: Env) -> Outcome:
    """Issue 29, finding 2, on the device: an int16 tensor in a raw batched
    send/recv to itself (NCCL has no int16), whether torch left the group's
    coalescing open after it raised, `close_coalescing` (above), then the
    same tensor as byte views (what disagg posts), bit-exact."""
    if not env.cuda:
        raise Skip("NCCL only (Gloo has no self pair and no coalescing)")
    from disagg.transport import as_bytes
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{env.tmp}/int16",
                            rank=0, world_size=1)
    try:
        g = dbackend.new_group([0], backend="nccl", timeout=datetime.timedelta(seconds=60),
                               device=env.device)
        src = torch.arange(4096, dtype=torch.int16, device=env.device)
        dst = torch.zeros_like(src)
        raw_error = "none"
        try:
            with device_lock(env.device):
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, src, 0, group=g),
                                                dist.P2POp(dist.irecv, dst, 0, group=g)])
            for w in works:
                w.wait()
        except Exception as e:
            raw_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        left_open = g in dist.distributed_c10d._world.pg_coalesce_state
        close_coalescing(g, env.device)
        with device_lock(env.device):
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, as_bytes(src), 0, group=g),
                                            dist.P2POp(dist.irecv, as_bytes(dst), 0, group=g)])
        if not all(wait_until(w.is_completed, time.monotonic() + 60) for w in works):
            raise AssertionError("byte-view batch not done in 60 s: the group stayed open")
        for w in works:
            w.wait()
        assert torch.equal(src, dst), "int16 as bytes: bytes differ"
        dbackend.destroy_group(g, env.device)
    finally:
        if dist.is_initialized():
            with device_lock(env.device):
                dist.destroy_process_group()
    return Outcome("byte views ok", f"raw int16 batch: {raw_error}; coalescing left open "
                   f"after it: {left_open}; closed, then byte views bit-exact",
                   {"raw_error": raw_error, "left_open": left_open})


def _free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def _group_of_one(env: Env, store: dist.Store, prefix: str, max_ctas: int = 0) -> Any:
    """A group of this one rank made as `disagg/pairing.py` makes a pair's: the
    backend's own constructor on a PrefixStore, NCCL's communicator made eagerly."""
    timeout = datetime.timedelta(seconds=60)
    pstore = dist.PrefixStore(prefix, store)
    if not env.cuda:
        return dist.ProcessGroupGloo(pstore, 0, 1, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    config = getattr(opts, "config", None)
    if max_ctas and config is not None:
        config.min_ctas, config.max_ctas = 1, max_ctas
    pg = dist.ProcessGroupNCCL(pstore, 0, 1, opts)
    eager = getattr(pg, "eager_connect_single_device", None)
    if eager is not None:
        eager(env.device)
    return pg


def check_jobs_group(env: Env) -> Outcome:
    """A pair group as `disagg/pairing.py` makes it (world and jobs mode alike):
    the backend's own constructor on a PrefixStore of a TCPStore, with no
    default world, on a world of one (NCCL refuses two ranks of a communicator
    on one GPU, so a real pair needs two GPUs). Twice: NCCL's default
    communicator, then a thin one (`DISAGG_PAIR_NCCL_MAX_CTAS=2`: min 1, max 2 CTAs);
    each made eagerly (`eager_connect_single_device`, as pairs are, off the
    device lock), its first op, the device memory it took (free memory before
    and after, NCCL's buffers included), and teardown (`shutdown`)."""
    from disagg.store import host_store
    assert not dist.is_initialized()
    store = host_store(_free_port(), "127.0.0.1")
    t: dict[str, float] = {}
    for attempt, max_ctas in enumerate((0, 2)):
        free0 = torch.cuda.mem_get_info(env.device)[0] if env.cuda else 0
        t0 = time.perf_counter()
        pg = _group_of_one(env, store, f"disagg/jobs/v1/pair/{attempt}/pg", max_ctas)
        t[f"construct_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
        x = torch.ones(4, device=env.device)
        t0 = time.perf_counter()
        with device_lock(env.device):
            work = pg.allreduce([x])
        if not wait_until(work.is_completed, time.monotonic() + 60):
            raise AssertionError("first op on the pair group not done in 60 s")
        work.wait()
        t[f"first_op_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
        t[f"device_mib_{attempt}"] = ((free0 - torch.cuda.mem_get_info(env.device)[0]) / 2**20
                                      if env.cuda else 0.0)
        assert x.tolist() == [1.0] * 4
        t0 = time.perf_counter()
        if hasattr(pg, "shutdown"):
            pg.shutdown()
        del pg
        t[f"teardown_{attempt}_ms"] = (time.perf_counter() - t0) * 1e3
    assert not dist.is_initialized(), "a default world was made"
    kind = "ProcessGroupNCCL" if env.cuda else "ProcessGroupGloo"
    mem = (f"; device memory {t['device_mib_0']:.0f} MiB default / {t['device_mib_1']:.0f} MiB "
           f"thin" if env.cuda else "")
    return Outcome(f"{kind}: ok x2",
                   f"construct {t['construct_0_ms']:.0f}/{t['construct_1_ms']:.0f} ms; first op "
                   f"{t['first_op_0_ms']:.0f}/{t['first_op_1_ms']:.0f} ms; teardown "
                   f"{t['teardown_0_ms']:.0f}/{t['teardown_1_ms']:.0f} ms{mem} (default, then "
                   f"thin; no default world)", t)


def check_pair_posts(env: Env) -> Outcome:
    """Issue 29, finding 9, on the device: how `disagg.transport.post_ops` posts a
    frame on a pair group made as pairs are (constructor, eager communicator),
    driven as a pair of one rank with itself (NCCL lets a rank send to itself
    when the recv is in the same group launch). One coalescing block of a
    frame's sends and recvs (bf16, int16 and int64 tensors as byte views) gives
    one work, completes host-observed, bytes exact; the device memory the first
    block takes says whether torch made a second communicator for it (it does
    for a point-to-point op outside a block); a block whose first op raises
    leaves the group usable; and the cost of posting and completing one block."""
    if not env.cuda:
        raise Skip("NCCL only: Gloo has no coalescing and no pair of a rank with itself")
    from disagg import streams
    from disagg.store import host_store
    from disagg.transport import as_bytes, post_ops
    dev = env.device
    store = host_store(_free_port(), "127.0.0.1")
    with streams.on_library_stream(dev):  # before the memory readings below
        srcs = [torch.randn(512, 1024, device=dev).to(torch.bfloat16),
                torch.arange(4096, dtype=torch.int16, device=dev),
                torch.arange(7, dtype=torch.int64, device=dev)]
        dsts = [torch.zeros_like(x) for x in srcs]
    env.sync()
    free0 = torch.cuda.mem_get_info(dev)[0]
    pg = _group_of_one(env, store, "disagg/check/posts/pg")
    free1 = torch.cuda.mem_get_info(dev)[0]
    coalesce = bool(getattr(pg, "supports_coalescing", False))
    assert coalesce, "ProcessGroupNCCL says it cannot coalesce: disagg posts an op per tensor"

    def frame() -> list[Any]:
        ops = [(True, as_bytes(x)) for x in srcs] + [(False, as_bytes(x)) for x in dsts]
        with streams.on_library_stream(dev), device_lock(dev):
            return post_ops(pg, 0, ops, coalesce=True)

    works = frame()
    assert len(works) == 1, f"a block gave {len(works)} works"
    if not wait_until(works[0].is_completed, time.monotonic() + 60):
        raise AssertionError("a block of sends and recvs to itself not done in 60 s")
    works[0].wait()
    free2 = torch.cuda.mem_get_info(dev)[0]
    for a, b in zip(srcs, dsts, strict=True):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), \
            f"{a.dtype}: bytes differ"
    raised = ""
    try:  # an op that raises before any is issued: the block must still end
        with device_lock(dev):
            post_ops(pg, 0, [(False, torch.zeros(4, dtype=torch.uint8))], coalesce=True)
    except Exception as e:
        raised = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    assert raised, "a recv into host memory on an NCCL group did not raise"
    runs = []
    for _ in range(50):
        t0 = time.perf_counter()
        (w,) = frame()
        if not wait_until(w.is_completed, time.monotonic() + 60, 1e-5):
            raise AssertionError("a block after the failed one not done: the group stayed open")
        w.wait()
        runs.append((time.perf_counter() - t0) * 1e6)
    if hasattr(pg, "shutdown"):
        pg.shutdown()
    eager_mib, first_mib = (free0 - free1) / 2**20, (free1 - free2) / 2**20
    med = statistics.median(runs)
    return Outcome(f"1 work/frame, {med:.0f} us",
                   f"one block of 3 sends + 3 recvs (bf16, int16, int64 as bytes), bit-exact; "
                   f"eager communicator {eager_mib:.0f} MiB, first block {first_mib:.0f} MiB "
                   f"more (a second communicator would take about as much again); a block "
                   f"whose op raised ({raised}) left the group usable; post + complete "
                   f"median {med:.0f} us (min {min(runs):.0f}, max {max(runs):.0f}, 50 runs)",
                   {"eager_mib": eager_mib, "first_block_mib": first_mib, "raised": raised,
                    "block_us_median": med, "block_us_min": min(runs),
                    "block_us_max": max(runs)})


# ---------------------------------------------------------------- pair

PAIR_WORKER = ROOT / "scripts" / "_gpu_pair_worker.py"
_pair: dict[str, dict[str, Any]] = {}  # device -> what the Language rank wrote


def _pair_results(env: Env) -> dict[str, Any]:
    """Run the two-process pair once (scripts/_gpu_pair_worker.py): on CUDA an
    Embedding and a Language rank on GPUs 0 and 1 over NCCL, on the CPU both
    over Gloo (the dry-run). The Language rank's record, or why there is none."""
    key = str(env.device)
    if key in _pair:
        return _pair[key]
    if env.cuda and torch.cuda.device_count() < 2:
        _pair[key] = {"skip": f"needs two GPUs ({torch.cuda.device_count()} here): NCCL "
                              f"refuses a pair's two ranks on one"}
        return _pair[key]
    out = env.tmp / "pair"
    out.mkdir(exist_ok=True)
    init = f"tcp://127.0.0.1:{_free_port()}"
    store_port = _free_port()
    procs = []
    for rank in (0, 1):
        child = dict(os.environ, LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        if not env.cuda:
            child["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, str(PAIR_WORKER), "--rank", str(rank), "--init", init,
               "--store-port", str(store_port), "--device", env.device.type, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=child, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    record_path = out / "rank1.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if procs[1].returncode != 0 or "error" in record:
        record["error"] = record.get("error") or f"exit {procs[1].returncode}: {logs[1][-1500:]}"
    if procs[0].returncode != -9:  # the Embedding rank is SIGKILLed in the last phase
        record.setdefault("error", f"Embedding rank: exit {procs[0].returncode} (not the "
                                   f"SIGKILL of the last phase): {logs[0][-1500:]}")
    _pair[key] = record
    return record


def _pair_phase(env: Env, phase: str) -> dict[str, Any]:
    record = _pair_results(env)
    if "skip" in record:
        raise Skip(record["skip"])
    if phase not in record:
        raise AssertionError(f"the pair stopped before its '{phase}' phase: "
                             f"{record.get('error', 'no record')}")
    return dict(record[phase], backend=record.get("backend"))


def check_pair_rooms(env: Env) -> Outcome:
    """12 rooms over a real pair (NCCL on two GPUs), half pre-posted, every byte."""
    r = _pair_phase(env, "rooms")
    return Outcome(f"{r['backend']}: {r['rooms']} rooms, {r['chunks']} chunks",
                   f"half with seq_len known (a pre-posted frame's meta and payload in one "
                   f"post), half not; every byte compared; {r['seconds']:.1f} s", r)


def check_pair_sync(env: Env) -> Outcome:
    """Finding 6: while a room's recv stands (its sender waits 2 s), the caller's
    own stream synchronises at once; torch.cuda.synchronize() is reported (docs:
    it waits for the frame)."""
    r = _pair_phase(env, "sync")
    assert r["room"] == "SUCCESS", r["room"]
    if not env.cuda:
        return Outcome("CPU: nothing to synchronise", f"the room: {r['room']}", r)
    assert r["stream_s"] < r["delay_s"] / 4, \
        f"the caller's stream waited {r['stream_s']:.2f} s for a recv that stands"
    return Outcome(f"stream {r['stream_s'] * 1e3:.1f} ms, device {r['device_s']:.2f} s",
                   f"recv standing ~{r['delay_s']:.0f} s: current_stream().synchronize() "
                   f"{r['stream_s'] * 1e3:.1f} ms; torch.cuda.synchronize() "
                   f"{r['device_s']:.2f} s (docs/nccl.md: it waits for the frame); room "
                   f"{r['room']}", r)


def check_pair_capture(env: Env) -> Outcome:
    """Finding 6: a CUDA graph captured while a recv stands: with
    capture_error_mode="thread_local" (what the docs ask) the capture, its replay
    and the room succeed; with "global" (torch's default) what happens is reported."""
    local = _pair_phase(env, "capture_thread_local")
    glob = _pair_phase(env, "capture_global")
    entry = _pair_phase(env, "graph_entry")
    values = {"thread_local": local, "global": glob, "graph_entry": entry}
    assert local["room"] == "SUCCESS", f"thread_local: the room {local['room']}"
    assert entry["room"] == "SUCCESS", f"torch.cuda.graph(): the room {entry['room']}"
    if not env.cuda:
        return Outcome("CPU: no graphs", f"rooms {local['room']}, {glob['room']}, "
                       f"{entry['room']}", values)
    assert local["capture"] == "captured, replay exact", f"thread_local: {local['capture']}"
    return Outcome(f"thread_local ok; global: {glob['capture'][:24]}",
                   f"capture_begin() held 0.3 s while a recv stood: thread_local: "
                   f"{local['capture']}, room {local['room']}; global: {glob['capture']}, "
                   f"room {glob['room']}. Entering torch.cuda.graph() (it synchronises the "
                   f"device) took {entry['enter_s']:.2f} s with a recv standing "
                   f"~{entry['delay_s']:.0f} s", values)


def check_pair_dead_peer(env: Env) -> Outcome:
    """Findings 1 and 4: the Embedding rank SIGKILLed while a room waits on the
    pair: the room fails with the cause, the Language process outlives the pair
    group's timeout (CUDA: the watchdog spared it), shutdown() returns at once."""
    r = _pair_phase(env, "dead")
    assert r["status"] == "FAILED", r
    assert r["peer_alive"] is False, f"health() still says the dead peer is alive: {r}"
    assert r["shutdown_s"] < 10.0, f"shutdown took {r['shutdown_s']:.1f} s"
    outlived = f", outlived the group timeout by waiting {r['outlived_s']:.0f} s" \
        if env.cuda else ""
    return Outcome(f"FAILED in {r['failed_s']:.1f} s, shutdown {r['shutdown_s']:.2f} s",
                   f"{r['failure']}{outlived}", r)


def check_lock_cost(env: Env) -> Outcome:
    """What the lock costs a post: 100k uncontended acquire+release of the
    device's lock (TorchPairTransport holds it for each post)."""
    lock = device_lock(env.device)
    n = 100_000
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            with lock:
                pass
        runs.append((time.perf_counter() - t0) / n)
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    empty = (time.perf_counter() - t0) / n
    med = statistics.median(runs)
    return Outcome(f"{(med - empty) * 1e9:.0f} ns / post",
                   f"{n} uncontended `with lock:` x5: median {med * 1e9:.0f} ns "
                   f"[{min(runs) * 1e9:.0f}-{max(runs) * 1e9:.0f}], empty loop "
                   f"{empty * 1e9:.0f} ns", {"ns": (med - empty) * 1e9})


# ---------------------------------------------------------------- model


def check_model(env: Env) -> Outcome:
    """OPTIONAL: the real-model example, when it exists (another engineer's
    examples/qwen_vl.py). Its own checks decide; a non-zero exit fails this row."""
    if not MODEL_EXAMPLE.exists():
        raise Skip(f"optional: {MODEL_EXAMPLE.relative_to(ROOT)} not present")
    if not env.cuda:
        raise Skip("optional: the real model needs CUDA")
    if env.model_cmd is None:
        raise Skip("optional: --no-model")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(env.model_cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=env.model_timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still running after {env.model_timeout:.0f}s") from e
    dt = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    assert proc.returncode == 0, f"exit {proc.returncode}: {' | '.join(tail)}"
    return Outcome(f"ok in {dt:.0f} s", " | ".join(tail)[:300], {"seconds": dt})


# ---------------------------------------------------------------- runner

CHECKS: list[tuple[str, str, Callable[[Env], Outcome]]] = [
    ("contract", "rooms bit-exact, 2 E x TP2", check_rooms),
    ("contract", "producer stream's event", check_producer_stream),
    ("contract", "abort in every state", check_aborts),
    ("contract", "threads bind the device", check_threads),
    ("contract", "caller on a side stream, allocator churn", check_side_stream),
    ("pools", "library stream: no wait for the default stream", check_library_stream),
    ("pools", "pool allocation", check_pool_alloc),
    ("pools", "pool copy-out vs plain copy", check_copy_out),
    ("pools", "result() ids split", check_result_split),
    ("pools", "completion per chunk", check_event_overhead),
    ("nccl", "backend auto-pick, this node", check_backend_pick),
    ("nccl", "backend, 2 ranks on 1 GPU", check_backend_shared_gpu),
    ("nccl", "cycle guard (E>=2, L>=2)", check_cycle_guard),
    ("nccl", "disagg.init, world of one", check_init_one_rank),
    ("nccl", "world of one: groups, first op", check_world_of_one),
    ("nccl", "pair group (eager; default and thin), no world", check_jobs_group),
    ("nccl", "int16 batch, then byte views", check_int16_batch),
    ("nccl", "pair posts: one block per frame", check_pair_posts),
    ("nccl", "device lock, uncontended", check_lock_cost),
    ("pair", "rooms bit-exact over a real pair", check_pair_rooms),
    ("pair", "synchronize() with a recv standing", check_pair_sync),
    ("pair", "graph capture with a recv standing", check_pair_capture),
    ("pair", "dead peer: room fails, process lives", check_pair_dead_peer),
    ("model", "examples/qwen_vl.py", check_model),
]


def run_check(section: str, name: str, fn: Callable[[Env], Outcome], env: Env) -> Row:
    t0 = time.perf_counter()
    try:
        out = fn(env)
        row = Row(section, name, PASS, out.figure, out.detail, values=out.values)
    except Skip as e:
        row = Row(section, name, SKIP, "", str(e))
    except Exception as e:
        text = str(e) or repr(e)
        if not isinstance(e, AssertionError):
            text = f"{type(e).__name__}: {text}\n{traceback.format_exc(limit=4)}"
        row = Row(section, name, FAIL, "", text)
    row.seconds = time.perf_counter() - t0
    return row


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.result == FAIL for r in rows) else 0


def header(env: Env) -> str:
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "-"
        return (f"gpu_check on {env.device} ({props.name}, {props.total_memory / 2**30:.0f} GiB), "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
                f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', '-')}")
    why = ("no CUDA on this machine" if not torch.cuda.is_available()
           else "--device cpu")
    return (f"gpu_check: {why}: CPU dry-run of the same code paths (device cpu, Gloo); "
            f"figures are CPU figures, not GPU ones. torch {torch.__version__}")


def print_table(rows: list[Row], out: Any = sys.stdout) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'section':<9} {'check':<{width}} {'result':<6} {'s':>5}  figure", file=out)
    for r in rows:
        print(f"{r.section:<9} {r.check:<{width}} {r.result:<6} {r.seconds:5.1f}  {r.figure}",
              file=out)
    print(file=out)
    for r in rows:
        if r.detail:
            first, *rest = r.detail.splitlines()
            print(f"  {r.check}: {first}", file=out)
            for line in rest:
                print(f"    {line}", file=out)
    n = {k: sum(1 for r in rows if r.result == k) for k in (PASS, FAIL, SKIP)}
    print(f"\n{n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--device", default=None,
                   help="cuda[:N] or cpu (default: cuda:0 when CUDA is there, else the CPU "
                        "dry-run)")
    p.add_argument("--json", metavar="PATH", help="write every check as JSON here ('-': stdout)")
    p.add_argument("--only", metavar="SECTIONS",
                   help="comma-separated sections to run (contract, pools, nccl, model)")
    p.add_argument("--no-model", action="store_true", help="skip the optional real-model check")
    p.add_argument("--model-cmd", default=None,
                   help="command for the model check (default: torchrun --standalone "
                        "--nproc-per-node 2 examples/qwen_vl.py)")
    p.add_argument("--model-timeout", type=float, default=600.0, help="seconds (default 600)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                print("gpu_check: --device cuda but this machine has no CUDA", file=sys.stderr)
                return 2
            if device.index is None:
                device = torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_cmd = None if args.no_model else (
        args.model_cmd.split() if args.model_cmd else
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(MODEL_EXAMPLE)])
    sections = None if args.only is None else set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = Env(device, tmp, model_cmd, args.model_timeout)
    print(header(env), flush=True)
    rows: list[Row] = []
    try:
        for section, name, fn in CHECKS:
            if sections is None or section in sections:
                rows.append(run_check(section, name, fn, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    if args.json:
        record = {"header": header(env), "device": str(device), "dry_run": device.type != "cuda",
                  "rows": [dataclasses.asdict(r) for r in rows], "exit": exit_code(rows)}
        text = json.dumps(record, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("disagg")]
    if alive:
        print(f"disagg threads left behind: {alive}", file=sys.stderr)
        return 1
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
