"""The in-process contract on whatever device the layer runs on
(`DISAGG_TEST_DEVICE`, cpu by default; `scripts/gpu_check.py` runs this file
and `test_abort.py` on a GPU). On CUDA each fake link moves device memory on a
stream of its own, after a GPU-side delay, and completes only once its copy's
event is host-observed, so the library's own stream and event logic runs for
real.

- every room of two Embedding ranks to a TP-2 instance, several chunks each
  (resume rounds, a pool smaller than the rooms), bit-exact on every rank, in
  both landing modes; on CUDA every DATA frame's sends waited for the
  producer's event;
- embeddings written on a side stream behind a GPU delay, `send()` called
  from that stream at once: only the producer's event keeps the sends from
  reading them before they are written, and `send()` returns before they are;
- a Language caller on a side stream under allocator churn: every result it
  read there after letting it go is bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import TERMINAL, TEST_DEVICE, World
from .rooms import mismatches, on, room_data, send

SUCCESS = TransferStatus.SUCCESS
SEQS = (1, 15, 16, 17, 47, 48, 49, 130, 200, 333)
# GPU cycles a producer spends before writing (~20 ms at 1.5-2 GHz)
PRODUCER_DELAY_CYCLES = 40_000_000


def rooms_cfg(recv_into: str) -> DisaggConfig:
    return DisaggConfig(num_embedding_ranks=2, language_tp_size=2, hidden_size=96,
                        block_size=16, num_blocks=24, default_alloc_tokens=48,
                        recv_into=recv_into, auto_resume=True,  # type: ignore[arg-type]
                        extra_buffers={"deepstack": ((2, 8), "bfloat16")},
                        bootstrap_timeout=30.0, peer_timeout=5.0)


@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_rooms_of_two_embedding_ranks_to_tp2_bit_exact(recv_into: str) -> None:
    cfg = rooms_cfg(recv_into)
    with World(cfg, auto_control=True, embedding_blocks=256) as w:
        topo = w.topology
        data = {(e, i): room_data(cfg, 1000 * e + i, seq)
                for e in topo.embedding_ranks for i, seq in enumerate(SEQS)}
        senders = {}
        for (e, i), d in data.items():
            senders[(e, i)] = w.emb(e).sender(d.room)
            send(senders[(e, i)], d)
        receivers = {(e, i, lang): w.lang(lang).receiver(d.room, src_rank=e)
                     for (e, i), d in data.items() for lang in topo.language_ranks}
        inited: set[tuple[int, int, int]] = set()

        def step() -> bool:  # init() again until the pool has blocks for the room
            for key, r in receivers.items():
                if key not in inited and r.init():
                    inited.add(key)
            return all(r.poll() in TERMINAL for r in receivers.values())

        w.run_until(step, f"{recv_into}: every room ended", timeout=60.0)
        bad = [f"{key}: {r.poll().name} {r.failure}" for key, r in receivers.items()
               if r.poll() is not SUCCESS]
        bad += [m for (e, i, _), r in receivers.items() if r.poll() is SUCCESS
                for m in mismatches(r.result(), data[(e, i)])]
        for key, s in senders.items():
            if w.ended(s, f"sender {key}") is not SUCCESS:
                bad.append(f"sender {key}: {s.failure}")
        if w.device.type == "cuda":
            bad += [f"{link.name}: {len(link.frames)} frames but the sends of only "
                    f"{link.producer_events} waited for a producer's event"
                    for link in w.links.values()
                    if link.producer_events != sum(
                        1 for f in link.frames if f.meta.kind.name == "DATA")]
        assert not bad, f"{recv_into}: " + "; ".join(bad[:6])
        assert len(receivers) == 2 * len(SEQS) * 2
        assert sum(w.counter(r, "chunks") for r in topo.language_ranks) > len(receivers)


def test_sends_wait_for_the_producer_stream() -> None:
    cfg = DisaggConfig(hidden_size=256, block_size=16, num_blocks=64, default_alloc_tokens=512,
                       bootstrap_timeout=30.0, peer_timeout=5.0)
    cuda = TEST_DEVICE.type == "cuda"
    with World(cfg, auto_control=True) as w:
        for room in range(3):
            data = room_data(cfg, 50 + room, 500)
            staged = on(data, w.device)
            if cuda:
                torch.cuda.synchronize(w.device)
            s = w.emb().sender(data.room)
            if cuda:
                producer = torch.cuda.Stream(w.device)
                with torch.cuda.stream(producer):
                    torch.cuda._sleep(PRODUCER_DELAY_CYCLES)  # an encoder still at work
                    emb = staged.embeddings.clone()  # written only after the delay
                    written = torch.cuda.Event()
                    written.record(producer)
                    s.send(emb, staged.fill_ids, staged.mrope_positions, aux=data.aux)
                # finding 8: send() returns without waiting for the encoder's work
                assert not written.query(), "send() waited for the producer's stream"
            else:
                emb = staged.embeddings.clone()
                s.send(emb, staged.fill_ids, staged.mrope_positions, aux=data.aux)
            r = w.lang().receiver(data.room, src_rank=0)
            assert r.init(), "no blocks in an idle pool"
            assert w.finish(r, f"room {data.room}") is SUCCESS, r.failure
            bad = mismatches(r.result(), data)
            assert not bad, f"read before the producer wrote it: {bad}"
            assert w.ended(s, "sender") is SUCCESS, s.failure
            del emb


def test_a_caller_on_a_side_stream_under_allocator_churn_reads_every_room_bit_exact() -> None:
    """Issue 29, finding 3: result memory is made on the library stream and read
    by the caller on a stream of its own. The caller here takes each result on
    a side stream, queues a slow read of it there (a GPU delay, then a copy) and
    drops it at once, while a churn thread allocates, scribbles on and frees
    device memory on a third stream, and the next rooms land: a result whose
    memory went back to the allocator before the caller's read ran
    (`record_stream` missing) shows up as a copy that differs."""
    import threading

    from disagg import transport

    cfg = DisaggConfig(hidden_size=256, block_size=16, num_blocks=64, default_alloc_tokens=512,
                       recv_into="output", bootstrap_timeout=30.0, peer_timeout=5.0)
    cuda = TEST_DEVICE.type == "cuda"
    stop = threading.Event()
    churned = 0

    def churn() -> None:
        nonlocal churned
        transport.bind_device(TEST_DEVICE)
        own = torch.cuda.Stream(TEST_DEVICE) if cuda else None
        while not stop.is_set():
            with torch.cuda.stream(own) if own is not None else contextlib.nullcontext():
                for n in (300, 4096, 17, 90_000):
                    torch.full((n, 256), 7.0, device=TEST_DEVICE).add_(1)
            churned += 1

    side = torch.cuda.Stream(TEST_DEVICE) if cuda else None
    churner = threading.Thread(target=churn, name="churn", daemon=True)
    churner.start()
    try:
        with World(cfg, auto_control=True, embedding_blocks=256) as w:
            copies = []
            for room in range(12):
                data = room_data(cfg, 80 + room, 97 + 61 * room)
                s = w.emb().sender(data.room)
                send(s, data)
                r = w.lang().receiver(data.room, src_rank=0)
                assert r.init(), "no blocks in an idle pool"
                assert w.finish(r, f"room {data.room}") is SUCCESS, r.failure
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    res = r.result()
                    if side is not None:
                        torch.cuda._sleep(PRODUCER_DELAY_CYCLES // 4)  # the LLM's step
                    copies.append((data, dataclasses.replace(
                        res, embeddings=res.embeddings.clone(), fill_ids=res.fill_ids.clone(),
                        mrope_positions=(None if res.mrope_positions is None
                                         else res.mrope_positions.clone()),
                        extra={n: t.clone() for n, t in res.extra.items()})))
                del res, r  # the caller lets go at once; its read is still queued
                assert w.ended(s, "sender") is SUCCESS, s.failure
            if side is not None:
                side.synchronize()
            bad = [m for data, got in copies for m in mismatches(got, data)]
            assert not bad, f"a result was overwritten under the caller's read: {bad[:4]}"
    finally:
        stop.set()
        churner.join(10)
    assert churned > 0 and not churner.is_alive()


def test_every_library_thread_binds_the_ranks_device_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, finding 5: a thread whose first CUDA call finds no current device
    makes a context on GPU 0. Every disagg thread (each pair's send and receive
    thread, the control thread) calls `transport.bind_device` with its rank's
    device before anything else; recorded here by thread name."""
    import threading
    import time

    import zmq

    from disagg import transport
    from disagg.control import ControlChannel

    bound: dict[str, torch.device | None] = {}
    monkeypatch.setattr(transport, "bind_device",
                        lambda device: bound.setdefault(threading.current_thread().name, device))
    cfg = rooms_cfg("output")
    with World(cfg, auto_control=True, embedding_blocks=256) as w:
        d = room_data(cfg, 1, 40)
        send(w.emb(0).sender(1), d)
        rs = [w.lang(lang).receiver(1, src_rank=0) for lang in w.topology.language_ranks]
        for r in rs:
            assert r.init()
        for r in rs:
            assert w.finish(r, "room 1") is SUCCESS
        ours = {t.name for t in threading.enumerate() if t.name.startswith("disagg-")}
        assert ours and ours <= set(bound), f"not bound: {sorted(ours - set(bound))}"
        assert all(device == w.device for device in bound.values())

    class Idle:
        def on_message(self, peer: int, msg: object) -> None: ...

        def on_bad_message(self, peer: int | None, room: int | None, why: str) -> None: ...

        def on_tick(self) -> None: ...

    zctx = zmq.Context()
    control = ControlChannel(zctx, name="disagg-control-test")
    try:
        control.start(Idle(), TEST_DEVICE)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while "disagg-control-test" not in bound and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bound.get("disagg-control-test") == TEST_DEVICE
    finally:
        control.close()
        zctx.destroy(linger=0)
