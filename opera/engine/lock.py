"""One writer per run directory (docs/reliability.md).

:class:`RunLock`: ``OUTPUT/.opera.lock`` is created complete by a hard link (atomic, failing if it
exists, on local filesystems and NFS) and holds the owner (host, pid, process start, SLURM job id,
start time); its heartbeat is the file's modification time, which a thread touches every
``OPERA_LOCK_HEARTBEAT_S`` seconds (the file is never rewritten, so a heartbeat cannot overwrite a
takeover). A second run refuses in one line naming the holder. A lock is *stale*, and taken over
with one line saying so, when its process is gone (same host: the pid is dead or reused), when it
belongs to this very SLURM job (a requeue), or when its heartbeat is older than
``OPERA_LOCK_STALE_S`` (another host that died). Under several processes only rank 0 holds it
(:func:`own_run_dir`); the others write nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opera.files import NO_ROOM, write_failed
from opera.errors import OperaError

LOCK = ".opera.lock"


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


def _write_file(path: Path, flags: int, data: bytes) -> None:
    """Create ``path`` (``flags``) holding ``data``, fsynced; on any error no file is left (a
    file this call created is removed) and the OSError is raised."""
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


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
        Where hard links are not supported, ``O_CREAT | O_EXCL`` instead. A write that fails (a
        full disk, a read-only folder) leaves no file behind and is one line (:func:`write_failed`)."""
        tmp = self.path.with_name(f"{LOCK}.{self.me.token}.tmp")
        text = json.dumps(self.me.__dict__).encode()
        try:
            _write_file(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, text)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno in NO_ROOM or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                # no hard links here (some FUSE and object-store mounts)
            try:
                _write_file(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, text)
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            raise write_failed(self.path, exc, "the run lock", kept=f"no lock was taken and nothing in "
                               f"{self.path.parent} was changed") from None
        finally:
            with contextlib.suppress(OSError):
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


@contextlib.contextmanager
def owned_output(output: str | Path) -> Iterator[RunLock]:
    """Hold ``output``'s lock while a job writes into it; a folder made only for the lock is
    removed again if nothing was written (a run that fails on its inputs leaves no folder)."""
    output = Path(output)
    made = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OperaError(f"cannot create --output {output}: {exc.strerror or exc}; pass a writable folder") from None
    try:
        with RunLock(output) as lock:
            yield lock
    finally:
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()


__all__ = ["LOCK", "Holder", "NoLock", "RunLock", "own_run_dir", "owned_output"]
