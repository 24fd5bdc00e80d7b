"""One rank of bench_transfer.py. Each scenario gets a fresh torch.distributed
world (a new file:// rendezvous) in the same processes; in it the raw send/recv
baseline, the ZeroMQ baseline and disagg under each of its modes (a caller that
blocks, spins or serves, with or without seq_len known) take turns moving the
same tensors, every round behind a barrier on a side group. Every rank reports when it left
the barrier and Language ranks when each room's last byte was usable, on the
host's shared CLOCK_MONOTONIC; `_bench_report` turns that into durations.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import json
import os
import resource
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import zmq
from _bench_scenarios import BASELINES, SERVING_WORK_S, Scenario, parse_mode

import disagg
from disagg import TransferStatus
from disagg.progress import PAUSE_S

WAIT_S = 60.0  # a room that takes longer than this is a bug, not a measurement


def vm_rss_kb() -> int:
    """Resident set size of this process, in KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass  # not Linux: peak RSS is the best there is
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _config(sc: Scenario, rank: int) -> disagg.DisaggConfig:
    """num_blocks may differ between the sides. The Embedding budget holds a whole
    round; the Language pool too, unless the scenario limits it to a few allocations."""
    round_blocks = -(-sc.tokens // sc.block) * max(sc.rooms, 32)
    if rank > 0 and sc.pool_allocs:
        num_blocks = sc.pool_allocs * sc.alloc_tokens // sc.block
    else:
        num_blocks = max(round_blocks, 64)
    return disagg.DisaggConfig(
        language_tp_size=sc.tp, hidden_size=sc.hidden, block_size=sc.block,
        num_blocks=num_blocks, default_alloc_tokens=sc.alloc_tokens, recv_into=sc.recv_into,
        auto_resume=not sc.manual_resume, bootstrap_timeout=WAIT_S, peer_timeout=30.0,
        slow_room_s=None)


class _Rank:
    """This rank's side of one scenario: tensors, sockets, and one round per kind."""

    def __init__(self, ctx: disagg.Context, sc: Scenario, rank: int, fresh: bool,
                 recycle: bool = True) -> None:
        self.ctx, self.sc, self.rank, self.fresh = ctx, sc, rank, fresh
        self.recycle = recycle  # Language: hand results back when the round ends
        self.langs = list(range(1, sc.world))
        self.side = dist.new_group(backend="gloo")
        self.raw = dist.new_group(backend="gloo")
        self.room = 0
        self.ready: list[disagg.Receiver] = []  # alloc_first: receivers init()ed before a round
        g = torch.Generator().manual_seed(1234)  # every rank holds the same source
        n, h = sc.tokens, sc.hidden
        self.emb = torch.randint(-(1 << 15), 1 << 15, (n, h), generator=g,
                                 dtype=torch.int16).view(torch.bfloat16)
        self.ids = torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32)
        self.pos = torch.randint(0, 1 << 12, (3, n), generator=g, dtype=torch.int32)
        self.srcs = [self.emb, self.ids, self.pos.t().contiguous()]  # what raw/zmq move
        self.zctx = zmq.Context()
        port = torch.zeros(sc.world, dtype=torch.int64)
        if rank == 0:
            self.push = {}
            for lang in self.langs:
                s = self.push[lang] = self.zctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
        else:
            self.pull = self.zctx.socket(zmq.PULL)
            self.pull.setsockopt(zmq.LINGER, 0)
            port[rank] = self.pull.bind_to_random_port("tcp://127.0.0.1")
            rooms = 0 if sc.is_memory or fresh else sc.rooms
            # preallocated (and touched) landing tensors, one set per room of a round
            self.dsts = [[torch.zeros_like(t) for t in self.srcs] for _ in range(rooms)]
            self.dst_np = [[_bytes(d) for d in ds] for ds in self.dsts]
        dist.all_reduce(port, group=self.side)
        if rank == 0:
            for lang in self.langs:
                self.push[lang].connect(f"tcp://127.0.0.1:{int(port[lang])}")
            self.frames = [_bytes(t) for t in self.srcs]

    def close(self) -> None:
        self.zctx.destroy(linger=0)

    def _landing(self, j: int) -> list[torch.Tensor]:
        """Where a baseline's room j lands: the preallocated, touched tensors, or
        (fresh) new ones, as a receiver that hands each request its own gets."""
        return [torch.empty_like(t) for t in self.srcs] if self.fresh else self.dsts[j]

    # ------------------------------------------------------------ rounds

    def round(self, kind: str, check: bool = False,
              rooms: int | None = None) -> list[tuple[float, list[float]]]:
        """Move one round of `kind` ("raw", "zmq", or one of disagg's modes,
        such as "spin" or "wait+len"). Returns its segments, each (start, [room
        ends]) in time.monotonic() seconds (CLOCK_MONOTONIC: one clock for every
        rank on this host); rank 0 reports starts only. The rooms of a round
        start together behind one barrier; in a `sequential` scenario each room
        is a segment of its own behind its own barrier."""
        k = self.sc.rooms if rooms is None else rooms
        side = "send" if self.rank == 0 else "recv"
        is_disagg = kind not in BASELINES
        caller, known = parse_mode(kind) if is_disagg else ("", False)
        fn = getattr(self, f"_{'disagg' if is_disagg else kind}_{side}")
        segments = []
        n = 1 if self.sc.sequential else k
        for j in range(k if self.sc.sequential else 1):
            if is_disagg and self.rank > 0 and self.sc.alloc_first:
                self.ready = self._disagg_init(n, known)  # the ALLOCs leave before the barrier
            dist.barrier(group=self.side)
            t0 = time.monotonic()
            args = (caller, known) if is_disagg else ()
            segments.append((t0, fn(n, check and j == 0, *args)))
        return segments

    def _disagg_send(self, k: int, check: bool, caller: str, known: bool) -> list[float]:
        senders = []
        for _ in range(k):
            s = self.ctx.embedding.sender(self.room)
            self.room += 1
            s.send(self.emb, self.ids, self.pos)
            senders.append(s)
        if caller == "serving":
            _serve(senders)
        else:
            for s in senders:
                _expect(_settle(s, caller), s)
        return []

    def _disagg_init(self, k: int, known: bool) -> list[disagg.Receiver]:
        """init() k rooms; `known`: with seq_len=, so the ALLOC carries the length."""
        recvs = []
        for _ in range(k):
            r = self.ctx.language.receiver(self.room, src_rank=0)
            self.room += 1
            if not (r.init(seq_len=self.sc.tokens) if known else r.init()):
                raise RuntimeError(f"room {r.room}: no free blocks for init()")
            recvs.append(r)
        return recvs

    def _disagg_recv(self, k: int, check: bool, caller: str, known: bool) -> list[float]:
        more = self.sc.alloc_tokens if self.sc.manual_resume else None
        recvs, self.ready = self.ready or self._disagg_init(k, known), []
        if caller == "serving":  # every live room looked at once per loop iteration
            done = _serve(recvs, more)
        else:
            done = []
            for r in recvs:  # in start order: a room's end is seen once those before it ended
                _finish(r, more, caller)
                done.append(time.monotonic())
        if check:
            for r in recvs:
                res = r.result()
                _check_equal([res.embeddings, res.fill_ids, res.mrope_positions],
                             [self.emb, self.ids, self.pos], "disagg")
        if self.recycle:  # as a serving loop after prefill (the baselines reuse theirs)
            for r in recvs:
                self.ctx.language.recycle(r.result())
        return done

    def _raw_send(self, k: int, check: bool) -> list[float]:
        for _ in range(k):  # room after room, each posted to every Language rank at once
            works = [dist.isend(t, lang, group=self.raw) for lang in self.langs for t in self.srcs]
            for w in works:
                w.wait()
        return []

    def _raw_recv(self, k: int, check: bool) -> list[float]:
        done, landed = [], []
        for j in range(k):
            dsts = self._landing(j)
            for w in [dist.irecv(d, 0, group=self.raw) for d in dsts]:
                w.wait()
            done.append(time.monotonic())
            landed.append(dsts)  # a round's results live until it ends, as disagg's do
        if check:
            _check_equal(landed[0], self.srcs, "raw")
        return done

    def _rawloop_send(self, k: int, check: bool) -> list[float]:
        """raw's sends, every room posted at once, then looked at once per
        serving-loop iteration (SERVING_WORK_S of Python between looks): what
        such a loop costs a transfer with no library at all."""
        works = [dist.isend(t, lang, group=self.raw)
                 for _ in range(k) for lang in self.langs for t in self.srcs]
        _loop_until([works])
        return []

    def _rawloop_recv(self, k: int, check: bool) -> list[float]:
        """raw's recvs, every room posted at once, each room's end seen by the
        serving loop's next look."""
        landed = [self._landing(j) for j in range(k)]
        works = [[dist.irecv(d, 0, group=self.raw) for d in dsts] for dsts in landed]
        done = _loop_until(works)
        if check:
            _check_equal(landed[0], self.srcs, "rawloop")
        return done

    def _zmq_send(self, k: int, check: bool) -> list[float]:
        for _ in range(k):
            for lang in self.langs:
                self.push[lang].send_multipart(self.frames, copy=False)
        return []

    def _zmq_recv(self, k: int, check: bool) -> list[float]:
        done, landed = [], []
        for j in range(k):
            frames = self.pull.recv_multipart(copy=False)
            dsts = self._landing(j)
            dst_np = [_bytes(d) for d in dsts] if self.fresh else self.dst_np[j]
            for f, d in zip(frames, dst_np, strict=True):
                np.copyto(d, np.frombuffer(f.buffer, dtype=np.uint8))
            done.append(time.monotonic())
            landed.append(dsts)  # a round's results live until it ends, as disagg's do
        if check:
            _check_equal(landed[0], self.srcs, "zmq")
        return done


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 array (no copy)."""
    return t.view(-1).view(torch.uint8).numpy()


def _expect(status: TransferStatus, room: disagg.Sender | disagg.Receiver) -> None:
    if status != TransferStatus.SUCCESS:
        raise RuntimeError(f"room {room.room}: {status.name} {room.failure or '(timed out)'}")


TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)


def _busy(seconds: float) -> None:
    """Pure-Python work that holds the GIL, as a serving loop's scheduler does."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1


