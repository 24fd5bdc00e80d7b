"""Jobs mode's membership rules, in one process: the ids, the records as read
back from the store (hostile ones included), the pure scan that says who
joined and who left, and what an engine does with a departed peer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from inproc.fakes import World

from disagg.config import DisaggConfig
from disagg.errors import FailureCause
from disagg.geometry import Geometry
from disagg.roster import EMBEDDING_IDS, MAX_ID, Member, Seen, counter, language_id, scan
from disagg.topology import Topology
from disagg.types import TransferStatus

GEOM = Geometry.from_config(DisaggConfig(hidden_size=32, block_size=8)).to_dict()


def member(i: int, name: str, gen: int = 1, role: str = "embedding") -> Member:
    return Member(i, role, name, gen, GEOM, "gloo", "copy",
                  "tcp://127.0.0.1:1" if role == "embedding" else None)


def test_language_ids_keep_the_topology_arithmetic() -> None:
    tp = 4
    topo = Topology(EMBEDDING_IDS + ((MAX_ID + 1 - EMBEDDING_IDS) // tp) * tp, EMBEDDING_IDS, tp)
    for k, i in ((0, 0), (0, 3), (7, 2), (123_456, 1)):
        lid = language_id(k, i, tp)
        assert topo.role(lid) == "language"
        assert topo.instance_of(lid) == k and topo.index_in_instance(lid) == i
        assert topo.instance_ranks(k)[i] == lid
    assert topo.role(EMBEDDING_IDS - 1) == "embedding"
    with pytest.raises(ValueError, match="past the id space"):
        language_id((MAX_ID - EMBEDDING_IDS) // tp + 1, 0, tp)


def test_records_round_trip_and_hostile_ones_are_refused() -> None:
    m = member(3, "enc-a", 2)
    assert Member.decode(m.encode()) == m
    good = json.loads(m.encode())
    bad: list[Any] = [b"", b"\xff\xfe", b"[]", b"null", b"{}", b'{"id": 1}',
                      json.dumps({**good, "extra": 1}).encode(),
                      json.dumps({**good, "role": "root"}).encode(),
                      json.dumps({**good, "id": -1}).encode(),
                      json.dumps({**good, "id": MAX_ID + 1}).encode(),
                      json.dumps({**good, "id": "3"}).encode(),
                      json.dumps({**good, "geometry": []}).encode(),
                      json.dumps({**good, "address": None}).encode()]  # an encoder needs one
    for raw in bad:
        assert Member.decode(raw) is None, raw


def test_scan_joins_new_members_and_leaves_none_that_lives() -> None:
    known: dict[int, Seen] = {}
    out = scan(known, {0: member(0, "a"), 1: member(1, "b")}, {0: 1, 1: 1}, 10.0, 2.0)
    assert [m.id for m in out.joined] == [0, 1] and not out.left and not out.collect
    known = {0: Seen(member(0, "a"), 1, 10.0), 1: Seen(member(1, "b"), 1, 10.0)}
    out = scan(known, {0: member(0, "a"), 1: member(1, "b")}, {0: 5, 1: 7}, 11.9, 2.0)
    assert not out.joined and not out.left and known[0].lease == 5


def test_scan_a_record_gone_is_a_member_that_left() -> None:
    known = {0: Seen(member(0, "a"), 1, 10.0)}
    out = scan(known, {}, {}, 10.5, 2.0)
    assert out.left == [(0, "it left the deployment")] and not out.collect


def test_scan_a_lease_standing_still_past_peer_timeout_is_collected() -> None:
    known = {0: Seen(member(0, "a"), 4, 10.0)}
    assert not scan(known, {0: member(0, "a")}, {0: 4}, 11.9, 2.0).left
    out = scan(known, {0: member(0, "a")}, {0: 4}, 12.1, 2.0)
    assert [i for i, _ in out.left] == [0] and "lease stood still" in out.left[0][1]
    assert out.collect == [0]


def test_scan_a_restart_under_the_same_name_supersedes_the_old_id() -> None:
    known = {0: Seen(member(0, "enc", 1), 3, 10.0)}
    records = {0: member(0, "enc", 1), 5: member(5, "enc", 2)}
    out = scan(known, records, {0: 4, 5: 1}, 10.2, 2.0)
    assert [m.id for m in out.joined] == [5]
    assert out.left == [(0, "superseded by 'enc' generation 2 (id 5)")] and out.collect == [0]
    # an old generation this rank never knew is only collected
    out = scan({}, records, {0: 4, 5: 1}, 10.2, 2.0)
    assert [m.id for m in out.joined] == [5] and not out.left and out.collect == [0]


def test_a_room_addressed_to_a_departed_rank_fails_at_once_and_an_unknown_one_raises() -> None:
    """DESIGN 0.3: in jobs mode a departed id fails its rooms at once with
    PEER_LOST, not after bootstrap_timeout; an id never known is a caller's bug."""
    with World(DisaggConfig(hidden_size=32, block_size=8, num_blocks=8)) as w:
        eng = w.lang()
        eng.peer_gone(0, "it left the deployment")
        r = eng.receiver(5, src_rank=0)
        assert r.init() is False
        assert r.poll() is TransferStatus.FAILED and "it left the deployment" in (r.failure or "")
        assert w.causes(1) == {FailureCause.PEER_LOST.value: 1}
        with pytest.raises(ValueError, match="not an embedding rank this rank knows"):
            eng.receiver(6, src_rank=77)
        w.close(check=False)


