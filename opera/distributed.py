"""The one distributed helper of opera.

Everything here works unchanged when ``torch.distributed`` is not initialised: the world is then
one process of rank 0, gathers return their input, and reductions are identities. ``init`` handles
torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, as submitit sets them) and a single process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
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


def shard_bounds(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s contiguous share of ``range(n)``, without padding.

    The shares of all ranks partition ``range(n)`` (sizes differ by at most one), so an evaluation
    that sums per-rank counts sees every sample exactly once, unlike ``DistributedSampler``, which
    pads the last ranks with repeated samples.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return n * rank // world, n * (rank + 1) // world


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a collective on ``x`` must run: CUDA under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor on ``x``'s device; no gradient). Identity alone."""
    if not is_initialized() or get_world_size() == 1:
        return x
    y = x.detach().to(_comm_device(x), copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


@torch.no_grad()
def all_gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 in rank order, when ranks hold different
    numbers of rows (a shard of :func:`shard_bounds`); the result is on ``x``'s device.

    Rows are padded to the largest shard for the collective and the padding is cut off again, so
    the output has exactly ``sum(len(x_r))`` rows. No gradient.
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    dev = _comm_device(x)
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    most = max(sizes_)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x.to(dev)
    out = [torch.empty_like(padded) for _ in sizes_]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_)]).to(x.device)


def ranks_where(flag: torch.Tensor | bool) -> list[int]:
    """The ranks on which ``flag`` is true (every rank calls it; one small all-reduce and one host
    sync, on the flag's device under NCCL). Without a process group: ``[0]`` or ``[]``."""
    if not is_initialized() or get_world_size() == 1:
        return [0] if bool(flag) else []
    flag = torch.as_tensor(flag)
    flags = torch.zeros(get_world_size(), device=flag.device if dist.get_backend() == "nccl" else torch.device("cpu"))
    flags[get_rank()] = flag.to(flags.device, flags.dtype)
    dist.all_reduce(flags)
    return [i for i, v in enumerate(flags.tolist()) if v > 0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (for logging; no gradient)."""
    if not is_initialized() or get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


@torch.no_grad()
def all_reduce_sum_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, without gradient (e.g. the labelled count of the global batch)."""
    if not is_initialized() or get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of every rank's input is the sum over ranks of
    the gradients of the outputs (the gradient of the sum of all ranks' losses)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return g


class GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the samples of all ranks, on CPU (gloo).

    ``torch.nn.SyncBatchNorm`` runs on CUDA only (its kernels have no CPU version and DDP refuses it
    on CPU modules), so CPU runs of several processes use this one: mean and variance come from two
    differentiable all-reduces, which makes the forward and the gradients those of one BatchNorm over
    the global batch. It is not a ``SyncBatchNorm`` subclass (DDP would refuse it). Outside training,
    or in a single process, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized() and get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # statistics in fp32 at least
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / n  # biased, as BatchNorm normalises
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm of ``module`` (a momentum encoder included) -> one with statistics over ranks.

    ``torch.nn.SyncBatchNorm`` when the module is on CUDA, :class:`GlooSyncBatchNorm` otherwise.
    Parameters and buffers are shared with the originals (the same tensors), as torch's converter does.
    """
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist, as ``scontrol show hostnames`` would list it:
    ``node[1-2]`` -> ``node1``, ``gpu[007-009,011],cpu1`` -> ``gpu007``, ``r[1-2]-n[01-04]`` -> ``r1-n01``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


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
    return first_host(nodelist)  # no scontrol here: the same host, read from the hostlist itself


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


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` as a device (``auto`` and ``cuda``: this process's
    ``cuda:local_rank``); a one-line error for an unknown name or CUDA asked for where there is none."""
    from opera.errors import OperaError

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise OperaError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OperaError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else dev


def join(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group the launcher described (torchrun, ``--nproc``, SLURM; none alone)
    and pick this process's device (``cuda:LOCAL_RANK`` for ``auto`` / ``cuda``)."""
    dev = resolve_device(device)
    env = init(dev.type)
    return env, resolve_device(device, env.local_rank)


def shutdown() -> None:
    """Leave the process group: meet every rank once more, then close it, so that no rank exits
    (closing its gloo sockets and, on rank 0, the store) while another is still finishing its last
    collective; and rank 0, which hosts the store, closes last, once every other rank has closed
    its group (counted in the store; at most 60 s): a store that vanished under a rank still
    closing its group aborted that rank with SIGABRT ("terminate called without an active
    exception") in 4 of 10 runs of a two-rank test. Nothing when no group is open."""
    if not is_initialized():
        return
    dist.barrier()
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store() if world > 1 else None
    if store is None or rank != 0:
        dist.destroy_process_group()
        if store is not None:
            store.add("opera/left", 1)
        return
    # rank 0 hosts the store: it closes last, once every other rank has closed its group
    deadline = time.monotonic() + 60
    while store.add("opera/left", 0) < world - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on localhost (for local multi-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
