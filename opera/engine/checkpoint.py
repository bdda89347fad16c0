"""The one checkpoint writer and reader of opera.

* Every file is written atomically: to a temporary file in the same folder, flushed and fsynced,
  then renamed over the target - a run killed mid-write leaves the previous checkpoint intact.
  ``last.pt`` is also rotated: the one it replaces stays beside it as ``last.prev.pt`` (a hard
  link, so no copy), so even a filesystem that loses the new file's data keeps one intact state.
* A full disk or quota (``ENOSPC``, ``EDQUOT``, ``EFBIG``) while writing is one line naming the
  file and the bytes it needs; the temporary file is removed and the previous file is untouched.
  Every other write error (``EACCES``, ``EROFS``, ...) is one line too (:func:`write_failed`),
  for every file opera writes: they all go through :func:`atomic_write`
  (:func:`atomic_write_text`, :func:`atomic_write_bytes`) or, for the append-only logs and the
  run lock, raise :func:`write_failed` themselves.
* A run that owns its folder removes the temporary files that writers killed mid-write left
  there (:func:`remove_partial_writes`).
* Training states (``last.pt``, ``epoch_NNNN.pt``) hold only tensors and plain Python values and
  are loaded with ``torch.load(weights_only=True)``: no pickled code ever runs.
* The backbone alone goes to ``backbone.safetensors`` with its build spec in the metadata, so it
  loads into ``timm.create_model(timm_name, **timm_kwargs)`` without opera.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from safetensors import safe_open
from torch import nn

from opera.errors import OperaError

LAST = "last.pt"
PREV = "last.prev.pt"  # the last.pt that the newest one replaced
BACKBONE = "backbone.safetensors"


class CheckpointUnreadable(OperaError):
    """A checkpoint that cannot be loaded; ``reason`` says why in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return CheckpointUnreadable, (str(self), self.reason)


class WriteFailed(OperaError):
    """A file could not be written (no room, no permission, a read-only filesystem, ...); the
    previous file is untouched and no temporary file is left."""


class DiskFull(WriteFailed):
    """No room (disk full, quota, file size limit) to write a file; nothing was replaced."""


#: errnos that mean "no room": the disk, the quota, the file-size limit (``ulimit -f``)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensor storages in ``obj`` (nested dicts/lists), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


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
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
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


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a training state (tensors and plain values only); ``last.pt`` rotates."""
    path = Path(path)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file: the OSError of a failed write reaches us (ENOSPC, ...)
            torch.save(state, f)

    return atomic_write(path, write, need=_nbytes(state) + (1 << 16), keep_previous=PREV if path.name == LAST else None,
                        what="the training state",
                        then="rerun the same command to resume")


def _torch_reason(exc: BaseException) -> str:
    """torch's own first sentence (its advice dropped)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0][:160]


def _unpickler_detail(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice around it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return " ".join(text.strip().split("\n\n")[0].split()).split(". ")[0][:160] or type(exc).__name__


_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})


def _globals_of_pickle(stream) -> list[str]:
    """The globals (``module.name``) that the pickle at ``stream``'s position imports, read from
    its opcodes without unpickling anything. Raises (``ValueError``, ``EOFError``, ...) where the
    bytes are not one whole pickle.

    ``GLOBAL``/``INST`` name theirs; a ``STACK_GLOBAL`` takes the two strings pushed before it
    (directly or from the memo), or is ``(a name built while loading)`` when they are not strings."""
    import pickletools
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    def named(module: str, qual: str) -> str:  # as Python 3 imports it: __builtin__.exec is builtins.exec
        module, qual = NAME_MAPPING.get((module, qual), (IMPORT_MAPPING.get(module, module), qual))
        return f"{module}.{qual}"

    found: list[str] = []
    pushed: list[Any] = []  # what each push put on the stack: the string, or None for anything else
    memo: dict[Any, Any] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(named(*str(arg).split(" ", 1)))  # "module name"
        elif name == "STACK_GLOBAL":
            module, qual = pushed[-2:] if len(pushed) >= 2 else (None, None)
            ok = isinstance(module, str) and isinstance(qual, str)
            found.append(named(module, qual) if ok else "(a name built while loading)")
        if name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(arg if name in _STRING_OPS else None)
    return found


def _pickled_globals(path: Path) -> list[str]:
    """The globals that the pickles of torch file ``path`` import, each once, in order: of
    ``data.pkl`` in a zip-format file, of the leading pickles of a legacy one; only whole pickles
    count (a truncated one names nothing). Never raises."""
    import zipfile

    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if names:
                    with z.open(names[0]) as stream:
                        found += _globals_of_pickle(stream)
        else:
            with open(path, "rb") as f:
                for _ in range(5):  # magic number, protocol, system info, the object, storage keys
                    found += _globals_of_pickle(f)
    except Exception:  # noqa: BLE001 - what could be read is all there is
        pass
    return list(dict.fromkeys(found))