def _settle(room: disagg.Sender | disagg.Receiver, caller: str) -> TransferStatus:
    """How the caller waits for a room to end (or, on a receiver, to need a
    resume): blocked in wait(), spinning on poll(), or a serving loop that
    does SERVING_WORK_S of Python between polls."""
    if caller == "wait":
        return room.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while True:
        st = room.poll()
        if st in TERMINAL or (isinstance(room, disagg.Receiver) and room.needs_resume):
            return st
        if time.monotonic() > deadline:
            return st
        if caller == "serving":
            _busy(SERVING_WORK_S)


def _serve(rooms: list[disagg.Sender] | list[disagg.Receiver], resume_tokens: int | None = None) -> list[float]:
    """A serving loop: each iteration does SERVING_WORK_S of Python, then looks
    at every live room once (a receiver that asks is resumed there), as an
    engine's scheduler does. Returns when each room was first seen ended, in
    the rooms' order."""
    ends: dict[int, float] = {}
    live = list(rooms)
    deadline = time.monotonic() + WAIT_S
    while True:
        for room in list(live):
            st = room.poll()
            if st in TERMINAL:
                _expect(st, room)
                ends[id(room)] = time.monotonic()
                live.remove(room)
            elif isinstance(room, disagg.Receiver) and room.needs_resume:
                room.resume(resume_tokens)
        if not live:
            return [ends[id(room)] for room in rooms]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(live)} room(s) not ended in {WAIT_S:.0f}s")
        _busy(SERVING_WORK_S)


