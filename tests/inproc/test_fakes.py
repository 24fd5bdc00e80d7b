"""In-process layer, the fakes themselves: a fake that forgives what Gloo or
NCCL would not makes every test above it worthless, so this module checks
that `FakeLink` matches by order and copies bytes, fails loudly on a size
mismatch, honours gates and breaks, reports a hang as `TransferTimeout`,
records posts made under a lock; that `FakeControl` decodes, authenticates
and routes like `ControlChannel`; and that `World.close()` fails on what is
left behind.
"""

from __future__ import annotations

import threading

import pytest
import torch

from disagg import wire
from disagg.config import DisaggConfig
from disagg.errors import PeerLost, TransferTimeout
from disagg.meta import FrameKind, Meta
from disagg.wire import ControlMessage

from .fakes import Activity, FakeControl, FakeLink, WireMismatch, World, disagg_threads

pytestmark = pytest.mark.timeout(30)


def meta(room: int = 5) -> Meta:
    return Meta(FrameKind.DATA, room, 0, 0, 2, 2, 3, ())


def link(*, gated: bool = False, timeout_s: float = 5.0) -> FakeLink:
    return FakeLink(0, 1, Activity(), gated=gated, timeout_s=timeout_s)


def test_link_matches_by_order_and_copies_bytes_not_shapes() -> None:
    k = link()
    src = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    sent = k.embedding.post_frame(meta(), [src])
    m = k.language.post_meta_recv()
    dst = torch.zeros(4, 2, dtype=torch.int32)  # another shape, the same bytes
    got = k.language.post_recv([dst])
    assert k.language.wait_meta(m) == meta()
    k.language.wait(got, "payload")
    k.embedding.wait(sent)
    assert torch.equal(dst.reshape(-1), src.reshape(-1))
    assert [f.meta for f in k.frames] == [meta()] and k.frames[0].payload_nbytes == (32,)
    assert k.errors == []


@pytest.mark.parametrize("recv_bytes", [31, 33])
def test_size_mismatch_fails_both_works_and_the_final_check(recv_bytes: int) -> None:
    k = link()
    sent = k.embedding.post_frame(meta(), [torch.zeros(32, dtype=torch.uint8)])
    k.language.wait_meta(k.language.post_meta_recv())
    got = k.language.post_recv([torch.zeros(recv_bytes, dtype=torch.uint8)])
    with pytest.raises(WireMismatch, match="matched a recv of"):
        k.language.wait(got, "payload")
    with pytest.raises(WireMismatch):
        k.embedding.wait(sent)
    assert len(k.errors) == 1 and "32 bytes" in k.errors[0]
    with pytest.raises(PeerLost):  # as after a Gloo abort: nothing more on this pair
        k.language.post_meta_recv()


def test_dtype_byte_size_counts_not_element_count() -> None:
    k = link()
    sent = k.embedding.post_frame(meta(), [torch.zeros(4, dtype=torch.int32)])
    k.language.wait_meta(k.language.post_meta_recv())
    got = k.language.post_recv([torch.zeros(4, dtype=torch.int64)])  # 4 elements, 2x the bytes
    with pytest.raises(WireMismatch):
        k.language.wait(got, "payload")
    with pytest.raises(WireMismatch):
        k.embedding.wait(sent)


def test_gated_link_delivers_only_what_the_test_releases() -> None:
    k = link(gated=True)
    payload = torch.ones(3, dtype=torch.int16)
    k.embedding.post_frame(meta(), [payload])
    m = k.language.post_meta_recv()
    got = k.language.post_recv([torch.zeros(3, dtype=torch.int16)])
    assert k.num_matched == 0
    k.deliver(1)  # the meta only
    assert k.language.wait_meta(m).room == 5 and k.num_matched == 1
    assert k.num_matched == 1  # the payload waits at the gate
    k.release_frame()  # the rest of the frame
    k.language.wait(got, "payload")
    assert torch.equal(got.tensors[0], payload)


def test_broken_link_fails_pending_and_later_operations() -> None:
    k = link()
    m = k.language.post_meta_recv()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            k.language.wait_meta(m)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    k.wait_recvs(1)
    k.break_link("rank 0 died")
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PeerLost), errors
    assert "rank 0 died" in str(errors[0])
    with pytest.raises(PeerLost):
        k.embedding.post_frame(meta(), [])
    assert k.errors == []  # a peer's death is no bug of ours


