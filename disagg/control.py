"""ZeroMQ control channel: small binary messages between Language and Embedding ranks.

Embedding ranks bind one ROUTER; Language ranks connect one DEALER per
Embedding rank, with identity b"L<rank>" so the ROUTER side can check a
message's claimed sender. One thread owns every socket (ZeroMQ sockets are not
thread-safe); other threads hand it messages through a bounded outbox and wake
it with a socketpair. Inbound messages go to a handler callback; the thread
survives anything the handler raises.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

import zmq

from .errors import DisaggError

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
CLOSE_LINGER_MS = 200
MAX_OUTBOX = 1 << 16
MAX_MESSAGE_BYTES = 64 + 4 * (1 << 20)


def identity_of(lang_rank: int) -> bytes:
    return b"L%d" % lang_rank


def rank_of_identity(identity: bytes) -> int | None:
    """The rank behind b"L<rank>", only in its canonical spelling: an alias such
    as b"L01" would let a second connection speak for rank 1."""
    if identity[:1] != b"L" or not identity[1:].isdigit() or len(identity) > 12:
        return None
    rank = int(identity[1:])
    return rank if identity_of(rank) == identity else None


class RateLimitedLog:
    """At most `per_interval` warnings per key every `interval_s`; counts the rest."""

    def __init__(self, logger: logging.Logger, per_interval: int = 5,
                 interval_s: float = 10.0) -> None:
        self._log = logger
        self._per = per_interval
        self._interval = interval_s
        self._window: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            start, n = self._window.get(key, (now, 0))
            if now - start > self._interval:
                if n > self._per:
                    self._log.warning("%s: %d more suppressed", key, n - self._per)
                start, n = now, 0
            self._window[key] = (start, n + 1)
            if len(self._window) > 1024:
                self._window.clear()
        if n < self._per:
            self._log.warning(msg, *args)


# handler(peer, payload): peer is the ROUTER identity (bytes) or the Embedding rank (int).
Handler = Callable[[bytes | int, bytes], None]


class ControlChannel:
    """Owns the sockets and the thread. Set up with `bind_router` or
    `connect_dealers`, then `start` with the handlers."""

    def __init__(self, zctx: zmq.Context, name: str = "disagg-control") -> None:
        self._zctx = zctx
        self._handler: Handler = lambda peer, payload: None
        self._on_tick: Callable[[], None] | None = None
        self._name = name
        self._router: zmq.Socket | None = None
        self._dealers: dict[int, zmq.Socket] = {}
        self._outbox: collections.deque[tuple[bytes | int, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _configure(self, s: zmq.Socket) -> None:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)

    def bind_router(self, host: str) -> str:
        s = self._zctx.socket(zmq.ROUTER)
        self._configure(s)
        port = s.bind_to_random_port(f"tcp://{host}")
        self._router = s
        return f"tcp://{host}:{port}"

    def connect_dealers(self, my_rank: int, addresses: dict[int, str]) -> None:
        for peer, addr in addresses.items():
            s = self._zctx.socket(zmq.DEALER)
            self._configure(s)
            s.setsockopt(zmq.IDENTITY, identity_of(my_rank))
            s.connect(addr)
            self._dealers[peer] = s

    def start(self, handler: Handler, on_tick: Callable[[], None] | None = None) -> None:
        """Run the thread: `handler` for every inbound message, `on_tick` at least
        every poll interval."""
        self._handler = handler
        self._on_tick = on_tick
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def post(self, dest: bytes | int, payload: bytes) -> None:
        """Queue a message for `dest` (ROUTER: identity; DEALER: Embedding rank)."""
        with self._lock:
            if len(self._outbox) >= MAX_OUTBOX:
                raise DisaggError(f"control outbox full ({MAX_OUTBOX} messages)")
            self._outbox.append((dest, payload))
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            self._wake_w.send(b"\0")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (flushing queued messages first) and close every socket."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("%s thread did not stop within %.1fs", self._name, timeout_s)
        for s in [self._router, *self._dealers.values()]:
            if s is not None:
                s.close(linger=CLOSE_LINGER_MS)  # bounded: the last messages (BYE) may leave
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        poller = zmq.Poller()
        sockets: dict[zmq.Socket, int | None] = {}
        if self._router is not None:
            sockets[self._router] = None
        for e_rank, dealer in self._dealers.items():
            sockets[dealer] = e_rank
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll(int(POLL_INTERVAL_S * 1000)))
            if self._wake_r.fileno() in events:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            self._flush()
            for sock, peer in sockets.items():
                if sock in events:
                    self._drain(sock, peer)
            if self._on_tick is not None:
                self._guard(self._on_tick)
            if self._stop.is_set():
                self._flush()
                return

    def _drain(self, s: zmq.Socket, peer: int | None) -> None:
        for _ in range(1024):  # bounded, so a flood cannot starve the outbox
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if peer is None:  # ROUTER: [identity, payload]
                if len(frames) != 2:
                    self._guard(self._handler, frames[0] if frames else b"", b"")
                    continue
                self._guard(self._handler, frames[0], frames[1])
            else:
                self._guard(self._handler, peer, frames[0] if len(frames) == 1 else b"")

    def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                dest, payload = self._outbox.popleft()
            try:
                if isinstance(dest, bytes):
                    assert self._router is not None
                    self._router.send_multipart([dest, payload], zmq.NOBLOCK)
                else:
                    self._dealers[dest].send(payload, zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError, KeyError) as e:
                log.warning("control message to %r dropped: %s", dest, e)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # the control thread must outlive any single bad message
            log.exception("%s: handler raised", self._name)
