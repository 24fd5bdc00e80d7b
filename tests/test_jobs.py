"""Separate jobs that meet through a rendezvous store (`disagg.join`), on real
processes over Gloo on 127.0.0.1. The test process hosts the store and drives
every phase through it; no process shares a torch.distributed world with
another job.

Jobs: a Language job of TP 2 (its own world of two processes); encoders
"enc-a" (no world at all) and "enc-b" (its own world of one, joining late);
"enc-c", SIGKILLed with rooms queued on it, then restarted under the same
name; and the Language job itself stopped and started again. Every room is
compared byte for byte; pools are whole on every live process at the end; no
process but the killed one dies. Measured and printed: join-to-usable for a
late encoder, kill-to-PEER_LOST on the Language ranks, kill-to-peers() drop.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port
from test_faults import aux_of, make_data, mismatches

import disagg
from disagg import TransferStatus
from disagg.roster import key, language_id
from disagg.store import host_store

pytestmark = pytest.mark.timeout(240)

HIDDEN, BS, PEER_TIMEOUT = 64, 16, 2.0
TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)


def cfg() -> disagg.DisaggConfig:
    return disagg.DisaggConfig(language_tp_size=2, hidden_size=HIDDEN, block_size=BS,
                               num_blocks=64, default_alloc_tokens=4 * BS, backend="gloo",
                               host="127.0.0.1", bootstrap_timeout=30.0,
                               peer_timeout=PEER_TIMEOUT)


class Board:
    """The test's own keys in the rendezvous store: JSON values, bounded waits."""

    def __init__(self, port: int) -> None:
        self.store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                   wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=120))

    def put(self, k: str, v: Any = True) -> None:
        self.store.set(f"test/{k}", json.dumps(v))

    def get(self, k: str, timeout: float = 60.0) -> Any:
        self.store.wait([f"test/{k}"], datetime.timedelta(seconds=timeout))
        return json.loads(self.store.get(f"test/{k}"))

    def has(self, k: str) -> bool:
        return bool(self.store.check([f"test/{k}"]))


# ---------------------------------------------------------------- processes

def encoder(port: int, name: str, with_world: bool, out: Any) -> None:
    """Serve every room the board names for `name`, in order, until "stop"."""
    try:
        board = Board(port)
        if with_world:  # an encoder job with a torchrun-like world of its own
            fd, path = tempfile.mkstemp()
            os.close(fd)
            os.unlink(path)
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=0,
                                    world_size=1)
        t0 = time.monotonic()
        ctx = disagg.join(cfg(), f"tcp://127.0.0.1:{port}", role="embedding", name=name)
        board.put(f"joined/{name}/{ctx.rank}", {"pid": os.getpid(), "join_s": time.monotonic()
                                                - t0, "started": time.time()})
        outcome: dict[str, Any] = {}
        held: dict[int, Any] = {}
        i = 0
        while True:
            job = board.get(f"serve/{name}/{ctx.rank}/{i}", 120.0)
            i += 1
            if job == "stop":
                break
            room, seq, hold = job
            s = ctx.embedding.sender(room)
            if hold:  # queued with no data: the rank is killed once both ALLOCs are here
                lanes = ctx.embedding._rooms[room].lanes  # observed, not driven
                deadline = time.monotonic() + 30
                while len(lanes) < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                board.put(f"held/{room}", len(lanes))
                held[room] = s
                continue
            s.send(*make_data(room, seq, HIDDEN), aux=aux_of(room))
            outcome[str(room)] = (s.wait(60.0).name, s.failure)
            board.put(f"sent/{room}", outcome[str(room)])
        st = ctx.stats()
        res = {"outcome": outcome, "rooms_live": st["rooms_live"],
               "whole": st["pool_free_blocks"] == st["pool_total_blocks"],
               "held": {str(r): (s.poll().name, s.failure) for r, s in held.items()}}
        ctx.shutdown()
        if with_world:
            dist.destroy_process_group()
        out.put((name, "ok", res))
    except BaseException:
        out.put((name, "error", traceback.format_exc()))


