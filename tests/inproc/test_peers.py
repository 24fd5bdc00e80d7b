"""In-process layer: a peer lost mid-stream, and a peer that leaves cleanly.

Ported from test_faults.py (section 2, SIGKILL), without processes: a rank
"dies" when its control traffic is lost and its links break (what a SIGKILL
does to a Gloo pair), or only goes silent (no heartbeat: the clock moves on
and the survivors' `on_tick` must notice), or says BYE on its way out. Each
time the rooms of that peer, and only those, fail with a reason naming it;
rooms already done stay done; every other pair's rooms, old and new, arrive
bit-exact; the survivors' failure counts say "peer_lost" for exactly the
rooms lost; every pool and budget is whole at the end (the dead rank's too:
its engine runs on in this process and must clean up after itself as well).

Rooms play roles by index (as in the SIGKILL tests): i % 4 == 0 one chunk,
done before the loss; 3 two chunks, done before; 1 ("held") partly landed and
waiting for resume(), no frame owed at the loss; 2 ("last moment") resumed
just before the loss, its chunk held on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from disagg.config import DisaggConfig
from disagg.embedding import Sender
from disagg.language import Receiver
from disagg.types import TransferStatus

from .fakes import TERMINAL, World
from .rooms import RoomData, mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 64
BS = 16
FIRST = 32  # every room's first allocation: longer rooms need a resume
N = 12  # rooms per stream
PEER_TIMEOUT = 3.0
HELD, LAST_MOMENT = 1, 2


def k_cfg(num_embedding: int) -> DisaggConfig:
    return DisaggConfig(num_embedding_ranks=num_embedding, hidden_size=HIDDEN, block_size=BS,
                        num_blocks=128, default_alloc_tokens=FIRST, auto_resume=False,
                        bootstrap_timeout=30.0, peer_timeout=PEER_TIMEOUT)


def k_seq(i: int) -> int:
    """i % 4 == 0: one chunk (<= 20 tokens); otherwise two (33..292 tokens)."""
    return 5 + i % 16 if i % 4 == 0 else 33 + (i * 97) % 260


@dataclass
class Room:
    room: int
    src: int
    dst: int
    data: RoomData
    s: Sender
    r: Receiver | None = None


class Traffic:
    """Rooms between given (Embedding, Language) rank pairs, driven by hand."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.rooms: dict[int, Room] = {}

    def add(self, room: int, src: int, dst: int, seq: int, *, init: bool = True) -> Room:
        d = room_data(self.w.cfg, room, seq)
        rm = Room(room, src, dst, d, self.w.emb(src).sender(room))
        send(rm.s, d)
        if init:
            self.init(rm)
        self.rooms[room] = rm
        return rm

    def init(self, rm: Room) -> None:
        rm.r = self.w.lang(rm.dst).receiver(rm.room, src_rank=rm.src)
        assert rm.r.init()

    def receiver(self, room: int) -> Receiver:
        r = self.rooms[room].r
        assert r is not None, f"room {room} has no receiver"
        return r

    def stage(self, resume: set[int]) -> None:
        """Deliver and resume (only the rooms in `resume`) until every room is
        SUCCESS or holds at needs_resume."""

        def staged() -> bool:
            for rm in self.rooms.values():
                r = rm.r
                if r is None:
                    continue
                if r.needs_resume and rm.room in resume:
                    assert r.resume()
                if r.poll() not in TERMINAL and not r.needs_resume:
                    return False
            return True

        self.w.run_until(staged, "rooms staged", detail=self.describe)

    def describe(self) -> str:
        return "; ".join(f"{rm.room}: {rm.r.poll().name if rm.r else '-'}"
                         f"{' held' if rm.r and rm.r.needs_resume else ''}"
                         for rm in self.rooms.values())

    def finish(self, rooms: list[int]) -> None:
        for room in rooms:
            rm = self.rooms[room]
            assert rm.r is not None
            assert self.w.finish(rm.r, f"room {room}") is SUCCESS, rm.r.failure
            assert mismatches(rm.r.result(), rm.data) == []
            assert self.w.ended(rm.s, f"sender {room}") is SUCCESS, rm.s.failure

    def lost(self, room: int, *, side: str) -> str | None:
        """The room's status on `side` once ended (FAILED reason or None)."""
        rm = self.rooms[room]
        h = rm.r if side == "language" else rm.s
        assert h is not None
        st = self.w.ended(h, f"room {room} on the {side} side")
        if st is SUCCESS:
            return None
        return h.failure or "FAILED without a reason"