def test_an_id_met_by_another_tp_rank_first_waits_for_its_pair_here() -> None:
    """Jobs mode: each rank forms its own pair with a new encoder, so one TP rank
    may list it in peers() before the other has met it. A room addressed to a
    member not met yet here waits (init() is False, call again, as the queue
    does); one addressed to an id that is no member fails at once."""
    with World(DisaggConfig(hidden_size=32, block_size=8, num_blocks=8)) as w:
        eng = w.lang()
        eng.membership = lambda i: i == 7
        forming = eng.receiver(5, src_rank=7)
        assert forming.init() is False and forming.poll() is TransferStatus.BOOTSTRAPPING
        gone = eng.receiver(6, src_rank=8)
        assert gone.init() is False and gone.poll() is TransferStatus.FAILED
        assert "no member of the deployment" in (gone.failure or "")
        forming.abort("test over")
        w.close(check=False)


def test_a_store_outage_collects_nobody_for_it() -> None:
    """Nobody can bump a lease while the rendezvous store is away: when it is
    back, every member's lease counts as moved then (`Roster._grace`), so one
    whose first bump after the outage comes a little after this rank's first
    rescan is not collected for the outage."""
    import torch

    from disagg.jobs import Roster
    me = member(EMBEDDING_IDS, "llm/0", role="language")
    roster = Roster(None, me, Geometry.from_config(DisaggConfig(hidden_size=32, block_size=8)),
                    1, torch.device("cpu"), 2.0, lambda m: None, lambda i, w: None)
    roster.known = {0: Seen(member(0, "a"), 4, 10.0)}
    stale = scan(dict(roster.known), {0: member(0, "a")}, {0: 4}, 20.0, 2.0)
    assert stale.collect == [0]  # without the grace: collected for the outage
    roster.known = {0: Seen(member(0, "a"), 4, 10.0)}
    roster._grace(20.0)
    assert not scan(roster.known, {0: member(0, "a")}, {0: 4}, 21.0, 2.0).left


class CountingStore:
    """A store that counts the ops each kind of call costs the server."""

    def __init__(self, store: Any, counts: dict[str, int]) -> None:
        self._store, self.counts = store, counts

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._store, name)
        if name == "clone":
            return lambda: CountingStore(fn(), self.counts)
        if not callable(fn):
            return fn

        def counted(*a: Any, **kw: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*a, **kw)
        return counted


def test_a_rescan_reads_records_and_leases_in_one_store_op_each() -> None:
    """Issue 28: membership reads batch with multi_get instead of a get and an
    add per member (the store is the fleet's shared bottleneck)."""
    import datetime

    import torch
    import torch.distributed as dist

    from disagg.jobs import Roster
    from disagg.roster import key
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True,
                           timeout=datetime.timedelta(seconds=10))
    n = 12
    for i in range(n):  # Embedding members whose pairs this rank would refuse (another backend)
        server.set(key("m", i), json.dumps({**json.loads(member(i, f"e{i}").encode()),
                                            "backend": "nccl"}))
        server.add(key("lease", i), 3)
    server.add(key("emb", "next"), n)
    counts: dict[str, int] = {}
    store = CountingStore(server, counts)
    me = member(EMBEDDING_IDS, "llm/0", role="language")
    roster = Roster(store, me, Geometry.from_config(DisaggConfig(hidden_size=32, block_size=8)),
                    1, torch.device("cpu"), 10.0, lambda m: None, lambda i, w: None)
    roster._rescan(0.0)
    assert sorted(roster.known) == list(range(n)) and len(roster.refused) == n
    assert counts.get("multi_get") == 2, counts  # the records, then their leases
    assert counts.get("check") == n, counts  # each new id, once
    assert counts.get("get", 0) == 0 and counts.get("add", 0) == 2, counts  # two counters
    # steady state: the two counters and the leases, whatever the number of members
    counts.clear()
    roster._rescan(1.0)
    assert counts == {"add": 2, "multi_get": 1}, counts
    # a departure is read from the log, in one more multi_get
    server.add(key("left", "n"), 1)
    server.set(key("left", 1), "3")
    server.delete_key(key("m", 3))
    server.delete_key(key("lease", 3))
    counts.clear()
    gone: list[int] = []
    roster._on_gone = lambda i, why: gone.append(i)
    roster._rescan(2.0)
    assert gone == [3] and 3 not in roster.known
    assert counts == {"add": 2, "multi_get": 2}, counts