def _unsafe_globals(path: Path) -> list[str]:
    """The globals of ``path``'s pickles that ``torch.load(weights_only=True)`` does not allow:
    the code that loading it in full would import and call."""
    from torch import _weights_only_unpickler as wo

    allowed: set[str] = set()
    for table in ("_get_allowed_globals", "_get_user_allowed_globals"):
        try:
            allowed |= set(getattr(wo, table)())
        except Exception:  # noqa: BLE001 - another torch: then every global counts
            pass
    return [g for g in _pickled_globals(path) if g not in allowed]


def load_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a training state with ``weights_only=True``; a bad file is a one-line error.

    A file whose pickle imports anything but tensors and plain values (a class, ``os.system``,
    ``exec``) is refused without running it, naming those globals as read from the file's own
    pickle opcodes; a truncated or corrupt one names torch's reason. ``mmap``: map the tensors
    instead of reading them (cheap, to look at a checkpoint's step; a truncated file still fails,
    its zip directory being at the end).
    """
    path = Path(path)
    if not path.is_file():
        raise OperaError(f"checkpoint {path} does not exist; pass a run directory with {LAST} or a .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # code, truncated, corrupt, empty, not a torch file
        unsafe = _unsafe_globals(path)
        if unsafe:
            code = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
            raise CheckpointUnreadable(
                f"checkpoint {path} holds pickled Python objects (code: {code}), not only tensors; opera loads "
                "checkpoints as tensors only, so it did not run that code and will not execute it - use a checkpoint "
                "written by opera or by a source you trust, or re-save only its tensors (a state dict) and pass that",
                "it holds pickled code, not only tensors") from None
        if isinstance(exc, pickle.UnpicklingError):
            detail = _unpickler_detail(exc)
            raise CheckpointUnreadable(f"cannot load checkpoint {path}: it is corrupt or not a torch file ({detail}); "
                                       "pass another checkpoint", f"corrupt: {detail}") from None
        reason = _torch_reason(exc)
        raise CheckpointUnreadable(f"cannot load checkpoint {path}: it is truncated or corrupt ({reason}); pass "
                                   "another checkpoint", f"truncated or corrupt: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointUnreadable(f"checkpoint {path} is not an opera training state; pass a file written by "
                                   "'opera run pretrain'", "not an opera training state")
    return state


def export_backbone(backbone: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone's weights to safetensors with its spec (``opera_spec``) as metadata."""
    spec = getattr(backbone, "opera_spec", None)
    meta = {"format": "opera-backbone", "spec": json.dumps(spec.to_dict() if spec else None)}
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(tensors, metadata=meta)), need=_nbytes(tensors) + (1 << 16),
                        what="the backbone's weights", then="rerun the same command to resume")


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a ``backbone.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise OperaError(f"backbone file {path} does not exist; pass a run directory or its {BACKBONE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OperaError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}; it is not a safetensors file") from None
    meta = {k: json.loads(v) if k != "format" else v for k, v in raw_meta.items()}
    return tensors, meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a file -> the file to read (``backbone.safetensors`` preferred)."""
    path = Path(path)
    if path.is_dir():
        for name in (BACKBONE, LAST):
            if (path / name).is_file():
                return path / name
        raise OperaError(f"{path} holds neither {BACKBONE} nor {LAST}; pass the --output directory of an opera run")
    if not path.exists():
        raise OperaError(f"checkpoint {path} does not exist; pass a run directory or a checkpoint file")
    return path


def load_backbone(path: str | Path, expect: str | None = None) -> nn.Module:
    """Rebuild the backbone of an opera run (directory, ``backbone.safetensors`` or ``.pt``)."""

    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        tensors, meta = read_backbone_file(file)
        spec = meta.get("spec")
    else:
        state = load_state(file)
        spec = state.get("backbone_spec")
        tensors = {k[len("backbone."):]: v for k, v in state.get("model", {}).items() if k.startswith("backbone.")}
    if not spec:
        raise OperaError(f"{file} carries no backbone spec; it was not written by opera")
    if expect is not None and spec["name"] != expect:
        raise OperaError(f"{file} holds a {spec['name']!r} backbone, not {expect!r}; pass a checkpoint of that backbone or --backbone {spec['name']}")
    kwargs = {k: v for k, v in spec["timm_kwargs"].items() if k != "num_classes"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    import timm

    backbone = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OperaError(f"{file} does not match backbone {spec['name']!r} (missing {len(missing)}, unexpected {len(unexpected)} keys); the file is damaged or from another model")
    from opera.backbones import BackboneSpec, guard_image_size

    guard_image_size(backbone, spec["name"])
    backbone.opera_spec = BackboneSpec(spec["name"], spec["timm_name"], spec["timm_kwargs"])
    return backbone
