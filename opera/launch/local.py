"""Run a function in several processes on this machine, the way ``torchrun`` would.

Each child gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and
``MASTER_ADDR=127.0.0.1``/``MASTER_PORT`` (a free port) in its environment before ``fn(*args)``
runs, so :func:`opera.distributed.init` sets the process group up exactly as under torchrun.
``fn`` must be picklable (a module-level function): children are started with ``spawn``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException

from opera.distributed import free_port
from opera.errors import OperaError


class LocalLaunchError(RuntimeError):
    """A child process failed (its rank and its traceback are in the message) or timed out."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _child(local_rank: int, fn: Callable[..., Any], args: tuple, nproc: int, port: int, outdir: str,
           threads: int | None) -> None:
    os.environ.update({
        "RANK": str(local_rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    })
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    out = Path(outdir) / f"rank{local_rank}.pkl"
    try:
        result = fn(*args)
    except OperaError as e:  # re-raised as such in the parent: the CLI shows one line
        out.write_bytes(pickle.dumps(("opera_error", str(e))))
        raise
    _leave_group()
    try:
        payload = pickle.dumps(("ok", result))
    except Exception:  # an unpicklable result is not an error of the run
        payload = pickle.dumps(("ok", None))
    out.write_bytes(payload)


def _leave_group() -> None:
    """Every rank has returned: meet once more, then close the process group, so that no rank
    exits (closing its gloo sockets and, on rank 0, the store) while another is still finishing
    its last collective - which aborted that rank with SIGABRT in a CI run of ``knn --nproc 2``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch_local(fn: Callable[..., Any], args: tuple = (), nproc: int = 2, *, timeout: float | None = None,
                 master_port: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` spawned processes; return each rank's return value (rank order).

    A failing child stops the others and raises :class:`LocalLaunchError` naming its rank (or
    :class:`OperaError` if the child raised one). ``timeout`` (seconds) bounds the whole run.
    Unless ``OMP_NUM_THREADS`` is set, each child uses ``cpu_count // nproc`` threads.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise OperaError(f"nproc={nproc!r} must be a positive integer (processes to start on this machine)")
    port = master_port or free_port()
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="opera-launch-") as outdir:
        ctx = mp.start_processes(_child, args=(fn, tuple(args), nproc, port, outdir, threads), nprocs=nproc,
                                 join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if deadline is not None and time.monotonic() > deadline:
                    _stop(ctx.processes)
                    raise LocalLaunchError(f"local launch of {_name(fn)} with {nproc} processes did not finish "
                                           f"within {timeout:.0f}s")
        except ProcessException as e:
            rank = e.error_index
            _stop(ctx.processes)
            saved = _read(Path(outdir) / f"rank{rank}.pkl")
            if saved is not None and saved[0] == "opera_error":
                raise OperaError(saved[1]) from None
            if isinstance(e, ProcessRaisedException):
                tb = str(e).strip()
                last = tb.splitlines()[-1] if tb else "exception"
                detail = f"{last}\n{tb}"  # the child's error first, then its traceback
            else:
                detail = f"exit code {getattr(e, 'exit_code', '?')}" + (
                    f" (signal {e.signal_name})" if getattr(e, "signal_name", None) else "")
            raise LocalLaunchError(f"rank {rank} of {nproc} failed in {_name(fn)}: {detail}", rank=rank) from e
        results = []
        for rank in range(nproc):
            saved = _read(Path(outdir) / f"rank{rank}.pkl")
            results.append(saved[1] if saved is not None else None)
        return results


def _stop(processes, grace: float = 5.0) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(grace)


def _read(path: Path):
    try:
        return pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


__all__ = ["LocalLaunchError", "launch_local"]
