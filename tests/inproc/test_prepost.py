"""In-process layer: frames whose recvs are posted before anything arrives.

When a Language rank knows a frame's sizes as it asks for it (an ALLOC with a
declared seq_len, or a RESUME once the sender holds the whole room) and
nothing else is owed on the pair, it posts the frame's recvs (meta and
payload) right after the control message (wire FLAG_PREPOSTED): one
rendezvous per chunk instead of two. The Embedding rank must then answer
with exactly those sizes: the DATA chunk, an ABORT padded to them, or a
DEFER (filler; the answer comes later as an ordinary frame) when another
room's frame must use the pair first or a progressive part gives only some
of the chunk. The fake links match sends and recvs by order and fail the
test on any size disagreement (where Gloo would abort the process), so every
test here also checks that both ends stayed in step.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 32
BS = 8


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=32,
                        default_alloc_tokens=4 * BS, bootstrap_timeout=40.0,
                        peer_timeout=10.0).replace(**kw)


def counter(w: World, rank: int, name: str) -> int:
    return int(w.snapshot(rank).get(name, 0))


@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_alloc_with_declared_length_posts_its_recvs_first(recv_into: str) -> None:
    """The recvs of the first chunk are posted before the Embedding rank has the
    data; the frame then lands in them, bit-exact."""
    with World(cfg(recv_into=recv_into)) as w:
        link = w.link()
        d0 = room_data(w.cfg, 0, BS)  # a first room: the pair's thread is up and idle after
        r0 = w.lang().receiver(0, src_rank=0)
        assert r0.init(seq_len=BS)
        w.deliver_all()
        send(w.emb().sender(0), d0)
        assert w.ended(r0, "room 0") is SUCCESS and mismatches(r0.result(), d0) == []
        w.run_until(lambda: w.lang().pair(0).m.parked, "the pair's thread idle")
        before, sends = len(link.posts), link.num_sends
        d = room_data(w.cfg, 1, 3 * BS)
        r = w.lang().receiver(1, src_rank=0)
        assert r.init(seq_len=3 * BS)
        link.wait_recvs(3 + 3)  # meta, embeddings, packed ids and positions (each room)
        assert link.num_sends == sends
        # the pair's thread was idle: the caller posted them, after the lock
        posts = [p for p in link.posts[before:] if p.side == "language"]
        assert [(p.op, p.thread, p.under_lock) for p in posts] == [
            ("post_meta_recv", threading.current_thread().name, False),
            ("post_recv", threading.current_thread().name, False)], posts
        w.deliver_all()
        s = w.emb().sender(1)
        send(s, d)
        assert w.ended(r, "room") is SUCCESS and w.ended(s, "sender") is SUCCESS
        assert mismatches(r.result(), d) == []
        assert counter(w, 1, "preposted") == 2 and counter(w, 0, "deferred") == 0


def test_eager_resumes_post_each_next_chunk_while_this_one_lands() -> None:
    """A room in four chunks through a small pool, auto resume: once the sender
    says it holds the whole room (FLAG_GIVEN), every RESUME is pre-posted."""
    with World(cfg(recv_into="pool"), language_blocks=2, auto_control=True) as w:
        d = room_data(w.cfg, 2, 8 * BS)
        s = w.emb().sender(2)
        send(s, d)
        r = w.lang().receiver(2, src_rank=0)
        assert r.init(2 * BS)
        assert w.ended(r, "room") is SUCCESS
        assert mismatches(r.result(), d) == []
        assert counter(w, 1, "resumes") == 3
        assert counter(w, 1, "preposted") == 3  # every RESUME


def test_a_late_room_is_deferred_for_the_room_behind_it() -> None:
    """Room A's ALLOC is pre-posted but its data is late; room B, asked for
    after it on the same pair, has its data: A's recvs get a DEFER (filler),
    B goes first, and A is answered later as an ordinary frame."""
    with World(cfg(), auto_control=True) as w:
        da, db = room_data(w.cfg, 10, 2 * BS), room_data(w.cfg, 11, 3 * BS)
        ra = w.lang().receiver(10, src_rank=0)
        assert ra.init(seq_len=2 * BS)  # pre-posted: nothing else owed
        sa = w.emb().sender(10)
        w.run_until(lambda: counter(w, 1, "preposted") == 1, "A pre-posted")
        rb = w.lang().receiver(11, src_rank=0)
        assert rb.init(seq_len=3 * BS)  # A is owed: not pre-posted
        send(w.emb().sender(11), db)
        assert w.ended(rb, "room B") is SUCCESS and mismatches(rb.result(), db) == []
        assert ra.poll() is TransferStatus.WAITING_FOR_INPUT
        send(sa, da)
        assert w.ended(ra, "room A") is SUCCESS and mismatches(ra.result(), da) == []
        assert counter(w, 0, "deferred") == 1 and counter(w, 1, "deferred") == 1


@pytest.mark.parametrize("who", ["language", "embedding"])
def test_an_abort_answers_posted_recvs_with_a_padded_frame(who: str) -> None:
    """A pre-posted room aborted before its data: the answer is an ABORT padded
    to the posted sizes; the pair is in step, and the next room on it is fine."""
    with World(cfg(), auto_control=True) as w:
        r = w.lang().receiver(20, src_rank=0)
        assert r.init(seq_len=5 * BS)
        s = w.emb().sender(20)
        w.run_until(lambda: counter(w, 1, "preposted") == 1, "pre-posted")
        (r if who == "language" else s).abort("changed my mind")
        assert w.ended(r, "room") is FAILED and "changed my mind" in (r.failure or "")
        assert w.ended(s, "sender") is FAILED
        d = room_data(w.cfg, 21, 2 * BS)
        r2 = w.lang().receiver(21, src_rank=0)
        assert r2.init(seq_len=2 * BS)
        send(w.emb().sender(21), d)
        assert w.ended(r2, "next room") is SUCCESS and mismatches(r2.result(), d) == []


@pytest.mark.parametrize("real", [3 * BS - 1, 3 * BS + 5])
def test_declared_length_mismatch_is_a_padded_abort(real: int) -> None:
    with World(cfg(), auto_control=True) as w:
        r = w.lang().receiver(30, src_rank=0)
        assert r.init(seq_len=3 * BS)
        s = w.emb().sender(30)
        send(s, room_data(w.cfg, 30, real))
        assert w.ended(r, "room") is FAILED and w.ended(s, "sender") is FAILED
        for why in (r.failure or "", s.failure or ""):
            assert f"seq_len={3 * BS}" in why and f"{real} tokens" in why, why
        d = room_data(w.cfg, 31, BS)
        r2 = w.lang().receiver(31, src_rank=0)
        assert r2.init(seq_len=BS)
        send(w.emb().sender(31), d)
        assert w.ended(r2, "next room") is SUCCESS and mismatches(r2.result(), d) == []


def test_a_progressive_part_smaller_than_the_chunk_defers_it() -> None:
    """The whole room pre-posted, its first part given alone: the part leaves at
    once (after a DEFER), so the prefix grows part by part as before."""
    with World(cfg(default_alloc_tokens=8 * BS), auto_control=True) as w:
        d = room_data(w.cfg, 40, 6 * BS)
        r = w.lang().receiver(40, src_rank=0)
        assert r.init(seq_len=6 * BS)
        s = w.emb().sender(40)
        w.run_until(lambda: counter(w, 1, "preposted") == 1, "pre-posted")
        mrope = d.mrope_positions
        assert mrope is not None
        s.send(d.embeddings[:2 * BS], d.fill_ids[:2 * BS], mrope[:, :2 * BS], aux=d.aux,
               seq_len=6 * BS)
        w.run_until(lambda: r.progress[0] == 2 * BS, "the first part")
        s.send(d.embeddings[2 * BS:], d.fill_ids[2 * BS:], mrope[:, 2 * BS:])
        assert w.ended(r, "room") is SUCCESS and mismatches(r.result(), d) == []
        assert counter(w, 0, "deferred") == 1


def test_shutdown_answers_posted_recvs() -> None:
    """A pre-posted room still waiting for data at shutdown: the Language side's
    ABORT is answered by a padded frame, so its thread ends (World.close fails
    on a thread left behind or a block not returned)."""
    with World(cfg(), auto_control=True) as w:
        r = w.lang().receiver(50, src_rank=0)
        assert r.init(seq_len=4 * BS)
        w.emb().sender(50)
        w.run_until(lambda: counter(w, 1, "preposted") == 1, "pre-posted")
        w.lang().close(5.0)
        assert r.poll() is FAILED


def test_resume_for_a_room_ended_here_is_padded_from_its_tombstone() -> None:
    """Manual resume: the first chunk lands (the sender holds the whole room),
    then the Embedding caller aborts; the RESUME the Language rank sends
    meanwhile is pre-posted and refused with an ABORT padded to the sizes the
    Language rank computed from its span, which the room's tombstone keeps."""
    with World(cfg(auto_resume=False)) as w:
        d = room_data(w.cfg, 60, 6 * BS)
        s = w.emb().sender(60)
        send(s, d)
        r = w.lang().receiver(60, src_rank=0)
        assert r.init(2 * BS)
        w.deliver_all()
        w.run_until(lambda: r.needs_resume, "the first chunk")
        s.abort("encoder restarted")  # the room ends here: no frame is in flight
        w.run_until(lambda: s.poll() is FAILED, "the sender", deliver=False)
        assert r.resume(4 * BS)  # pre-posted: the REJECT is not delivered yet
        w.deliver_all()
        assert w.ended(r, "room") is FAILED
        assert counter(w, 1, "preposted") == 1
        d2 = room_data(w.cfg, 61, BS)
        r2 = w.lang().receiver(61, src_rank=0)
        assert r2.init(seq_len=BS)
        send(w.emb().sender(61), d2)
        w.deliver_all()
        assert w.ended(r2, "next room") is SUCCESS and mismatches(r2.result(), d2) == []


