"""torchrun helpers: the process's place in the world, read from torchrun's environment.

Outside torchrun everything falls back to rank 0 of a world of 1, so the same code runs single-process. NCCL is
used on GPUs and gloo on CPU. Multi-node runs go through torchrun's rendezvous (``--nnodes``,
``--rdzv_endpoint``); nothing here knows about SLURM.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .preemption import elastic_restart_count

log = logging.getLogger("xcit")


@dataclass(frozen=True)
class World:
    """This process's rank, local rank, the world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(device_target: str, local_rank: int = 0) -> torch.device:
    """``auto``/``ascend`` -> CUDA if present else CPU; ``cuda``/``gpu`` -> CUDA (an error without one); ``cpu``."""
    if device_target in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise RuntimeError("device_target is cuda but no CUDA device is available (use device_target: cpu)")
        return torch.device("cuda", local_rank)
    if device_target == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init(device_target: str = "auto", distribute: bool = True, timeout_s: float = 600) -> World:
    """Join the process group when torchrun started more than one process (``WORLD_SIZE > 1``).

    torchrun's environment decides: ``distribute: False`` under a multi-process torchrun is overridden with a
    notice (independent copies would all write the same files), and ``distribute: True`` without torchrun runs one
    process.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and not distribute and rank == 0:
        log.info("distribute: False, but torchrun started %d processes: training data-parallel across them", size)
    if size == 1 and distribute:
        log.info("distribute: True but not launched by torchrun: running 1 process (torchrun --nproc_per_node N)")
    device = pick_device(device_target, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        # a collective waiting on a dead or hung rank fails after timeout_s instead of blocking forever; NCCL's
        # watchdog needs async error handling for that (the default since torch 2.2; set it for older versions)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        backend = "nccl" if device.type == "cuda" else "gloo"
        _init_process_group(backend, rank, size, timedelta(seconds=timeout_s))
        # the group this created goes down before the interpreter does: left to exit, its backend's threads are
        # torn down mid-flight ("terminate called without an active exception", SIGABRT after the work is done)
        atexit.register(cleanup)
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def _init_process_group(backend: str, rank: int, size: int, timeout: timedelta) -> None:
    """``init_process_group`` over the rendezvous store, its keys under a prefix of their own per restart attempt.

    torchrun's agent keeps one store for all attempts of a job (``TORCHELASTIC_USE_AGENT_STORE``). Without a
    prefix, the ranks of a restarted attempt read the addresses that the previous attempt's ranks published there
    and the gloo mesh fails ("connectFullMesh failed ... Connection refused" to a dead port) or hangs. The prefix
    per ``TORCHELASTIC_RESTART_COUNT`` is what torch's own dynamic rendezvous does per round.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=size, timeout=timeout))
    store = dist.PrefixStore(f"xcit/attempt{elastic_restart_count()}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size, timeout=timeout)


def is_main() -> bool:
    """Rank 0 (or not distributed): the only process that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity when not distributed). Exact counts: reduce sums, never means of means."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks of equally weighted values (e.g. per-step losses of equal per-rank batches)."""
    return all_reduce_sum(t).div_(world_size())


def all_gather_object(obj: object) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
