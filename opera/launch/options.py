"""The launch options every ``opera run ...`` command shares, and where they send the work.

    @run_app.command("pretrain")
    @with_launch_options
    def pretrain(..., launch: LaunchOptions) -> None:
        ...
        dispatch(run_pretrain, (cfg, out, resume), launch, out)

:func:`with_launch_options` adds ``--nproc``, ``--slurm``, ``--partition``, ``--nodes``,
``--gpus-per-node``, ``--tasks-per-node``, ``--cpus-per-task``, ``--mem-gb``, ``--timeout``,
``--account``, ``--qos``, ``--constraint``, ``--sbatch KEY=VALUE``, ``--job-name`` and ``--wait``
to the command (Typer reads the rewritten ``__signature__``) and hands the command one
:class:`LaunchOptions` instead. :func:`dispatch` then runs ``fn(*args)``:

* in this process (``--nproc 1``, the default; also what each process of ``torchrun`` does);
* in ``--nproc N`` local processes (:func:`~opera.launch.local.launch_local`, gloo/NCCL);
* as one SLURM job of ``nodes x tasks_per_node`` tasks (``--slurm``), one task per GPU, wrapped in
  :class:`~opera.launch.slurm.Requeueable`: preempted or timed-out jobs requeue themselves and the
  training resumes from ``OUTPUT/last.pt``. It prints the job id and the log files and returns at
  once, unless ``--wait``, which follows task 0's logs until the job ends.

:func:`dispatch_array` submits one call per argument tuple as a SLURM job array (``opera ablate``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from opera.errors import OperaError
from opera.launch.slurm import SlurmOptions, describe, submit, submit_array, wait_and_tail

PANEL = "Launch (local processes or SLURM)"
DEFAULT_LOG_SUBDIR = "slurm"  # SLURM logs of a run: OUTPUT/slurm/<job id>/


class SlurmJobFailed(OperaError):
    """A job followed with ``--wait`` failed or was cancelled (its log files are in the message)."""

    exit_code = 1


@dataclass
class LaunchOptions(SlurmOptions):
    """Where a command runs. ``nproc`` processes here, or (``slurm``) a SLURM job described by the
    :class:`~opera.launch.slurm.SlurmOptions` fields it inherits (``partition``, ``nodes``,
    ``gpus_per_node`` ...; ``additional`` holds ``--sbatch KEY=VALUE``); ``wait`` follows the job
    to its end."""

    nproc: int = 1
    slurm: bool = False
    wait: bool = False

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU; ``--nproc`` tasks on a CPU-only cluster; ``--tasks-per-node`` wins."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else self.nproc

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node if self.slurm else self.nproc

    def validate(self) -> None:
        if not isinstance(self.nproc, int) or isinstance(self.nproc, bool) or self.nproc < 1:
            raise OperaError(f"--nproc {self.nproc!r} must be a positive integer (processes on this machine)")
        if self.slurm:
            if self.gpus_per_node > 0 and self.nproc > 1 and self.tasks_per_node is None and self.nproc != self.gpus_per_node:
                raise OperaError(f"--nproc {self.nproc} and --gpus-per-node {self.gpus_per_node} disagree: with --slurm "
                                 "there is one task per GPU; drop --nproc or set --tasks-per-node")
            self.slurm_options().validate()
        else:
            asked = [flag for name, flag in SLURM_ONLY.items() if getattr(self, name) != _DEFAULTS[name]]
            if asked:
                one = len(asked) == 1
                raise OperaError(f"{', '.join(asked)} {'is a SLURM option' if one else 'are SLURM options'}; add --slurm "
                                 f"to submit a job, or drop {'it' if one else 'them'} to run here")

    def slurm_options(self, log_dir: str | Path | None = None) -> SlurmOptions:
        """The inherited SLURM fields as a plain :class:`SlurmOptions`, with the task count resolved
        (``--nproc`` tasks on a CPU-only cluster) and the job's log folder."""
        values = {f.name: getattr(self, f.name) for f in fields(SlurmOptions)}
        values.update(tasks_per_node=self.ntasks_per_node, additional=dict(self.additional),
                      log_dir=str(log_dir) if log_dir is not None else self.log_dir)
        return SlurmOptions(**values)


