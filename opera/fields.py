"""Config fields that state their valid values once: :func:`option` and the checks that read it.

    @dataclass
    class OptimConfig:
        base_lr: float = option(0.6, help="lr = base_lr * global_batch / 256", min=0, min_exclusive=True)
        amp: str = option("auto", help="...", choices=("auto", "bf16", "fp16", "off"))

The field's type is its annotation; ``help``, the range (``min``/``max``, each inclusive unless
``min_exclusive``/``max_exclusive``) and ``choices`` go in its metadata, which
:func:`opera.configs.validate` reads for every config (pretraining, its task spaces, the
evaluations). A ``None`` value (for an ``X | None`` field) is never range-checked; a tuple value
is checked element by element.

A leaf module (only :mod:`opera.errors` below it), so the task spaces' ``Options`` can use it
without depending on :mod:`opera.configs`, which depends on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from opera.errors import OperaError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False, choices: tuple[Any, ...] | None = None,
           default_factory: Any = _MISSING, example: str | None = None) -> Any:
    """A dataclass field with its ``help``, valid range and choices in its metadata.

    ``example``: what to write in the fix of an error (default: derived from the range, e.g.
    ``<positive number>``)."""
    if (min is not None or max is not None) and choices is not None:
        raise TypeError("an option has a range or choices, not both")
    meta: dict[str, Any] = {"help": help}
    if min is not None:
        meta["min"], meta["min_exclusive"] = min, bool(min_exclusive)
    if max is not None:
        meta["max"], meta["max_exclusive"] = max, bool(max_exclusive)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if example is not None:
        meta["example"] = example
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def has_range(f: dataclasses.Field) -> bool:
    return "min" in f.metadata or "max" in f.metadata


def describe_range(meta: Any) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``, ``one of auto, bf16`` (what a value must be)."""
    if "choices" in meta:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"in {'(' if meta.get('min_exclusive') else '['}{lo:g}, {hi:g}{')' if meta.get('max_exclusive') else ']'}"
    if lo is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if meta.get('max_exclusive') else '<='} {hi:g}"
    return "any value of its type"


def _example(meta: Any, integer: bool) -> str:
    if "example" in meta:
        return meta["example"]
    if "choices" in meta:
        return "|".join(str(c) for c in meta["choices"])
    kind = "integer" if integer else "number"
    lo, hi = meta.get("min"), meta.get("max")
    if lo == 0 and hi is None:
        return f"<positive {kind}>" if meta.get("min_exclusive") else f"<{kind} >= 0>"
    return f"<{kind} {describe_range(meta)}>"


def in_range(value: float, meta: Any) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return False
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
        return False
    if hi is not None and (value >= hi if meta.get("max_exclusive") else value > hi):
        return False
    return True


def check_value(key: str, value: Any, f: dataclasses.Field) -> None:
    """Raise a one-line :class:`OperaError` if ``value`` is outside ``f``'s range or choices:
    ``config key optim.base_lr=-1.0 is out of range: must be > 0; set --set optim.base_lr=<positive number>``."""
    meta = f.metadata
    if value is None or not (has_range(f) or "choices" in meta):
        return
    if "choices" in meta:
        if value not in meta["choices"]:
            raise OperaError(f"config key {key} must be {describe_range(meta)}, got {value!r}; "
                             f"set --set {key}={_example(meta, False)}")
        return
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # the type check names it
        if not in_range(v, meta):
            integer = all(isinstance(x, int) for x in values)
            shown = list(value) if isinstance(value, (tuple, list)) else value
            raise OperaError(f"config key {key}={shown} is out of range: must be {describe_range(meta)}"
                             f"{' (each value)' if isinstance(value, (tuple, list)) else ''}; "
                             f"set --set {key}={_example(meta, integer)}")


__all__ = ["check_value", "describe_range", "has_range", "in_range", "option"]