def _loop_until(rooms: list[list[dist.Work]]) -> list[float]:
    """A serving loop over raw works: each iteration looks at every room once,
    then does SERVING_WORK_S of Python. Gloo's p2p works report completion only
    through a blocking wait() (is_completed() stays False until then), so one
    thread waits for them, in order, and marks each room: the least any
    Python-driven transfer on Gloo pays. Each look first leaves the GIL for
    PAUSE_S, as disagg's poll() does, or the thread would wait out CPython's
    switch interval (5 ms) for it. When each room was first seen complete by
    the loop, in order."""
    done = [False] * len(rooms)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            for j, works in enumerate(rooms):
                for w in works:
                    w.wait()
                done[j] = True
        except BaseException as e:  # reported by the loop
            errors.append(e)

    t = threading.Thread(target=waiter, name="rawloop-waiter", daemon=True)
    t.start()
    ends: list[float | None] = [None] * len(rooms)
    deadline = time.monotonic() + WAIT_S
    while True:
        if errors:
            raise errors[0]
        time.sleep(PAUSE_S)
        for j in range(len(rooms)):
            if ends[j] is None and done[j]:
                ends[j] = time.monotonic()
        if all(e is not None for e in ends):
            t.join()
            return [e for e in ends if e is not None]
        if time.monotonic() > deadline:
            raise RuntimeError("raw works not complete in time")
        _busy(SERVING_WORK_S)