def test_goodbye_after_the_last_chunk_is_read_before_the_pair_is_given_up() -> None:
    """The Embedding rank's last chunk completed (its room SUCCESS), then it shut
    down; its BYE reached the Language rank before the receiver thread read
    that chunk. The BYE says how many frames were sent, so the thread reads
    them first: the room succeeds on both sides (before, it failed here with
    "it shut down" while the Embedding side reported SUCCESS)."""
    with World(cfg()) as w:
        d = room_data(w.cfg, 70, 2 * BS)
        link = w.link()
        hold = threading.Event()
        real_wait_meta = link.language.wait_meta

        def held_wait_meta(posted: Any) -> Any:
            meta = real_wait_meta(posted)  # the frame is here ...
            hold.wait(10)  # ... but the thread is slow to look at it
            return meta

        link.language.wait_meta = held_wait_meta  # type: ignore[method-assign]
        r = w.lang().receiver(70, src_rank=0)
        assert r.init(seq_len=2 * BS)  # pre-posted: the send completes on arrival
        w.deliver_all()
        s = w.emb().sender(70)
        send(s, d)
        assert w.ended(s, "sender") is SUCCESS
        w.emb().close(5.0)
        w.deliver_all()  # the BYE, while the frame waits unread
        assert r.poll() is not FAILED, r.failure
        hold.set()
        assert w.ended(r, "room") is SUCCESS, r.failure
        assert mismatches(r.result(), d) == []
        w.close(check=False)  # the Embedding engine is closed already


