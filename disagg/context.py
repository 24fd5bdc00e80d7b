"""`disagg.init`: join the world, check every rank's geometry, build the pair
groups, the control sockets and this rank's engine.

Start-up, identical on every rank:
 1. init_process_group (env:// inside torchrun, or the explicit arguments);
 2. publish hostname, then geometry and (Embedding ranks) the ZeroMQ address in
    the c10d store, and check every rank's geometry against rank 0's;
 3. create one Gloo group per Language instance, in the same order on every
    rank; each (Embedding, Language) pair's group is made only when a room
    first needs it, by the pair's own thread, on the world's store, and closed
    when idle (`links.py`; on NCCL a world whose pair communicators could wait
    on each other in a cycle is refused: docs/nccl.md);
 4. start the control thread.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import zmq

from .backend import (
    backend_choice,
    check_nccl_topology,
    cuda_index,
    destroy_group,
    local_rank,
    new_group,
    warm_up,
    world_backend,
)
from .config import DisaggConfig
from .control import ControlChannel
from .embedding import EmbeddingEngine
from .errors import DisaggError
from .geometry import Geometry, Topology
from .language import LanguageEngine
from .language_side import LanguageSide
from .pair_book import PairBook, make_book
from .pairs import warm_pair
from .shell import readiness
from .startup import check_peers
from .stats import Stats
from .transport import PairTransport, device_lock

log = logging.getLogger(__name__)

_KEY = "disagg/v1"


def init(cfg: DisaggConfig | None = None, *, rank: int | None = None,
         world_size: int | None = None, init_method: str | None = None,
         timeout: datetime.timedelta | None = None) -> Context:
    """Join (or reuse) the torch.distributed world and build this rank's side.

    Inside torchrun: `init(cfg)`. Elsewhere pass rank, world_size and
    init_method ("tcp://host:port" or "file://..."). If the default process
    group is already initialised it is reused and left alone at shutdown.
    """
    cfg = cfg or DisaggConfig()
    owns_world = not dist.is_initialized()
    if owns_world and init_method is None and "RANK" not in os.environ:
        raise DisaggError("disagg.init: no torch.distributed world to join: run under "
                          "torchrun (e.g. `torchrun --standalone --nproc-per-node 2 ...`), "
                          "or pass rank=, world_size= and init_method= (\"tcp://host:port\")")
    backend, why = backend_choice(cfg)
    log.info("disagg backend: %s (%s)", backend, why)
    if owns_world:
        dist.init_process_group(world_backend(backend),
                                init_method=init_method or "env://",
                                rank=-1 if rank is None else rank,
                                world_size=-1 if world_size is None else world_size,
                                timeout=timeout)
    elif (rank is not None and rank != dist.get_rank()) or (
            world_size is not None and world_size != dist.get_world_size()):
        raise ValueError(f"init(rank={rank}, world_size={world_size}) disagrees with the "
                         f"initialised world (rank {dist.get_rank()} of "
                         f"{dist.get_world_size()})")
    try:
        return Context(cfg, backend, owns_world)
    except BaseException:
        if owns_world and dist.is_initialized():
            dist.destroy_process_group()
        raise


def _routable_host(hostnames: list[str]) -> str:
    if len(set(hostnames)) == 1:
        return "127.0.0.1"
    for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        ip = str(info[4][0])
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    raise DisaggError("the world spans several hosts but no routable address was found for "
                      "this one; set DisaggConfig.host")


class Context:
    """One rank's handle: `role`, `instance`, `embedding` or `language`, `stats()`,
    `shutdown()`. Build it with `disagg.init`."""

    def __init__(self, cfg: DisaggConfig, backend: str, owns_world: bool) -> None:
        self.cfg = cfg
        self.backend = backend
        self._owns_world = owns_world
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.topology = Topology(self.world_size, cfg.num_embedding_ranks, cfg.language_tp_size)
        if backend == "nccl":
            check_nccl_topology(self.topology)
        self.role = self.topology.role(self.rank)
        self.instance = self.topology.instance_of(self.rank)
        index, _ = local_rank()
        self.device = (torch.device("cuda", cuda_index(index, torch.cuda.device_count()))
                       if backend == "nccl" else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.geometry = Geometry.from_config(cfg)
        self._closed = False
        self._closers: list[Callable[[], None]] = []
        self._groups: list[dist.ProcessGroup] = []
        self._book: PairBook | None = None
        self._zctx = zmq.Context()
        self._control: ControlChannel | None = None
        self._embedding: EmbeddingEngine | None = None  # the side this rank has
        self._language: LanguageSide | None = None
        self.control_address: str | None = None
        try:
            self._start()
        except BaseException:
            if not self._closed:
                if self._book is not None:
                    self._book.close_all()
                self._zctx.destroy(linger=0)
            raise

    def _start(self) -> None:
        store = dist.distributed_c10d._get_default_store()
        topo = self.topology
        # Contexts made one after another in one world each have their own keys:
        # every rank counts its own contexts, and every rank makes the same ones.
        generation = store.add(f"{_KEY}/contexts/{self.rank}", 1)
        key = f"{_KEY}/{generation}"
        store.set(f"{key}/host/{self.rank}", socket.gethostname())
        hostnames = [_get(store, f"{key}/host/{r}") for r in range(self.world_size)]
        is_embedding = self.role == "embedding"
        stats = Stats(pool_total_blocks=self.geometry.num_blocks,
                      pool_free_blocks=self.geometry.num_blocks, rooms_live=0)
        self._stats = stats
        control = self._control = ControlChannel(self._zctx, name=f"disagg-control-{self.rank}")
        if is_embedding:
            self.control_address = control.bind_router(self.cfg.host or _routable_host(hostnames),
                                                       topo.language_ranks)
        gpu = (str(torch.cuda.get_device_properties(self.device).uuid)
               if self.device.type == "cuda" else None)
        store.set(f"{key}/rank/{self.rank}", json.dumps(
            {"geometry": self.geometry.to_dict(), "address": self.control_address,
             "backend": self.backend, "fanout": self.cfg.fanout, "gpu": gpu,
             "max_pairs": self.cfg.max_pairs}))
        peers = {r: json.loads(_get(store, f"{key}/rank/{r}")) for r in range(self.world_size)}
        check_peers(self.rank, self.backend, self.geometry, topo, peers, hostnames)
        # Pair groups are made when a room first needs them (links.py), on the
        # world's store; only the instance groups are made here, in the same
        # order on every rank. A pair's transport timeout outlasts every room
        # deadline (bootstrap_timeout, answered by a frame within peer_timeout)
        # with peer_timeout to spare: a late room ends itself and never the pair.
        timeout = datetime.timedelta(seconds=self.cfg.bootstrap_timeout
                                     + 2 * self.cfg.peer_timeout)
        book = self._book = self._pair_book(store, f"{key}/pair", timeout.total_seconds(),
                                            stats)
        instance_group = gather_group = None
        for i in range(topo.num_instances):
            g = new_group(topo.instance_ranks(i), backend="gloo",
                          timeout=datetime.timedelta(seconds=self.cfg.step_timeout),
                          device=self.device)
            if self.instance == i:
                instance_group = gather_group = g
                self._groups.append(g)
        if self.backend == "nccl" and topo.language_tp_size > 1:
            # fanout="scatter" all-gathers on the device (NVLink). Made for every
            # instance, whatever its fanout, so every rank makes the same groups.
            # NCCL creates a communicator only at a group's first collective, which
            # must not be a step()'s, under the device lock: each instance makes
            # its own here (`warm_up`), all its ranks together.
            for i in range(topo.num_instances):
                g = new_group(topo.instance_ranks(i), backend="nccl",
                              timeout=datetime.timedelta(seconds=self.cfg.step_timeout),
                              device=self.device)
                if self.instance == i:
                    gather_group = g
                    self._groups.append(g)
            if gather_group is not None:
                warm_up(gather_group, self.device, self.cfg.step_timeout)
        others = list(topo.language_ranks if is_embedding else topo.embedding_ranks)
        transports: dict[int, PairTransport] = {p: book.link(p) for p in others}
        if is_embedding:
            peer_blocks = {r: int(peers[r]["geometry"]["num_blocks"]) for r in topo.language_ranks}
            engine = EmbeddingEngine(self.cfg, self.rank, topo, self.geometry, peer_blocks,
                                     transports, self.device, stats, control)
            engine.attach(book)
            control.start(engine, self.device)
            self._embedding = engine
        else:
            control.connect_dealers(self.rank,
                                    {e: peers[e]["address"] for e in topo.embedding_ranks})
            lang_engine = LanguageEngine(self.cfg, self.rank, topo, self.geometry, transports,
                                         self.device, stats, control)
            lang_engine.attach(book)
            control.start(lang_engine, self.device)
            self._language = LanguageSide(lang_engine, instance_group, gather_group)
        caps = {r: int(peers[r].get("max_pairs", self.cfg.max_pairs)) for r in peers}
        warm = [p for p in others
                if warm_pair(len(topo.embedding_ranks), len(topo.language_ranks),
                             *(caps[r] for r in self._pair_ends(p)))]
        missed = book.warm_in_order(warm, timeout.total_seconds())
        if missed is not None:
            self.shutdown(0.0)  # the engines' threads run already
            why = book.warm_failed.get(missed)
            raise DisaggError(f"start-up: the pair with rank {missed} was not made"
                              + (f": {why}" if why else
                                 f" in {timeout.total_seconds():.0f}s; did every rank call "
                                 f"disagg.init?"), rank=self.rank)

    def _pair_ends(self, peer: int) -> tuple[int, int]:
        """The pair with `peer`'s (Embedding, Language) ranks."""
        return (self.rank, peer) if self.role == "embedding" else (peer, self.rank)

    def _pair_base(self, peer: int) -> str:
        """The store keys of the pair with `peer`, under the book's base."""
        e, lang = self._pair_ends(peer)
        return f"/{e}/{lang}"

    def _pair_book(self, store: dist.Store, base: str, timeout_s: float,
                   stats: Stats) -> PairBook:
        """This rank's pairs, made on demand on `store` under `base` (links.py)."""
        return make_book(store, lambda peer: f"{base}{self._pair_base(peer)}",
                         embedding=self.role == "embedding", device=self.device,
                         timeout_s=timeout_s, cfg=self.cfg, stats=stats)

    @property
    def embedding(self) -> EmbeddingEngine:
        """This Embedding rank's engine (`sender(room)`); a `DisaggError` on a
        Language rank."""
        if self._embedding is None:
            raise DisaggError(f"rank {self.rank} is a language rank: ctx.embedding exists "
                              f"only on ranks [0, {self.topology.num_embedding_ranks})")
        return self._embedding

    @property
    def language(self) -> LanguageSide:
        """This Language rank's side (`receiver`, `queue`); a `DisaggError` on an
        Embedding rank."""
        if self._language is None:
            raise DisaggError(f"rank {self.rank} is an embedding rank: ctx.language exists "
                              f"only on ranks [{self.topology.num_embedding_ranks}, "
                              f"{self.world_size})")
        return self._language

    def stats(self) -> dict[str, object]:
        return self._stats.snapshot()

    def _engine(self) -> EmbeddingEngine | LanguageEngine | None:
        """This rank's engine, whichever side it is."""
        return self._embedding or (self._language.engine if self._language else None)

    def peers(self) -> dict[int, str]:
        """The Embedding ranks usable now, rank -> name: in world mode the fixed
        Embedding ranks whose pair is not lost (on an Embedding rank: the
        Language ranks it serves)."""
        eng = self._engine()
        if eng is None or self._closed:
            return {}
        lost = eng.lost_peers()
        return {p: f"rank {p}" for p in eng.liveness.peers if p not in lost}

    def readiness(self) -> dict[str, object]:
        """One summary for a readiness probe (`disagg.metrics` serves it at
        /health): `ready` (bool) and `reason`; `peers_alive`, `peers_down`
        (rank -> why); on Language ranks `instance`, the TP instance's agreement
        ("ok", or "lost: why", after which its queue failed every room and the
        instance must be restarted). Ready: not shut down, a peer alive, and the
        instance's agreement not lost."""
        eng = self._engine()
        assert eng is not None
        return readiness(self.role, eng.health(), self._closed,
                         getattr(eng, "instance_lost", None))

    def health(self) -> dict[int, dict[str, object]]:
        """Per peer rank: `alive`, `last_heard_s`, `rooms_live`, `pair` ("ok" or
        "lost: why"); a serving loop's readiness probe reads it. On a Language
        rank after shutdown, a peer whose receiver thread is still blocked in a
        recv (a frozen peer) also has `receiver`."""
        eng = self._engine()
        assert eng is not None
        return eng.health()

    def on_shutdown(self, fn: Callable[[], None]) -> None:
        """Run `fn` first thing in `shutdown()` (e.g. stop a metrics exporter)."""
        self._closers.append(fn)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """End every live room FAILED("shutdown"), stop threads, close sockets and
        destroy the process groups this context created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        bound = self.cfg.peer_timeout if timeout_s is None else timeout_s
        for fn in self._closers:
            try:
                fn()
            except Exception:
                log.exception("a shutdown hook raised")
        eng = self._engine()
        try:
            if eng is not None:
                eng.close(bound)
        finally:
            # A pair whose thread still waits (a frozen peer) has an op pending:
            # abort it first, so destroying its group (under the device lock)
            # never waits for that op's kernels.
            if self._book is not None:
                for peer in eng.stuck_peers() if eng is not None else []:
                    self._book.lose(peer, abort=True)
                self._book.close_all()
            if self._control is not None:
                self._control.close()
            self._zctx.term()
            for g in self._groups:
                try:
                    destroy_group(g, self.device)
                except Exception as e:  # a group broken by a dead peer
                    log.debug("destroying an instance group: %s", e)
            self._groups.clear()
            if self._language is not None:
                self._language.release_group()
            if self._owns_world and dist.is_initialized():
                with device_lock(self.device):
                    dist.destroy_process_group()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _get(store: dist.Store, key: str) -> str:
    t0 = time.monotonic()
    try:
        return store.get(key).decode()
    except RuntimeError as e:
        raise DisaggError(f"start-up: {key} not published after {time.monotonic() - t0:.0f}s; "
                          f"did every rank call disagg.init? ({e})") from e
