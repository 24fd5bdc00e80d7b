"""Issue 29, findings 3 and 8, on the CPU: the library's stream per device and
how the application's streams are ordered against it (`disagg/streams.py`).

CUDA streams and events are stood in for by recording fakes, and the few
calls a CPU build cannot make (pinned memory, `record_stream`) by the seams
`streams.py` names for them; the tensors are CPU tensors playing device ones.
What is checked is the bookkeeping: on which stream each allocation, copy and
post is made, what waits for what, and that no stream is ever synchronised.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_transport import DoneWork  # a work that is done

from disagg import streams
from disagg import transport as tr
from disagg.config import DisaggConfig
from disagg.errors import TransferTimeout
from disagg.geometry import Geometry
from disagg.language.landing import copy_out
from disagg.meta import FrameKind, Meta
from disagg.plan import segment_plan
from disagg.pool import BlockPool
from disagg.results import make_outputs, prefix_views

CPU = torch.device("cpu")


def geometry() -> Geometry:
    return Geometry.from_config(DisaggConfig(hidden_size=8, block_size=4, num_blocks=8))


class FakeEvent:
    def __init__(self, name: str = "event", polls_until_done: int = 0) -> None:
        self.name = name
        self.recorded_on: FakeStream | None = None
        self.polls_left = polls_until_done
        self.queries = 0

    def record(self, stream: FakeStream) -> None:
        self.recorded_on = stream
        stream.log.append(f"record {self.name}")

    def query(self) -> bool:
        self.queries += 1
        if self.polls_left > 0:
            self.polls_left -= 1
            return False
        return True


class FakeStream:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.waited: list[str] = []

    def wait_event(self, e: FakeEvent) -> None:
        self.waited.append(e.name)
        self.log.append(f"{self.name} waits {e.name}")

    def synchronize(self) -> None:
        raise AssertionError(f"{self.name}.synchronize(): disagg never syncs a stream")

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeCuda:
    """torch.cuda as far as streams.py and the transport use it; the current
    stream is per thread, as CUDA's is."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.made: list[FakeStream] = []
        self.caller = FakeStream("caller", self.log)
        self._local = threading.local()
        self.event_polls = 0  # how many polls each event made here takes to be done

    def current(self) -> FakeStream:
        return getattr(self._local, "stream", self.caller)

    def Stream(self, device: Any = None) -> FakeStream:
        s = FakeStream(f"library{len(self.made)}", self.log)
        self.made.append(s)
        return s

    def Event(self) -> FakeEvent:
        return FakeEvent("joined", self.event_polls)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.current()

    def set_stream(self, s: FakeStream) -> None:
        self._local.stream = s

    @contextlib.contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        before = self.current()
        self._local.stream = s
        try:
            yield
        finally:
            self._local.stream = before

    def set_device(self, device: Any) -> None:
        pass

    def current_device(self) -> int:
        return 0

    def synchronize(self, device: Any = None) -> None:
        raise AssertionError("torch.cuda.synchronize(): disagg never syncs the device")


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """CPU tensors play device ones; every CUDA call goes to a `FakeCuda`."""
    fake = FakeCuda()
    for name in ("Stream", "Event", "current_stream", "set_stream", "stream", "set_device",
                 "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(streams, "_streams", {})
    monkeypatch.setattr(streams, "_cuda", lambda device: True)

    def pinned(t: torch.Tensor) -> torch.Tensor:
        fake.log.append(f"pinned copy on {fake.current().name}")
        return t.clone()

    def pinned_empty(like: torch.Tensor) -> torch.Tensor:
        fake.log.append(f"pinned buffer on {fake.current().name}")
        return torch.empty(like.shape, dtype=like.dtype)

    monkeypatch.setattr(streams, "_pinned", pinned)
    monkeypatch.setattr(streams, "_pinned_empty", pinned_empty)
    return fake


class RecordingGroup:
    """A two-rank pair group made by the backend's constructor (`group_peer`
    ops): records the current stream at each post; a recv of a meta gets
    `meta_words`."""

    def __init__(self, cuda: FakeCuda, meta_words: torch.Tensor | None = None) -> None:
        self.cuda = cuda
        self.posts: list[tuple[str, int, str]] = []
        self.meta_words = meta_words

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> DoneWork:
        self.posts.append(("send", tensors[0].nbytes, self.cuda.current().name))
        return DoneWork()

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> DoneWork:
        self.posts.append(("recv", tensors[0].nbytes, self.cuda.current().name))
        if self.meta_words is not None:
            tensors[0].copy_(self.meta_words.view(torch.uint8))
        return DoneWork()


def test_one_library_stream_per_device_made_once_whoever_asks(cuda: FakeCuda) -> None:
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(
        streams.library_stream(torch.device("cuda", 0)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cuda.made) == 1 and all(s is cuda.made[0] for s in got)
    other = streams.library_stream(torch.device("cuda", 1))
    assert other is not got[0] and len(cuda.made) == 2  # one per device


def test_a_library_thread_works_on_the_library_stream(cuda: FakeCuda) -> None:
    """Finding 8: disagg's threads posted and copied on the device's default
    stream, so each waited for the application's work queued there."""
    seen: list[str] = []

    def thread() -> None:
        tr.bind_device(torch.device("cuda", 0))
        seen.append(cuda.current().name)

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert seen == ["library0"] and cuda.current() is cuda.caller  # this thread untouched


def test_a_frames_sends_wait_for_the_producer_by_event_and_the_host_for_nobody(
        cuda: FakeCuda) -> None:
    """Finding 8, Embedding side: `send()` returned only once the encoder's queued
    work was done (the meta's plain `.to(device)` synchronised the poster's
    current stream). Now the library stream waits for the producer's event on
    the device, the meta goes by a pinned copy queued there, and the posts are
    made with the library stream current; the caller's stream is left as it was."""
    g = RecordingGroup(cuda)
    t = tr.TorchPairTransport(g, 1, CPU, 5.0, group_peer=1)  # type: ignore[arg-type]
    payload = torch.arange(64, dtype=torch.float32)
    ready = FakeEvent("producer")
    t.post_frame(Meta(FrameKind.DATA, 3, 0, 0, 64, 64), [payload], ready)  # type: ignore[arg-type]
    lib = cuda.made[0]
    assert lib.waited == ["producer"] and cuda.caller.waited == []
    assert cuda.log.index("library0 waits producer") < cuda.log.index("pinned copy on library0")
    assert [p[2] for p in g.posts] == ["library0", "library0"]  # the meta, the payload
    assert [p[1] for p in g.posts][1] == payload.nbytes
    assert cuda.current() is cuda.caller


def test_a_frame_over_parts_from_several_streams_waits_for_every_producer(
        cuda: FakeCuda) -> None:
    """Finding 7: each part of a progressive send may come from a stream of its
    own; a chunk spanning several parts waited only for the last part's event.
    The library stream waits for every part's event, joins the pieces there,
    and records the one event the sends wait for."""
    from disagg.embedding import stream as es
    from disagg.embedding.room import Part

    emb = torch.arange(12 * 2, dtype=torch.float32).reshape(12, 2)
    parts = [Part(0, 4, [emb[0:4]], FakeEvent("a")), Part(4, 4, [emb[4:8]], FakeEvent("b")),
             Part(8, 4, [emb[8:12]], FakeEvent("c"))]  # type: ignore[arg-type]
    plan = segment_plan([0, 1, 2], 4, 10, direct=True)  # one run over the three parts
    f = es.data_frame(Meta(FrameKind.DATA, 1, 0, 2, 10, 12), parts, plan, lambda err: None)
    lib = cuda.made[0]
    assert lib.waited == ["a", "b", "c"] and cuda.caller.waited == []
    assert isinstance(f.ready, FakeEvent) and f.ready.recorded_on is lib
    assert cuda.log.index("library0 waits c") < cuda.log.index("record joined")
    assert torch.equal(f.payload[0], emb[2:12])  # the joined segment, bit-exact
    one = es.data_frame(Meta(FrameKind.DATA, 1, 0, 0, 4, 12), parts[:1],
                        segment_plan([0], 4, 4, direct=True), lambda err: None)
    assert one.ready is parts[0].ready and lib.waited == ["a", "b", "c"]  # its own event


def test_a_meta_comes_to_the_host_by_a_copy_polled_on_the_library_stream(
        cuda: FakeCuda) -> None:
    """Finding 8, Language side: reading a meta (`.cpu()`) synchronised the receive
    thread's current stream, the default one, so every frame waited for the
    LLM's queued step. Now the recv target is made on the library stream, the
    copy to a pinned buffer is queued there, and the host polls its event."""
    meta = Meta(FrameKind.DATA, 9, 0, 0, 48, 48, aux=(5, 6))
    g = RecordingGroup(cuda, meta_words=meta.to_tensor())
    t = tr.TorchPairTransport(g, 0, CPU, 5.0, group_peer=0)  # type: ignore[arg-type]
    cuda.event_polls = 3  # the copy is not done at the first looks
    posted = t.post_meta_recv()
    got = t.wait_meta(posted)
    assert got == meta
    assert g.posts == [("recv", meta.to_tensor().nbytes, "library0")]
    assert cuda.log[-2:] == ["pinned buffer on caller", "record joined"]
    assert cuda.current() is cuda.caller


def test_results_are_made_on_the_library_stream_and_marked_used_by_the_callers(
        cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 3: results allocated on one stream and freed after use on another
    need `record_stream`, or the caching allocator gives their memory to the
    library's next recv while the caller's kernels still read it. Results are
    made on the library stream whichever thread asks, and `result()`/`prefix()`
    (prefix_views) mark them used by the stream current at that call."""
    from disagg import results

    made_on: list[str] = []
    real = results.empty_result
    monkeypatch.setattr(results, "empty_result", lambda shape, dtype, device: (
        made_on.append(cuda.current().name), real(shape, dtype, device))[1])
    recorded: list[tuple[int, str]] = []
    monkeypatch.setattr(streams, "_record_stream",
                        lambda t, s: recorded.append((t.data_ptr(), s.name)))
    g = geometry()
    outputs = make_outputs(g, 12, CPU)
    assert made_on and set(made_on) == {"library0"}
    side = FakeStream("side", cuda.log)
    with torch.cuda.stream(side):  # type: ignore[arg-type]
        prefix_views(g, outputs, 5, (), CPU)
    assert sorted(recorded) == sorted((t.data_ptr(), "side") for t in outputs.values())


def test_pool_modes_copy_out_is_host_observed_by_an_event_not_a_sync(cuda: FakeCuda) -> None:
    """Finding 8: the copy out of the pool synchronised the receive thread's
    current stream (the default one) before the blocks went back. Now it runs
    on the library stream (where the blocks' next recvs are posted, after it)
    and the host polls an event recorded after it."""
    g = geometry()
    pool = BlockPool(g, CPU, with_buffers=True)
    plan = segment_plan([5, 2], 4, 7, direct=False)  # two runs of one block each
    for b in g.wire_buffers:
        raw = pool.buffers[b.name].view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    outputs = make_outputs(g, 7, CPU)
    cuda.event_polls = 2
    copy_out(g, pool, outputs, plan, 0, CPU)
    assert cuda.log[-1] == "record joined" and cuda.made[0].waited == []
    for b in g.wire_buffers:  # bytes (random bits: a float NaN is unequal to itself)
        for s in plan:
            got = outputs[b.name][s.chunk_start:s.chunk_start + s.num_tokens]
            want = pool.token_view(b.name, s.dst_token, s.num_tokens)
            assert torch.equal(tr.as_bytes(got), tr.as_bytes(want))


def test_a_host_read_that_never_ends_is_a_timeout_not_a_hang(cuda: FakeCuda) -> None:
    cuda.event_polls = 10**9
    with pytest.raises(TransferTimeout, match="not done after"):
        streams.to_host(torch.zeros(4, dtype=torch.int64), timeout_s=0.01)


def test_the_poll_backs_off_to_its_bound() -> None:
    """A wait is seen late by about its own length, never more than `longest`."""
    import time

    looks: list[float] = []

    def done() -> bool:
        looks.append(time.monotonic())
        return len(looks) > 12

    assert streams.wait_until(done, time.monotonic() + 5, longest=2e-4)
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert min(gaps) >= 1e-5 and len(looks) == 13
