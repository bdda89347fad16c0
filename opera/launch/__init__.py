"""Launchers: several processes on this machine (``launch_local``) or jobs on SLURM (``submit``).

``opera.launch.options`` holds the launch options shared by the ``opera run ...`` commands and
``dispatch``/``dispatch_array``. Names are imported on first use, so that the CLI (which imports
``opera.launch.options`` at startup) does not pay for importing torch before it needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LocalLaunchError": "local", "launch_local": "local",
    "JobInfo": "slurm", "Requeueable": "slurm", "SlurmOptions": "slurm", "describe": "slurm",
    "sbatch_reason": "slurm", "submit": "slurm", "submit_array": "slurm", "wait_and_tail": "slurm",
    "LaunchOptions": "options", "dispatch": "options", "dispatch_array": "options", "with_launch_options": "options",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"opera.launch.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'opera.launch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = sorted(_WHERE)
