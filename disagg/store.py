"""Jobs mode's rendezvous store: connecting to it, hosting it, and what a
rank writes there first (its id and its member record). Every other store
call of jobs mode is the roster's (`jobs.py`), which lists the other role's
ids allocated so far with `candidate_ids`, and reads keys that may vanish
with `QuickReads`."""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from .errors import DisaggError
from .geometry import Geometry
from .roster import EMBEDDING_IDS, MAX_ID, Member, key, language_id


def connect_store(rendezvous: str, timeout_s: float) -> dist.TCPStore:
    """A client of the rendezvous store at "tcp://host:port"."""
    if not rendezvous.startswith("tcp://") or ":" not in rendezvous[6:]:
        raise ValueError(f"rendezvous={rendezvous!r}: expected 'tcp://host:port'")
    host, port = rendezvous[6:].rsplit(":", 1)
    try:
        return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise DisaggError(f"cannot reach the rendezvous store at {rendezvous}: {e}") from e


def host_store(port: int, host: str = "0.0.0.0", timeout_s: float = 30.0) -> dist.TCPStore:
    """Host the rendezvous store in this process (`python -m launch.rendezvous`
    does it for a deployment; any job may instead)."""
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True)


def new_member(store: dist.Store, *, role: str, name: str | None, member_id: int,
               geometry: Geometry, backend: str, fanout: str,
               address: str | None) -> Member:
    """This rank's record, with a fresh generation of its name."""
    name = name or f"{role}-{socket.gethostname()}-{os.getpid()}"
    generation = store.add(key("name", name), 1)
    return Member(member_id, role, name, generation, geometry.to_dict(), backend, fanout,
                  address, socket.gethostname(), os.getpid())


def embedding_id(store: dist.Store) -> int:
    i = store.add(key("emb", "next"), 1) - 1
    if i >= EMBEDDING_IDS:
        raise DisaggError(f"the rendezvous store has handed out all {EMBEDDING_IDS} "
                          f"embedding ids; start a fresh rendezvous")
    return i


def candidate_ids(store: dist.Store, embedding: bool, tp: int) -> list[int]:
    """Ids of the other role (of an Embedding rank's, when `embedding`)
    allocated so far (a member may not have written its record yet: then it is
    seen at a later rescan)."""
    if embedding:
        instances = store.add(key("inst", "next"), 0)
        return [language_id(k, i, tp) for k in range(instances) for i in range(tp)
                if language_id(k, i, tp) <= MAX_ID]
    return list(range(min(store.add(key("emb", "next"), 0), EMBEDDING_IDS)))


class QuickReads:
    """Reads of keys that may vanish (a member leaving or collected between a
    check and a get) on a client of their own with a short timeout: a get
    waits for a missing key up to the client's timeout, and the roster thread
    that reads also keeps its rank's lease, so it must not wait long (peers
    would collect it)."""

    def __init__(self, store: dist.Store, timeout_s: float) -> None:
        self._store, self._timeout_s = store, timeout_s
        self._client: dist.Store | None = None

    def all(self, keys: list[str]) -> list[bytes | None]:
        """The values of `keys` in one store op (`multi_get`); None for a key
        deleted since it was seen, found by reading the keys one by one when
        the batch could not be read."""
        if not keys:
            return []
        try:
            return list(self._reader().multi_get(keys))
        except (RuntimeError, dist.DistError, AttributeError):
            pass
        out: list[bytes | None] = []
        for k in keys:
            try:
                out.append(self._reader().get(k))
            except (RuntimeError, dist.DistError):
                out.append(None)  # deleted meanwhile
        return out

    def close(self) -> None:
        self._client = None  # its socket closes with it

    def _reader(self) -> dist.Store:
        if self._client is None:
            clone = getattr(self._store, "clone", None)
            if clone is None:  # not a TCPStore: its own timeout stands
                return self._store
            self._client = clone()
            self._client.set_timeout(datetime.timedelta(seconds=self._timeout_s))
        return self._client
