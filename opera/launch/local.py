"""Run a function in several processes on this machine, the way ``torchrun`` would.

Each child gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and
``MASTER_ADDR=127.0.0.1``/``MASTER_PORT`` (a free port) in its environment before ``fn(*args)``
runs, so :func:`opera.distributed.init` sets the process group up exactly as under torchrun.
``fn`` must be picklable (a module-level function): children are started with ``spawn``.

Signals: the launcher is what a user stops (Ctrl-C in a terminal, ``kill -INT <pid>``). Each child
runs in its own process group, so a terminal's Ctrl-C reaches the launcher only, and the launcher
forwards SIGINT / SIGTERM to every child once: rank 0 takes it as a stop request
(:class:`~opera.engine.stop.GracefulStop`, with its one line), the other ranks take it without a
word, the ranks agree on the stop step, rank 0 writes ``last.pt``, and the launcher raises the
:class:`~opera.engine.stop.Stopped` of that step (the CLI prints its one line and exits 128 + the
signal). A second signal is forwarded too and aborts at once (:class:`~opera.engine.stop.Aborted`, exit 128 + the signal).
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException

from opera.distributed import free_port
from opera.engine.stop import Aborted, GracefulStop, Stopped
from opera.errors import OperaError


class LocalLaunchError(RuntimeError):
    """A child process failed (its rank and its traceback are in the message) or timed out."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


#: how long the launcher waits, once a stop was forwarded, for the ranks to finish their step,
#: write last.pt and exit on their own before it terminates them
STOP_GRACE_S = 300.0
#: after a second signal: how long the ranks get to abort before they are terminated
ABORT_GRACE_S = 5.0
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def _at_default(sig: int) -> bool:
    return signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)


def _quiet_stop(signum: int, frame: Any) -> None:
    """A rank other than 0: the stop request of a forwarded signal, without the line rank 0 prints
    (the ranks agree on the step through rank 0's request); a second signal, or one that arrives
    outside a training loop, interrupts as Ctrl-C does."""
    stop = GracefulStop.active()
    if stop is None or stop.signum is not None:
        raise Aborted(signum)
    stop.request(signum)


def _own_process_group(local_rank: int) -> None:
    """A terminal's Ctrl-C (sent to its foreground process group) then reaches the launcher only,
    which forwards it once; ranks other than 0 take signals quietly."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if local_rank != 0:
        for sig in FORWARDED:
            if _at_default(sig):
                signal.signal(sig, _quiet_stop)


def _child(local_rank: int, fn: Callable[..., Any], args: tuple, nproc: int, port: int, outdir: str,
           threads: int | None) -> None:
    _own_process_group(local_rank)
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
    except Stopped as e:  # re-raised as such in the parent: its one line and exit code 128 + signal
        out.write_bytes(pickle.dumps(("stopped", e.step, e.signum)))
        raise
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
    """Every rank has returned: meet once more and close the process group
    (:func:`opera.distributed.shutdown`) - a rank that exited while another was still finishing its
    last collective aborted that rank with SIGABRT in a CI run of ``knn --nproc 2``."""
    from opera import distributed

    distributed.shutdown()


class _Forwarder:
    """The launcher's SIGINT / SIGTERM handler while its children run: the first signal is
    forwarded to every live child (a stop request); a second one is forwarded too and aborts."""

    def __init__(self, processes) -> None:
        self.processes = processes
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Forwarder:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED:
                if _at_default(sig):  # an ignored signal stays ignored, a caller's handler stays its own
                    self._previous[sig] = signal.getsignal(sig)
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def forward(self, signum: int) -> None:
        for p in self.processes:
            if p.pid and p.is_alive():
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _handle(self, signum: int, frame: Any) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        self.forward(signum)
        if again:
            raise Aborted(signum)


def launch_local(fn: Callable[..., Any], args: tuple = (), nproc: int = 2, *, timeout: float | None = None,
                 master_port: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` spawned processes; return each rank's return value (rank order).

    A failing child stops the others and raises :class:`LocalLaunchError` naming its rank (or
    :class:`OperaError` if the child raised one). ``timeout`` (seconds) bounds the whole run.
    Unless ``OMP_NUM_THREADS`` is set, each child uses ``cpu_count // nproc`` threads.

    SIGINT / SIGTERM received meanwhile are forwarded to the children (see the module docstring):
    a run they stop raises its :class:`~opera.engine.stop.Stopped`; a run interrupted before its
    loop could stop, or by a second signal, raises :class:`~opera.engine.stop.Aborted`.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise OperaError(f"nproc={nproc!r} must be a positive integer (processes to start on this machine)")
    port = master_port or free_port()
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="opera-launch-") as outdir:
        processes: list = []
        with _Forwarder(processes) as signals:
            try:
                ctx = mp.start_processes(_child, args=(fn, tuple(args), nproc, port, outdir, threads), nprocs=nproc,
                                         join=False, start_method="spawn")
                processes.extend(ctx.processes)
                if signals.signum is not None:  # a signal while they started: they get it now
                    signals.forward(signals.signum)
                deadline = None if timeout is None else time.monotonic() + timeout
                while not ctx.join(timeout=0.5, grace_period=STOP_GRACE_S if signals.signum else None):
                    if deadline is not None and time.monotonic() > deadline:
                        _stop(ctx.processes)
                        raise LocalLaunchError(f"local launch of {_name(fn)} with {nproc} processes did not finish "
                                               f"within {timeout:.0f}s")
            except KeyboardInterrupt:  # a second signal: the children got it too and abort
                end = time.monotonic() + ABORT_GRACE_S
                for p in processes:  # they remove a checkpoint's temporary file as they go
                    p.join(max(0.0, end - time.monotonic()))
                _stop(processes)
                raise
            except ProcessException as e:
                rank = e.error_index
                _stop(ctx.processes)
                saved = [_read(Path(outdir) / f"rank{r}.pkl") for r in range(nproc)]
                stopped = [s for s in saved if s is not None and s[0] == "stopped"]
                if stopped:  # every rank stopped at the same step; rank 0 wrote last.pt
                    raise Stopped(stopped[0][1], stopped[0][2]) from None
                if signals.signum is not None:  # interrupted before the loop could stop (rank 0 wrote nothing)
                    raise Aborted(signals.signum) from None
                mine = saved[rank]
                if mine is not None and mine[0] == "opera_error":
                    raise OperaError(mine[1]) from None
                if isinstance(e, ProcessRaisedException):
                    tb = str(e).strip()
                    last = tb.splitlines()[-1] if tb else "exception"
                    detail = f"{last}\n{tb}"  # the child's error first, then its traceback
                else:
                    detail = f"exit code {getattr(e, 'exit_code', '?')}" + (
                        f" (signal {e.signal_name})" if getattr(e, "signal_name", None) else "")
                raise LocalLaunchError(f"rank {rank} of {nproc} failed in {_name(fn)}: {detail}", rank=rank) from e
        results = [_read(Path(outdir) / f"rank{rank}.pkl") for rank in range(nproc)]
        if signals.signum is not None and any(saved is None for saved in results):
            raise Aborted(signals.signum)  # a rank interrupted before its loop could stop exits quietly (torch's _wrap)
        return [saved[1] if saved is not None else None for saved in results]


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
