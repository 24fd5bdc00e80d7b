"""The separate-jobs demo (`launch.jobs_demo`) as a user runs it: one command
that starts a rendezvous, a Language job under torchrun and an encoder job on
127.0.0.1, SIGKILLs the encoder mid-run and restarts it. Checked: the exit
code, the summary, and that no process of the demo outlives it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]


def run_demo(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "launch.jobs_demo", f"--port={port}",
                        "--timeout=60", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p, port


def survivors(port: int) -> list[str]:
    """Processes whose command line names this run's port (the demo passes it to all)."""
    out = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"--port={port}" in cmd and "launch." in cmd:
            out.append(cmd)
    return out


def test_encoder_killed_and_restarted_while_the_llm_serves() -> None:
    p, port = run_demo("--rooms=12", "--restart-after=4")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    rooms = re.search(r"rooms +12: (\d+) SUCCESS .*, (\d+) FAILED, 0 mismatched", p.stdout)
    assert rooms, out
    restart = re.search(r"restart +id (\d+) SIGKILLed after (\d+) rooms ended: (\d+) rooms "
                        r"addressed to it FAILED; restarted as id (\d+): usable ([\d.]+) s "
                        r"after its process started, (\d+) rooms SUCCESS on it", p.stdout)
    assert restart, out
    ok, failed = int(rooms[1]), int(rooms[2])
    killed, after, lost, new, usable_s, on_new = restart.groups()
    assert ok + failed == 12 and failed == int(lost), out  # only the killed one's rooms fail
    assert int(after) >= 4 and int(new) != int(killed) and int(on_new) >= 1, out
    assert float(usable_s) < 30, out
    if failed:  # each TP rank's reason; one names the lost stream, the other may name that rank
        assert len(re.findall(r"\n  reason     ", p.stdout)) == 2, out
        assert re.search(r"reason .*embedding rank " + killed + r"\b", p.stdout), out
    assert "verdict    OK" in p.stdout, out
    assert not survivors(port)


def test_tp1_without_a_restart() -> None:
    p, port = run_demo("--rooms=6", "--language-tp-size=1", "--restart-after=0")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "rooms      6: 6 SUCCESS (every byte checked on 1 TP ranks), 0 FAILED" in p.stdout
    assert "restart" not in p.stdout and "verdict    OK" in p.stdout, out
    assert not survivors(port)