#: options that mean nothing without --slurm (field -> flag)
SLURM_ONLY = {"partition": "--partition", "nodes": "--nodes", "gpus_per_node": "--gpus-per-node",
              "tasks_per_node": "--tasks-per-node", "cpus_per_task": "--cpus-per-task", "mem_gb": "--mem-gb",
              "timeout_min": "--timeout", "account": "--account", "qos": "--qos", "constraint": "--constraint",
              "additional": "--sbatch"}
_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
             for f in fields(LaunchOptions)}


def parse_sbatch(items: Sequence[str]) -> dict[str, Any]:
    """``["exclusive", "mail-type=END"]`` -> ``{"exclusive": True, "mail_type": "END"}`` (submitit's keys)."""
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key or (sep and not value.strip()):
            raise OperaError(f"--sbatch {item!r} is not KEY=VALUE (or a bare flag such as --sbatch exclusive)")
        extra[key] = value.strip() if sep else True
    return extra


# ----------------------------------------------------------------------------------- the decorator
def _launch_parameters(job_name: str) -> list[inspect.Parameter]:
    def opt(name: str, annotation: Any, default: Any, *decls: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *decls, help=help, rich_help_panel=PANEL))

    return [
        opt("nproc", int, 1, "--nproc", help="Processes on this machine (gloo on CPU, NCCL on GPU), like torchrun "
            "--nproc_per_node; --batch-size stays global. With --slurm on a CPU-only cluster: tasks per node."),
        opt("slurm", bool, False, "--slurm", help="Submit a SLURM job (submitit) instead of running here: one task per "
            "GPU, requeued on preemption/timeout and resumed from OUTPUT/last.pt. Prints the job id and logs and returns."),
        opt("partition", Optional[str], None, "--partition", help="SLURM partition (default: the cluster's)."),
        opt("nodes", int, 1, "--nodes", help="SLURM nodes."),
        opt("gpus_per_node", int, 0, "--gpus-per-node", help="GPUs per node, one task each (0: a CPU-only job)."),
        opt("tasks_per_node", Optional[int], None, "--tasks-per-node", help="Tasks per node (default: --gpus-per-node, "
            "or --nproc on a CPU-only cluster)."),
        opt("cpus_per_task", Optional[int], None, "--cpus-per-task", help="CPUs per task (also its torch threads)."),
        opt("mem_gb", Optional[float], None, "--mem-gb", help="Memory per node in GB (default: the cluster's)."),
        opt("timeout_min", int, 60, "--timeout", help="Time limit in minutes; the job checkpoints and requeues itself "
            "90 s before it (up to 3 times)."),
        opt("account", Optional[str], None, "--account", help="SLURM account to charge."),
        opt("qos", Optional[str], None, "--qos", help="SLURM quality of service."),
        opt("constraint", Optional[str], None, "--constraint", help="SLURM node constraint, e.g. volta32gb."),
        opt("sbatch", list[str], [], "--sbatch", help="Extra sbatch option KEY=VALUE (or a bare flag), repeatable: "
            "--sbatch exclusive --sbatch mail-type=END."),
        opt("job_name", Optional[str], None, "--job-name", help=f"SLURM job name (default: {job_name})."),
        opt("wait", bool, False, "--wait", help="With --slurm: wait for the job and print its task-0 log as it runs."),
    ]