@pytest.mark.parametrize("how", ["killed", "silent"])
def test_peer_lost_while_a_frame_is_pre_posted(how: str) -> None:
    """The Embedding rank dies (its link breaks: the posted recvs fail) or falls
    silent (heartbeats stop: the room fails at peer_timeout while the posted
    recvs still hold its blocks, which come back once the receiver thread's
    wait ends). Every block returns (World.close checks)."""
    with World(cfg(), auto_control=False, link_timeout_s=5.0) as w:
        r = w.lang().receiver(80, src_rank=0)
        assert r.init(seq_len=4 * BS)
        w.emb().sender(80)
        w.deliver_all()
        w.run_until(lambda: counter(w, 1, "preposted") == 1, "pre-posted")
        if how == "killed":
            w.kill(0)
        else:
            w.mute(0)
            w.advance(2 * w.cfg.peer_timeout)  # declared dead: the room fails now
        assert w.ended(r, "room") is FAILED
        assert "embedding rank 0" in (r.failure or ""), r.failure
        if how == "silent":  # the posted recvs end at the link's timeout, then
            w.link().break_link("the transport timed out")  # (what Gloo does)
        w.run_until(lambda: w.snapshot(1)["pool_free_blocks"] == 32, "blocks back")
        w.close(check=False)  # the dead rank's engine cannot close cleanly


def test_a_part_given_before_the_pre_posted_alloc_arrives_still_leaves() -> None:
    """The same with the other order: the first part is given before the
    pre-posted ALLOC reaches the Embedding rank. The grant meets partial data
    on arrival, is DEFERred, and the part leaves (before, it waited for the
    whole chunk, and the prefix did not grow: a hang for a caller waiting on it)."""
    with World(cfg(default_alloc_tokens=8 * BS)) as w:
        d = room_data(w.cfg, 41, 6 * BS)
        r = w.lang().receiver(41, src_rank=0)
        assert r.init(seq_len=6 * BS)  # its ALLOC waits in the control queue
        s = w.emb().sender(41)
        mrope = d.mrope_positions
        assert mrope is not None
        s.send(d.embeddings[:2 * BS], d.fill_ids[:2 * BS], mrope[:, :2 * BS], aux=d.aux,
               seq_len=6 * BS)
        w.run_until(lambda: r.progress[0] == 2 * BS, "the first part")  # delivers the ALLOC
        assert counter(w, 1, "preposted") == 1 and counter(w, 0, "deferred") == 1
        s.send(d.embeddings[2 * BS:], d.fill_ids[2 * BS:], mrope[:, 2 * BS:])
        w.run_until(lambda: r.needs_resume or r.poll() is SUCCESS, "the rest")
        if r.needs_resume:
            assert r.resume()
        assert w.ended(r, "room") is SUCCESS and mismatches(r.result(), d) == []