def language(port: int, job: str, rank: int, init_method: str, name: str, out: Any) -> None:
    """One TP rank of a Language job: add the rooms the board lists, in order,
    step in lockstep, report each room's outcome; "stop" ends it. `name`: its
    name in the deployment (a restarted job's ranks reuse their names)."""
    who = f"{job}/{rank}"
    try:
        board = Board(port)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
        ctx = disagg.join(cfg(), f"tcp://127.0.0.1:{port}", role="language", name=name)
        board.put(f"lang_joined/{job}/{rank}", ctx.rank)
        q = ctx.language.queue()
        results: dict[str, Any] = {}
        added: dict[int, float] = {}
        lost_at: dict[str, float] = {}
        i = 0
        stop = False
        while not stop or len(q):
            # admission is a rank-agreed decision: TP rank 0 counts what arrived and
            # tells rank 1 (the queue wants the same rooms, in the same order, per step)
            n = torch.tensor([0])
            if rank == 0:
                while board.has(f"add/{job}/{i + int(n)}") and n < 16:
                    n += 1
            dist.broadcast(n, src=0)
            for _ in range(int(n)):
                item = board.get(f"add/{job}/{i}")
                i += 1
                if item == "stop":
                    stop = True
                    break
                room, seq, src_name = item
                src = board.get(f"src/{src_name}")  # the id, the same on both ranks
                q.add(room, src_rank=src)
                added[room] = time.time()
            done, failed = q.step()
            for room, res in done:
                seq = board.get(f"seq/{room}")
                results[str(room)] = ("SUCCESS", mismatches(res, room, seq, HIDDEN))
            for room, why in failed:
                results[str(room)] = ("FAILED", str(why))
                lost_at[str(room)] = time.time()
            for room_s in [*(str(r) for r, _ in done), *(str(r) for r, _ in failed)]:
                board.put(f"lout/{who}/{room_s}", results[room_s])
            peers = ctx.peers()
            board.put(f"peers/{who}", {str(k): v for k, v in peers.items()})
            time.sleep(0.002)
        st = ctx.stats()
        res = {"results": results, "lost_at": lost_at, "rooms_live": st["rooms_live"],
               "whole": st["pool_free_blocks"] == st["pool_total_blocks"]}
        ctx.shutdown()
        dist.destroy_process_group()
        out.put((who, "ok", res))
    except BaseException:
        out.put((who, "error", traceback.format_exc()))


# ---------------------------------------------------------------- the driver

