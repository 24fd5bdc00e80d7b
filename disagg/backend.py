"""Which backend a rank uses, and NCCL's rules at start-up: the auto-pick
(NCCL only when every rank of the node has a GPU of its own), what
`init_process_group` is given, the refusal of a world whose pair
communicators could wait on each other in a cycle, and group creation and
teardown under the device's NCCL lock (docs/nccl.md)."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from . import streams
from .config import DisaggConfig
from .topology import Topology
from .transport import device_lock

log = logging.getLogger(__name__)


def local_rank() -> tuple[int, int]:
    # torchrun's contract; without it every rank is alone on its host as far as we know
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def visible_devices(env: Mapping[str, str] = os.environ) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES, or None where it is not set."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def one_gpu_each(gpus: int, local_world: int, env: Mapping[str, str] = os.environ) -> bool:
    """Whether each process of the node was given one GPU of its own (SLURM's
    --gpus-per-task=1, Kubernetes, a launcher that sets CUDA_VISIBLE_DEVICES per
    rank): this process sees exactly one, named by CUDA_VISIBLE_DEVICES, while
    the node runs several ranks. `check_distinct_gpus` confirms it at start-up."""
    visible = visible_devices(env)
    return gpus == 1 and local_world > 1 and visible is not None and len(visible) == 1


def backend_choice(cfg: DisaggConfig, *, gpus: int | None = None,
                   local_world: int | None = None,
                   env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """("nccl" or "gloo", why): `cfg.backend` if set (a ValueError if NCCL cannot
    run here), else NCCL when every rank of this node has a GPU of its own: the
    node has one per rank, or each process was given one (`one_gpu_each`).
    `gpus` and `local_world` default to this node's (torchrun's LOCAL_WORLD_SIZE)."""
    if local_world is None:
        _, local_world = local_rank()
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = (f"{local_world} ranks on this node but {gpus} GPU(s): NCCL refuses two ranks "
             f"on one GPU (a communicator cannot hold the same device twice; NCCL reports "
             f"a duplicate GPU), so ranks that would share a GPU cannot talk over NCCL")
    own = (f"one GPU visible to this process (CUDA_VISIBLE_DEVICES="
           f"{','.join(visible_devices(env) or [])}) of {local_world} ranks on this node: "
           f"each was given its own (checked at start-up)")
    each = one_gpu_each(gpus, local_world, env)
    if cfg.backend == "nccl":
        if gpus == 0:
            raise ValueError("DisaggConfig.backend='nccl' but this rank sees no CUDA GPU; "
                             "use backend='gloo' (CPU) or None to pick automatically")
        if local_world > gpus and not each:
            raise ValueError(f"DisaggConfig.backend='nccl' needs one GPU per rank: {share}. "
                             f"Use fewer ranks per node, give each process its own GPU "
                             f"(CUDA_VISIBLE_DEVICES), or backend='gloo'")
        return "nccl", "backend='nccl' in the config" + (f"; {own}" if each else "")
    if cfg.backend == "gloo":
        return "gloo", "backend='gloo' in the config"
    if gpus == 0:
        return "gloo", "no CUDA GPU on this rank: CPU tensors over Gloo"
    if each:
        return "nccl", own
    if local_world > gpus:
        return "gloo", f"{share}; Gloo through host memory instead"
    return "nccl", f"{local_world} rank(s) on this node and {gpus} GPU(s): one GPU per rank"


def cuda_index(local: int, gpus: int) -> int:
    """The CUDA device a rank with local rank `local` uses: the one it sees when
    it was given one of its own, else its local rank's."""
    if gpus == 1:
        return 0
    if not 0 <= local < gpus:
        raise ValueError(f"local rank {local} has no GPU of its own: this process sees "
                         f"{gpus} GPU(s)")
    return local


def check_distinct_gpus(devices: Mapping[int, tuple[str, str]]) -> None:
    """rank -> (host, GPU uuid) of every NCCL rank: two ranks of one host on one
    GPU cannot talk over NCCL (a duplicate GPU), so say so before any pair."""
    seen: dict[tuple[str, str], int] = {}
    for rank, (host, uuid) in sorted(devices.items()):
        other = seen.setdefault((host, uuid), rank)
        if other != rank:
            raise ValueError(f"ranks {other} and {rank} on host {host} use the same GPU "
                             f"({uuid}): NCCL refuses two ranks on one GPU. Give each rank "
                             f"its own GPU (CUDA_VISIBLE_DEVICES per rank, or LOCAL_RANK), or "
                             f"use backend='gloo'")


