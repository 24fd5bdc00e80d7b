"""Jobs mode's membership (DESIGN 0.3, "Deployments"): this process's job is
its own torchrun world, or it has no world at all; ranks of other jobs are
met through one c10d `TCPStore`. The `Roster` registers this rank, keeps its
lease, reads who joined and who left (incrementally: docs/performance.md,
"Fleet scale"), checks each new member's geometry, and reports members to
the context, which gives each a pair made on demand (`links.py`): a pair's
two-rank group is made with the backend's own constructor on a prefix of the
rendezvous store when a room first needs it (`pairing.py`). That constructor
needs no default world (an encoder process without torchrun), never touches
the host framework's default world or its collectives, fixes each end's rank
in the group (Embedding 0, Language 1) and lets one pair be dropped alone;
vLLM builds its stateless NCCL groups the same way.

Threads: the roster thread (membership: lease, rescans, collection); pairs
are made by their own stream threads.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import transport
from .errors import GeometryMismatch
from .geometry import Geometry
from .roster import POLL_S, Member, Seen, counter, key, scan
from .store import candidate_ids, own_client

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2  # a read of a key that vanished fails this fast (see `Roster._reader`)
EPOCH_EVERY_S = 0.5  # how often the epoch (bumped by every join and leave) is read


class Roster:
    """This rank's view of the deployment: registers itself, keeps its lease,
    reports every member of the other role as it appears (the context gives
    it a pair, made on demand) and every departure. `on_member(member)` and `on_gone(id, why)`
    are the context's."""

    def __init__(self, store: dist.Store, me: Member, geometry: Geometry, tp: int,
                 device: torch.device, peer_timeout: float,
                 on_member: Callable[[Member], None],
                 on_gone: Callable[[int, str], None]) -> None:
        self.store = store
        self.me = me
        self.geometry = geometry
        self.tp = tp
        self.device = device
        self.peer_timeout = peer_timeout
        self._on_member, self._on_gone = on_member, on_gone
        self.embedding = me.role == "embedding"
        self._lock = threading.Lock()
        self.known: dict[int, Seen] = {}  # members of the other role met: usable or refused
        self.names: dict[int, str] = {}  # usable now: id -> name
        self.refused: dict[int, str] = {}  # id -> why its pair was refused (geometry)
        self.store_error: str | None = None  # the store is unreachable (live pairs go on)
        self._epoch = -1
        self._lease = 0
        self._collected = False  # a peer collected this rank's record (see `_rescan`)
        # membership read incrementally (docs/performance.md, "Fleet scale"): the
        # records of present members (a record never changes), the candidate ids
        # examined so far, ids examined before their record was written (looked
        # at again until `peer_timeout` passed), and the departures log read so far
        self._records: dict[int, Member] = {}
        self._examined = 0
        self._unwritten: dict[int, float] = {}
        self._left_read = 0
        self._looked_up: dict[int, float] = {}  # `admit`: when each unknown id was read
        self._hole: tuple[int, float] | None = None  # a departure logged, not yet written: since
        self._read_store: dist.Store | None = None  # `_reader`
        self._failed_at = -1e9  # `_run`: when a pass last failed for a bug
        # the roster thread's own client: a pair's rendezvous waits on the shared
        # one (up to the pair's timeout, for a peer gone meanwhile), and a call
        # behind it there would stall this rank's lease until peers collect it
        self._mine = own_client(store)
        self._stop = threading.Event()
        self._first_pass = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"disagg-roster-{me.id}")

    # ---------------------------------------------------------------- life

    def start(self, settle_s: float) -> None:
        """Register, then start; return once the members present now have been
        seen (or `settle_s` passed). Their pairs are made when rooms need them."""
        self.store.set(key("m", self.me.id), self.me.encode().decode())
        self.store.add(key("lease", self.me.id), 1)
        self.store.add(key("epoch"), 1)
        self._thread.start()
        self._first_pass.wait(settle_s)

    def halt(self, timeout_s: float) -> None:
        """Stop the thread: nobody joins or leaves this rank's view any more."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():  # a store call that waits for its timeout
            log.error("rank id %d: %s still running after %.1fs", self.me.id,
                      self._thread.name, timeout_s)

    def leave(self) -> None:
        """Delete this rank's entries (a clean shutdown leaves nothing of its own
        in the store); the peers see it gone at their next rescan."""
        self._read_store = None  # its client's socket closes with it
        try:
            self._depart(self.me.id)
            self.store.add(key("epoch"), 1)
        except (RuntimeError, dist.DistError) as e:
            log.warning("rank id %d: could not deregister from the rendezvous store: %s",
                        self.me.id, e)

    def peers(self) -> dict[int, str]:
        with self._lock:
            return dict(self.names)

    def is_member(self, member_id: int) -> bool:
        """Whether `member_id` is in the deployment now (its pair with this rank
        may still be forming): this rank's view, else the store's word."""
        with self._lock:
            if member_id in self.known:
                return member_id not in self.refused
        try:
            return bool(self.store.check([key("m", member_id)]))
        except (RuntimeError, dist.DistError):
            return False

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        transport.bind_device(self.device)
        next_rescan = next_lease = next_epoch = 0.0
        # peers collect a lease that stood still for peer_timeout: 8 bumps in that
        # window are plenty, and each costs the store one op (docs/performance.md)
        lease_every = max(POLL_S, self.peer_timeout / 8)
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_lease:
                    self._lease = self._mine.add(key("lease", self.me.id), 1)
                    next_lease = now + lease_every
                epoch = self._epoch
                if now >= next_epoch:  # a join or a leave bumps it: rescan then
                    epoch = self._mine.add(key("epoch"), 0)
                    next_epoch = now + EPOCH_EVERY_S
                if epoch != self._epoch or now >= next_rescan:
                    self._epoch = epoch
                    self._rescan(now)
                    next_rescan = now + max(POLL_S, self.peer_timeout / 4)
                if self.store_error is not None:
                    log.warning("rank id %d: the rendezvous store is back", self.me.id)
                    self._grace(time.monotonic())
                self.store_error = None
            except (RuntimeError, dist.DistError) as e:
                if self.store_error is None:
                    log.warning("rank id %d: rendezvous store unreachable (live pairs keep "
                                "moving data; no one joins or is collected meanwhile): %s",
                                self.me.id, e)
                self.store_error = str(e)
            except Exception:  # a bug here must not end the lease: peers would collect
                # this rank while it serves. Said loudly, once a minute; the next pass retries
                if now - self._failed_at > 60.0:
                    self._failed_at = now
                    log.exception("rank id %d: membership pass failed (retried)", self.me.id)
            self._first_pass.set()
            self._stop.wait(POLL_S)

    def _grace(self, now: float) -> None:
        """The store was away: nobody could bump a lease meanwhile, so every
        member's lease counts as moved now (none is collected for the outage)."""
        with self._lock:
            for seen in self.known.values():
                seen.lease_moved_at = now

    def _rescan(self, now: float) -> None:
        """Who joined and who left, read incrementally: the new candidate ids (each
        examined once, or again until its record is written), the departures
        logged since the last rescan, and every present member's lease in one
        `multi_get`. In steady state three store ops, whatever the fleet's size."""
        self._read_departures(now)
        ids = candidate_ids(self._mine, self.embedding, self.tp)
        fresh = ids[self._examined:]
        self._examined = len(ids)
        for i in fresh:
            self._unwritten.setdefault(i, now)
        look = [i for i, since in self._unwritten.items() if now - since <= self.peer_timeout]
        self._unwritten = {i: self._unwritten[i] for i in look}
        present = [i for i in look if self._mine.check([key("m", i)])]
        for i, raw in zip(present, self._read_all([key("m", i) for i in present]),
                          strict=True):
            self._unwritten.pop(i, None)
            m = None if raw is None else Member.decode(raw)
            if m is not None and m.id == i and m.role != self.me.role:
                self._records[i] = m
        records = dict(self._records)
        leases = {i: -1 if (n := counter(raw)) is None else n
                  for i, raw in zip(records, self._read_all([key("lease", i) for i in records]),
                                    strict=True)}
        with self._lock:
            known = dict(self.known)
        result = scan(known, records, leases, now, self.peer_timeout)
        for i in result.collect:
            self._depart(i)
            self._records.pop(i, None)
        if result.collect:
            self._mine.add(key("epoch"), 1)
        for i, why in result.left:
            with self._lock:
                self.known.pop(i, None)
                self.names.pop(i, None)
                self.refused.pop(i, None)
            self._on_gone(i, why)
        for m in result.joined:
            self._join(m, now)

    def _depart(self, member_id: int) -> None:
        """Log a departure (a leave, or a collection), then delete the member's
        keys: readers learn of it from the log, in one read for all of them."""
        n = self._mine.add(key("left", "n"), 1)
        self._mine.set(key("left", n), str(member_id))
        for k in (key("m", member_id), key("lease", member_id)):
            self._mine.delete_key(k)

    def _read_departures(self, now: float) -> None:
        """The departures logged since the last read: those members' records are
        no longer present (the scan then reports them gone). This rank's own id
        there means a peer collected it (its lease stood still, e.g. a stall
        longer than peer_timeout): the others have dropped it, and it cannot be
        met again under this id; the job must join again (restart)."""
        n = self._mine.add(key("left", "n"), 0)
        if n <= self._left_read:
            return
        idx = list(range(self._left_read + 1, n + 1))
        for i, raw in zip(idx, self._read_all([key("left", i) for i in idx]), strict=True):
            if raw is None:  # logged, not yet written: read from here next time, unless
                # its writer died in between: a hole older than peer_timeout is skipped
                if self._hole is None or self._hole[0] != i:
                    self._hole = (i, now)
                if now - self._hole[1] <= self.peer_timeout:
                    break
                self._left_read = i
                continue
            self._left_read = i
            gone = counter(raw)
            if gone is None:
                log.warning("rank id %d: departure %d in the rendezvous store is not an id: "
                            "%r (skipped)", self.me.id, i, raw[:64])
                continue
            self._records.pop(gone, None)
            if gone == self.me.id and not self._collected:
                self._collected = True
                log.error("rank id %d: this rank was collected from the rendezvous store (its "
                          "lease stood still for peer_timeout): peers no longer use it; "
                          "restart this job to join again", self.me.id)

    def _read_all(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys` in one store op (`multi_get`); None for a key
        deleted since it was seen (a member leaving or collected meanwhile),
        found by reading the keys one by one when the batch could not be read.
        An empty value is one deleted meanwhile too: TCPStore's get waits for
        the key, then reads it, and a delete between the two reads as b''
        (no key here is ever written empty)."""
        if not keys:
            return []
        try:  # a short timeout: a missing key makes a get (and multi_get) wait
            return [v or None for v in self._reader().multi_get(keys)]
        except (RuntimeError, dist.DistError, AttributeError):
            pass
        out: list[bytes | None] = []
        for k in keys:
            try:
                out.append(self._reader().get(k) or None)
            except (RuntimeError, dist.DistError):
                out.append(None)  # deleted meanwhile
        return out

    def _reader(self) -> dist.Store:
        """A client of the store for reads of keys that may vanish (a member
        leaving or collected between a check and a get): a get waits for a
        missing key up to the client's timeout, and this thread also keeps
        this rank's lease, so it must not wait long: peers would collect it."""
        if self._read_store is None:
            client = own_client(self.store)
            if client is self.store:  # not a TCPStore: its own timeout stands
                return client
            client.set_timeout(datetime.timedelta(seconds=READ_TIMEOUT_S))
            self._read_store = client
        return self._read_store

    def admit(self, member_id: int) -> bool:
        """A message came from `member_id` before this rank met it (control
        thread): it met this rank in the store first. Read its record now and
        join it if it is a member of the other role (the rescan would, a
        moment later). Whether it is usable. An id found wanting is not looked
        up again for a second: a hostile peer costs at most one read a second."""
        now = time.monotonic()
        with self._lock:
            if member_id in self.known:
                return member_id in self.names
            if now - self._looked_up.get(member_id, -1e9) < 1.0:
                return False
            self._looked_up[member_id] = now
            if len(self._looked_up) > 1024:
                self._looked_up.clear()
        raw = self._read_all([key("m", member_id)])[0]
        m = None if raw is None else Member.decode(raw)
        if m is None or m.id != member_id or m.role == self.me.role:
            return False
        self._join(m, now)
        with self._lock:
            return member_id in self.names

    def _join(self, m: Member, now: float) -> None:
        with self._lock:  # once: a rescan and an early message may both find it
            if m.id in self.known:
                return
        try:
            theirs = Geometry.from_dict(m.geometry)
            self.geometry.check_compatible(theirs, rank=self.me.id, peer=m.id)
            if m.backend != self.me.backend:
                raise GeometryMismatch(f"backend differs: rank {self.me.id} uses "
                                       f"{self.me.backend}, rank {m.id} uses {m.backend}",
                                       rank=self.me.id, peer=m.id)
        except (GeometryMismatch, ValueError, KeyError, TypeError) as e:
            why = f"pair with rank {m.id} ({m.name!r}) refused: {e}"
            log.error("rank id %d: %s", self.me.id, why)
            with self._lock:
                self.known[m.id] = Seen(m, -1, now)
                self.refused[m.id] = why
            return
        with self._lock:
            self.known[m.id] = Seen(m, -1, now)
        self._on_member(m)

    def usable(self, member_id: int) -> None:
        """A member joined (its pair made, if the context warmed it): listed by
        `peers()` from now on, unless it left meanwhile."""
        with self._lock:
            seen = self.known.get(member_id)
            if seen is not None and member_id not in self.refused:
                self.names[member_id] = seen.member.name

    def knows(self, member_id: int) -> bool:
        """Whether `member_id` is still a member this rank pairs with."""
        with self._lock:
            return member_id in self.known and member_id not in self.refused
