"""Jobs mode's rendezvous store: connecting to it, hosting it, and what a
rank writes there first (its id and its member record). Every other store
call of jobs mode is the roster's (`jobs.py`), which lists the other role's
ids allocated so far with `candidate_ids`. `own_client` serves both modes'
stores (the pairs' and the roster's clients)."""

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


def own_client(store: dist.Store) -> dist.Store:
    """A client of `store` of the caller's own (`TCPStore.clone`: a socket of its
    own, so a call that waits there holds up no other user's calls); the
    store itself when it cannot be cloned (a `HashStore`, a `FileStore`)."""
    clone = getattr(store, "clone", None)
    return clone() if clone is not None else store


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
