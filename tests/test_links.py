"""Pairs made on demand (issue 28), without a process group: the pure rules
(`pairs.py`), and `PairBook`/`PairLink` with a fake maker and host, driven
step by step: the cap, eviction of the least recently used idle pair,
generations, a pair no longer wanted, a pair lost as it forms, stats."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from disagg.errors import PeerLost
from disagg.links import PairLink
from disagg.pair_book import PairBook
from disagg.pairs import LinkState, LinkView, evictable, idle_due, may_form, warm_pair
from disagg.stats import Stats

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------ rules


def views(*rows: tuple[int, LinkState, float]) -> list[LinkView]:
    return [LinkView(p, s, t) for p, s, t in rows]


def test_evictable_is_open_idle_pairs_least_recently_used_first() -> None:
    links = views((1, LinkState.OPEN, 5.0), (2, LinkState.OPEN, 1.0), (3, LinkState.OPEN, 3.0),
                  (4, LinkState.FORMING, 0.0), (5, LinkState.CLOSED, 0.0))
    assert evictable(links, lambda p: False) == [2, 3, 1]
    assert evictable(links, lambda p: p == 2) == [3, 1]  # a live room or a frame owed
    assert evictable(links, lambda p: False, exclude=3) == [2, 1]


def test_idle_due_needs_the_idle_time_and_an_idle_pair() -> None:
    links = views((1, LinkState.OPEN, 0.0), (2, LinkState.OPEN, 9.5), (3, LinkState.CLOSING, 0.0))
    assert idle_due(links, lambda p: False, now=10.0, idle_s=1.0) == [1]
    assert idle_due(links, lambda p: p == 1, now=10.0, idle_s=1.0) == []


def test_may_form_only_a_closed_pair_under_the_cap() -> None:
    assert may_form(LinkState.CLOSED, 1, 2)
    assert not may_form(LinkState.CLOSED, 2, 2)
    assert not may_form(LinkState.OPEN, 0, 2)
    assert not may_form(LinkState.BROKEN, 0, 2)


def test_a_pair_is_warmed_only_while_both_ends_can_hold_the_whole_other_side() -> None:
    assert warm_pair(2, 4, embedding_cap=4, language_cap=2)
    assert not warm_pair(2, 5, embedding_cap=4, language_cap=24)  # its Embedding end is short
    assert not warm_pair(3, 4, embedding_cap=24, language_cap=2)  # its Language end is short
    assert warm_pair(1, 1, embedding_cap=1, language_cap=1)



# ------------------------------------------------------------------ book and links


class FakeTransport:
    def __init__(self, peer: int, gen: int) -> None:
        self.peer, self.gen = peer, gen
        self.aborted = self.destroyed = False
        self.group = self

    def abort(self) -> None:
        self.aborted = True

    def post_recv(self, dsts: list[Any]) -> tuple[int, int]:
        return (self.peer, self.gen)


class Host:
    """The engine's side: busy peers, and closes on request (as the Language
    side does: PAIR_CLOSE, then this end)."""

    def __init__(self, book: PairBook) -> None:
        self.book = book
        self.busy: set[int] = set()
        self.opened: list[int] = []
        self.closed: list[int] = []

    def pair_busy(self, peer: int) -> bool:
        return peer in self.busy

    def make_room(self, candidates: list[int]) -> None:
        for p in candidates:
            if p not in self.busy:
                link = self.book.links[p]
                if link.begin_close() is not None:
                    link.finish_close()
                    return

    def pair_opened(self, peer: int) -> None:
        self.opened.append(peer)

    def pair_closed(self, peer: int) -> None:
        self.closed.append(peer)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def book(max_pairs: int = 2, make: Any = None) -> tuple[PairBook, Host, list[tuple[int, int]],
                                                        Clock]:
    made: list[tuple[int, int]] = []
    clock = Clock()

    def maker(peer: int, gen: int, wanted: Any) -> FakeTransport:
        made.append((peer, gen))
        return FakeTransport(peer, gen)

    def destroy(t: Any) -> None:
        t.destroyed = True

    b = PairBook(make or maker, destroy, max_pairs=max_pairs, idle_s=10.0, stats=Stats(),
                 clock=clock)
    h = Host(b)
    b.host = h  # type: ignore[assignment]
    return b, h, made, clock


def test_a_pair_is_made_on_first_need_and_posts_go_to_it() -> None:
    b, h, made, _ = book()
    link = b.link(7)
    assert not link.is_open() and made == [] and b.stats.snapshot()["pairs_live"] == 0
    with pytest.raises(PeerLost, match="closed"):
        link.post_recv([])  # nobody posts on a pair that is not open
    assert link.ensure()
    assert link.is_open() and made == [(7, 0)] and h.opened == [7]
    assert link.post_recv([]) == (7, 0)
    assert link.ensure() and made == [(7, 0)]  # open: nothing made again
    snap = b.stats.snapshot()
    assert (snap["pairs_live"], snap["pairs_created"], snap["pairs_closed"]) == (1, 1, 0)


def test_at_the_cap_the_least_recently_used_idle_pair_closes_and_generations_move() -> None:
    b, h, made, clock = book(max_pairs=2)
    a, c, d = b.link(1), b.link(2), b.link(3)
    a.ensure()
    clock.t = 1.0
    c.ensure()
    clock.t = 2.0
    h.busy = {1}  # pair 1 has a live room: never closed, though least recently used
    first = a.inner
    assert d.ensure()
    assert c.state is LinkState.CLOSED and c.gen == 1 and h.closed == [2]
    assert a.is_open() and a.inner is first and d.is_open()
    h.busy = set()
    clock.t = 3.0
    assert c.ensure()  # made again: the next generation, after closing pair 1 (LRU)
    assert made == [(1, 0), (2, 0), (3, 0), (2, 1)]
    assert a.state is LinkState.CLOSED and first is not None and first.destroyed
    snap = b.stats.snapshot()
    assert (snap["pairs_live"], snap["pairs_created"], snap["pairs_closed"]) == (2, 4, 2)


def test_at_the_cap_with_every_pair_busy_a_room_waits_until_one_idles() -> None:
    b, h, _, _ = book(max_pairs=1)
    b.link(1).ensure()
    h.busy = {1}
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(b.link(2).ensure()))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waiting, not failed, not over the cap
    assert b.live == 1
    h.busy = set()  # the room on pair 1 ended
    t.join(5)
    assert got == [True] and b.links[1].state is LinkState.CLOSED


def test_a_pair_no_longer_wanted_stops_waiting() -> None:
    b, h, _, _ = book(max_pairs=1)
    b.link(1).ensure()
    h.busy = {1}
    assert b.link(2).ensure(wanted=lambda: False) is False
    assert b.links[2].state is LinkState.CLOSED and b.live == 1


def test_a_pair_lost_as_it_forms_is_lost_for_good_and_its_slot_is_free() -> None:
    started, release = threading.Event(), threading.Event()

    def make(peer: int, gen: int, wanted: Any) -> FakeTransport | None:
        started.set()
        release.wait(5)
        return FakeTransport(peer, gen)

    b, _, _, _ = book(max_pairs=1, make=make)
    link = b.link(1)
    errors: list[BaseException] = []

    def form() -> None:
        try:
            link.ensure()
        except PeerLost as e:
            errors.append(e)

    t = threading.Thread(target=form)
    t.start()
    assert started.wait(5)
    link.abort()  # its peer declared dead meanwhile
    release.set()
    t.join(5)
    assert errors and "aborted" in str(errors[0])
    assert link.state is LinkState.BROKEN and link.inner is None and b.live == 0
    with pytest.raises(PeerLost):
        link.ensure()


def test_a_warm_pair_whose_peer_came_and_left_is_no_start_up_failure() -> None:
    """A peer that finishes its init and shuts down at once says goodbye while
    this rank's warm-up still holds the pair it just made (seen on CI:
    test_scatter_init failed start-up on the Embedding rank). Start-up fails
    only for a pair not made in time, or when this rank itself stops."""
    formed, release = threading.Event(), threading.Event()

    def make(peer: int, gen: int, wanted: Any) -> FakeTransport:
        formed.set()
        release.wait(5)  # made; the goodbye comes before the link says OPEN
        return FakeTransport(peer, gen)

    b, _, _, _ = book(max_pairs=2, make=make)
    result: list[int | None] = []
    t = threading.Thread(target=lambda: result.append(b.warm_in_order([1], 5.0)))
    t.start()
    assert formed.wait(5)
    b.link(1).lose(abort=False)  # the peer's goodbye, on the control thread
    release.set()
    t.join(5)
    assert result == [None] and b.warm_failed == {}
    b.stop()
    assert b.warm_in_order([2], 5.0) == 2 and "shut down" in b.warm_failed[2]


def test_an_embedding_end_takes_no_slot_before_its_peer_waits() -> None:
    """The Embedding end follows (`pairing.py`): a pair its peer has not
    started holds no slot meanwhile, so another pair, whose peer waits, forms."""
    asked = threading.Event()
    looks: list[tuple[int, int]] = []

    def follow(peer: int, gen: int) -> bool:
        looks.append((peer, gen))
        if len(looks) >= 3:
            asked.set()
        return peer == 2

    b, _, made, _ = book(max_pairs=1)
    b.follow = follow
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(b.link(3).ensure(lambda: not stop.is_set())))
    t.start()
    assert asked.wait(5)
    assert b.links[3].state is LinkState.CLOSED and b.live == 0 and made == []
    assert "waits for the Language rank" in b.why_not_open(3)
    assert b.link(2).ensure() and made == [(2, 0)]  # the slot was free
    stop.set()
    t.join(5)
    assert result == [False] and set(looks) == {(3, 0), (2, 0)}


class Fleet:
    """Two Embedding and two Language ranks (ids 0, 1 and 2, 3), each with its
    own book at max_pairs 1, making pairs as `pairing.py` does: hellos in a
    shared store, the Language end leading. One room per (Embedding, Language)
    pair, busy until both ends used the pair; a pair is closed at both ends by
    the Language end (asked by the Embedding end when it needs room)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.hellos: set[tuple[int, int, int, str]] = set()
        self.asked: set[tuple[int, int]] = set()  # (Embedding, Language) looked for
        self.used: dict[tuple[int, int], set[int]] = {}
        self.books = {r: self._book(r) for r in range(4)}

    def _book(self, me: int) -> PairBook:
        embedding = me < 2

        def make(peer: int, gen: int, wanted: Any) -> FakeTransport | None:
            e, lang = (me, peer) if embedding else (peer, me)
            mine = (e, lang, gen, "e" if embedding else "l")
            theirs = (e, lang, gen, "l" if embedding else "e")
            with self.cv:
                self.hellos.add(mine)
                self.cv.notify_all()
                while wanted():  # a hello stands until both constructed: never deleted
                    if theirs in self.hellos:
                        return FakeTransport(peer, gen)
                    if embedding:
                        break
                    self.cv.wait(0.05)
                self.hellos.discard(mine)
            return None

        def follow(peer: int, gen: int) -> bool:
            with self.cv:
                self.asked.add((me, peer))
                return (me, peer, gen, "l") in self.hellos

        b = PairBook(make, lambda t: None, max_pairs=1, idle_s=10.0, stats=Stats(),
                     follow=follow if embedding else None)
        b.host = self  # type: ignore[assignment]
        return b

    def pair_busy(self, peer: int) -> bool:  # the host of every book; only `idle` asks
        return False

    def make_room(self, candidates: list[int]) -> None:
        """Any rank at its cap: every pair whose room is over is closed."""
        with self.cv:
            idle = [(e, lang) for (e, lang), used in self.used.items() if len(used) == 2]
        for e, lang in idle:  # PAIR_CLOSE: the Language end, then the Embedding end
            ends = (self.books[lang].links.get(e), self.books[e].links.get(lang))
            if all(k is not None and k.is_open() for k in ends):
                for k in ends:
                    assert k is not None and k.begin_close() is not None
                    k.finish_close()

    def pair_opened(self, peer: int) -> None:
        pass

    def pair_closed(self, peer: int) -> None:
        pass

    def room(self, me: int, peer: int, deadline: float) -> bool:
        """This end of pair (me, peer)'s room: the pair made, then used once."""
        import time
        e, lang = (me, peer) if me < 2 else (peer, me)
        with self.cv:
            self.used.setdefault((e, lang), set())
        if not self.books[me].link(peer).ensure(lambda: time.monotonic() < deadline):
            return False
        with self.cv:
            self.used[(e, lang)].add(me)
        return True