def test_counters_read_back_from_the_store_are_never_trusted() -> None:
    assert counter(b"17") == 17 and counter(b"-1") == -1
    assert counter(None) is None and counter(b"") is None
    assert counter(b"x1") is None and counter(b"\xff") is None


class DeletedMeanwhile(CountingStore):
    """A store whose reads of `gone` keys come back empty: what TCPStore's get
    and multi_get return for a key deleted between their wait and their read
    (a member leaving or collected while another rank reads its lease)."""

    def __init__(self, store: Any, gone: set[str]) -> None:
        super().__init__(store, {})
        self.gone = gone

    def __getattr__(self, name: str) -> Any:
        if name == "multi_get":
            return lambda keys: [b"" if k in self.gone else v
                                 for k, v in zip(keys, self._store.multi_get(keys), strict=True)]
        if name == "get":
            return lambda k: b"" if k in self.gone else self._store.get(k)
        if name == "clone":
            return lambda: DeletedMeanwhile(self._store.clone(), self.gone)
        return super().__getattr__(name)


def test_a_key_deleted_while_it_is_read_is_a_departure_not_a_crash() -> None:
    """CI saw the roster thread die of `int(b'')`: a lease read as a peer
    collected its member. Every value read back empty counts as deleted: the
    lease is unknown (the member is collected only once it stood still for
    peer_timeout), an empty departure is a hole read again later."""
    import datetime

    import torch
    import torch.distributed as dist

    from disagg.jobs import Roster
    from disagg.roster import key
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True,
                           timeout=datetime.timedelta(seconds=10))
    for i in range(2):
        server.set(key("m", i), json.dumps({**json.loads(member(i, f"e{i}").encode()),
                                            "backend": "nccl"}))
        server.add(key("lease", i), 3)
    server.add(key("emb", "next"), 2)
    gone = {key("lease", 1)}
    me = member(EMBEDDING_IDS, "llm/0", role="language")
    roster = Roster(DeletedMeanwhile(server, gone),
                    me, Geometry.from_config(DisaggConfig(hidden_size=32, block_size=8)),
                    1, torch.device("cpu"), 2.0, lambda m: None, lambda i, w: None)
    roster._rescan(0.0)
    roster._rescan(1.0)
    assert sorted(roster.known) == [0, 1]
    assert roster.known[1].lease == -1 and roster.known[0].lease == 3
    left: list[int] = []
    roster._on_gone = lambda i, why: left.append(i)
    server.add(key("left", "n"), 1)
    server.set(key("left", 1), "1")
    gone.add(key("left", 1))  # its read races too: looked at again next time
    roster._rescan(1.5)
    assert left == [] and roster._left_read == 0
    gone.discard(key("left", 1))
    roster._rescan(1.6)
    assert left == [1] and roster._left_read == 1 and sorted(roster.known) == [0]


def test_the_roster_thread_outlives_a_bug_in_one_pass(caplog: Any) -> None:
    """A pass that raises something unforeseen is logged and the next one runs:
    a dead roster thread stops this rank's lease, and peers would collect a
    rank that still serves."""
    import threading

    import torch
    import torch.distributed as dist

    from disagg.jobs import Roster
    me = member(EMBEDDING_IDS, "llm/0", role="language")
    roster = Roster(dist.HashStore(), me,
                    Geometry.from_config(DisaggConfig(hidden_size=32, block_size=8)),
                    1, torch.device("cpu"), 2.0, lambda m: None, lambda i, w: None)
    passes: list[float] = []
    again = threading.Event()

    def rescan(now: float) -> None:
        passes.append(now)
        if len(passes) == 1:
            raise ValueError("a bug")
        again.set()
    roster._rescan = rescan  # type: ignore[method-assign]
    roster._epoch = 0  # each pass reads the epoch as 1 (start bumps it): a rescan at once
    try:
        roster.start(settle_s=5.0)
        assert again.wait(10.0), "no pass ran after the one that failed"
    finally:
        roster.halt(5.0)
    assert "membership pass failed" in caplog.text and "ValueError: a bug" in caplog.text