def with_launch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the launch options to a Typer command; it receives them as ``launch: LaunchOptions``.

    The command must have a ``launch`` parameter; its other parameters are kept as they are.
    """
    signature = inspect.signature(command, eval_str=True)
    if "launch" not in signature.parameters:
        raise TypeError(f"{command.__name__} needs a 'launch: LaunchOptions' parameter to take the launch options")
    job_name = f"opera-{command.__name__.replace('_', '-')}"
    added = _launch_parameters(job_name)
    names = {p.name for p in added}
    clash = names & set(signature.parameters)
    if clash:
        raise TypeError(f"{command.__name__} already has parameters {sorted(clash)} that the launch options add")
    kept = [p for name, p in signature.parameters.items() if name != "launch"]
    positional = [p for p in kept if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in kept if p not in positional]
    new_signature = signature.replace(parameters=positional + rest + added)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        defaults = {p.name: p.default.default for p in added}
        v = {**defaults, **values}
        launch = LaunchOptions(
            nproc=v["nproc"], slurm=bool(v["slurm"]), partition=v["partition"], nodes=v["nodes"],
            gpus_per_node=v["gpus_per_node"], tasks_per_node=v["tasks_per_node"], cpus_per_task=v["cpus_per_task"],
            mem_gb=v["mem_gb"], timeout_min=v["timeout_min"], account=v["account"], qos=v["qos"],
            constraint=v["constraint"], additional=parse_sbatch(v["sbatch"] or []),
            job_name=v["job_name"] or job_name, wait=bool(v["wait"]),
        )
        launch.validate()
        return command(*args, launch=launch, **kwargs)

    wrapper.__signature__ = new_signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new_signature.parameters.values()
                               if p.annotation is not inspect.Parameter.empty}
    if new_signature.return_annotation is not inspect.Signature.empty:
        wrapper.__annotations__["return"] = new_signature.return_annotation
    return wrapper


# --------------------------------------------------------------------------------- running the work
def run_task(fn: Callable[..., Any], *args: Any) -> Any:
    """What every SLURM task runs: one line naming the task in its log, torch threads =
    ``SLURM_CPUS_PER_TASK`` (unless ``OMP_NUM_THREADS`` is set), then ``fn(*args)``."""
    env = os.environ
    rank, world = env.get("SLURM_PROCID", "0"), env.get("SLURM_NTASKS", "1")
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in env:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
    restart = env.get("SLURM_RESTART_COUNT", "0")
    print(f"opera task {rank}/{world} (job {env.get('SLURM_JOB_ID', '?')}, restart {restart}) on "
          f"{socket.gethostname()}: {getattr(fn, '__qualname__', fn)}", flush=True)
    result = fn(*args)
    print(f"opera task {rank}/{world}: finished", flush=True)
    return result


def _refuse_nested(launch: LaunchOptions) -> None:
    """Under torchrun (or in a SLURM task) every process already runs the command: do not launch again."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and (launch.nproc > 1 or launch.slurm):
        flag = "--slurm" if launch.slurm else f"--nproc {launch.nproc}"
        raise OperaError(f"{flag} was given inside a launcher that already started {world} processes (WORLD_SIZE="
                         f"{world}, e.g. torchrun); drop {flag} - each process runs the command once")


def _absolute_output(args: tuple, output: Path) -> tuple[tuple, Path]:
    """``output`` made absolute, and so every argument equal to it (the job may run elsewhere)."""
    absolute = Path(os.path.abspath(Path(output).expanduser()))
    same = {str(output), str(Path(output))}
    fixed = tuple(
        (absolute if isinstance(a, Path) else str(absolute)) if isinstance(a, (str, Path)) and str(a) in same else a
        for a in args
    )
    return fixed, absolute


def _console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def dispatch(fn: Callable[..., Any], args: tuple, launch: LaunchOptions, output: Path) -> Any:
    """Run ``fn(*args)`` where ``launch`` says (see the module docstring); return its result here
    (rank 0's with ``--nproc N``), ``None`` for a SLURM job.

    With ``--nproc N``, SIGINT / SIGTERM stop the N processes after their step
    (:func:`~opera.launch.local.launch_local`). With ``--slurm``, ``output`` (and any argument
    equal to it) is made absolute before submitting, and the job's logs go to
    ``OUTPUT/slurm/<job id>/``.
    """
    launch.validate()
    _refuse_nested(launch)
    if not launch.slurm:
        if launch.nproc == 1:
            return fn(*args)
        from opera.launch.local import launch_local

        return launch_local(fn, tuple(args), launch.nproc)[0]
    args, output = _absolute_output(tuple(args), output)
    options = launch.slurm_options(log_dir=output / DEFAULT_LOG_SUBDIR / "%j")
    job = submit(run_task, fn, *args, options=options)
    _announce([job], launch, output)
    if launch.wait:
        _follow(job)
    return None