def test_ranks_at_their_caps_never_wait_on_each_other_in_a_ring() -> None:
    """bench_scale's 2 x 2 at max_pairs 1 hung about one run in ten: E0 held its
    slot for L3, L3 for E1, E1 for L2 and L2 for E0, each waiting for the next.
    Driven into that order here: the Language ends of the ring start first and
    wait; the Embedding ends, which follow, hold no slot for them, so the
    other pairs form, their rooms end, and the ring's pairs form after them."""
    import time
    fleet = Fleet()
    deadline = time.monotonic() + 10.0
    results: dict[tuple[int, int], bool] = {}

    def run(me: int, peer: int) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(
            (me, peer), fleet.room(me, peer, deadline)), daemon=True)
        t.start()
        return t

    ring = [run(2, 0), run(3, 1), run(0, 3), run(1, 2)]
    books = fleet.books

    def ring_stands() -> bool:  # both Language ends wait; both Embedding ends looked
        states = [books[lang].links[e].state for lang, e in ((2, 0), (3, 1))
                  if e in books[lang].links]
        with fleet.cv:
            return states == [LinkState.FORMING] * 2 and {(0, 3), (1, 2)} <= fleet.asked
    while not ring_stands():
        assert time.monotonic() < deadline, "the ring's ends did not start"
        time.sleep(0.005)
    assert books[0].live == 0 and books[1].live == 0  # the followers hold no slot for them
    rest = [run(0, 2), run(1, 3), run(2, 1), run(3, 0)]
    for t in ring + rest:
        t.join(max(0.0, deadline - time.monotonic()) + 1.0)
    assert len(results) == 8 and all(results.values()), results
    assert all(len(used) == 2 for used in fleet.used.values()) and len(fleet.used) == 4