def _pick_backend(cfg: DisaggConfig) -> str:
    return backend_choice(cfg)[0]


def world_backend(backend: str) -> str:
    """What `init_process_group` is given: on NCCL, Gloo too for CPU tensors
    (the store-side groups and any CPU collective)."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"


# NCCL with several Embedding and several Language ranks rests on one
# assumption (docs/nccl.md); set to 0 to refuse such layouts instead.
NCCL_CONCURRENT_ENV = "DISAGG_NCCL_CONCURRENT_COMMS"


def check_nccl_topology(topology: Topology, env: Mapping[str, str] = os.environ) -> None:
    """On NCCL, a world with at least 2 Embedding and 2 Language ranks has pair
    communicators that could wait on each other in a cycle if a device ran
    NCCL kernels of different communicators one at a time (docs/nccl.md): two
    ranks of each side that submit their ops on the pairs between them in
    opposite orders. Every NCCL deployment with TP >= 2 rests on the same
    assumption (its TP and data-parallel communicators run concurrently), so
    such layouts are allowed by default, with a log line that names the
    assumption. Refused where a setting breaks it (`CUDA_DEVICE_MAX_CONNECTIONS=1`,
    `CUDA_LAUNCH_BLOCKING=1`: every kernel of a device waits for the one before
    it), or when the operator says so (`DISAGG_NCCL_CONCURRENT_COMMS=0`). One
    Embedding rank, or one Language rank, cannot form a cycle."""
    e, lang = topology.num_embedding_ranks, len(topology.language_ranks)
    if e < 2 or lang < 2:
        return
    serial = [f"{k}={env[k]}" for k, v in (("CUDA_DEVICE_MAX_CONNECTIONS", "1"),
                                            ("CUDA_LAUNCH_BLOCKING", "1"))
              if env.get(k, "").strip() == v]
    layout = f"NCCL with {e} Embedding and {lang} Language ranks"
    if serial:
        raise ValueError(
            f"{layout} can deadlock under {', '.join(serial)}: every kernel of a device then "
            f"waits for the one before it, and two Embedding and two Language ranks whose ops "
            f"on the pairs between them are queued in opposite orders wait on each other in a "
            f"cycle (docs/nccl.md). Unset it, or use num_embedding_ranks=1, or backend='gloo'")
    if env.get(NCCL_CONCURRENT_ENV, "").strip() == "0":
        raise ValueError(
            f"{layout} refused: {NCCL_CONCURRENT_ENV}=0 says this deployment's devices may run "
            f"the kernels of different NCCL communicators one at a time, and then two "
            f"Embedding and two Language ranks can deadlock (docs/nccl.md). Use "
            f"num_embedding_ranks=1, or backend='gloo', or unset it")
    log.info("%s: pair communicators assume that each device runs the kernels of different "
             "NCCL communicators concurrently, as every NCCL deployment with TP >= 2 does "
             "(docs/nccl.md); %s=0 refuses such layouts", layout, NCCL_CONCURRENT_ENV)


def new_group(ranks: list[int], *, backend: str, timeout: datetime.timedelta,
              device: torch.device) -> dist.ProcessGroup:
    """`dist.new_group`, holding the device's NCCL lock (docs/nccl.md)."""
    with device_lock(device):
        return dist.new_group(ranks, timeout=timeout, backend=backend)


def warm_up(group: dist.ProcessGroup, device: torch.device, timeout_s: float) -> None:
    """A group's first collective, now, under the device lock: on NCCL it creates
    the communicator (collective over the group's ranks, which all call this at
    the same point of start-up), so no later collective creates it inside a
    serving loop's `step()`. Returns once the collective is done."""
    with streams.on_library_stream(device):  # never behind the application's work
        t = torch.zeros(1, device=device)
        with device_lock(device):
            work = dist.all_reduce(t, group=group, async_op=True)
    assert work is not None
    if not streams.observed([work], device, time.monotonic() + timeout_s):
        raise TimeoutError(f"the instance group's first all-reduce on {device} did not end "
                           f"within {timeout_s:.0f}s: is every rank of the instance starting?")
    work.wait()  # Gloo: blocks, bounded by the group's timeout; CUDA: only its error


def destroy_group(group: dist.ProcessGroup, device: torch.device) -> None:
    """`dist.destroy_process_group(group)`, holding the device's NCCL lock."""
    with device_lock(device):
        dist.destroy_process_group(group)
