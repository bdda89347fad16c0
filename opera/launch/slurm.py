"""Submit opera functions to SLURM through submitit, with checkpoint-and-requeue.

``submit(fn, *args, options=SlurmOptions(...), folder=...)`` wraps ``fn`` in :class:`Requeueable`:
when SLURM preempts the job or its time limit approaches (submitit's ``USR2`` signal,
``signal_delay_s`` before the end), submitit calls ``Requeueable.checkpoint`` which resubmits the
*same* call. The requeued job runs ``fn(*args)`` again and the training function resumes by itself
from ``<output>/last.pt`` (where it saves), so nothing else needs to be passed along.

sbatch refusals (an impossible request, an unknown partition or account) become one-line
:class:`~opera.errors.OperaError` with sbatch's own reason.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from opera.errors import OperaError

DEFAULT_FOLDER = "runs/slurm/%j"


@dataclass
class SlurmOptions:
    """What to ask SLURM for. ``None`` means "do not pass it, use the cluster's default"."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU, or 1 on CPU
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "opera"
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {"exclusive": True}
    log_dir: str | None = None  # submitit folder (logs, pickles); "%j" is the job id
    array_parallelism: int = 256
    signal_delay_s: int = 90  # USR2 this long before the time limit: time to save and requeue
    max_num_timeout: int = 3  # requeues allowed after a time limit (preemptions are unlimited)

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self) -> None:
        positive = {"nodes": self.nodes, "timeout_min": self.timeout_min, "array_parallelism": self.array_parallelism,
                    "tasks_per_node": self.ntasks_per_node}
        if self.cpus_per_task is not None:
            positive["cpus_per_task"] = self.cpus_per_task
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OperaError(f"slurm option {name}={value!r} must be a positive integer")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise OperaError(f"slurm option gpus_per_node={self.gpus_per_node!r} must be an integer >= 0")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise OperaError(f"slurm option mem_gb={self.mem_gb!r} must be positive (or unset)")
        if self.signal_delay_s < 0 or self.max_num_timeout < 0:
            raise OperaError("slurm options signal_delay_s and max_num_timeout must be >= 0")

    def executor_parameters(self) -> dict[str, Any]:
        """Parameters for ``submitit.AutoExecutor.update_parameters`` (cluster="slurm")."""
        self.validate()
        params: dict[str, Any] = {
            "name": self.job_name,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "timeout_min": self.timeout_min,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_node > 0:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None:
                params[f"slurm_{key}"] = value
        if self.additional:
            params["slurm_additional_parameters"] = dict(self.additional)
        return params


class Requeueable:
    """``fn`` as a submitit checkpointable callable: on preemption/time limit, rerun the same call.

    ``fn`` must be picklable (a module-level function) and resume by itself from what it saved
    (opera's training resumes from ``<output>/last.pt``, where it saves).

    In the job, submitit's USR2 handler requeues and then calls ``sys.exit`` wherever the main thread
    happens to be - inside ``torch.save`` of a checkpoint, say, whose writer then fails on the
    interrupted file and turns the requeue into a failed job. So while ``fn`` runs, USR2 goes to
    :class:`DeferredRequeue` instead: with a training loop running (a
    :class:`~opera.engine.stop.GracefulStop` is active) the loop finishes its step, writes
    ``last.pt`` and raises :class:`~opera.engine.stop.Stopped`, and only then does submitit
    requeue. A loop that reaches no step boundary within ``grace_s`` seconds (half the signal's
    lead on the time limit by default) is requeued where it stands, as submitit would.
    """

    def __init__(self, fn: Callable[..., Any], grace_s: float = 45.0):
        self.fn = fn
        self.grace_s = grace_s

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from opera.engine.stop import Stopped

        with DeferredRequeue(getattr(self, "grace_s", 45.0)) as deferred:
            try:
                return self.fn(*args, **kwargs)
            except Stopped as stop:
                if deferred.signum is None:  # a plain SIGINT/SIGTERM stop: not a preemption
                    raise
                print(f"stopped at step {stop.step} with last.pt written; requeueing the job", file=sys.stderr,
                      flush=True)
                deferred.requeue_now()  # task 0: requeue and SystemExit; UncompletedJobError if not requeueable
                deferred.wait_for_requeue()  # other tasks: task 0's requeue ends them
                raise
            except BaseException:
                if deferred.requeued:  # the job is requeued: whatever the exit unwound into is not a failure
                    raise SystemExit(-1) from None
                raise

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Requeueable({getattr(self.fn, '__qualname__', self.fn)!r})"


class DeferredRequeue:
    """Hold submitit's USR2 handler back until the running loop has checkpointed (see
    :class:`Requeueable`). Outside submitit (USR2 not handled by a Python function) it does nothing.
    """

    SIGNAL = getattr(signal, "SIGUSR2", None)
    WAIT_S = 600.0  # how long a task other than 0 waits for task 0's requeue to end it

    def __init__(self, grace_s: float = 45.0):
        self.grace_s = grace_s
        self.signum: int | None = None  # the signal deferred to the loop
        self.requeued = False  # submitit's handler requeued the job (and is exiting)
        self._handler: Callable[..., Any] | None = None
        self._timer: threading.Timer | None = None
        self._called = False

    def __enter__(self) -> DeferredRequeue:
        if self.SIGNAL is None or threading.current_thread() is not threading.main_thread():
            return self
        current = signal.getsignal(self.SIGNAL)
        if callable(current):
            self._handler = current
            signal.signal(self.SIGNAL, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._handler is not None:
            signal.signal(self.SIGNAL, self._handler)
            self._handler = None

    def _handle(self, signum: int, frame: Any) -> None:
        from opera.engine.stop import GracefulStop

        stop = GracefulStop.active()
        if self.signum is None and stop is not None:
            self.signum = signum
            stop.request(signum)
            print(f"{signal.Signals(signum).name} (preemption or time limit): finishing the current step and writing "
                  f"last.pt, then requeueing (at once if that takes over {self.grace_s:.0f}s)", file=sys.stderr,
                  flush=True)
            self._timer = threading.Timer(self.grace_s, signal.pthread_kill, (threading.main_thread().ident, signum))
            self._timer.daemon = True
            self._timer.start()
            return
        if self.signum is not None and not self._called:
            print(f"{signal.Signals(signum).name} again, or no step boundary within {self.grace_s:.0f}s: requeueing at "
                  "once (the run resumes from its previous checkpoint)", file=sys.stderr, flush=True)
        self._call(signum, frame)

    def _call(self, signum: int, frame: Any) -> None:
        if self._called:  # the grace timer's signal and the loop's own stop may both arrive
            return
        self._called = True
        try:
            self._handler(signum, frame)  # submitit: task 0 requeues and exits; the other tasks return
        except SystemExit:
            self.requeued = True
            raise

    def requeue_now(self) -> None:
        """The loop has written ``last.pt``: let submitit requeue (task 0 does not return from it)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._handler is not None and self.signum is not None:
            self._call(self.signum, None)

    def wait_for_requeue(self, timeout_s: float | None = None) -> None:
        """Tasks other than 0: the requeue of the job by task 0 stops this process; wait for it
        (bounded, in case task 0 could not requeue) instead of ending with a result of our own."""
        if self._handler is None:
            return
        deadline = time.monotonic() + (self.WAIT_S if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def make_executor(options: SlurmOptions, folder: str | Path | None = None):
    """A ``submitit.AutoExecutor`` for SLURM with ``options``; OperaError when SLURM is absent."""
    import submitit

    folder = Path(folder or options.log_dir or DEFAULT_FOLDER)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=options.max_num_timeout)
    except RuntimeError as e:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise OperaError(f"cannot submit to SLURM: no srun/sbatch on this machine ({e}); "
                         "run on a SLURM login node or use the local launcher") from e
    executor.update_parameters(**options.executor_parameters())
    return executor


def submit(fn: Callable[..., Any], *args: Any, options: SlurmOptions | None = None,
           folder: str | Path | None = None, **kwargs: Any):
    """Submit ``fn(*args, **kwargs)`` as one SLURM job of ``nodes x tasks_per_node`` tasks.

    Returns the ``submitit.Job``. ``folder`` (default ``options.log_dir``, else ``runs/slurm/%j``)
    holds the logs and pickles; ``%j`` is replaced by the job id.
    """
    options = options or SlurmOptions()
    executor = make_executor(options, folder)
    with _sbatch_errors(options):
        return executor.submit(Requeueable(fn, grace_s=options.signal_delay_s / 2), *args, **kwargs)


def submit_array(fn: Callable[..., Any], list_of_args: Sequence[tuple | list], options: SlurmOptions | None = None,
                 folder: str | Path | None = None) -> list:
    """Submit ``fn(*args)`` for every ``args`` of ``list_of_args`` as one SLURM job array (at most
    ``options.array_parallelism`` running at once); return the jobs in the same order."""
    options = options or SlurmOptions()
    calls = [tuple(a) for a in list_of_args]
    if not calls:
        return []
    executor = make_executor(options, folder)
    wrapped = Requeueable(fn, grace_s=options.signal_delay_s / 2)
    jobs = []
    with _sbatch_errors(options):
        with executor.batch():
            for call in calls:
                jobs.append(executor.submit(wrapped, *call))
    return jobs


@contextlib.contextmanager
def _sbatch_errors(options: SlurmOptions):
    """Turn sbatch's refusal into a one-line OperaError (and keep submitit from printing it too)."""
    import submitit

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except submitit.core.utils.FailedJobError as e:
        reason = sbatch_reason(str(e) or captured.getvalue())
        raise OperaError(f"SLURM refused the job: {reason} (asked for {_asked(options)}; "
                         "compare with `sinfo -o '%P %D %c %m %G'`)") from e
    else:
        if captured.getvalue():
            sys.stderr.write(captured.getvalue())


def sbatch_reason(stderr: str) -> str:
    """sbatch's one-line reason from its stderr ("sbatch: error: Batch job submission failed: X" -> "X")."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["sbatch failed without a message"]
    reason = errors[-1]
    for prefix in ("sbatch: error:", "Batch job submission failed:"):
        if reason.startswith(prefix):
            reason = reason[len(prefix):].strip()
    return reason


def _asked(o: SlurmOptions) -> str:
    parts = [f"nodes={o.nodes}", f"tasks_per_node={o.ntasks_per_node}"]
    if o.gpus_per_node:
        parts.append(f"gpus_per_node={o.gpus_per_node}")
    for key in ("cpus_per_task", "mem_gb", "partition", "account", "qos", "constraint"):
        value = getattr(o, key)
        if value is not None:
            parts.append(f"{key}={value}")
    parts.append(f"timeout_min={o.timeout_min}")
    return ", ".join(parts)


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    stdout: Path
    stderr: Path

    def __str__(self) -> str:
        return f"SLURM job {self.job_id}: stdout {self.stdout}, stderr {self.stderr}"


def describe(job) -> JobInfo:
    """The job id and the log files of task 0 (``str()`` of it is a one-line summary)."""
    return JobInfo(str(job.job_id), Path(job.paths.stdout), Path(job.paths.stderr))


def wait_and_tail(job, timeout: float | None = None, out: TextIO | None = None, poll_s: float = 1.0,
                  tail: bool = True) -> Any:
    """Wait for ``job`` to finish, copying new lines of its task-0 stdout/stderr to ``out``; return
    the result of task 0 (all tasks' results: ``job.results()`` afterwards).

    Raises ``TimeoutError`` (naming the job and its logs) after ``timeout`` seconds, and whatever
    ``job.result()`` raises when the job failed or was cancelled (submitit's ``FailedJobError`` /
    ``UncompletedJobError``). Requeued jobs are followed across restarts (same log files).
    """
    out = out if out is not None else sys.stdout
    info = describe(job)
    offsets = {info.stdout: 0, info.stderr: 0}
    start = time.monotonic()
    last_forced = start

    def flush() -> None:
        if not tail:
            return
        for path in offsets:
            try:
                with open(path, "rb") as fh:
                    fh.seek(offsets[path])
                    chunk = fh.read()
            except OSError:
                continue
            if chunk:
                offsets[path] += len(chunk)
                out.write(chunk.decode(errors="replace"))
                out.flush()

    while True:
        now = time.monotonic()
        # sacct is cheap here but not free: force a state check every 2 s at first, then less often.
        force = now - last_forced >= min(30.0, max(2.0, (now - start) / 4))
        if force:
            last_forced = now
        done = job.done(force_check=force)
        flush()
        if done:
            break
        if timeout is not None and now - start > timeout:
            raise TimeoutError(f"{info} did not finish within {timeout:.0f}s (state {job.state})")
        time.sleep(poll_s)
    return job.results()[0]
