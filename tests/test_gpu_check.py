"""scripts/gpu_check.py: its CPU dry-run passes in CI (the same code paths as on a
GPU, device cpu), and any failed check makes it exit non-zero."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"

pytestmark = pytest.mark.timeout(150)

# Every check by name; on the CPU these cannot run, and say why.
CPU_SKIPS = {"completion per chunk": "no CUDA events", "examples/qwen_vl.py": "optional",
             "int16 batch, then byte views": "NCCL only",
             "pair posts: one block per frame": "NCCL only",
             "library stream: no wait for the default stream": "no streams on the CPU"}


def _load() -> object:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


def test_cpu_dry_run_passes_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "CPU dry-run of the same code paths" in proc.stdout, text
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["exit"] == 0
    rows = {r["check"]: r for r in record["rows"]}
    names = [c[1] for c in _load().CHECKS]  # type: ignore[attr-defined]
    assert list(rows) == names, text
    for name, row in rows.items():
        if name in CPU_SKIPS:
            assert row["result"] == "SKIP" and CPU_SKIPS[name] in row["detail"], row
        else:
            assert row["result"] == "PASS", row
    # the contract layer's tests ran, on the device, in a pytest of their own
    assert rows["rooms bit-exact, 2 E x TP2"]["values"]["tests"] == 2  # output, pool
    assert rows["producer stream's event"]["values"]["tests"] == 1
    assert rows["abort in every state"]["values"]["tests"] >= 40
    assert "refuses two ranks on one GPU" in rows["backend, 2 ranks on 1 GPU"]["detail"]
    # the table, as printed
    # the pair section: two processes, over Gloo here
    assert rows["rooms bit-exact over a real pair"]["values"]["rooms"] == 12
    assert rows["rooms bit-exact over a real pair"]["values"]["backend"] == "gloo"
    dead = rows["dead peer: room fails, process lives"]["values"]
    assert dead["status"] == "FAILED" and "rank 0" in dead["failure"], dead
    assert "19 passed, 0 failed, 5 skipped" in proc.stdout, text


def test_a_failed_check_fails_the_run() -> None:
    g = _load()

    def broken(env: object) -> object:
        raise AssertionError("bytes differ")

    row = g.run_check("contract", "broken", broken, None)  # type: ignore[attr-defined]
    assert row.result == "FAIL" and "bytes differ" in row.detail
    ok = g.Row("pools", "fine", "PASS")  # type: ignore[attr-defined]
    skipped = g.Row("model", "absent", "SKIP")  # type: ignore[attr-defined]
    assert g.exit_code([ok, skipped]) == 0  # type: ignore[attr-defined]
    assert g.exit_code([ok, row, skipped]) == 1  # type: ignore[attr-defined]


def test_the_kit_runs_the_test_tree_without_importing_it() -> None:
    """The contract section runs tests/inproc with pytest in a subprocess; the
    kit itself imports no module of the test tree (a fresh interpreter loads it
    and looks)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = mod\n"
            "spec.loader.exec_module(mod)\n"
            "tests = [m for m in sys.modules if m.split('.')[0] in "
            "('inproc', 'roomdata', 'harness', 'tests')]\n"
            "print(tests, [p for p in sys.path if p.rstrip('/').endswith('tests')])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []", proc.stdout
    g = _load()
    assert all(f.startswith("tests/inproc/") for f in g.CONTRACT_FILES)  # type: ignore[attr-defined]


def test_the_int16_probe_closes_the_coalescing_torch_leaves_open(monkeypatch) -> None:
    """Issue 29, finding 2: torch's coalescing manager has no try/finally, so an op
    that raises inside `batch_isend_irecv` (a broken or aborted NCCL pair, an
    int16 tensor) leaves the group's coalescing open. disagg's pairs never batch
    (one op per tensor on the pair's group); the kit's int16 row still probes
    torch's raw batch, and its `close_coalescing` ends what that leaves open.
    torch's behaviour is reproduced by a stand-in."""
    import torch
    import torch.distributed as dist

    g = _load()
    state = dist.distributed_c10d._world.pg_coalesce_state
    calls: list[str] = []

    class Group:
        def _start_coalescing(self, device: torch.device) -> None:
            calls.append("start")

        def _end_coalescing(self, device: torch.device) -> None:
            calls.append("end")
            raise RuntimeError("NCCL communicator was aborted")  # its own error: not reported

    group = Group()

    def torch_batch(ops: list) -> list:  # what torch does, up to the op that raises
        state.setdefault(ops[0].group, [])
        ops[0].group._start_coalescing(torch.device("cpu"))
        raise RuntimeError("NCCL error: remote process exited")

    monkeypatch.setattr(dist, "batch_isend_irecv", torch_batch)
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, group: type(
        "Op", (), {"group": group})())
    with pytest.raises(RuntimeError, match="remote process exited"):
        dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.zeros(2), 0, group=group)])
    assert group in state  # left open
    g.close_coalescing(group, torch.device("cpu"))  # type: ignore[attr-defined]
    assert calls == ["start", "end"] and group not in state
    g.close_coalescing(group, torch.device("cpu"))  # type: ignore[attr-defined]  # nothing open
    assert calls == ["start", "end"]
