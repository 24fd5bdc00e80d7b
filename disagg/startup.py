"""World mode's start-up agreement: what every rank published in the store
(its geometry, backend, fanout and GPU) checked by every rank the same way, so
that all of them stop at the same point with the same error instead of some
here and the others in a collective waiting for them. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .backend import check_distinct_gpus
from .errors import DisaggError, GeometryMismatch
from .geometry import Geometry
from .topology import Topology


def check_peers(rank: int, backend: str, geometry: Geometry, topology: Topology,
                peers: Mapping[int, Mapping[str, object]], hostnames: Sequence[str]) -> None:
    """Every rank's published record against this rank's: geometries compatible,
    one backend, one fanout per Language instance, and on NCCL no two ranks of a
    host on one GPU. `GeometryMismatch` or `DisaggError` naming the ranks."""
    for r, info in peers.items():
        theirs = Geometry.from_dict(info["geometry"])  # type: ignore[arg-type]
        if r != rank:
            geometry.check_compatible(theirs, rank=rank, peer=r)
        if info["backend"] != backend:
            raise GeometryMismatch(f"backend differs: rank {rank} uses {backend}, rank {r} "
                                   f"uses {info['backend']}", rank=rank, peer=r)
    for i in range(topology.num_instances):
        fanouts = {r: peers[r]["fanout"] for r in topology.instance_ranks(i)}
        if len(set(fanouts.values())) > 1:
            raise GeometryMismatch(f"fanout differs inside language instance {i}: {fanouts}; "
                                   f"every rank of an instance must use the same", rank=rank)
    if backend == "nccl":
        try:
            check_distinct_gpus({r: (hostnames[r], str(info["gpu"]))
                                 for r, info in peers.items()})
        except ValueError as why:
            raise DisaggError(f"start-up: {why}", rank=rank) from None
