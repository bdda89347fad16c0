"""Every file opera writes, written atomically, and every write error in one line.

* :func:`atomic_write` writes to a temporary file in the same folder (``.NAME.XXXXXXXX.tmp``),
  fsyncs it and renames it over the target, so a process killed mid-write leaves the previous file
  intact; ``keep_previous`` keeps the file it replaces beside it (``last.prev.pt``, a hard link).
  :func:`atomic_write_text` and :func:`atomic_write_bytes` are the common cases.
* A failed write (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EACCES``, ``EROFS``, ...) removes the
  temporary file, leaves the previous file untouched and raises :class:`WriteFailed`
  (:class:`DiskFull` when there was no room) with one line naming the file, what it holds, what is
  left and the fix (:func:`write_failed`); the append-only logs and the run lock, which write
  themselves, raise the same line.
* :func:`link_or_copy` gives a file a second name (an epoch checkpoint of the ``last.pt`` just
  written): a hard link, or an atomic copy where the filesystem refuses links.
* :func:`remove_partial_writes`: the owner of a folder removes the temporary files of writers
  killed mid-write there (only these names, :data:`PARTIAL`).

A module of its own, below every subpackage: the data (``labelled.txt``, the photos of
``opera data make-folder``), the engine and the evaluations all write through it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from opera.errors import OperaError


class WriteFailed(OperaError):
    """A file could not be written (no room, no permission, a read-only filesystem, ...); the
    previous file is untouched and no temporary file is left."""


class DiskFull(WriteFailed):
    """No room (disk full, quota, file size limit) to write a file; nothing was replaced."""


#: errnos that mean "no room": the disk, the quota, the file-size limit (``ulimit -f``)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _cause(exc: BaseException | None, kind: type, errnos: tuple[int, ...] = ()) -> BaseException | None:
    """The ``kind`` exception (with one of ``errnos``, if given) behind ``exc``: torch wraps what a
    Python file's write raised (ENOSPC, or a KeyboardInterrupt or SystemExit from a signal handler)
    in a RuntimeError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind) and (not errnos or getattr(exc, "errno", None) in errnos):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _fix(exc: OSError, folder: Path) -> str:
    """What the user can do about ``exc``."""
    code = exc.errno
    if code == errno.EFBIG:
        return "raise the file-size limit (ulimit -f) or write to a filesystem that allows larger files"
    if code == errno.EDQUOT:
        return "free space or raise the quota"
    if code == errno.ENOSPC:
        return "free space on that filesystem"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {folder} writable for this user or choose another --output"
    if code == errno.EROFS:
        return f"remount {folder}'s filesystem read-write or choose another --output"
    return "check that filesystem (the kernel log may say more)"


def write_failed(path: str | Path, exc: OSError, what: str, need: int | None = None, kept: str | None = None,
                 then: str = "rerun the same command") -> WriteFailed:
    """The one-line error of a failed write of ``path`` (``what``: what it holds, "the training
    state"): the file, the system's reason, what is left, the fix. ``kept``: what is left instead of
    "the previous NAME is intact" / "no NAME was written". A :class:`DiskFull` when there was no room."""
    path = Path(path)
    reason = exc.strerror or type(exc).__name__
    if exc.errno in NO_ROOM:
        free = _free_bytes(path.parent)
        room = f"it needs about {need:,} bytes" if need else "it did not fit"
        if free is not None:
            room += f", {free:,} bytes free on that filesystem"
        reason += f" ({room})"
    if kept is None:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    kind = DiskFull if exc.errno in NO_ROOM else WriteFailed
    return kind(f"cannot write {path} ({what}): {reason}; {kept}; {_fix(exc, path.parent)}, then {then}")


def _rotate(path: Path, keep: Path) -> None:
    """Make ``keep`` the file now at ``path`` (a hard link; a rename where links are not supported)."""
    if not path.exists():
        return
    tmp = keep.with_name(f".{keep.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)
        os.replace(tmp, keep)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.replace(path, keep)  # a moment with no `path`; the reader then falls back to `keep`


def atomic_write(path: str | Path, write: Callable[[str], None], need: int | None = None,
                 keep_previous: str | None = None, what: str | None = None,
                 then: str = "rerun the same command") -> Path:
    """Call ``write(tmp_path)``, fsync the file, then rename it over ``path`` (same filesystem).

    ``keep_previous``: a file name for the file ``path`` replaces (``last.prev.pt``). ``need``: the
    expected size, for the message when the disk is full. ``what``: what the file holds, for that
    message. A failed write (no room, no permission, a read-only filesystem, ...) leaves ``path``
    as it was, removes the temporary file and raises :class:`WriteFailed` (:class:`DiskFull` when
    there was no room) in one line; the temporary file is ``.NAME.XXXXXXXX.tmp``
    (:func:`remove_partial_writes` knows it).
    """
    path = Path(path)
    what = what or f"the file {path.name}"
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous:
            _rotate(path, path.with_name(keep_previous))
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except Exception as exc:
        if _cause(exc, KeyboardInterrupt) is not None:  # a second Ctrl-C inside torch.save's writes
            raise KeyboardInterrupt from None
        exiting = _cause(exc, SystemExit)  # sys.exit from a signal handler (submitit's requeue) inside the writes
        if exiting is not None:
            raise SystemExit(exiting.code) from None
        failed = _cause(exc, OSError)
        if failed is None or failed.errno is None or isinstance(exc, OperaError):
            raise
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise write_failed(path, failed, what, need, then=then) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def link_or_copy(source: str | Path, path: str | Path, what: str, then: str = "rerun the same command") -> str:
    """Make ``path`` the file at ``source``, atomically: a hard link (no second copy on disk), or,
    where the filesystem refuses links (none, another device, too many links), a copy written by
    :func:`atomic_write`. Returns ``"linked"`` or ``"copied"``; a failed copy is :class:`WriteFailed`."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write(path, lambda t: shutil.copyfile(source, t), need=source.stat().st_size, what=what, then=then)
        return "copied"
    try:
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return "linked"


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str, what: str, then: str = "rerun the same command") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`); one line on failure."""
    data = text.encode()
    return atomic_write_bytes(path, data, what, then=then)


def atomic_write_bytes(path: str | Path, data: bytes, what: str, then: str = "rerun the same command") -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); one line on failure."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), need=len(data), what=what, then=then)


#: the temporary files of opera's writers: atomic_write's ``.NAME.XXXXXXXX.tmp`` (mkstemp), the
#: rotation's ``.NAME.PID.tmp``, the run lock's ``.opera.lock.TOKEN.tmp`` and a takeover's
#: ``.opera.lock.stale-TOKEN``
PARTIAL = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|[0-9]+)\.tmp$|^\.opera\.lock\.(?:[0-9a-f]{32}\.tmp|stale-[0-9a-f]{32})$")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def remove_partial_writes(folder: str | Path) -> str | None:
    """Remove the temporary files of writers that died mid-write in ``folder`` (only opera's own
    temporary-file names, :data:`PARTIAL`; not recursive); the one line that says so, or None.

    Call it only while holding the folder's lock: its writers are then certainly gone."""
    folder = Path(folder)
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        if not PARTIAL.match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        removed.append(f"{entry.name} ({_size(size)})")
    if not removed:
        return None
    n = len(removed)
    files = "1 partial file left by an interrupted write" if n == 1 else f"{n} partial files left by interrupted writes"
    return f"removed {files}: {', '.join(removed)}"


__all__ = ["DiskFull", "NO_ROOM", "PARTIAL", "WriteFailed", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "link_or_copy", "remove_partial_writes", "write_failed"]
