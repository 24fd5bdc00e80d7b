"""One (Embedding, Language) pair's group, formed, in either deployment. Both
ends say hello in the store (so both constructors meet within milliseconds),
then each calls the backend's own constructor on the pair's prefix of the
store, with fixed ranks: Embedding 0, Language 1. Each making of a pair is a
generation with keys of its own (`links.py`).

The Language end leads: it takes a slot under its cap, says hello and waits
for the Embedding end. The Embedding end follows: it takes a slot only for a
Language end whose hello stands (`PairMaker.waiting`), so it never holds one
waiting. Were both to wait holding slots, ranks at their caps could wait on
each other in a ring (E0 for L3, L3 for E1, E1 for L2, L2 for E0) for ever."""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from .store import own_client
from .transport import TorchPairTransport, device_lock

HELLO_POLL_S = (0.002, 0.05)  # a forming pair looks for its peer's hello this often (first, at most)


def hello(store: dist.Store, base: str, mine: str, theirs: str, wanted: Callable[[], bool],
          stop: threading.Event, *, follow: bool = False) -> bool:
    """Say this rank is ready to construct the pair, and wait for the peer to
    say so, for as long as it is a member and this rank runs; `follow` (the
    Embedding end): the peer said so first, and a hello withdrawn meanwhile
    is not waited for. A hello stands only while its rank waits for this very
    pair in a thread of its own, so both constructors meet: there is no stale
    hello, and no two pairs wait on each other."""
    store.set(f"{base}/hello/{mine}", "1")
    delay = HELLO_POLL_S[0]
    while not stop.is_set():
        if not wanted():
            break
        try:  # check, not wait: a store wait that times out logs a warning each time
            if store.check([f"{base}/hello/{theirs}"]):
                return True
            if follow:
                break  # the leader gave up: look for it again without a slot
        except (RuntimeError, dist.DistError):
            pass  # the store is away: look again
        stop.wait(delay)
        delay = min(delay * 2, HELLO_POLL_S[1])
    with contextlib.suppress(RuntimeError, dist.DistError):
        store.delete_key(f"{base}/hello/{mine}")
    return False


