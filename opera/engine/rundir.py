"""A run directory is owned, consistent and recoverable (docs/reliability.md).

Four pieces, each used by every training entry point (``opera run pretrain``, the ablation cells
that call it, ``opera run linear`` / ``finetune``):

* :class:`RunLock` - one writer per run directory. ``OUTPUT/.opera.lock`` is created complete by a
  hard link (atomic, failing if it exists, on local filesystems and NFS) and holds the owner (host, pid,
  process start, SLURM job id, start time); its heartbeat is the file's modification time, which a
  thread touches every ``OPERA_LOCK_HEARTBEAT_S`` seconds (the file is never rewritten, so a
  heartbeat cannot overwrite a takeover). A second run refuses in one line naming the holder. A lock
  is *stale*, and taken over with one line saying so, when its process is gone (same host: the
  pid is dead or reused), when it belongs to this very SLURM job (a requeue), or when its
  heartbeat is older than ``OPERA_LOCK_STALE_S`` (another host that died).
* :func:`check_config_drift` - a resumed run must have the configuration it was started with,
  except for the keys in :data:`RESUMABLE_CHANGES` (each change said in one line).
* :func:`find_checkpoint` - the newest intact checkpoint of a directory: ``last.pt``, else the
  newest readable of ``last.prev.pt`` and ``epoch_NNNN.pt``, with one line naming what was skipped.
* :class:`GracefulStop` - SIGINT / SIGTERM finish the current step; the loop then writes
  ``last.pt`` at that step and raises :class:`Stopped`. A second signal aborts at once.
* :func:`owns_output` - the same lock for the evaluations that train (linear, finetune), which keep
  no checkpoint: a signal stops them at once with one line, and the lock is released.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from opera.engine.checkpoint import LAST, PREV, load_state
from opera.errors import OperaError

LOCK = ".opera.lock"

#: Keys that may differ between a checkpoint's configuration and the run resuming it, and why.
RESUMABLE_CHANGES: dict[str, str] = {
    "train.epochs": "the run is extended or shortened; the lr and EMA schedules now end at the new epoch count",
    "train.max_steps": "only where the run stops",
    "train.log_every": "logging cadence only",
    "train.save_every_steps": "checkpoint cadence only",
    "train.save_every_epochs": "checkpoint cadence only",
    "train.knn_every": "monitoring cadence only",
    "train.knn_k": "the kNN monitor only, not the training",
    "data.workers": "data loading speed only (augmentations depend on seed, epoch and index)",
    "train.compile": "speed only",
}


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise OperaError(f"{name}={raw!r} is not a number of seconds; set it to e.g. {default:g} or unset it") from None
    if value <= 0:
        raise OperaError(f"{name}={raw!r} must be positive; set it to e.g. {default:g} or unset it")
    return value


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5), counted after the command name


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


@dataclass
class Holder:
    """Who holds a run directory (the lock file's content)."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    pid_start: str | None = None
    slurm_job: str | None = None

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex, _process_start(os.getpid()),
                   os.environ.get("SLURM_JOB_ID"))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host}{job}, started {_when(self.started)}"

    def stale_reason(self, stale_after: float) -> str | None:
        """Why this holder is certainly gone, or None while it may be alive."""
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid, self.pid_start):
                return "that process is gone"
        elif self.slurm_job and self.slurm_job == os.environ.get("SLURM_JOB_ID"):
            return f"it is an earlier run of this SLURM job {self.slurm_job} (requeued)"
        age = time.time() - self.heartbeat
        if self.host != socket.gethostname() and age > stale_after:
            return f"its last heartbeat was {age:.0f} s ago (stale after {stale_after:.0f} s)"
        return None


def _read_holder(path: Path) -> Holder | None:
    """The lock file's owner; its ``heartbeat`` is the later of the one written at creation and the
    file's modification time (what the owner's heartbeat thread touches)."""
    try:
        with open(path) as f:
            text, mtime = f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return Holder("?", -1, 0.0, 0.0, "", None, None)
    try:
        holder = Holder(**json.loads(text))
    except (ValueError, TypeError):  # an empty or torn lock file: its writer died while creating it
        return Holder("?", -1, 0.0, 0.0, "", None, None)
    holder.heartbeat = max(float(holder.heartbeat), mtime)
    return holder


