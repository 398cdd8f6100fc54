"""The process's place in the world: read from torchrun's environment, or from SLURM's inside an ``srun`` step.

torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) wins, so ``srun torchrun ...`` (one torchrun per
node) works as torchrun alone does. Without it, a process that ``srun`` started is one rank of the step's tasks:
``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (``SLURM_NTASKS``) and ``SLURM_LOCALID``, the master on the step's first
node and a port derived from the job id (as submitit's ``TorchDistributedEnvironment`` and dinov2's
``distributed/__init__.py`` read them). SLURM's variables count only inside a step (``SLURM_STEP_ID`` set): the batch
script of ``sbatch`` and a shell under ``salloc`` also carry ``SLURM_PROCID``/``SLURM_NTASKS`` for the whole
allocation, and a single process started there must stay a world of 1. Otherwise everything falls back to rank 0 of
a world of 1. NCCL is used on GPUs and gloo on CPU.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Launch:
    """Who started this process: ``torchrun``, ``slurm`` (a task of an ``srun`` step) or ``none`` (a world of 1).
    ``master_addr``/``master_port`` are set for ``slurm`` only (torchrun's rendezvous brings its own)."""

    launcher: str = "none"
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    master_addr: str = ""
    master_port: int = 0


def launch_env(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's launcher and place in the world, read from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (also inside an srun step: srun torchrun ...)
        return Launch("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return Launch()
    size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    addr = env.get("MASTER_ADDR") or first_host(nodes)
    port = int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0")))
    return Launch("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), size, addr, port)


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a job: 20000-39999, from the job id, so that every task computes the same one and two
    jobs on one node rarely meet (the ranges of torchrun's 29500 and of ephemeral ports, 32768+, are shared alike)."""
    digits = re.sub(r"\D", "", job_id) or "0"  # an array task's id is 123_4
    return 20000 + int(digits) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-05,7],gpu1`` -> ``node03``): ``scontrol show hostnames`` where
    SLURM's commands are installed, else parsed here (the same rules as submitit's ``_parse_node_list``)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()  # fmt: skip
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding kept: node[003-010] -> node003
    return prefix + first


def pick_device(device_target: str, local_rank: int = 0) -> torch.device:
    """``auto``/``ascend`` -> CUDA if present else CPU; ``cuda``/``gpu`` -> CUDA (an error without one); ``cpu``.

    The GPU is ``local_rank`` modulo the visible devices: SLURM's GPU binding can show each task only its own."""
    if device_target in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise RuntimeError("device_target is cuda but no CUDA device is available (use device_target: cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device_target == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device_target: str = "auto", distribute: bool = True, timeout_s: float = 600) -> World:
    """Join the process group when torchrun or ``srun`` started more than one process (:func:`launch_env`).

    The launcher decides: ``distribute: False`` under a multi-process launch is overridden with a notice
    (independent copies would all write the same files), and ``distribute: True`` without one runs one process.
    """
    launch = launch_env()
    size, rank, local_rank = launch.size, launch.rank, launch.local_rank
    if size > 1 and not distribute and rank == 0:
        log.info("distribute: False, but %s started %d processes: training data-parallel across them",
                 launch.launcher, size)  # fmt: skip
    if size == 1 and distribute:
        log.info("distribute: True but not launched by torchrun or srun: running 1 process "
                 "(torchrun --nproc_per_node N, or srun -n N)")  # fmt: skip
    device = pick_device(device_target, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        # a collective waiting on a dead or hung rank fails after timeout_s instead of blocking forever; NCCL's
        # watchdog needs async error handling for that (the default since torch 2.2; set it for older versions)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        backend = "nccl" if device.type == "cuda" else "gloo"
        _init_process_group(backend, launch, timedelta(seconds=timeout_s))
        # the group this created goes down before the interpreter does: left to exit, its backend's threads are
        # torn down mid-flight ("terminate called without an active exception", SIGABRT after the work is done)
        atexit.register(cleanup)
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def _init_process_group(backend: str, launch: Launch, timeout: timedelta) -> None:
    """``init_process_group`` over the rendezvous store, its keys under a prefix of their own per restart attempt.

    Under ``srun`` the store is a TCP store on the first node's derived port (rank 0 serves it).

    torchrun's agent keeps one store for all attempts of a job (``TORCHELASTIC_USE_AGENT_STORE``). Without a
    prefix, the ranks of a restarted attempt read the addresses that the previous attempt's ranks published there
    and the gloo mesh fails ("connectFullMesh failed ... Connection refused" to a dead port) or hangs. The prefix
    per ``TORCHELASTIC_RESTART_COUNT`` is what torch's own dynamic rendezvous does per round.
    """
    rank, size = launch.rank, launch.size
    url = f"tcp://{launch.master_addr}:{launch.master_port}" if launch.launcher == "slurm" else "env://"
    store, _, _ = next(dist.rendezvous(url, rank=rank, world_size=size, timeout=timeout))
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
