"""`disagg.affinity`: which Embedding ranks an instance (or a request) uses,
by rendezvous (highest-random-weight) hashing. Pure.

Each (key, peer) pair gets a pseudo-random weight; a key's peers are the k of
highest weight. When a peer joins, a key's choice changes only if the newcomer
outranks one of its k (a k/(n+1) share of keys, each losing one peer); when a
peer leaves, only the keys that used it change, each gaining one. So a router
that routes an instance's rooms to `affinity(instance, ctx.peers(), k)` keeps
every Language rank's pairs to k Embedding ranks, and a change of membership
moves few of them (docs/deployment.md, "Scale").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


def _weight(key: bytes, peer: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + peer, digest_size=8).digest(), "big")


def _as_bytes(x: bytes | str | int, what: str) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x).encode()
    raise ValueError(f"affinity: {what} must be bytes, str or int, got {type(x).__name__}")


def affinity(key: bytes | str | int, peers: Mapping[int, str] | Iterable[int],
             k: int = 1) -> list[int]:
    """The k peers (ranks) `key` maps to, best first: rendezvous hashing over
    `peers`, either `ctx.peers()` (rank -> name: the name is hashed, so a rank
    that rejoins under its name with a new id keeps its keys) or plain ranks.
    Fewer than k peers: all of them. `ValueError` for no peers or k < 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"affinity(k={k!r}): an int >= 1")
    named = dict(peers) if isinstance(peers, Mapping) else {p: p for p in peers}
    if not named:
        raise ValueError("affinity: no peers to choose from")
    kb = _as_bytes(key, "key")
    ranked = sorted(named, key=lambda p: (_weight(kb, _as_bytes(named[p], "a peer")), p),
                    reverse=True)
    return ranked[:k]