def test_a_wait_that_never_matches_is_a_timeout_and_a_reported_hang() -> None:
    k = link(timeout_s=0.05)
    m = k.language.post_meta_recv()
    with pytest.raises(TransferTimeout):
        k.language.wait_meta(m)
    assert len(k.errors) == 1 and "not matched" in k.errors[0]
    assert k.broken is not None  # as Gloo: a timed-out pair is closed for good


def test_posts_record_whether_the_lock_was_held() -> None:
    k = link()
    lock = threading.RLock()
    k.language.lock_probe = lock._is_owned  # type: ignore[attr-defined]
    k.language.post_meta_recv()
    with lock:
        k.language.post_meta_recv()
    assert [p.under_lock for p in k.posts] == [False, True]
    assert len(k.posts_under_lock()) == 1


class Recorder:
    """A `ControlHandler` that only remembers what it was handed."""

    def __init__(self) -> None:
        self.msgs: list[tuple[int, ControlMessage]] = []
        self.bad: list[tuple[int | None, int | None, str]] = []

    def on_message(self, peer: int, msg: ControlMessage) -> None:
        self.msgs.append((peer, msg))

    def on_bad_message(self, peer: int | None, room: int | None, why: str) -> None:
        self.bad.append((peer, room, why))

    def on_tick(self) -> None:
        pass


def control() -> tuple[FakeControl, Recorder, Recorder]:
    c = FakeControl(Activity())
    e, lang = Recorder(), Recorder()
    c.register(0, e, "embedding")
    c.register(1, lang, "language")
    return c, e, lang


def test_control_queues_until_delivered_and_decodes() -> None:
    c, e, _ = control()
    msg = wire.Alloc(7, 1, 1, (0, 1), 32)
    c.port(1).post(0, msg)
    assert e.msgs == [] and len(c.pending()) == 1
    assert c.deliver_all() == 1
    assert e.msgs == [(1, msg)]


def test_control_reorders_drops_and_kills() -> None:
    c, e, _ = control()
    for room in (1, 2, 3):
        c.port(1).post(0, wire.Abort(room, 1, "x"))
    c.deliver(1, where=lambda env: getattr(env.msg, "room", None) == 3)
    c.drop(lambda env: getattr(env.msg, "room", None) == 1)
    c.deliver_all()
    assert [m for _, m in e.msgs] == [wire.Abort(3, 1, "x"), wire.Abort(2, 1, "x")]
    c.kill(1)
    c.port(1).post(0, wire.Abort(4, 1, "x"))
    assert c.deliver_all() == 0


def test_control_routes_malformed_and_unauthorised_to_on_bad_message() -> None:
    c, e, lang = control()
    good = wire.encode(wire.Abort(9, 1, "x"))
    c.inject(1, 0, good[:10])  # truncated
    c.inject(1, 0, wire.encode(wire.Abort(9, 2, "x")))  # rank 1 speaking for rank 2
    c.inject(None, 0, good)  # from nobody we know
    c.inject(0, 1, wire.encode(wire.Abort(9, 1, "x")))  # ABORT is no E->L message
    c.deliver_all()
    assert e.msgs == [] and [peer for peer, _, _ in e.bad] == [1, 1, None]
    assert "truncated" in e.bad[0][2]
    assert e.bad[1][1] == 9 and "claims language rank 2" in e.bad[1][2]
    assert lang.msgs == [] and [peer for peer, _, _ in lang.bad] == [0]


def test_world_close_fails_on_a_link_error() -> None:
    w = World(DisaggConfig(hidden_size=8, block_size=4, num_blocks=4))
    w.link().errors.append("a planted error")
    with pytest.raises(AssertionError, match="a planted error"):
        w.close()
    assert disagg_threads() == []


def test_world_close_fails_on_a_pool_not_whole() -> None:
    w = World(DisaggConfig(hidden_size=8, block_size=4, num_blocks=4))
    w.lang().pool.allocator.allocate(1, owner=12345)  # blocks nobody will return
    with pytest.raises(AssertionError, match="pool 3/4 free"):
        w.close()


def test_world_close_fails_on_a_post_under_the_lock() -> None:
    """The probe is wired into every World: a post it sees under the lock fails close()."""
    w = World(DisaggConfig(hidden_size=8, block_size=4, num_blocks=4))
    w.link().language.lock_probe = lambda: True  # as if the engine held its lock
    r = w.lang().receiver(1, src_rank=0)
    assert r.init()  # the receiver thread posts a meta recv
    w.link().wait_recvs(1)
    with pytest.raises(AssertionError, match=r"post_meta_recv by language thread .* under "
                                             r"the engine lock"):
        w.close()
