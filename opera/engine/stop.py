"""Stopping a run at a step boundary (docs/reliability.md).

:class:`GracefulStop`: SIGINT / SIGTERM finish the current step; the loop then writes ``last.pt``
at that step and raises :class:`Stopped`. A second signal aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, ClassVar

from opera.errors import OperaError


class Stopped(OperaError):
    """The run stopped on SIGINT/SIGTERM after writing ``last.pt`` at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; rerun the same command to resume "
                         f"({signal.Signals(signum).name}; last.pt holds that step)")
        self.exit_code = 128 + signum
        self.step, self.signum = step, signum

    def __reduce__(self):  # crosses process pools (ablation cells with --jobs) intact
        return Stopped, (self.step, self.signum)


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run aborts at once (the last checkpoint written is intact).
    The CLI exits ``128 + signum``: 130 for SIGINT, 143 for SIGTERM, as a shell reports them."""

    #: the latest abort in this process: typer turns a KeyboardInterrupt into exit code 130 before
    #: the CLI sees it, which then exits with this one's code instead
    last: ClassVar[Aborted | None] = None

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        Aborted.last = self

    def __reduce__(self):
        return Aborted, (self.signum,)


class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step.

    Only signals still at their default disposition are taken (under submitit, SIGTERM stays
    submitit's; its USR2 is deferred to :meth:`request` by :class:`opera.launch.slurm.Requeueable`,
    which requeues once the loop has written ``last.pt``). A second signal aborts at once
    (:class:`Aborted`, a ``KeyboardInterrupt``); the previous handlers are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    _active: ClassVar[list[GracefulStop]] = []  # entered and not yet exited, innermost last

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                current = signal.getsignal(sig)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[sig] = current
                    signal.signal(sig, self._handle)
            GracefulStop._active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in GracefulStop._active:
            GracefulStop._active.remove(self)

    @classmethod
    def active(cls) -> GracefulStop | None:
        """The innermost stop request in force in this process (a loop that checkpoints at its step
        boundaries is running), or ``None``. The SLURM wrapper defers submitit's USR2 to it."""
        return cls._active[-1] if cls._active else None

    def request(self, signum: int) -> None:
        """Ask the loop to stop after its current step (what a first SIGINT/SIGTERM does)."""
        self.signum = self.signum or signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.__exit__()
            print(f"{signal.Signals(signum).name} again: aborting at once; the last checkpoint written is intact, rerun "
                  "the same command to resume from it", file=sys.stderr, flush=True)
            raise Aborted(signum)
        self.request(signum)
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then writing last.pt "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def requested(self, world_size: int = 1) -> int | None:
        """The signal to stop on, agreed by all ranks (one tiny all-reduce when distributed)."""
        if world_size <= 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.signum or 0)])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


__all__ = ["Aborted", "GracefulStop", "Stopped"]
