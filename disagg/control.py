"""ZeroMQ control channel: small binary messages between Language and Embedding ranks.

Embedding ranks bind one ROUTER; Language ranks connect one DEALER per
Embedding rank, with identity b"L<rank>" so the ROUTER side can check a
message's claimed sender. ZeroMQ sockets are not thread-safe, so each is used
under one discipline:

- the ROUTER belongs to the control thread; other threads hand it messages
  through a bounded outbox and wake it with a socketpair;
- the DEALERs are shared under a lock, so a Language rank's ALLOC or RESUME
  leaves from the thread that made it, without waiting for the control thread
  to wake (that hop was a fifth of a small room's latency). The control thread
  polls their file descriptors, never the sockets, and reads them under the
  lock.

Authentication and decoding happen here: the handler receives
`(peer_rank, decoded message)` for every well-formed message whose sender is who
it claims to be, and `on_bad_message` (with whatever could be learnt: the peer,
the room the header names) for everything else. Engines never see identities or
bytes. The thread survives anything the handler raises.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import zmq

from . import transport
from .errors import DisaggError, ProtocolError
from .wire import (
    HEADER_SIZE,
    ITEM_ENTRY_BYTES,
    MAX_BLOCKS_PER_MESSAGE,
    MAX_ITEMS_PER_MESSAGE,
    Abort,
    Alloc,
    ControlMessage,
    Heartbeat,
    PairDown,
    Reject,
    Resume,
    decode,
    encode,
    peek_room,
)

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
CLOSE_LINGER_MS = 200
MAX_OUTBOX = 1 << 16
# the largest message: an ALLOC with every block id and a full item table
MAX_MESSAGE_BYTES = (HEADER_SIZE + 4 * MAX_BLOCKS_PER_MESSAGE + 4
                     + ITEM_ENTRY_BYTES * MAX_ITEMS_PER_MESSAGE)


def identity_of(lang_rank: int) -> bytes:
    return b"L%d" % lang_rank


def rank_of_identity(identity: bytes) -> int | None:
    """The rank behind b"L<rank>", only in its canonical spelling: an alias such
    as b"L01" would let a second connection speak for rank 1."""
    if identity[:1] != b"L" or not identity[1:].isdigit() or len(identity) > 12:
        return None
    rank = int(identity[1:])
    return rank if identity_of(rank) == identity else None


class ControlHandler(Protocol):
    """What an engine offers the control channel (called on the control thread)."""

    def on_message(self, peer: int, msg: ControlMessage) -> None: ...

    def on_bad_message(self, peer: int | None, room: int | None, why: str) -> None:
        """A message that could not be accepted: `peer` None when the sender is not
        a known rank, `room` when the header names one."""

    def on_tick(self) -> None: ...


class ControlPort(Protocol):
    """What an engine needs to send: one decoded message to one peer rank."""

    def post(self, peer: int, msg: ControlMessage) -> None: ...


def _configure(s: zmq.Socket) -> None:
    """Every socket of the channel: no linger at close, and a bound on what a
    peer may send in one message."""
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)


class ControlChannel:
    """Owns the sockets and the thread. Set up with `bind_router` or
    `connect_dealers`, then `start` with the handlers."""

    def __init__(self, zctx: zmq.Context, name: str = "disagg-control") -> None:
        self._zctx = zctx
        self._handler: ControlHandler | None = None
        self._name = name
        self._router: zmq.Socket | None = None
        self._peers: frozenset[int] = frozenset()  # ROUTER side: who may speak to us
        # ROUTER side, jobs mode: asked about a rank not yet allowed whose message
        # came first (it met this rank in the store before this rank met it);
        # True once it is allowed (`allow`)
        self.admit: Callable[[int], bool] | None = None
        self._dealers: dict[int, zmq.Socket] = {}
        self._dealer_lock = threading.Lock()
        self._closed = False
        self._outbox: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind_router(self, host: str, peers: Iterable[int]) -> str:
        """Embedding side: accept messages from the Language ranks `peers`."""
        s = self._zctx.socket(zmq.ROUTER)
        _configure(s)
        port = s.bind_to_random_port(f"tcp://{host}")
        self._router = s
        self._peers = frozenset(peers)
        return f"tcp://{host}:{port}"

    def connect_dealers(self, my_rank: int, addresses: dict[int, str]) -> None:
        for peer, addr in addresses.items():
            self.add_dealer(my_rank, peer, addr)

    def add_dealer(self, my_rank: int, peer: int, address: str) -> None:
        """Language side, any thread: connect to an Embedding rank that joined
        (jobs mode), or at start-up. The control thread polls it from its next pass."""
        s = self._zctx.socket(zmq.DEALER)
        _configure(s)
        s.setsockopt(zmq.IDENTITY, identity_of(my_rank))
        s.connect(address)
        with self._dealer_lock:
            if self._closed:
                s.close(linger=0)
                return
            self._dealers[peer] = s
        self._wake()

    def disallow(self, peer: int) -> None:
        """Embedding side: a Language rank that left; its messages are dropped."""
        self._peers = self._peers - {peer}

    def allow(self, peer: int) -> None:
        """Embedding side, any thread: accept messages from a Language rank that
        joined (jobs mode). A new set each time: the control thread reads it unlocked."""
        self._peers = self._peers | {peer}

    def start(self, handler: ControlHandler, device: torch.device | None = None) -> None:
        """Run the thread: `handler.on_message` for every inbound message,
        `handler.on_tick` at least every poll interval. The handler posts frames
        from it, so it runs on the rank's `device` (`transport.bind_device`)."""
        self._handler = handler
        self._thread = threading.Thread(target=self._run, args=(device,), name=self._name,
                                        daemon=True)
        self._thread.start()

    def post(self, peer: int, msg: ControlMessage | bytes) -> None:
        """Send `msg` to rank `peer`: queued for the control thread (ROUTER side) or
        sent now on the peer's DEALER (Language side). Bytes go as they are (tools
        and tests that put crafted messages on the genuine socket)."""
        payload = msg if isinstance(msg, bytes) else encode(msg)
        if self._router is None:
            self._send_dealer(peer, payload)
            return
        with self._lock:
            if len(self._outbox) >= MAX_OUTBOX:
                raise DisaggError(f"control outbox full ({MAX_OUTBOX} messages)")
            self._outbox.append((identity_of(peer), payload))
        self._wake()

    def _send_dealer(self, dest: int, payload: bytes) -> None:
        with self._dealer_lock:
            if self._closed:
                return  # shut down: the peer learns from the heartbeats' end
            s = self._dealers.get(dest)
            if s is None:
                log.warning("control message to unknown embedding rank %r dropped", dest)
                return
            try:
                s.send(payload, zmq.NOBLOCK)
            except zmq.ZMQError as e:  # Again: the peer's queue is full
                # never dropped silently: the caller fails what depended on it
                raise DisaggError(f"control message to embedding rank {dest} not sent: {e}",
                                  peer=dest) from e
            # A socket operation may consume the edge its descriptor signals inbound
            # messages with: if one is waiting, make sure the control thread looks.
            inbound = int(s.getsockopt(zmq.EVENTS)) & zmq.POLLIN
        if inbound:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a wake-up is already pending
            self._wake_w.send(b"\0")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (flushing queued messages first) and close every socket."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("%s thread did not stop within %.1fs", self._name, timeout_s)
        with self._dealer_lock:
            self._closed = True
            for s in [self._router, *self._dealers.values()]:
                if s is not None:
                    s.close(linger=CLOSE_LINGER_MS)  # bounded: the last messages (BYE) may leave
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- thread

    def _run(self, device: torch.device | None) -> None:
        transport.bind_device(device)
        poller = zmq.Poller()
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        polled: set[int] = set()  # dealers whose descriptor the poller watches
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            if len(polled) < len(self._dealers):  # new ones (jobs mode: a peer joined)
                with self._dealer_lock:
                    fresh = [(p, d) for p, d in self._dealers.items() if p not in polled]
                    for peer, dealer in fresh:
                        poller.register(dealer.getsockopt(zmq.FD), zmq.POLLIN)
                        polled.add(peer)
            events = dict(poller.poll(int(POLL_INTERVAL_S * 1000)))
            if self._wake_r.fileno() in events:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            self._flush()
            if self._router is not None and self._router in events:
                self._drain_router(self._router)
            # Every pass, not only on their descriptors' edges: another thread's
            # send may have taken the edge (it then wakes us, but this is cheap).
            self._drain_dealers()
            if self._handler is not None:
                self._guard(self._handler.on_tick)
            if self._stop.is_set():
                self._flush()
                return

    def _drain_router(self, s: zmq.Socket) -> None:
        for _ in range(1024):  # bounded, so a flood cannot starve the outbox
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:  # [identity, payload]
                self._inbound_router(frames[0] if frames else b"", b"")
                continue
            self._inbound_router(frames[0], frames[1])

    def _drain_dealers(self) -> None:
        with self._dealer_lock:
            dealers = list(self._dealers.items())
        for peer, s in dealers:
            inbox = []
            with self._dealer_lock:
                if self._closed:
                    return
                for _ in range(1024):
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    inbox.append(frames[0] if len(frames) == 1 else b"")
            for payload in inbox:  # outside the lock: handlers may send
                self._inbound_dealer(peer, payload)

    def _flush(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                dest, payload = self._outbox.popleft()
            try:
                assert self._router is not None and isinstance(dest, bytes)
                self._router.send_multipart([dest, payload], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("control message to %r dropped: %s", dest, e)

    def _inbound_router(self, identity: bytes, payload: bytes) -> None:
        """A message to an Embedding rank: from a known Language rank, speaking for
        itself, in a Language->Embedding kind."""
        claimed = rank_of_identity(identity)
        if claimed is not None and claimed not in self._peers and self.admit is not None:
            self.admit(claimed)
        if claimed is None or claimed not in self._peers:
            self._bad(None, None, f"message from unknown peer identity {identity[:32]!r}")
            return
        msg = self._decode(claimed, payload)
        if msg is None:
            return
        if isinstance(msg, Reject):
            self._bad(claimed, msg.room, "REJECT is not a Language->Embedding message")
        elif isinstance(msg, (Heartbeat, PairDown)) and msg.rank != claimed:
            self._bad(claimed, None, f"message claims language rank {msg.rank} but comes "
                                     f"from {claimed}")
        elif isinstance(msg, (Alloc, Resume, Abort)) and msg.lang_rank != claimed:
            self._bad(claimed, msg.room, f"message claims language rank {msg.lang_rank} but "
                                         f"comes from {claimed}")
        else:
            self._deliver(claimed, msg)

    def _inbound_dealer(self, src: int, payload: bytes) -> None:
        """A message to a Language rank from Embedding rank `src`: REJECT, HEARTBEAT
        or PAIR_DOWN (an idle close: `wire.PairClose`)."""
        msg = self._decode(src, payload)
        if msg is None:
            return
        if isinstance(msg, Reject) or (isinstance(msg, (Heartbeat, PairDown))
                                       and msg.rank == src):
            self._deliver(src, msg)
        else:
            self._bad(src, None, f"unexpected {type(msg).__name__} from embedding rank {src}")

    def _decode(self, peer: int, payload: bytes) -> ControlMessage | None:
        try:
            return decode(payload)
        except ProtocolError as e:
            self._bad(peer, peek_room(payload), f"malformed control message: {e}")
            return None

    def _deliver(self, peer: int, msg: ControlMessage) -> None:
        if self._handler is not None:
            self._guard(self._handler.on_message, peer, msg)

    def _bad(self, peer: int | None, room: int | None, why: str) -> None:
        if self._handler is not None:
            self._guard(self._handler.on_bad_message, peer, room, why)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # the control thread must outlive any single bad message
            log.exception("%s: handler raised", self._name)
