"""``opera run pretrain --slurm`` end to end on the one-node test cluster, through the CLI.

A 2-task job trains (both ranks, one writer), a preempted job requeues itself and resumes from
``last.pt`` at the step it had saved, and an impossible request is one line with exit code 2.
Every wait is bounded.
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
import yaml

from opera.launch import describe, wait_and_tail

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

RUN = ["--data", "digits:0-3", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
       "--set", "train.knn_every=0", "--set", "self.mlp_dim=64", "--set", "train.save_every_steps=2",
       "--set", "train.log_every=1"]
TOTAL_STEPS = 36  # digits:0-3 has 576 training images: 18 steps of 32 per epoch, 2 epochs
SLURM = ["--slurm", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--timeout", "30"]
CLI_TIMEOUT_S = 150
JOB_TIMEOUT_S = 150


def opera(args: list[str], timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_of(stdout: str, output: Path) -> submitit.SlurmJob:
    found = re.search(r"submitted SLURM job (\d+)", stdout)
    assert found, f"no job id printed:\n{stdout}"
    job_id = found.group(1)
    return submitit.SlurmJob(folder=output / "slurm" / "%j", job_id=job_id, tasks=(0, 1))


def task_log(job: submitit.SlurmJob, task: int) -> str:
    path = Path(str(describe(job).stdout).replace(f"{job.job_id}_0_log", f"{job.job_id}_{task}_log"))
    return path.read_text(errors="replace") if path.is_file() else ""


def metric_steps(output: Path) -> list[int]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]  # the step rows (an epoch's monitor row shares its last step)


def saved_step(output: Path) -> int:
    try:
        return int(torch.load(output / "last.pt", weights_only=True, map_location="cpu")["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.slurm
def test_two_task_job_trains_on_both_ranks_and_rank0_writes(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    done = opera([*SLURM, "--wait", *RUN, "-o", str(out)])
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    job = job_of(done.stdout, out)
    print(f"\n2-task job {job.job_id}: submitted, trained {TOTAL_STEPS} steps and finished in {elapsed:.1f}s")
    assert f"log (task 0): {out}/slurm/{job.job_id}/{job.job_id}_0_log.out" in done.stdout
    assert "done" in done.stdout.splitlines()[-1]

    results = job.results()  # what each task's run_pretrain returned
    assert [r["global_step"] for r in results] == [TOTAL_STEPS, TOTAL_STEPS] and all(r["finished"] for r in results)
    for task in (0, 1):
        log = task_log(job, task)
        assert f"opera task {task}/2 (job {job.job_id}, restart 0)" in log and f"opera task {task}/2: finished" in log
    assert "epoch 2/2" in task_log(job, 0) and "epoch 2/2" not in task_log(job, 1)  # progress from rank 0 only

    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["per_rank_batch"] == 16
    assert metric_steps(out) == list(range(1, TOTAL_STEPS + 1))  # every step logged once: one writer
    # last.pt alone (its predecessor is removed once it reads back: retention, docs/reliability.md);
    # no epoch copies, no temp files
    assert sorted(p.name for p in out.glob("*.pt")) == ["last.pt"] and not list(out.glob(".*.tmp"))
    assert saved_step(out) == TOTAL_STEPS
    assert (out / "backbone.safetensors").is_file()


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes_from_last_checkpoint(slurm_accounting, tmp_path):
    out = tmp_path / "run"
    submitted = opera([*SLURM, *RUN, "-o", str(out)], timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "scancel" in submitted.stdout and "done" not in submitted.stdout  # returned at once
    job = job_of(submitted.stdout, out)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while saved_step(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    before = saved_step(out)
    assert 4 <= before < TOTAL_STEPS, f"the job did not checkpoint in time (step {before}); log:\n{task_log(job, 0)}"
    interrupted_at = time.monotonic()
    job._interrupt()  # preemption as submitit simulates it: SIGTERM, then USR2 -> checkpoint -> requeue

    result = wait_and_tail(job, timeout=JOB_TIMEOUT_S, tail=False)
    finished_in = time.monotonic() - interrupted_at
    log = task_log(job, 0)
    resumed = re.findall(r"resuming from (\S+) at epoch \d+, step (\d+)", log)
    assert len(resumed) == 1, log[-3000:]
    path, step = resumed[0][0], int(resumed[0][1])
    print(f"\npreempted at saved step {before}; the requeued job resumed from step {step} "
          f"and finished {finished_in:.1f}s after the interrupt")
    assert Path(path) == out / "last.pt"  # resume path == save path
    assert before <= step < TOTAL_STEPS, "the requeued job did not resume from the step it had saved"
    # both ranks finished the step the USR2 landed in; then task 0 wrote last.pt and requeued; resumed there
    err = Path(str(describe(job).stderr)).read_text(errors="replace")
    assert re.findall(r"stopped at step (\d+) with last.pt written; requeueing the job", err) == [str(step)], err[-3000:]
    assert "opera task 0/2 (job %s, restart 1)" % job.job_id in log and "opera task 1/2 (job %s, restart 1)" % job.job_id in task_log(job, 1)
    assert result["global_step"] == TOTAL_STEPS and result["finished"]
    assert saved_step(out) == TOTAL_STEPS
    assert metric_steps(out) == list(range(1, TOTAL_STEPS + 1))  # rows past the checkpoint were dropped, not doubled


@pytest.mark.slurm
def test_impossible_request_is_one_line_exit_2(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    run = [*RUN[:RUN.index("--batch-size")], "--batch-size", "198", *RUN[RUN.index("--batch-size") + 2:]]  # 99 x 2
    done = opera(["--slurm", "--nodes", "99", "--timeout", "5", *run, "-o", str(out)], timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: SLURM refused the job:") and "nodes=99" in lines[0]
    print(f"\n{lines[0]}")
    assert not slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.strip()  # nothing left pending


@pytest.mark.slurm
def test_a_batch_that_does_not_divide_over_the_tasks_is_refused_before_submitting(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    done = opera([*SLURM, *RUN, "--batch-size", "33", "-o", str(out)], timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: --batch-size 33 is not divisible by the 2 tasks of the job; it is the global batch, split "
                     "evenly over them: use a multiple of 2"], done.stderr
    assert not slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.strip()  # nothing was submitted
    assert not out.exists()


def cube(x: int) -> int:
    return x ** 3


@pytest.mark.slurm
def test_dispatch_array_submits_one_requeueable_job_per_call(slurm_cluster, tmp_path, capsys):
    from opera.launch.options import LaunchOptions, dispatch_array

    launch = LaunchOptions(slurm=True, timeout_min=5, job_name="opera-ablate", wait=True)
    jobs = dispatch_array(cube, [(2,), (3,)], launch, folder=tmp_path / "%j")
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array
    assert [j.result() for j in jobs] == [8, 27]
    out = capsys.readouterr().out
    assert f"submitted SLURM job array {jobs[0].job_id.split('_')[0]} of 2 jobs" in out
