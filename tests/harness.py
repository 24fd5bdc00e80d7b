"""Run real ranks as processes on Gloo over 127.0.0.1, each bounded by a timeout.

`spawn(world_size, fn, *args)` runs `fn(rank, world_size, init_method, *args)` in
`world_size` fresh processes and returns their results in rank order. Any rank
that raises, dies, or outlives the timeout fails the call with every rank's story;
leftover processes are killed, never left behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pytest

_ONCE: dict[str, tuple[bool, Any]] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, init_method: str, args: tuple,
           out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        out.put((rank, "ok", fn(rank, world, init_method, *args)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))


class RankFailure(AssertionError):
    pass


def spawn(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0,
          expect_dead: set[int] | frozenset[int] = frozenset()) -> list[Any]:
    """Results by rank; ranks in `expect_dead` may die without reporting (None)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="disagg-init-")
    os.close(fd)
    os.unlink(path)
    init_method = f"file://{path}"
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_method, args, out),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import time
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size - len(expect_dead):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, kind, value = out.get(timeout=min(left, 0.5))
                results[rank] = (kind, value)
            except Exception:
                alive_needed = [r for r, p in enumerate(procs)
                                if r not in results and r not in expect_dead]
                if all(not procs[r].is_alive() for r in alive_needed) and alive_needed:
                    # died without a word; drain what may still be queued
                    try:
                        while True:
                            rank, kind, value = out.get(timeout=0.5)
                            results[rank] = (kind, value)
                    except Exception:
                        break
        for p in procs:
            p.join(max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if os.path.exists(path):
            os.unlink(path)
    problems = []
    for r in range(world_size):
        if r in expect_dead:
            continue
        if r not in results:
            code = procs[r].exitcode
            problems.append(f"rank {r}: no result (exit code {code}; timeout {timeout}s)")
        elif results[r][0] == "error":
            problems.append(f"rank {r} raised:\n{results[r][1]}")
    if problems:
        raise RankFailure("\n".join(problems))
    return [results.get(r, (None, None))[1] for r in range(world_size)]


def spawn_once(key: str, world_size: int, fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> list[Any]:
    """`spawn` on first use of `key`, then the same results (or the same failure)
    for every later test that shares the run."""
    if key not in _ONCE:
        try:
            _ONCE[key] = (True, spawn(world_size, fn, *args, **kwargs))
        except Exception as e:
            _ONCE[key] = (False, e)
    ok, value = _ONCE[key]
    if not ok:
        raise AssertionError(f"the {key} run did not complete: {value}")
    return value


def check_whole(ctx: Any, when: str) -> dict[str, Any]:
    """In a rank: every block back in the pool and no room live; the stats then."""
    st = ctx.stats()
    if st["pool_free_blocks"] != st["pool_total_blocks"] or st["rooms_live"] != 0:
        raise AssertionError(f"{ctx.role} rank {ctx.rank} {when}: pool_free_blocks="
                             f"{st['pool_free_blocks']} pool_total_blocks="
                             f"{st['pool_total_blocks']} rooms_live={st['rooms_live']}")
    return st


def rank_results(per_rank: Sequence[tuple[str, Any]], title: str,
                 who: Sequence[str] | None = None) -> list[Any]:
    """The values of one scenario's (status, value) per rank; a rank whose status
    is not "ok" fails the test, with every such rank's story under `title`."""
    names = who or [f"rank {r}" for r in range(len(per_rank))]
    problems = [f"--- {name}: {what}\n{detail}"
                for name, (what, detail) in zip(names, per_rank, strict=True) if what != "ok"]
    if problems:
        pytest.fail(f"{title}:\n" + "\n".join(problems), pytrace=False)
    return [value for _, value in per_rank]
