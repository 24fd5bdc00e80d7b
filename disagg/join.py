"""`disagg.join(cfg, rendezvous=..., role=..., name=None)`: this process's side
in a deployment of separate jobs (DESIGN 0.3). Returns a `Context` with the
same API as `init()`'s; `ctx.rank` is this rank's id in the rendezvous store
(an Embedding rank's id is what Language callers pass as `src_rank`), and
`ctx.peers()` lists the Embedding ranks usable now.

A Language job's ranks are its default world (torchrun), split into TP
instances of `language_tp_size` consecutive ranks as in world mode, or the
ranks of `instance_group=` (inside another framework's worker); a
single-process Language job with TP 1 needs no world. Every process of an
Embedding job is one Embedding rank, world or not. `join()` never initialises
or destroys the default world, and the only collectives it issues on it are
its own instance group's creation at start-up.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time

import torch
import torch.distributed as dist
import zmq

from . import transport as transport_mod
from .backend import backend_choice, cuda_index, destroy_group, local_rank, new_group
from .config import DisaggConfig
from .context import Context
from .control import ControlChannel
from .embedding import EmbeddingEngine
from .errors import DisaggError
from .geometry import Geometry, Topology
from .jobs import Roster
from .language import LanguageEngine
from .language_side import LanguageSide
from .pair_book import PairBook
from .pairs import warm_pair
from .roster import EMBEDDING_IDS, MAX_ID, Member, key, language_id
from .stats import Stats
from .store import connect_store, embedding_id, new_member
from .transport import PairTransport

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # join() returns once the members present have been met, or after this


def join(cfg: DisaggConfig | None = None, rendezvous: str = "tcp://127.0.0.1:29600", *,
         role: str, name: str | None = None,
         instance_group: dist.ProcessGroup | None = None) -> Context:
    """Join a deployment of separate jobs through the rendezvous store at
    `rendezvous` ("tcp://host:port", hosted by `python -m launch.rendezvous` or by
    any job with `disagg.store.host_store`). `role`: "embedding" or "language".
    `name` (default: role, host and pid): a rank that joins under a name already
    live supersedes it (a restarted job), which every peer then drops."""
    cfg = cfg or DisaggConfig()
    if role not in ("embedding", "language"):
        raise ValueError(f"role={role!r}: expected 'embedding' or 'language'")
    return JobsContext(cfg, rendezvous, role, name, instance_group)


class JobsContext(Context):
    """A `Context` whose peers are met through the rendezvous store."""

    def __init__(self, cfg: DisaggConfig, rendezvous: str, role: str, name: str | None,
                 instance_group: dist.ProcessGroup | None) -> None:
        self.cfg = cfg
        self.backend, why = backend_choice(cfg)
        log.info("disagg backend: %s (%s)", self.backend, why)
        self._owns_world = False
        self.role = role
        tp = cfg.language_tp_size
        self.topology = Topology(EMBEDDING_IDS + ((MAX_ID + 1 - EMBEDDING_IDS) // tp) * tp,
                                 EMBEDDING_IDS, tp)
        self.world_size = self.topology.world_size
        index, _ = local_rank()
        self.device = (torch.device("cuda", cuda_index(index, torch.cuda.device_count()))
                       if self.backend == "nccl" else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.geometry = Geometry.from_config(cfg)
        self._closed = False
        self._closers = []
        self._groups: list[dist.ProcessGroup] = []
        self._zctx = zmq.Context()
        self._control: ControlChannel | None = None
        self._embedding: EmbeddingEngine | None = None
        self._language: LanguageSide | None = None
        self._roster: Roster | None = None
        self._book: PairBook | None = None
        self._addresses: dict[int, str] = {}  # member id -> its control address
        self._connected: set[int] = set()  # Language side: control sockets made
        self._warming: list[threading.Thread] = []  # `_warm_member`
        self.control_address: str | None = None
        self.rendezvous = rendezvous
        try:
            self._store = connect_store(rendezvous, cfg.bootstrap_timeout)
            self.rank = (embedding_id(self._store) if role == "embedding"
                         else self._language_id(instance_group))
            self.instance = self.topology.instance_of(self.rank)
            self._start_jobs(name, instance_group)
        except BaseException:
            self._close_partial()
            raise

    # ---------------------------------------------------------------- start-up

    def _language_id(self, instance_group: dist.ProcessGroup | None) -> int:
        """This rank's id: its job's instances take consecutive instance numbers
        from the store (its world's rank 0 takes them, the others read them)."""
        tp = self.cfg.language_tp_size
        group = instance_group
        if group is None and not dist.is_initialized():
            if tp != 1:
                raise DisaggError(f"join(role='language') with language_tp_size={tp} needs "
                                  f"the instance's ranks: run under torchrun (one world per "
                                  f"Language job) or pass instance_group=")
            base = self._store.add(key("inst", "next"), 1) - 1
            return language_id(base, 0, 1)
        ranks = (dist.get_process_group_ranks(group) if group is not None
                 else list(range(dist.get_world_size())))
        me = dist.get_rank()
        if len(ranks) % tp:
            raise DisaggError(f"join(role='language'): {len(ranks)} ranks in the job, not a "
                              f"multiple of language_tp_size={tp}")
        local = ranks.index(me)
        job_store = dist.distributed_c10d._get_default_store()
        gen = job_store.add(f"disagg/jobs/joins/{me}", 1)
        k = f"disagg/jobs/instance_base/{ranks[0]}/{gen}"
        if local == 0:
            n = len(ranks) // tp
            job_store.set(k, str(self._store.add(key("inst", "next"), n) - n))
        base = int(job_store.get(k).decode())
        self._job_ranks = ranks
        return language_id(base + local // tp, local % tp, tp)

    def _start_jobs(self, name: str | None, instance_group: dist.ProcessGroup | None) -> None:
        cfg = self.cfg
        stats = Stats(pool_total_blocks=self.geometry.num_blocks,
                      pool_free_blocks=self.geometry.num_blocks, rooms_live=0)
        self._stats = stats
        control = self._control = ControlChannel(self._zctx, name=f"disagg-control-{self.rank}")
        transports: dict[int, PairTransport] = {}
        self._book = self._pair_book(self._store, "", cfg.bootstrap_timeout
                                     + 2 * cfg.peer_timeout, stats)
        if self.role == "embedding":
            self.control_address = control.bind_router(cfg.host or _host(self.rendezvous), ())
            engine = EmbeddingEngine(cfg, self.rank, self.topology, self.geometry, {},
                                     transports, self.device, stats, control, peers=())
            engine.attach(self._book)
            control.start(engine, self.device)
            self._embedding = engine
        else:
            lang_engine = LanguageEngine(cfg, self.rank, self.topology, self.geometry,
                                         transports, self.device, stats, control, peers=())
            lang_engine.attach(self._book)
            control.start(lang_engine, self.device)
            group = self._instance_group(instance_group)
            self._language = LanguageSide(lang_engine, group, group)
        me = new_member(self._store, role=self.role, name=name, member_id=self.rank,
                        geometry=self.geometry, backend=self.backend, fanout=cfg.fanout,
                        address=self.control_address)
        self.name = me.name
        self._roster = Roster(self._store, me, self.geometry, cfg.language_tp_size,
                              self.device, cfg.peer_timeout, self._on_member, self._on_gone)
        if self._embedding is not None:
            control.admit = self._roster.admit
        if self._language is not None:
            self._language.engine.membership = self._roster.is_member
            self._language.engine.connect = self._connect
        self._roster.start(SETTLE_S)
        deadline = time.monotonic() + SETTLE_S  # the pairs of the members present now
        for t in list(self._warming):
            t.join(max(0.0, deadline - time.monotonic()))

    def _instance_group(self, given: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        """The Gloo group of this rank's TP instance (None for TP 1): made on the
        job's world, the only collective join() issues there."""
        tp = self.cfg.language_tp_size
        if tp == 1:
            return None
        if given is not None:  # the host framework's TP group: used, never destroyed here
            if dist.get_world_size(given) != tp:
                raise DisaggError(f"instance_group has {dist.get_world_size(given)} ranks, "
                                  f"language_tp_size is {tp}")
            return given
        ranks = self._job_ranks
        local = ranks.index(dist.get_rank())
        mine = None
        for i in range(len(ranks) // tp):  # every rank of the job makes every instance's
            g = new_group(ranks[i * tp:(i + 1) * tp], backend="gloo",
                          timeout=datetime.timedelta(seconds=self.cfg.step_timeout),
                          device=self.device)
            if i == local // tp:
                mine = g
                self._groups.append(g)
        return mine

    # ---------------------------------------------------------------- roster events

    def _pair_base(self, peer: int) -> str:
        return key("pair", *self._pair_ends(peer))

    def _on_member(self, m: Member) -> None:
        """Member `m` of the other role joined (roster thread): usable from now
        on; its pair is made when a room first needs it."""
        assert self._control is not None and self._book is not None
        link = self._book.link(m.id)
        self._addresses[m.id] = m.address or ""
        if self._embedding is not None:
            self._control.allow(m.id)
            self._embedding.add_peer(m.id, link, int(str(m.geometry["num_blocks"])))
        elif self._language is not None:
            self._language.engine.add_peer(m.id, link)
        assert self._roster is not None
        if not self._small():  # past the cap: pairs on demand only
            self._roster.usable(m.id)
            return
        t = threading.Thread(target=self._warm_member, args=(m.id,), daemon=True,
                             name=f"disagg-warm-{self.rank}-{m.id}")
        self._warming = [w for w in self._warming if w.is_alive()] + [t]
        t.start()

    def _small(self) -> bool:
        """Whether pairs are warmed as members join: while every rank of either
        role could pair with every rank of the other under `max_pairs`. Both
        ends decide it alike, from the store's two id counters (ranks ever
        joined, so a restarted rank counts again: the rule errs on demand)."""
        cap = self.cfg.max_pairs
        try:
            embedding = self._store.add(key("emb", "next"), 0)
            language = self._store.add(key("inst", "next"), 0) * self.cfg.language_tp_size
        except (RuntimeError, dist.DistError):
            return False
        return warm_pair(embedding, language, cap, cap)

    def _warm_member(self, member_id: int) -> None:
        """Within the cap, a member's pair is made as it joins (`links.py`, "Warm
        pairs"): it warms this rank's pair too, once it sees this rank (within a
        rescan or two). Listed by `peers()` once made, or once given up."""
        transport_mod.bind_device(self.device)
        roster, book = self._roster, self._book
        assert roster is not None and book is not None
        deadline = time.monotonic() + 2 * self.cfg.peer_timeout + SETTLE_S
        try:
            book.warm(member_id, lambda: roster.knows(member_id)
                      and time.monotonic() < deadline)
        finally:
            roster.usable(member_id)

    def _connect(self, member_id: int) -> None:
        """Language side, first use of Embedding rank `member_id` (engine lock
        held): its control socket is connected now, not at its join, so a rank
        has sockets only to the encoders it uses."""
        if member_id in self._connected or self._control is None:
            return
        address = self._addresses.get(member_id)
        if address:
            self._connected.add(member_id)
            self._control.add_dealer(self.rank, member_id, address)

    def _on_gone(self, member_id: int, why: str) -> None:
        if self._book is not None:  # before its rooms fail or give memory back
            self._book.lose(member_id, abort=True)
        if self._embedding is not None:
            self._embedding.peer_gone(member_id, why)
            if self._control is not None:
                self._control.disallow(member_id)
        elif self._language is not None:
            self._language.engine.peer_gone(member_id, why)
        if self._book is not None:
            self._book.forget(member_id)

    # ---------------------------------------------------------------- public

    def peers(self) -> dict[int, str]:
        """The Embedding ranks usable now: id -> name (on an Embedding rank: the
        Language ranks it serves). A rank whose pair is lost is not listed."""
        eng = self._engine()
        if self._roster is None or eng is None or self._closed:
            return {}
        lost = eng.lost_peers()
        return {i: n for i, n in self._roster.peers().items() if i not in lost}

    def shutdown(self, timeout_s: float | None = None) -> None:
        """As `Context.shutdown`, and this rank leaves the rendezvous store: first
        no one new is met, then the rooms end and the peers get their goodbyes,
        then the rank's entries are deleted."""
        if self._closed:
            return
        bound = self.cfg.peer_timeout if timeout_s is None else timeout_s
        if self._roster is not None:
            self._roster.halt(bound)
        super().shutdown(timeout_s)
        for t in self._warming:  # the book is stopped: each ends at its next look
            t.join(bound)
        if self._roster is not None:
            self._roster.leave()
        self._roster = None
        self.__dict__.pop("_store", None)  # its socket closes with the last reference

    def _close_partial(self) -> None:
        if self._book is not None:
            self._book.close_all()
        for g in self._groups:
            destroy_group(g, self.device)
        self._groups.clear()
        if self._control is not None:
            self._control.close()
        self._zctx.destroy(linger=0)


def _host(rendezvous: str) -> str:
    """The address Language ranks reach this rank's ROUTER at: loopback when the
    deployment meets on loopback (one box), else this host's routable address."""
    if rendezvous[6:].rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        ip = str(info[4][0])
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    return "127.0.0.1"
