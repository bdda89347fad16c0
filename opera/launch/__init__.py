"""Launchers: several processes on this machine (``launch_local``) or jobs on SLURM (``submit``)."""

from opera.launch.local import LocalLaunchError, launch_local
from opera.launch.slurm import (
    JobInfo,
    Requeueable,
    SlurmOptions,
    describe,
    sbatch_reason,
    submit,
    submit_array,
    wait_and_tail,
)

__all__ = [
    "JobInfo",
    "LocalLaunchError",
    "Requeueable",
    "SlurmOptions",
    "describe",
    "launch_local",
    "sbatch_reason",
    "submit",
    "submit_array",
    "wait_and_tail",
]
