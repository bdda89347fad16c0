"""The one checkpoint writer and reader of opera.

* Every file is written atomically: to a temporary file in the same folder, flushed and fsynced,
  then renamed over the target - a run killed mid-write leaves the previous checkpoint intact.
  ``last.pt`` is also rotated: the one it replaces stays beside it as ``last.prev.pt`` (a hard
  link, so no copy), so even a filesystem that loses the new file's data keeps one intact state.
* Checkpoints are written by :func:`opera.files.atomic_write`: a full disk or quota (``ENOSPC``,
  ``EDQUOT``, ``EFBIG``) while writing is one line naming the file and the bytes it needs, every
  other write error is one line too; the temporary file is removed and the previous file is
  untouched.
* Training states (``last.pt``, ``epoch_NNNN.pt``) hold only tensors and plain Python values and
  are loaded with ``torch.load(weights_only=True)``: no pickled code ever runs.
* The backbone alone goes to ``backbone.safetensors`` with its build spec in the metadata, so it
  loads into ``timm.create_model(timm_name, **timm_kwargs)`` without opera.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from safetensors import safe_open
from torch import nn

from opera.errors import OperaError
from opera.files import (  # noqa: F401  (the writer's names, also read from here)
    NO_ROOM,
    PARTIAL,
    DiskFull,
    WriteFailed,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    link_or_copy,
    remove_partial_writes,
    write_failed,
)

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


def save_state(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Atomically save a training state (tensors and plain values only); ``last.pt`` rotates.

    ``keep_previous=False``: ``last.prev.pt`` (the ``last.pt`` replaced) is removed once the new
    ``last.pt`` reads back (:func:`load_state`, tensors mapped); while it does not, it stays."""
    path = Path(path)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file: the OSError of a failed write reaches us (ENOSPC, ...)
            torch.save(state, f)

    atomic_write(path, write, need=_nbytes(state) + (1 << 16), keep_previous=PREV if path.name == LAST else None,
                 what="the training state",
                 then="rerun the same command to resume")
    if path.name == LAST and not keep_previous:
        _drop_previous(path)
    return path


def _drop_previous(path: Path) -> None:
    """Remove ``last.prev.pt`` beside ``path`` once ``path`` reads back; say so in one line when it does not."""
    try:
        load_state(path, mmap=True)
    except OperaError as exc:
        print(f"{path} did not read back ({getattr(exc, 'reason', exc)}); keeping {PREV} beside it", flush=True)
        return
    previous = path.with_name(PREV)
    if previous.exists():
        previous.unlink()


# --------------------------------------------------------------------------- epoch checkpoints kept
#: ``train.keep_epoch_checkpoints``: a count (the newest N; -1: all) or the epochs to keep
KeepEpochs = int | tuple[int, ...]
EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")


#: ``train.save_every_steps=auto``: checkpointing may take this share of the training time ...
AUTO_SAVE_SHARE = 0.02
#: ... and no more than this many seconds of steps are ever lost to a crash (the cap wins)
AUTO_SAVE_MAX_LOST_S = 1800.0


def auto_save_every(write_s: float, step_s: float, share: float = AUTO_SAVE_SHARE,
                    max_lost_s: float = AUTO_SAVE_MAX_LOST_S) -> int:
    """``train.save_every_steps=auto``'s cadence from one measured ``last.pt`` write (``write_s``)
    and the measured time of a step (``step_s``): the fewest steps between writes that keep the
    writes under ``share`` of the time, ``ceil(write_s / (share * step_s))``, but at most
    ``floor(max_lost_s / step_s)`` steps (the work a crash can lose), and at least 1."""
    if step_s <= 0:
        return 1
    need = math.ceil(max(write_s, 0.0) / (share * step_s))
    cap = math.floor(max_lost_s / step_s)
    return max(1, min(need, cap))


def auto_save_line(every: int, write_s: float, step_s: float) -> str:
    """The line a run prints once ``auto`` has chosen its cadence."""
    share = write_s / (every * step_s) if step_s > 0 else 0.0
    apart = every * step_s
    lost = f"{apart / 60:.1f} min" if apart >= 120 else f"{apart:.1f} s"
    return (f"checkpoint cadence: last.pt every {every} steps (train.save_every_steps=auto: a write took {write_s:.2f} s, "
            f"a step {step_s:.3f} s, so writes take {100 * share:.1f}% of the time, aimed at <= {100 * AUTO_SAVE_SHARE:.0f}%; "
            f"at most {lost} of steps lost, capped at {AUTO_SAVE_MAX_LOST_S / 60:.0f} min)")


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def keeps_epoch(keep: KeepEpochs, epoch: int) -> bool:
    """Whether ``keep`` ever keeps ``epoch``'s checkpoint (so whether it is worth writing)."""
    if isinstance(keep, int):
        return keep != 0
    return epoch in keep


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """The ``epoch_NNNN.pt`` files of ``folder`` by epoch."""
    out = {}
    for path in folder.iterdir():
        m = EPOCH_FILE.match(path.name)
        if m and path.is_file():
            out[int(m.group(1))] = path
    return out


def write_epoch_checkpoint(folder: Path, epoch: int, keep: KeepEpochs) -> list[str]:
    """``epoch_NNNN.pt`` of ``epoch``: a hard link to the ``last.pt`` just written (a copy where
    links fail), then the older epoch files that ``keep`` does not keep removed; the names removed.

    Files of later epochs than ``epoch`` (left by another run in this folder) are never removed."""
    link_or_copy(folder / LAST, folder / epoch_file(epoch), what="an epoch checkpoint",
                 then="rerun the same command to resume")
    older = sorted(e for e in epoch_checkpoints(folder) if e < epoch)
    if isinstance(keep, int):
        drop = [] if keep < 0 else older[: max(len(older) - (keep - 1), 0)]
    else:
        drop = [e for e in older if e not in keep]
    for e in drop:
        (folder / epoch_file(e)).unlink(missing_ok=True)
    return [epoch_file(e) for e in drop]


def kept_epoch_count(keep: KeepEpochs, epochs: int, save_every_epochs: int) -> int:
    """How many ``epoch_NNNN.pt`` files a run of ``epochs`` keeps at most."""
    if not save_every_epochs:
        return 0
    written = epochs // save_every_epochs
    if isinstance(keep, int):
        return written if keep < 0 else min(keep, written)
    return len([e for e in keep if e <= epochs and e % save_every_epochs == 0])


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """About the bytes of a training state of ``model`` and ``optimizer`` before its first step:
    the model's tensors, plus the optimizer's per-parameter slots (two with Adam's betas, one with
    momentum, as torch's and opera's optimizers keep them)."""
    total = _nbytes(model.state_dict())
    for group in optimizer.param_groups if optimizer is not None else ():
        slots = 2 if "betas" in group else int(bool(group.get("momentum", 0)))
        total += slots * sum(p.numel() * p.element_size() for p in group["params"])
    return total


def disk_use(one: int, epochs: int, save_every_epochs: int, keep: KeepEpochs, keep_previous: bool) -> tuple[int, int]:
    """(at rest, while writing) bytes of a run's checkpoints, each ``one`` bytes: ``last.pt``, the
    epoch files kept (:func:`kept_epoch_count`; none beside it when they are links to it, counted
    as copies here) and ``last.prev.pt`` when kept; while a ``last.pt`` is written, one more (the
    new file, or the old one held as ``last.prev.pt`` until the new one reads back)."""
    files = 1 + kept_epoch_count(keep, epochs, save_every_epochs) + int(keep_previous)
    return files * one, (files + 1) * one


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
                f"it holds pickled code ({code}), not only tensors") from None
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
