"""Jobs mode's membership, kept in the rendezvous store: who is in the
deployment now, under which id, and whether each member still lives.

Ids. Embedding ranks take ids [0, EMBEDDING_IDS) from one counter; a Language
job takes a run of instance numbers from another, and its TP rank i of
instance k is `EMBEDDING_IDS + k * T + i`. So the engines' role arithmetic
(`Topology`: which instance, which TP index) holds for ids as it does for
world ranks, and every TP rank of an instance names an Embedding rank by the
same id. Ids are never reused: a rank that joins again (its job restarted)
gets a new one, so a room addressed to a departed id can fail at once.

Keys, under `NS` (values are JSON or counters; never pickle):

    emb/next, inst/next   id counters (store.add)
    epoch                 bumped on every join and leave: readers rescan when it moves
    name/<name>           a name's generation counter: a rank that registers under a
                          name already live supersedes it (a restart)
    m/<id>                a member's record (below; it never changes); deleted when it
                          leaves or is collected: absence is departure
    left/n, left/<i>      the departures log: a counter, and the i-th departed id
                          (written before its keys are deleted), read incrementally
    lease/<id>            counter its owner bumps every peer_timeout / 8; a member whose lease
                          stands still for peer_timeout is collected by whoever sees it
    pair/<e>/<l>/...      a pair's handshake and its Gloo rendezvous

`Roster.scan` is pure: given what the store holds now and what this rank
knew, it says who joined and who left, and why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

NS = "disagg/jobs/v1"
EMBEDDING_IDS = 1 << 20
MAX_ID = (1 << 31) - 1  # a rank id travels as an int32 on the wire
POLL_S = 0.25


@dataclass(frozen=True)
class Member:
    id: int
    role: str  # "embedding" or "language"
    name: str
    generation: int
    geometry: dict[str, object]
    backend: str
    fanout: str
    address: str | None = None  # Embedding: its ZeroMQ ROUTER
    host: str = ""
    pid: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def decode(raw: bytes) -> Member | None:
        """A record as stored, or None when it is not one (never trusted further)."""
        try:
            d = json.loads(raw.decode())
            m = Member(**d)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        ok = (isinstance(m.id, int) and 0 <= m.id <= MAX_ID
              and m.role in ("embedding", "language") and isinstance(m.name, str)
              and isinstance(m.generation, int) and isinstance(m.geometry, dict)
              and (m.role == "language" or isinstance(m.address, str)))
        return m if ok else None


def counter(raw: bytes | None) -> int | None:
    """A counter or an id as the store holds it (a lease, a departure's id);
    None for a value absent or not one (never trusted further)."""
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def language_id(instance: int, index: int, tp: int) -> int:
    i = EMBEDDING_IDS + instance * tp + index
    if i > MAX_ID:
        raise ValueError(f"language instance {instance} is past the id space")
    return i


def key(*parts: object) -> str:
    return "/".join([NS, *(str(p) for p in parts)])


@dataclass
class Seen:
    """A member this rank knows of: its record, and its lease as last read."""

    member: Member
    lease: int = -1
    lease_moved_at: float = 0.0


@dataclass
class Scan:
    """What changed since the last look: members that joined, and (id, why)
    for members that left, were superseded by a newer generation of their
    name, or whose lease stood still for `peer_timeout` (to be collected)."""

    joined: list[Member] = field(default_factory=list)
    left: list[tuple[int, str]] = field(default_factory=list)
    collect: list[int] = field(default_factory=list)  # ids whose record this rank deletes


def scan(known: dict[int, Seen], records: dict[int, Member],
         leases: dict[int, int], now: float, peer_timeout: float) -> Scan:
    """Decide, from the records and leases read now, who joined and who left.
    Updates `known` in place (the leases' last movement)."""
    out = Scan()
    for i in sorted(set(known) - set(records)):
        out.left.append((i, "it left the deployment"))
    newest: dict[str, Member] = {}
    for m in records.values():
        if m.name not in newest or m.generation > newest[m.name].generation:
            newest[m.name] = m
    for i, m in sorted(records.items()):
        if newest[m.name] is not m:
            if i in known:
                out.left.append((i, f"superseded by {m.name!r} generation "
                                    f"{newest[m.name].generation} (id {newest[m.name].id})"))
            out.collect.append(i)
            continue
        seen = known.get(i)
        lease = leases.get(i, -1)
        if seen is None:
            out.joined.append(m)
            continue
        if lease != seen.lease:
            seen.lease, seen.lease_moved_at = lease, now
        elif now - seen.lease_moved_at > peer_timeout:
            out.left.append((i, f"its lease stood still for {now - seen.lease_moved_at:.1f}s "
                                f"(peer_timeout={peer_timeout:g}s)"))
            out.collect.append(i)
    return out