class Deployment:
    def __init__(self) -> None:
        self.port = free_port()
        self.store = host_store(self.port, "127.0.0.1")
        self.board = Board(self.port)
        self.mp = mp.get_context("spawn")
        self.out = self.mp.Queue()
        self.procs: dict[str, Any] = {}
        self.results: dict[str, tuple[str, Any]] = {}
        self.ids: dict[str, int] = {}
        self.room = 100

    def start_encoder(self, name: str, with_world: bool = False) -> float:
        p = self.mp.Process(target=encoder, args=(self.port, name, with_world, self.out),
                            daemon=True)
        t0 = time.time()
        p.start()
        self.procs[name] = p
        known = set(self.ids.values())
        deadline = time.monotonic() + 60
        while True:  # its new id
            for i in range(int(self.store.add(key("emb", "next"), 0))):
                if i not in known and self.board.has(f"joined/{name}/{i}"):
                    self.ids[name] = i
                    self.board.put(f"src/{name}", i)
                    self.serve_index = getattr(self, "serve_index", {})
                    self.serve_index[name] = 0
                    return t0
            assert time.monotonic() < deadline, f"{name} did not join"
            time.sleep(0.01)

    def start_language(self, job: str, names: str | None = None) -> None:
        fd, path = tempfile.mkstemp()
        os.close(fd)
        os.unlink(path)
        for rank in (0, 1):
            name = f"{names or job}/{rank}"
            p = self.mp.Process(target=language, args=(self.port, job, rank, f"file://{path}",
                                                       name, self.out), daemon=True)
            p.start()
            self.procs[f"{job}/{rank}"] = p
        self.add_index = getattr(self, "add_index", {})
        self.add_index[job] = 0
        for rank in (0, 1):
            self.board.get(f"lang_joined/{job}/{rank}")

    def usable(self, job: str, name: str, timeout: float = 30.0) -> float:
        """Seconds until both TP ranks list `name`'s current id in peers()."""
        t0 = time.monotonic()
        want = str(self.ids[name])
        while True:
            if all(self.board.has(f"peers/{job}/{r}") and want in
                   self.board.get(f"peers/{job}/{r}") for r in (0, 1)):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"{name} not usable by {job}"
            time.sleep(0.01)

    def rooms(self, job: str, name: str, n: int, *, hold: bool = False) -> list[int]:
        out = []
        for _ in range(n):
            self.room += 1
            room, seq = self.room, 20 + (self.room * 37) % 150
            self.board.put(f"seq/{room}", seq)
            self.board.put(f"serve/{name}/{self.ids[name]}/{self.serve_index[name]}",
                           [room, seq, hold])
            self.serve_index[name] += 1
            self.board.put(f"add/{job}/{self.add_index[job]}", [room, seq, name])
            self.add_index[job] += 1
            out.append(room)
        return out

    def outcome(self, job: str, room: int, timeout: float = 60.0) -> tuple[Any, Any]:
        try:
            return (self.board.get(f"lout/{job}/0/{room}", timeout),
                    self.board.get(f"lout/{job}/1/{room}", timeout))
        except dist.DistStoreError:
            while True:  # say why: a process that raised, or which died
                try:
                    who, kind, value = self.out.get(timeout=0.5)
                    self.results[who] = (kind, value)
                except Exception:
                    break
            dead = {n: p.exitcode for n, p in self.procs.items() if not p.is_alive()}
            raise AssertionError(f"no outcome for room {room} on {job}; results "
                                 f"{self.results}; exited {dead}") from None

    def stop_encoder(self, name: str) -> None:
        self.board.put(f"serve/{name}/{self.ids[name]}/{self.serve_index[name]}", "stop")

    def stop_language(self, job: str) -> None:
        self.board.put(f"add/{job}/{self.add_index[job]}", "stop")

    def collect(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(n in self.results for n in names):
            left = deadline - time.monotonic()
            assert left > 0, f"no result from {[n for n in names if n not in self.results]}"
            try:
                who, kind, value = self.out.get(timeout=min(left, 0.5))
                self.results[who] = (kind, value)
            except Exception:
                dead = [n for n in names if n not in self.results
                        and not self.procs[n].is_alive()]
                assert not dead, f"died without a word: {dead}"
        errors = {n: v for n, (k, v) in self.results.items() if k == "error"}
        assert not errors, "\n".join(f"{n}:\n{v}" for n, v in errors.items())

    def close(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)


def test_jobs_join_leave_die_restart_while_the_llm_serves() -> None:
    d = Deployment()
    timings: dict[str, Any] = {}
    try:
        d.start_language("llm")
        t0 = d.start_encoder("enc-a")  # no world at all
        timings["enc-a usable after start (s)"] = round(d.usable("llm", "enc-a")
                                                        + time.time() - t0, 3)
        first = d.rooms("llm", "enc-a", 6)
        for room in first:
            assert d.outcome("llm", room) == (["SUCCESS", []], ["SUCCESS", []]), room

        # a late encoder with a world of its own
        t0 = d.start_encoder("enc-b", with_world=True)
        timings["enc-b (late) usable after start (s)"] = round(
            time.time() - t0, 3) if d.usable("llm", "enc-b") >= 0 else None
        both = d.rooms("llm", "enc-b", 4) + d.rooms("llm", "enc-a", 4)
        for room in both:
            assert d.outcome("llm", room) == (["SUCCESS", []], ["SUCCESS", []]), room

        # enc-c: rooms queued on it (ALLOCs waiting, no data), then SIGKILL
        d.start_encoder("enc-c")
        d.usable("llm", "enc-c")
        held = d.rooms("llm", "enc-c", 3, hold=True)
        killed_id = d.ids["enc-c"]
        assert [d.board.get(f"held/{room}") for room in held] == [2, 2, 2]
        kill_at = time.time()
        os.kill(d.procs["enc-c"].pid, signal.SIGKILL)
        for room in held:
            o0, o1 = d.outcome("llm", room)
            assert o0[0] == o1[0] == "FAILED", (room, o0, o1)
        t_fail = time.time() - kill_at
        while any(str(killed_id) in d.board.get(f"peers/llm/{r}") for r in (0, 1)):
            assert time.time() - kill_at < 30, "the killed encoder is still listed"
            time.sleep(0.01)
        timings["kill -> rooms FAILED on both TP ranks (s)"] = round(t_fail, 3)
        timings["kill -> peers() drop (s)"] = round(time.time() - kill_at, 3)
        # the others carry on meanwhile
        for room in d.rooms("llm", "enc-a", 2) + d.rooms("llm", "enc-b", 2):
            assert d.outcome("llm", room) == (["SUCCESS", []], ["SUCCESS", []]), room

        # enc-c restarted under the same name: a new id, usable again
        t0 = d.start_encoder("enc-c")
        assert d.ids["enc-c"] != killed_id
        d.usable("llm", "enc-c")
        timings["enc-c restarted: usable after start (s)"] = round(time.time() - t0, 3)
        for room in d.rooms("llm", "enc-c", 3):
            assert d.outcome("llm", room) == (["SUCCESS", []], ["SUCCESS", []]), room

        # the Language job is SIGKILLed with rooms live on enc-a, and restarted
        # under the same names: only its rooms end; the restart is served
        held = d.rooms("llm", "enc-a", 2, hold=True)
        assert [d.board.get(f"held/{room}") for room in held] == [2, 2]
        for r in (0, 1):
            os.kill(d.procs[f"llm/{r}"].pid, signal.SIGKILL)
        d.start_language("llm-r", names="llm")
        for name in ("enc-a", "enc-b", "enc-c"):
            d.usable("llm-r", name)
        for room in (d.rooms("llm-r", "enc-a", 2) + d.rooms("llm-r", "enc-b", 2)
                     + d.rooms("llm-r", "enc-c", 2)):
            assert d.outcome("llm-r", room) == (["SUCCESS", []], ["SUCCESS", []]), room
        d.stop_language("llm-r")
        for name in ("enc-a", "enc-b", "enc-c"):
            d.stop_encoder(name)
        d.collect(["llm-r/0", "llm-r/1", "enc-a", "enc-b", "enc-c"])
        for who, (_, res) in d.results.items():
            assert res["rooms_live"] == 0 and res["whole"], (who, res)
        for room in held:  # the killed job's rooms, on the encoder: FAILED, its peer lost
            status, why = d.results["enc-a"][1]["held"][str(room)]
            assert status == "FAILED" and "language rank" in why, (room, status, why)
        for name in ("enc-a", "enc-b", "enc-c"):  # every sent room: SUCCESS
            assert all(o[0] == "SUCCESS" for o in d.results[name][1]["outcome"].values())
        for n, p in d.procs.items():  # the killed enc-c was replaced by its restart
            p.join(20)
            assert p.exitcode == (-signal.SIGKILL if n in ("llm/0", "llm/1") else 0), \
                (n, p.exitcode)
        # nothing of any rank's own left in the store: records and leases deleted
        ids = [*range(int(d.store.add(key("emb", "next"), 0))),
               *(language_id(k, i, 2) for k in range(int(d.store.add(key("inst", "next"), 0)))
                 for i in (0, 1))]
        left = [k for i in ids for k in (key("m", i), key("lease", i)) if d.store.check([k])]
        assert not left, left
        print("jobs timings:", json.dumps(timings))
    finally:
        d.close()


# ---------------------------------------------------------------------------
# geometry per pair, and the rendezvous store going away
# ---------------------------------------------------------------------------

def lone_cfg(hidden: int = HIDDEN) -> disagg.DisaggConfig:
    return cfg().replace(language_tp_size=1, hidden_size=hidden)


def lone_encoder(port: int, name: str, hidden: int, go: Any, out: Any) -> None:
    try:
        ctx = disagg.join(lone_cfg(hidden), f"tcp://127.0.0.1:{port}", role="embedding",
                          name=name)
        out.put((f"{name}/joined", "ok", ctx.rank))
        if name == "bad":  # it refuses the Language rank too, on its own
            deadline = time.monotonic() + 30
            while not ctx._roster.refused:
                assert time.monotonic() < deadline, "the bad encoder never met the LLM"
                time.sleep(0.01)
            out.put(("bad/refused", "ok", dict(ctx._roster.refused)))
        assert go.wait(60)
        res: dict[str, Any] = {"refused": dict(ctx._roster.refused)}
        if name == "good":
            for room in range(10, 15):
                s = ctx.embedding.sender(room)
                s.send(*make_data(room, 40 + room, HIDDEN), aux=aux_of(room))
                res[str(room)] = s.wait(30.0).name
        out.put((f"{name}/done", "ok", res))
        assert go.wait(60)
        ctx.shutdown()
        out.put((name, "ok", ctx.stats()["rooms_live"]))
    except BaseException:
        out.put((name, "error", traceback.format_exc()))


def lone_language(port: int, ids: dict[str, int], go: Any, out: Any) -> None:
    try:
        ctx = disagg.join(lone_cfg(), f"tcp://127.0.0.1:{port}", role="language", name="llm")
        deadline = time.monotonic() + 30
        while set(ctx.peers()) != {ids["good"]} or ids["bad"] not in ctx._roster.refused:
            assert time.monotonic() < deadline, (ctx.peers(), ctx._roster.refused)
            time.sleep(0.01)
        out.put(("llm/met", "ok", {"peers": ctx.peers(), "refused": ctx._roster.refused}))
        assert go.wait(60)  # the store is gone now
        res = {}
        for room in range(10, 15):
            r = ctx.language.receiver(room, src_rank=ids["good"])
            assert r.init()
            deadline = time.monotonic() + 30
            while r.poll() not in TERMINAL:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            res[str(room)] = (r.poll().name, mismatches(r.result(), room, 40 + room, HIDDEN)
                              if r.poll() is TransferStatus.SUCCESS else r.failure)
        res["peers"] = {str(k): v for k, v in ctx.peers().items()}
        out.put(("llm/done", "ok", res))
        t0 = time.monotonic()
        ctx.shutdown()
        out.put(("llm", "ok", {"shutdown_s": time.monotonic() - t0,
                               "rooms_live": ctx.stats()["rooms_live"]}))
    except BaseException:
        out.put(("llm", "error", traceback.format_exc()))


def test_geometry_is_checked_per_pair_and_live_pairs_outlive_the_rendezvous() -> None:
    import subprocess
    port = free_port()
    rdv = subprocess.Popen([sys.executable, "-m", "launch.rendezvous", "--port", str(port),
                            "--host", "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    procs = []
    got: dict[str, Any] = {}

    def wait(*names: str) -> None:
        deadline = time.monotonic() + 90
        while not all(n in got for n in names):
            assert time.monotonic() < deadline, f"waiting for {names}: {got}"
            try:
                who, kind, value = out.get(timeout=0.5)
            except Exception:
                continue
            assert kind == "ok", f"{who}:\n{value}"
            got[who] = value

    try:
        assert rdv.stdout is not None and "rendezvous store" in rdv.stdout.readline()
        for name, hidden in (("good", HIDDEN), ("bad", HIDDEN // 2)):
            procs.append(ctx.Process(target=lone_encoder, args=(port, name, hidden, go, out),
                                     daemon=True))
            procs[-1].start()
        wait("good/joined", "bad/joined")
        ids = {"good": got["good/joined"], "bad": got["bad/joined"]}
        procs.append(ctx.Process(target=lone_language, args=(port, ids, go, out), daemon=True))
        procs[-1].start()
        wait("llm/met", "bad/refused")
        why = got["llm/met"]["refused"][ids["bad"]]
        assert "pool buffers differ" in why and "[64]" in why and "[32]" in why, why
        rdv.kill()  # the rendezvous goes away; the formed pair must keep moving data
        rdv.wait(10)
        go.set()
        wait("good/done", "bad/done", "llm/done", "llm", "good", "bad")
        assert list(got["bad/done"]["refused"]) != [] and "pool buffers differ" in \
            next(iter(got["bad/done"]["refused"].values()))
        for room in range(10, 15):
            assert got["llm/done"][str(room)] == ("SUCCESS", []), room
            assert got["good/done"][str(room)] == "SUCCESS"
        assert got["llm"]["rooms_live"] == 0 and got["llm"]["shutdown_s"] < 10.0, got["llm"]
        print("shutdown with the rendezvous gone (s):", round(got["llm"]["shutdown_s"], 3))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if rdv.poll() is None:
            rdv.kill()