def dispatch_array(fn: Callable[..., Any], list_of_args: Sequence[tuple], launch: LaunchOptions,
                   folder: str | Path | None = None) -> list:
    """Run ``fn(*args)`` for every ``args``: a SLURM job array with ``--slurm`` (one job per call,
    each of ``nodes x tasks_per_node`` tasks, requeueable; returns the submitit jobs in order, after
    waiting for them all with ``--wait``), else one after the other here (``--nproc`` processes
    each; returns their results, rank 0's with ``--nproc > 1``).

    ``folder`` holds the array's logs (default ``runs/slurm/<array id>``), made absolute.
    """
    launch.validate()
    _refuse_nested(launch)
    calls = [tuple(a) for a in list_of_args]
    if not launch.slurm:
        if launch.nproc == 1:
            return [fn(*call) for call in calls]
        from opera.launch.local import launch_local

        return [launch_local(fn, call, launch.nproc)[0] for call in calls]
    if not calls:
        return []
    folder = Path(os.path.abspath(Path(folder or "runs/slurm/%j").expanduser()))
    options = launch.slurm_options(log_dir=folder)
    jobs = submit_array(run_task, [(fn, *call) for call in calls], options=options)
    _announce(jobs, launch, None)
    if launch.wait:
        for job in jobs:
            _follow(job, tail=len(jobs) == 1)
    return jobs


def _announce(jobs: list, launch: LaunchOptions, output: Path | None) -> None:
    console = _console()
    first = describe(jobs[0])
    tasks = f"{launch.nodes * launch.ntasks_per_node} task{'s' if launch.world_size > 1 else ''} on " \
            f"{launch.nodes} node{'s' if launch.nodes > 1 else ''}"
    if len(jobs) == 1:
        console.print(f"[bold green]submitted[/] SLURM job {escape(first.job_id)} ({launch.job_name}, {tasks}, "
                      f"{launch.timeout_min} min)")
    else:
        array_id = first.job_id.split("_")[0]
        console.print(f"[bold green]submitted[/] SLURM job array {escape(array_id)} of {len(jobs)} jobs "
                      f"({launch.job_name}, {tasks} each, {launch.timeout_min} min)")
    console.print(f"  log (task 0): {escape(str(first.stdout))}")
    console.print(f"  errors:       {escape(str(first.stderr))}")
    if output is not None:
        console.print(f"  output:       {escape(str(output))} (a requeued job resumes from its last.pt)")
    job_ref = first.job_id.split("_")[0]
    if not launch.wait:
        console.print(f"  follow: tail -f {escape(str(first.stdout))}   status: squeue -j {job_ref}   "
                      f"cancel: scancel {job_ref}")


def _follow(job, tail: bool = True) -> Any:
    """Wait for ``job``, printing task 0's log; a failed job is one line naming its logs."""
    import submitit

    info = describe(job)
    try:
        return wait_and_tail(job, tail=tail)
    except KeyboardInterrupt:
        _console().print(f"stopped following; SLURM job {escape(info.job_id)} keeps running "
                         f"(scancel {escape(info.job_id)} to stop it)")
        raise typer.Exit(130) from None
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise SlurmJobFailed(f"SLURM job {info.job_id} did not finish: {last[:300]} (logs: {info.stdout}, "
                             f"{info.stderr})") from None


__all__ = ["LaunchOptions", "SlurmJobFailed", "dispatch", "dispatch_array", "parse_sbatch", "run_task",
           "with_launch_options"]