def pair_group(store: dist.Store, base: str, embedding: bool, device: torch.device,
               timeout_s: float, max_ctas: int = 0) -> dist.ProcessGroup:
    """The pair's two-rank group on `base`'s prefix of the store (this end's
    rank: 0 on the Embedding side); returns once both ends constructed it.

    On NCCL the communicator is made here, eagerly, in the calling thread (a
    pair's own, holding no lock): made lazily it would form at the pair's
    first op, which is posted under the device lock, and every other pair of
    the device would wait for the peer meanwhile. `max_ctas` > 0 makes a thin
    communicator (at most that many CTAs, i.e. channels): a point-to-point pair
    needs few, and each costs memory on the device."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefix = dist.PrefixStore(f"{base}/pg", store)
    rank = 0 if embedding else 1
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        config = getattr(opts, "config", None)
        if max_ctas and config is not None:
            config.min_ctas, config.max_ctas = 1, max_ctas
        pg = dist.ProcessGroupNCCL(prefix, rank, 2, opts)
        eager = getattr(pg, "eager_connect_single_device", None)
        if eager is not None:
            eager(device)
        return pg  # type: ignore[return-value]
    return dist.ProcessGroupGloo(prefix, rank, 2, timeout)  # type: ignore[return-value]


def destroy_pair(t: TorchPairTransport) -> None:
    """End a group made by `pair_group` (a pair closed when idle, or at
    shutdown): nothing is pending on it, or it was aborted first."""
    shutdown = getattr(t.group, "shutdown", None)
    if shutdown is None:
        return  # it goes with its last reference
    if t.device.type == "cuda":
        with device_lock(t.device):
            shutdown()
    else:
        shutdown()


# NCCL: at most this many CTAs (channels) per pair communicator, a thin one for a
# point-to-point pair (unset or 0: NCCL's default). Read by disagg, never set.
MAX_CTAS_ENV = "DISAGG_PAIR_NCCL_MAX_CTAS"


def max_ctas_from_env(env: Mapping[str, str] = os.environ) -> int:
    """`DISAGG_PAIR_NCCL_MAX_CTAS`: a `ValueError` naming it if it is not an int >= 0."""
    raw = env.get(MAX_CTAS_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{MAX_CTAS_ENV}={raw!r}: must be an int >= 0 (0: NCCL's default)")
    return n


KEEP_CLIENTS = 4  # store clients a rank keeps for forming pairs


class PairMaker:
    """Makes this rank's pair groups on `store` (world mode: the world's store;
    jobs mode: the rendezvous store). `base(peer)` names a pair's keys; each
    generation has its own under it. Called by `links.PairLink.ensure`, in the
    pair's own thread."""

    def __init__(self, store: dist.Store, base: Callable[[int], str], *, embedding: bool,
                 device: torch.device, timeout_s: float, max_ctas: int = 0) -> None:
        self.store, self.base = store, base
        self.embedding, self.device = embedding, device
        self.timeout_s, self.max_ctas = timeout_s, max_ctas
        self._never = threading.Event()  # `wanted` says when to stop
        self._lock = threading.Lock()
        self._idle: list[dist.Store] = []  # store clients kept for the next pairs (`_take`)
        self._looker: dist.Store | None = None  # `waiting`'s own client, one check at a time
        self._look_lock = threading.Lock()
        self._give(self._take())  # the first client, now rather than at a first room

    def __call__(self, peer: int, gen: int, wanted: Callable[[], bool]) -> TorchPairTransport | None:
        base = f"{self.base(peer)}/{gen}"
        mine, theirs = ("e", "l") if self.embedding else ("l", "e")
        store = self._take()
        try:
            return self._make(store, peer, base, mine, theirs, wanted)
        finally:
            self._give(store)

    def waiting(self, peer: int, gen: int) -> bool:
        """Embedding end: whether Language rank `peer` waits for generation
        `gen` of the pair now (its hello stands), so that a slot taken for it
        is not held waiting (see the module's docstring). Every waiting pair
        looks on one client of its own: a check never waits for a key, and
        the pairs' clients (`_take`) are not churned by many pairs looking."""
        with self._look_lock:
            try:
                if self._looker is None:
                    self._looker = own_client(self.store)
                return bool(self._looker.check([f"{self.base(peer)}/{gen}/hello/l"]))
            except (RuntimeError, dist.DistError):
                return False  # the store is away: look again

    def _take(self) -> dist.Store:
        """A store client of this forming pair's own. A client runs one op at a
        time, and the constructor's rendezvous waits in it for the peer's key.
        On a shared client that wait would chain with any other blocking call
        there (another pair's constructor, or the application's own
        `store.wait` on the world's store), and a peer held up the same way
        could be the one it waits for: a cycle. Clients are kept for reuse, and
        one is made at start-up (making one connects, and on some hosts
        resolves an address by DNS: seconds where that times out)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return own_client(self.store)

    def _give(self, store: dist.Store) -> None:
        with self._lock:
            if store is not self.store and len(self._idle) < KEEP_CLIENTS:
                self._idle.append(store)

    def close(self) -> None:
        """Let go of the kept clients (their sockets close with them)."""
        with self._lock:
            self._idle.clear()
        with self._look_lock:
            self._looker = None

    def _make(self, store: dist.Store, peer: int, base: str, mine: str, theirs: str,
              wanted: Callable[[], bool]) -> TorchPairTransport | None:
        if not hello(store, base, mine, theirs, wanted, self._never, follow=self.embedding):
            return None
        pg = pair_group(store, base, self.embedding, self.device, self.timeout_s,
                        self.max_ctas)
        t = TorchPairTransport(pg, peer, self.device, self.timeout_s,
                               group_peer=1 if self.embedding else 0)
        t.connect(sending=self.embedding)
        # both ends read the other's hello and rendezvous keys before the connect
        # frame could pass: they are done with
        with contextlib.suppress(RuntimeError, dist.DistError):
            store.delete_key(f"{base}/hello/{mine}")
            if self.device.type != "cuda":
                store.delete_key(f"{base}/pg/0/{1 if self.embedding else 0}")
        return t