def test_a_maker_that_fails_gives_the_slot_back() -> None:
    def make(peer: int, gen: int, wanted: Any) -> FakeTransport:
        raise RuntimeError("connection reset")

    b, _, _, _ = book(max_pairs=1, make=make)
    with pytest.raises(PeerLost, match="not formed: connection reset"):
        b.link(1).ensure()
    assert b.live == 0 and b.links[1].state is LinkState.CLOSED


def test_close_is_refused_for_another_generation_and_cancel_keeps_it_open() -> None:
    b, _, _, _ = book()
    link: PairLink = b.link(1)
    link.ensure()
    assert link.begin_close(gen=5) is None and link.is_open()
    assert link.begin_close() == 0
    link.cancel_close()  # its PAIR_CLOSE could not be sent
    assert link.is_open() and link.gen == 0


def test_idle_lists_pairs_unused_for_idle_s() -> None:
    b, h, _, clock = book()
    b.link(1).ensure()
    b.link(2).ensure()
    clock.t = 5.0
    b.touch(2)
    clock.t = 11.0
    assert b.idle(clock.t) == [1]
    h.busy = {1}
    assert b.idle(clock.t) == []


def test_shutdown_stops_waiters_and_destroys_every_group() -> None:
    b, h, _, _ = book(max_pairs=1)
    first = b.link(1)
    first.ensure()
    h.busy = {1}
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            b.link(2).ensure()
        except PeerLost as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    t.join(0.2)
    inner = first.inner
    b.close_all()
    t.join(5)
    assert errors and "shut down" in str(errors[0])
    assert inner is not None and inner.destroyed and b.live == 0


