"""The names of the loggers a run may write to (``train.loggers``, evaluations' ``loggers``).

A leaf module (only :mod:`opera.errors` below it): the config schema validates the names here,
without depending on :mod:`opera.engine`, where the trackers themselves live
(:mod:`opera.engine.trackers`).
"""

from __future__ import annotations

from opera.errors import OperaError, suggest

#: the loggers a run may name, in order
LOGGERS = ("tensorboard", "wandb", "mlflow")
#: the module each optional logger imports, and the extra that installs it
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


def parse_loggers(value: str | list[str] | tuple[str, ...], key: str = "train.loggers") -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; an unknown name is one line listing
    the choices. An empty value means no logger beside ``metrics.jsonl``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in LOGGERS:
            raise OperaError(f"config key {key} names an unknown logger {name!r}{suggest(name, list(LOGGERS))}; "
                             f"choose from {', '.join(LOGGERS)} (comma-separated, e.g. --set {key}=tensorboard,wandb)")
        if name not in out:
            out.append(name)
    return tuple(out)


__all__ = ["EXTRAS", "LOGGERS", "parse_loggers"]