class RunLock:
    """Exclusive ownership of a run directory for as long as a run writes into it."""

    def __init__(self, output: str | Path):
        self.path = Path(output) / LOCK
        self.me = Holder.me()
        self.heartbeat_s = _env_seconds("OPERA_LOCK_HEARTBEAT_S", 30.0)
        self.stale_s = _env_seconds("OPERA_LOCK_STALE_S", max(300.0, 4 * self.heartbeat_s))
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------- acquiring
    def acquire(self) -> RunLock:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            holder = _read_holder(self.path)
            if holder is None:
                continue  # released between our create and our read: try again
            reason = "its lock file is empty or torn" if holder.pid < 0 else holder.stale_reason(self.stale_s)
            if reason is None:
                age = time.time() - holder.heartbeat
                raise OperaError(
                    f"run directory {self.path.parent} is in use by {holder.describe()} (last heartbeat {age:.0f} s ago); "
                    f"wait for it to finish or stop it, or choose another --output (if that process is certainly "
                    f"gone, delete {self.path})")
            if self._take_over(holder):
                print(f"taking over the lock of {self.path.parent} from {holder.describe()}: {reason}", flush=True)
                self._start_heartbeat()
                return self
        raise OperaError(f"could not acquire {self.path}: other processes keep taking it; choose another --output")

    def _create(self) -> bool:
        """Write our owner file in full, then hard-link it to the lock name: the link is atomic and
        fails if the name exists (the NFS-safe way), so no reader ever sees a half-written lock.
        Where hard links are not supported, ``O_CREAT | O_EXCL`` instead."""
        tmp = self.path.with_name(f"{LOCK}.{self.me.token}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.me.__dict__))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and object-store mounts)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me.__dict__))
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: Holder) -> bool:
        """Move the stale lock aside (one rename wins), check it was the one we judged, create ours."""
        aside = self.path.with_name(f"{LOCK}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read_holder(aside)
        if moved is not None and moved.token != stale.token:  # someone else took over first: give theirs back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    # ------------------------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="opera-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = _read_holder(self.path)
            if holder is not None and holder.pid < 0:  # caught mid-write (torn): judge at the next beat
                continue
            if holder is None or holder.token != self.me.token:
                self.lost_to = holder
                return
            # Touch, never rewrite: a takeover landing between the check above and this line only
            # gets its own fresh heartbeat, and this run notices it lost the lock at the next beat.
            try:
                os.utime(self.path)
            except OSError:  # vanished, or a hiccup of the filesystem: the next beat judges again
                pass

    def check_owner(self) -> None:
        """Raise if another run took the directory over (it judged this one dead)."""
        if self.lost_to is not None:
            who = self.lost_to.describe() if self.lost_to.pid >= 0 else "another process"
            raise OperaError(f"lost the lock of {self.path.parent} to {who} (it judged this run dead); stopping "
                             "without writing - raise OPERA_LOCK_STALE_S if heartbeats can be this late")

    # -------------------------------------------------------------------------------- releasing
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NoLock:
    """What ranks other than 0 hold: rank 0 owns the directory for the whole job."""

    def check_owner(self) -> None:
        return None

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def own_run_dir(output: str | Path, main: bool) -> RunLock | NoLock:
    return RunLock(output) if main else NoLock()


# ------------------------------------------------------------------------------------ config drift
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_drift(old: dict[str, Any], new: dict[str, Any], ignore_sections: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between two resolved configurations, each ``key old -> new``.

    The ``resolved`` block (derived values such as the world size) and ``ignore_sections`` (options
    of task spaces the hierarchy does not use) are not compared.
    """
    skip = {"resolved", *ignore_sections}
    a = flatten({k: v for k, v in old.items() if k not in skip})
    b = flatten({k: v for k, v in new.items() if k not in skip})
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if _norm(a.get(key)) == _norm(b.get(key)):
            continue
        show = lambda tree, key=key: repr(tree[key]) if key in tree else "(unset)"  # noqa: E731
        change = f"{key} {show(a)} -> {show(b)}"
        (allowed if key in RESUMABLE_CHANGES else refused).append(change)
    return refused, allowed


def _drop(tree: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``tree`` without the dotted ``keys``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for key in keys:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = _drop(out[head], [rest])
        else:
            out.pop(head, None)
    return out


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_config_drift(old: dict[str, Any] | None, new: dict[str, Any], source: Path,
                       ignore_sections: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> list[str]:
    """Refuse (one line, every changed key) to resume ``source`` with another configuration;
    return the allowed changes as lines to print.

    A key that ``old`` lacks (the checkpoint predates the option) is no change while the new value
    is the option's default in ``defaults`` (the behaviour the older code had).
    """
    if not old:
        return []
    if defaults:
        have, dflt = flatten(old), flatten(defaults)
        new = _drop(new, [k for k, v in flatten(new).items() if k not in have and k in dflt and _norm(dflt[k]) == _norm(v)])
    refused, allowed = config_drift(old, new, ignore_sections)
    if refused:
        raise OperaError(
            f"{source} was trained with other settings: {', '.join(refused)}; rerun with the original values, or "
            f"choose a new --output to start a new run (keys that may change on resume: {', '.join(RESUMABLE_CHANGES)})")
    return [f"resuming with {change} ({RESUMABLE_CHANGES[change.split(' ', 1)[0]]})" for change in allowed]


# ------------------------------------------------------------------------------ finding a checkpoint
def _epoch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_[0-9]*.pt"), reverse=True)


def find_checkpoint(folder: Path, rename_unreadable: bool = True) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The newest intact checkpoint of run directory ``folder``: (path, state, note).

    ``last.pt`` if it loads; otherwise the readable one of ``last.prev.pt`` and ``epoch_NNNN.pt``
    with the highest ``global_step``, and ``note`` names what was skipped and why (the unreadable
    files are renamed ``NAME.unreadable`` so that the next rotation does not keep them, unless
    ``rename_unreadable`` is false: ranks other than 0 only read). (None,
    None, None) when the directory holds no checkpoint; a one-line error when none is intact.
    """
    candidates = [p for p in (folder / LAST, folder / PREV, *_epoch_files(folder)) if p.is_file()]
    if not candidates:
        return None, None, None
    skipped: list[tuple[Path, str]] = []
    best: tuple[int, Path] | None = None
    for path in candidates:
        try:
            state = load_state(path, mmap=path.name != LAST)  # the others: only their step, tensors mapped
        except OperaError as exc:  # unreadable, or renamed aside by rank 0 meanwhile
            skipped.append((path, getattr(exc, "reason", "it vanished while being read")))
            continue
        if path.name == LAST:
            return path, state, None
        step = int(state.get("global_step", -1))
        if best is None or step > best[0]:
            best = (step, path)
        del state
    why = "; ".join(f"{p.name} ({reason})" for p, reason in skipped)
    if best is None:
        raise OperaError(f"no intact checkpoint in {folder}: {why}; pass --resume PATH to a good checkpoint, or "
                         "choose a new --output to start over")
    for path, _ in skipped if rename_unreadable else ():
        if path.is_file():
            os.replace(path, path.with_name(path.name + ".unreadable"))
    kept = f" (kept as {', '.join(p.name + '.unreadable' for p, _ in skipped)})" if rename_unreadable else ""
    note = f"skipped {why}{kept}; resuming from {best[1].name}, the newest intact checkpoint (step {best[0]})"
    return best[1], load_state(best[1]), note


# ---------------------------------------------------------------------------------------- signals
class Stopped(OperaError):
    """The run stopped on SIGINT/SIGTERM after writing ``last.pt`` at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; rerun the same command to resume "
                         f"({signal.Signals(signum).name}; last.pt holds that step)")
        self.exit_code = 128 + signum
        self.step, self.signum = step, signum

    def __reduce__(self):  # crosses process pools (ablation cells with --jobs) intact
        return Stopped, (self.step, self.signum)


class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step.

    Only signals still at their default disposition are taken (under submitit, SIGTERM stays
    submitit's; its USR2 is deferred to :meth:`request` by :class:`opera.launch.slurm.Requeueable`,
    which requeues once the loop has written ``last.pt``). A second signal aborts at once
    (``KeyboardInterrupt``); the previous handlers are restored on exit.
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
            raise KeyboardInterrupt
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


# ----------------------------------------------------------------------- evaluations that train
@contextlib.contextmanager
def _signals_stop_at_once(what: str) -> Iterator[None]:
    """SIGINT/SIGTERM (if still at their defaults) -> one line, then ``KeyboardInterrupt``."""

    def handle(signum: int, frame: Any) -> None:
        print(f"{signal.Signals(signum).name} received: stopping the {what}; it keeps no checkpoint, rerun the same "
              "command to run it again", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in GracefulStop.SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def owned_output(output: str | Path, what: str, stop_at_once: bool = True) -> Iterator[RunLock]:
    """Hold ``output``'s lock while ``what`` writes into it; a folder made only for the lock is
    removed again if nothing was written (a run that fails on its inputs leaves no folder).
    ``stop_at_once=False``: leave SIGINT/SIGTERM to the protocol (a resumable one checkpoints)."""
    output = Path(output)
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OperaError(f"cannot create --output {output}: {exc.strerror or exc}; pass a writable folder") from None
    lock = RunLock(output)
    try:
        with lock, (_signals_stop_at_once(what) if stop_at_once else contextlib.nullcontext()):
            yield lock
    finally:
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()


def owns_output(what: str, stop_at_once: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``fn(cfg, ...)`` so that it runs holding ``cfg.output`` (see :func:`owned_output`).

    Under several processes only rank 0 holds the lock (the others write nothing)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            from opera.distributed import detect_env

            if not str(getattr(cfg, "output", "") or "") or detect_env()[0] != 0:
                return fn(cfg, *args, **kwargs)  # the protocol's own one-line error for a missing --output
            with owned_output(cfg.output, what, stop_at_once):
                return fn(cfg, *args, **kwargs)

        return wrapper

    return decorate


__all__ = ["LOCK", "RESUMABLE_CHANGES", "GracefulStop", "Holder", "NoLock", "RunLock", "Stopped",
           "check_config_drift", "config_drift", "find_checkpoint", "own_run_dir", "owned_output", "owns_output"]