def test_a_pair_not_open_says_why_for_a_timeout_s_reason() -> None:
    b, h, _, _ = book(max_pairs=1)
    b.link(1).ensure()
    h.busy = {1}
    b.link(2)
    assert b.why_not_open(1) == ""
    assert b.why_not_open(2) == ("its pair group waits for a slot: this rank is at "
                                 "max_pairs=1 with every pair busy")
    b.links[2].lose(abort=True)
    assert b.why_not_open(2) == "its pair group is lost: aborted"
    assert b.why_not_open(99) == ""  # no link: nothing to say


def test_a_following_hello_never_waits_for_a_leader_gone() -> None:
    """`pairing.hello`: the Language end waits for the Embedding end's hello;
    the Embedding end, which said hello only because the Language end's stood,
    does not wait if it was withdrawn meanwhile, and takes its own back."""
    import torch.distributed as dist

    from disagg.pairing import hello
    store, never = dist.HashStore(), threading.Event()
    assert not hello(store, "p/0", "e", "l", lambda: True, never, follow=True)
    assert not store.check(["p/0/hello/e"])
    waits = iter([True, True, False])
    assert not hello(store, "p/0", "l", "e", lambda: next(waits), never)  # a leader waits
    store.set("p/0/hello/l", "1")
    assert hello(store, "p/0", "e", "l", lambda: True, never, follow=True)
    assert store.check(["p/0/hello/e"])  # it stands until the pair is constructed


def test_an_embedding_end_looks_for_its_leader_on_a_client_of_its_own() -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from disagg.pairing import PairMaker
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True,
                           timeout=datetime.timedelta(seconds=10))
    maker = PairMaker(server, lambda peer: f"pair/{peer}", embedding=True,
                      device=torch.device("cpu"), timeout_s=5.0)
    assert not maker.waiting(3, 0)
    looker = maker._looker
    assert looker is not None and looker is not server
    server.set("pair/3/1/hello/l", "1")
    assert not maker.waiting(3, 0) and maker.waiting(3, 1)  # this generation's hello only
    assert maker._looker is looker  # one client, kept
    maker.close()
    assert maker._looker is None and maker._idle == []


def test_thin_communicators_are_asked_for_by_an_environment_variable() -> None:
    from disagg.pairing import max_ctas_from_env
    assert max_ctas_from_env({}) == 0 and max_ctas_from_env({"DISAGG_PAIR_NCCL_MAX_CTAS": "2"}) == 2
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match=r"DISAGG_PAIR_NCCL_MAX_CTAS='.*': must be an int"):
            max_ctas_from_env({"DISAGG_PAIR_NCCL_MAX_CTAS": bad})