def _finish(r: disagg.Receiver, resume_tokens: int | None, caller: str = "wait") -> None:
    """Wait for one room; resume it by hand when it asks (auto_resume=False)."""
    while True:
        st = _settle(r, caller)
        if st in TERMINAL:
            return _expect(st, r)
        if not r.needs_resume:
            raise RuntimeError(f"room {r.room} stuck in {st.name} for {WAIT_S:.0f}s")
        r.resume(resume_tokens)


def _check_equal(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        if not torch.equal(g.contiguous().view(-1).view(torch.uint8),
                           w.contiguous().view(-1).view(torch.uint8)):
            raise AssertionError(f"{what}: received bytes differ from the source")


def _timed(me: _Rank, kinds: list[str], rounds: int, warmup: int) -> dict:
    """Interleaved rounds of every kind (the baselines and disagg's modes); per
    kind, per measured round: its segments and this rank's minor page faults
    during it."""
    out: dict[str, list] = {k: [] for k in kinds}
    faults: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(warmup + rounds):
        r = i % len(kinds)
        for kind in kinds[r:] + kinds[:r]:  # rotate who goes first
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            segments = me.round(kind, check=i == 0)
            if i >= warmup:
                out[kind].append(segments)
                faults[kind].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    stats = me.ctx.stats()
    return {"rounds": out, "minor_faults": faults,
            "stats": {k: stats[k] for k in ("chunks", "resumes", "failures", "rooms_live")},
            "disagg_rooms": (warmup + rounds) * me.sc.rooms * (len(kinds) - len(BASELINES))}


def _memory(me: _Rank, mode: str) -> dict:
    """RSS after each checkpoint's worth of small rooms, 32 in flight at a time."""
    done, rss = 0, []
    me.round(mode, check=True, rooms=1)
    done += 1
    for cp in me.sc.memory_checkpoints:
        while done < cp:
            me.round(mode, rooms=min(32, cp - done))
            done += min(32, cp - done)
        gc.collect()
        dist.barrier(group=me.side)
        rss.append(vm_rss_kb())
    stats = me.ctx.stats()
    return {"rss_kb": rss, "stats": {k: stats[k] for k in
                                     ("failures", "rooms_live", "pool_free_blocks")}}


def run_scenario(rank: int, sc: Scenario, init_method: str, rounds: int, warmup: int,
                 timeout_s: float, fresh: bool, modes: list[str], recycle: bool = True) -> dict:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=sc.world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    faulthandler.dump_traceback_later(timeout_s, exit=True)  # a hang shows its stacks
    try:
        ctx = disagg.init(_config(sc, rank))  # reuses the world above, leaves it to us
        me = None
        try:
            me = _Rank(ctx, sc, rank, fresh, recycle)
            out = (_memory(me, modes[0]) if sc.is_memory
                   else _timed(me, [*BASELINES, *modes], rounds, warmup))
            dist.barrier(group=me.side)
            return out
        finally:
            if me is not None:
                me.close()
            ctx.shutdown()
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()


def _exit_with_parent() -> None:
    """A rank whose parent was killed (e.g. a test timeout) exits within a second
    instead of waiting in a barrier for good."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


def rank_main(rank: int, scenarios: list[Scenario], rounds: int, warmup: int, tmpdir: str,
              timeout_s: float, fresh: bool, modes: list[list[str]],
              recycle: bool = True) -> None:
    """torch.multiprocessing entry: every scenario this rank takes part in, each
    with its disagg modes (`modes[i]` for scenario i); results to
    `tmpdir/rank{rank}.json` (None for scenarios with fewer ranks). `recycle`:
    Language ranks hand disagg's results back at the end of each round."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _exit_with_parent()
    out = []
    for i, sc in enumerate(scenarios):
        out.append(None if rank >= sc.world else run_scenario(
            rank, sc, f"file://{tmpdir}/world-{i}", rounds, warmup, timeout_s, fresh, modes[i],
            recycle))
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
