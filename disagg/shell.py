"""What both engines are made of besides their tables and machines: the
injected world (config, rank, topology, geometry, device, stats, control
channel, clock), one lock with its condition, liveness of the peers, and the
shutdown flag. Each side's `engine.py` adds its tables and its executor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

from .config import DisaggConfig
from .control import ControlPort
from .errors import DisaggError
from .geometry import Geometry
from .liveness import Liveness
from .logs import RateLimitedLog
from .pair_book import PairBook
from .progress import Progress
from .stats import Stats
from .topology import Topology
from .types import TERMINAL, TransferStatus
from .wire import ControlMessage


class _HasStatus(Protocol):
    status: TransferStatus


class EngineShell:
    def __init__(self, cfg: DisaggConfig, rank: int, topology: Topology, geometry: Geometry,
                 device: torch.device, stats: Stats, control: ControlPort | None,
                 clock: Callable[[], float], peers: Iterable[int],
                 logger: logging.Logger) -> None:
        self.cfg = cfg
        self.rank = rank
        self.topology = topology
        self.geometry = geometry
        self.device = device
        self.stats = stats
        self.control = control
        self.clock = clock
        self.liveness = Liveness(peers, cfg.peer_timeout, clock())
        self._lock = threading.RLock()
        # The shells (handles, streams) take the lock through it, and wait on it
        # for a room's change; every status change notifies it.
        self.cond = threading.Condition(self._lock)
        self._warn = RateLimitedLog(logger)
        self._closing = False
        self.progress = Progress(self.cond)  # the pause and the sweep (progress.py)
        self.links: PairBook | None = None  # pairs made on demand (`attach`)

    def attach(self, book: PairBook) -> None:
        """Pairs made on demand (links.py): this engine answers the book's
        questions, and watches only the peers it uses (liveness.py)."""
        self.links = book
        book.host = self  # type: ignore[assignment]
        self.liveness.lazy = True

    def pair_opened(self, peer: int) -> None:
        """The book formed the pair with `peer`: watched while it is open."""
        with self._lock:
            self.liveness.activate(peer, self.clock())

    def pair_closed(self, peer: int) -> None:
        with self._lock:
            self.liveness.deactivate(peer)

    def holds_lock(self) -> bool:
        """Whether the calling thread holds the engine lock (tests check that no
        transport call is made under it)."""
        return self._lock._is_owned()  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        return self._closing

    def poll(self, room: _HasStatus) -> TransferStatus:
        """A room's status for `poll()`: when not final yet, after the pause
        (`progress.Progress.pause`)."""
        if room.status not in TERMINAL:
            self.progress.pause()
        return room.status

    def _post(self, peer: int, msg: ControlMessage) -> str | None:
        """Send a control message, never raising: why it could not be sent (a
        full outbox or peer queue, no channel), or None. Logged, rate-limited."""
        if self.control is None:
            return "no control channel"
        try:
            self.control.post(peer, msg)
        except DisaggError as e:
            self._warn.warning("post", "rank %d: control message to rank %d not sent: %s",
                               self.rank, peer, e)
            return f"control message to rank {peer} not sent: {e}"
        return None

    def health_report(self, rooms_live: Mapping[int, int],
                      lost: Mapping[int, str]) -> dict[int, dict[str, object]]:
        """`ctx.health()`: per peer, alive, seconds since last heard, live rooms,
        and the pair's state ("ok", or "lost: why"). One meaning for `alive`,
        whatever ended a pair: the peer is believed up and usable, i.e. heard
        within peer_timeout (or not watched: its pair is not in use, made on
        demand, `links.py`), its pair not lost, and this rank not shut down."""
        now = self.clock()
        limit = self.liveness.peer_timeout
        return {p: {"alive": (not self._closing and p not in lost and p not in self.liveness.dead
                              and (self.liveness.silence(p, now) <= limit
                                   or not self.liveness.watched(p))),
                    "last_heard_s": round(self.liveness.silence(p, now), 3),
                    "rooms_live": rooms_live.get(p, 0),
                    "pair": "ok" if p not in lost else f"lost: {lost[p]}"}
                for p in self.liveness.peers}


def readiness(role: str, health: Mapping[int, Mapping[str, object]], closed: bool,
              instance_lost: str | None = None) -> dict[str, object]:
    """`ctx.readiness()`, from `health()` (pure): `ready` and its `reason`, the
    peers alive and lost, and on Language ranks the TP instance's agreement.
    Ready: not shut down, at least one peer alive, and (Language) the instance's
    agreement not lost."""
    alive = sorted(p for p, h in health.items() if h["alive"])
    down = {p: str(h["pair"]) for p, h in health.items() if not h["alive"]}
    out: dict[str, object] = {"peers_alive": alive, "peers_down": down}
    if role == "language":
        out["instance"] = "ok" if instance_lost is None else f"lost: {instance_lost}"
    if closed:
        why = "this rank shut down"
    elif role == "language" and instance_lost is not None:
        why = (f"the TP instance's agreement is lost ({instance_lost}): restart the "
               f"instance (in jobs mode, its job only)")
    elif not alive:
        other = "embedding" if role == "language" else "language"
        why = f"no {other} rank alive" + (f" ({len(down)} down)" if down else " (none known)")
    else:
        why = ""
    out.update(ready=not why, reason=why or f"{len(alive)} peer(s) alive")
    return out
