"""The one distributed helper of opera.

Everything here works unchanged when ``torch.distributed`` is not initialised: the world is then
one process of rank 0, gathers return their input, and reductions are identities. ``init`` handles
torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, as submitit sets them) and a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient (MoCo's key gather).

    The keys of the instance space come from the momentum encoder and carry no gradient, so a
    plain gather is exact here. Every rank must pass a tensor of the same shape.
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (for logging; no gradient)."""
    if not is_initialized() or get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        import subprocess

        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        first = out.stdout.split()
        if first:
            return first[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0]


def init(device: str = "cpu", timeout_min: int = 30) -> DistEnv:
    """Initialise the process group if the environment describes several processes.

    gloo on CPU, NCCL on CUDA. Under SLURM without torchrun, the rendezvous address is the first
    node of the job and the port is derived from the job id, so every task agrees on it.
    """
    rank, world, local_rank = detect_env()
    if world == 1 or is_initialized():
        return DistEnv(get_rank(), get_world_size(), local_rank, None)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
        os.environ["MASTER_PORT"] = str(20000 + job % 20000)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    return DistEnv(rank, world, local_rank, backend)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on localhost (for local multi-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