def room_id(stream: int, i: int) -> int:
    return 1000 * (stream + 1) + i


@pytest.mark.parametrize("detect", ["link_breaks", "heartbeat_only"])
def test_embedding_rank_lost_mid_stream(detect: str) -> None:
    """Embedding ranks 0 and 1 stream to Language rank 2; rank 1 is lost. With
    `link_breaks` (a SIGKILL), frames are owed on its stream (the "last moment"
    rooms) and the broken link tells the receiver thread at once; with
    `heartbeat_only` (a wedged rank), nothing is owed and its stream stands:
    only the heartbeats' silence can tell, and not before peer_timeout."""
    with World(k_cfg(2), embedding_blocks=1024) as w:
        t = Traffic(w)
        for stream in (0, 1):
            for i in range(N):
                t.add(room_id(stream, i), stream, 2, k_seq(i))
        r0 = [room_id(0, i) for i in range(N)]
        r1 = [room_id(1, i) for i in range(N)]
        # stream 0: everything but the held rooms done; stream 1: 0 and 3 done
        t.stage({room for room in r0 if room % 4 != HELD}
                | {room for room in r1 if room % 4 == 3})

        def rooms_of_rank_1_ended() -> None:
            for room in r1:
                why = t.lost(room, side="language")
                if room % 4 in (0, 3):
                    assert why is None, f"room {room} had succeeded before the loss: {why}"
                else:
                    assert why is not None and "embedding rank 1" in why, (room, why)

        if detect == "link_breaks":
            link = w.link(1, 2)
            link.gate()
            sent = len(link.frames)
            last_moment = [room for room in r1 if room % 4 == LAST_MOMENT]
            for room in last_moment:  # frames owed by the rank about to die, held on the wire
                assert t.receiver(room).resume()
            w.deliver_all()
            link.wait_frames(sent + len(last_moment))
            w.kill(1)
            rooms_of_rank_1_ended()  # at once: no clock needed
            w.advance(PEER_TIMEOUT + 1.0)  # rank 0's heartbeats keep it alive meanwhile
        else:
            w.mute(1)
            w.advance(PEER_TIMEOUT * 0.75)
            assert not [room for room in r1 if t.receiver(room).poll() is FAILED], (
                "declared dead before peer_timeout")
            w.advance(PEER_TIMEOUT * 0.5)
            rooms_of_rank_1_ended()
        # the surviving stream goes on: its held rooms, and a batch sent after the loss
        for j in range(6):
            t.add(room_id(0, 100 + j), 0, 2, k_seq(100 + j))
        t.finish([room for room in t.rooms if room // 1000 == 1])
        failed = sum(1 for room in r1 if room % 4 in (HELD, LAST_MOMENT))
        assert w.causes(2) == {"peer_lost": failed}
        assert w.causes(0) == {}
        w.settle_whole("after the loss")


def test_a_lost_pair_is_aborted_before_its_rooms_fail() -> None:
    """Issue 29, finding 1: when a peer is declared dead, its pair's transport is
    aborted (on NCCL: the communicator, so no late frame lands and no watchdog
    fires) before any of its rooms is FAILED or gives blocks back: here a room
    held half-way, and one whose ALLOC holds blocks while its data never
    comes. The Embedding side's twin follows; a clean goodbye aborts nothing."""
    with World(k_cfg(2), embedding_blocks=1024) as w:
        t = Traffic(w)
        r1 = [room_id(1, i) for i in range(N)]
        for i in range(N):
            t.add(r1[i], 1, 2, k_seq(i))
        t.stage({room for room in r1 if room % 4 == 3})
        held = [room for room in r1 if room % 4 in (1, 2)]  # one-chunk rooms (0) end anyway
        waiting = Room(1999, 1, 2, room_data(w.cfg, 1999, 40), w.emb(1).sender(1999))
        t.rooms[1999] = waiting
        t.init(waiting)  # its ALLOC holds blocks; its data never comes
        w.deliver_all()
        lang = w.lang(2)
        assert lang.pool.allocator.owned_by(1999)
        tr = lang.pair(1).transport
        seen: list[tuple[list[TransferStatus], int]] = []
        real = tr.abort

        def abort() -> None:  # the rooms, and the waiting room's blocks, at the abort
            seen.append(([t.receiver(room).poll() for room in [*held, 1999]],
                         len(lang.pool.allocator.owned_by(1999))))
            real()

        tr.abort = abort  # type: ignore[method-assign]
        w.mute(1)
        w.advance(PEER_TIMEOUT * 1.25)
        for room in [*held, 1999]:
            assert t.lost(room, side="language") is not None
        assert len(seen) == 1, seen  # once, at the loss
        statuses, owned = seen[0]
        assert FAILED not in statuses and owned, seen  # nothing failed or given back yet
        assert not lang.pool.allocator.owned_by(1999)  # given back after
        w.settle_whole("after the loss")


def test_a_lost_language_rank_s_pair_is_aborted_before_its_rooms_fail() -> None:
    """The same on the Embedding side: rank 2 goes silent while rooms to it are
    held; rank 0 aborts the pair before any of them is FAILED or returns its
    budget, and the pair to rank 1 is left alone."""
    with World(k_cfg(1), instances=2, embedding_blocks=1024) as w:
        t = Traffic(w)
        to2 = [t.add(room_id(2, i), 0, 2, k_seq(i)).room for i in range(N)]
        t.stage({room for room in to2 if room % 4 == 3})
        held = [room for room in to2 if room % 4 in (1, 2)]
        emb = w.emb(0)
        streams = emb._streams
        tr2, tr1 = streams._transports[2], streams._transports[1]
        seen: list[tuple[list[TransferStatus], list[int]]] = []
        real = tr2.abort

        def abort() -> None:  # the held rooms, and the budget each still holds
            seen.append(([t.rooms[room].s.poll() for room in held],
                         [len(emb.budget.owned_by(room)) for room in held]))
            real()

        tr2.abort = abort  # type: ignore[method-assign]
        w.mute(2)
        w.advance(PEER_TIMEOUT * 1.25)
        for room in held:
            assert t.lost(room, side="embedding") is not None
        assert len(seen) == 1, seen
        statuses, owned = seen[0]
        assert FAILED not in statuses and all(owned), seen  # no budget returned yet
        assert tr1.aborts == 0
        w.settle_whole("after the loss")


def test_a_clean_goodbye_aborts_nothing() -> None:
    """A peer that said goodbye has nothing standing on the pair: its frames were
    read, and nothing is aborted."""
    with World(k_cfg(2), embedding_blocks=1024) as w:
        t = Traffic(w)
        r1 = [t.add(room_id(1, i), 1, 2, k_seq(i)).room for i in range(4)]
        t.stage(set(r1))
        tr = w.lang(2).pair(1).transport
        w.deliver_all()
        w.emb(1).close(5.0)
        w.deliver_all()
        w.run_until(lambda: 1 in w.lang(2).lost_peers(), "the goodbye read")
        assert tr.aborts == 0
        t.finish([room for room in r1 if room % 4 != HELD])
        w.settle_whole("after the goodbye")


@pytest.mark.parametrize("detect", ["link_breaks", "heartbeat_only"])
def test_language_rank_lost_mid_stream(detect: str) -> None:
    """Embedding rank 0 streams to Language ranks 1 and 2 (two instances); rank
    2 is lost. With `link_breaks`, rank 2's "late" rooms (ALLOCs in before their
    data) have their chunks on the wire at the loss: the first half-sent (meta
    landed, payload not), the others queued behind it; the failed sends tell
    the Embedding rank. With `heartbeat_only`, nothing is in flight to rank 2
    (held rooms, and the late rooms' ALLOCs waiting at their senders for data):
    its silence must tell."""
    late = [room_id(2, 200 + j) for j in range(4)]
    with World(k_cfg(1), instances=2, embedding_blocks=1024) as w:
        t = Traffic(w)
        to1 = [t.add(room_id(1, i), 0, 1, k_seq(i)).room for i in range(N)]
        to2 = [t.add(room_id(2, i), 0, 2, k_seq(i)).room for i in range(N)]
        t.stage({room for room in to1 if room % 4 != HELD}
                | {room for room in to2 if room % 4 == 3})
        for room in late:  # ALLOCs at the Embedding rank before the data
            rm = Room(room, 0, 2, room_data(w.cfg, room, 8 + room % 8),
                      w.emb(0).sender(room))
            t.rooms[room] = rm
            t.init(rm)
        w.deliver_all()
        if detect == "link_breaks":
            link = w.link(0, 2)
            link.gate()
            sent = len(link.frames)
            for room in late:
                send(t.rooms[room].s, t.rooms[room].data)
            link.wait_frames(sent + len(late))
            link.deliver(1)  # the first late chunk's meta: half-sent at the loss
            w.kill(2)
        else:
            w.mute(2)
            w.advance(PEER_TIMEOUT * 0.75)
            assert not [room for room in to2 if t.rooms[room].s.poll() is FAILED], (
                "declared dead before peer_timeout")
            w.advance(PEER_TIMEOUT * 0.5)
        for room in [*to2, *late]:
            why = t.lost(room, side="embedding")
            if room in late or room % 4 in (HELD, LAST_MOMENT):
                assert why is not None and "language rank 2" in why, (room, why)
            else:
                assert why is None, f"sender {room} had succeeded before the loss: {why}"
        if detect == "heartbeat_only":
            for room in late:  # data sent after the loss: nobody is waiting for it
                send(t.rooms[room].s, t.rooms[room].data)
        for j in range(6):
            t.add(room_id(1, 100 + j), 0, 1, k_seq(100 + j))
        t.finish([room for room in t.rooms if room // 1000 == 2])
        failed = sum(1 for room in to2 if room % 4 in (HELD, LAST_MOMENT)) + len(late)
        assert w.causes(0) == {"peer_lost": failed}
        assert w.causes(1) == {}
        w.settle_whole("after the loss")


def test_embedding_rank_says_bye() -> None:
    """Embedding rank 1 shuts down cleanly while Language rank 2 holds rooms
    from it (held half-way, and an ALLOC waiting for data): they fail, naming
    it, as soon as its goodbye arrives; rank 0's rooms go on."""
    with World(k_cfg(2), embedding_blocks=1024) as w:
        t = Traffic(w)
        r0 = [t.add(room_id(0, i), 0, 2, k_seq(i)).room for i in range(N)]
        r1 = [t.add(room_id(1, i), 1, 2, k_seq(i)).room for i in range(N)]
        t.stage(set(r1) - {room for room in r1 if room % 4 == HELD})
        waiting = Room(1999, 1, 2, room_data(w.cfg, 1999, 40), w.emb(1).sender(1999))
        t.rooms[1999] = waiting
        t.init(waiting)  # its ALLOC waits at rank 1 for data that never comes
        w.deliver_all()
        w.emb(1).close(5.0)
        w.deliver_all()
        for room in [*r1, 1999]:
            why = t.lost(room, side="language")
            if room % 4 == HELD or room == 1999:
                assert why is not None and "embedding rank 1" in why, (room, why)
            else:
                assert why is None, (room, why)
        t.finish(r0)
        assert sum(w.causes(2).values()) == sum(1 for room in r1 if room % 4 == HELD) + 1
        w.settle_whole("after the goodbye")


def test_language_rank_says_bye() -> None:
    """Language rank 2 (instance 1) shuts down cleanly: its rooms fail on the
    Embedding rank, naming it; instance 0's rooms go on."""
    with World(k_cfg(1), instances=2, embedding_blocks=1024) as w:
        t = Traffic(w)
        to1 = [t.add(room_id(1, i), 0, 1, k_seq(i)).room for i in range(N)]
        to2 = [t.add(room_id(2, i), 0, 2, k_seq(i)).room for i in range(N)]
        t.stage({room for room in to2 if room % 4 != HELD})
        w.control.start_auto()  # its close() waits for answers on its streams
        w.lang(2).close(5.0)
        w.control.stop_auto()
        w.deliver_all()
        for room in to2:
            why = t.lost(room, side="embedding")
            if room % 4 == HELD:
                assert why is not None and "language rank 2" in why, (room, why)
            else:
                assert why is None, (room, why)
        t.finish(to1)
        w.settle_whole("after the goodbye")
