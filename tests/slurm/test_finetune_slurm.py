"""``opera run finetune --slurm`` on the one-node test cluster: a job preempted mid-run requeues
itself, resumes from ``OUTPUT/last.pt`` and ends with the weights of an uninterrupted run.

The uninterrupted reference runs here (one process, one thread, like the job's one task with one
CPU). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from opera.launch import describe, wait_and_tail

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

RUN = ["--checkpoint", "random:resnet_tiny", "--data", "digits:0-3", "--recipe", "digits", "--epochs", "3",
       "--batch-size", "64", "--save-every-steps", "2", "--device", "cpu"]
TOTAL_STEPS = 27  # 576 training images: 9 steps of 64 per epoch, 3 epochs
SLURM = ["--slurm", "--nodes", "1", "--tasks-per-node", "1", "--cpus-per-task", "1", "--timeout", "30"]
TIMEOUT_S = 180


def opera(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "opera", "run", "finetune", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def saved_step(output: Path) -> int:
    try:
        return int(torch.load(output / "last.pt", weights_only=True, map_location="cpu")["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.slurm
def test_preempted_finetune_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm_accounting, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "job"
    submitted = opera([*SLURM, *RUN, "-o", str(out)], timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    found = re.search(r"submitted SLURM job (\d+)", submitted.stdout)
    assert found, submitted.stdout
    job = submitit.SlurmJob(folder=out / "slurm" / "%j", job_id=found.group(1), tasks=(0,))

    deadline = time.monotonic() + TIMEOUT_S
    while saved_step(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    before = saved_step(out)
    assert 4 <= before < TOTAL_STEPS, f"the job did not checkpoint inside the run (step {before})"
    job._interrupt()  # preemption as submitit simulates it: USR2 -> checkpoint() -> requeue
    result = wait_and_tail(job, timeout=TIMEOUT_S, tail=False)
    log = Path(str(describe(job).stdout)).read_text(errors="replace")
    err = Path(str(describe(job).stderr)).read_text(errors="replace")
    resumed = re.findall(r"resuming from (\S+) at epoch \d+, step (\d+)", log)
    # the USR2 was held back until the step ended and last.pt was written; the job resumes at that very step
    stopped = re.findall(r"stopped at step (\d+) with last.pt written; requeueing the job", err)
    assert len(stopped) == 1, err[-3000:]
    print(f"\nfinetune job {job.job_id}: preempted with last.pt at step {before}, requeued, resumed at "
          f"{resumed[0][1] if resumed else '?'}; top1 {result['metrics']['top1']:.2f}")
    assert len(resumed) == 1 and Path(resumed[0][0]) == out / "last.pt", log[-3000:]
    assert before <= int(resumed[0][1]) == int(stopped[0]) < TOTAL_STEPS
    assert f"opera task 0/1 (job {job.job_id}, restart 1)" in log
    assert result["metrics"]["steps"] == TOTAL_STEPS == saved_step(out)

    reference = opera([*RUN, "-o", str(whole)])  # the same run, never interrupted, here
    assert reference.returncode == 0, reference.stderr[-3000:]
    a = torch.load(whole / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = json.loads((whole / "results.json").read_text())["metrics"]
    assert json.loads((out / "results.json").read_text())["metrics"]["top1"] == ref["top1"]
