"""Real SLURM jobs on the one-node test cluster, submitted through opera.launch.slurm (submitit).

The jobs run plain module-level functions of this file (the training CLI comes later). Every wait
is bounded; a requeue on this cluster takes ~12 s (AuthInfo cred_expire=10).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import submitit

from opera.errors import OperaError
from opera.launch import Requeueable, SlurmOptions, describe, sbatch_reason, submit, submit_array, wait_and_tail

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)


JOB_TIMEOUT_S = 120


# ----------------------------------------------------------------- job functions (run on the node)
def report_env() -> dict:
    from opera import distributed

    rank, world, local_rank = distributed.detect_env()
    env = distributed.init("cpu", timeout_min=1)
    try:
        import torch

        gathered = distributed.all_gather_no_grad(torch.tensor([env.rank])).tolist()
    finally:
        distributed.shutdown()
    print(f"task rank={rank} world={world}", flush=True)
    return {"rank": rank, "world": world, "local_rank": local_rank, "gathered": gathered,
            "job_id": os.environ.get("SLURM_JOB_ID")}


def _save_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: the test never reads half a file


def resumable_counter(state_file: str, total_steps: int, step_s: float) -> dict:
    """Counts to total_steps, saving after every step; resumes from the saved step (like last.pt)."""
    path = Path(state_file)
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "starts": []}
    state["starts"].append({"step": state["step"], "time": time.time(),
                            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                            "job_id": os.environ.get("SLURM_JOB_ID")})
    _save_json(path, state)
    while state["step"] < total_steps:
        time.sleep(step_s)
        state["step"] += 1
        _save_json(path, state)
    return state


def square(x: int) -> int:
    return x * x


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "not cancelled"


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------- tests without the cluster
def test_options_map_to_submitit_parameters():
    cpu = SlurmOptions(timeout_min=30).executor_parameters()
    assert cpu["tasks_per_node"] == 1 and "gpus_per_node" not in cpu and "mem_gb" not in cpu
    gpu = SlurmOptions(nodes=2, gpus_per_node=8, cpus_per_task=10, mem_gb=64, partition="learn", account="a",
                       qos="high", constraint="volta32gb", job_name="opera-r50", additional={"exclusive": True},
                       array_parallelism=4).executor_parameters()
    assert gpu == {
        "name": "opera-r50", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
        "mem_gb": 64, "timeout_min": 60, "slurm_partition": "learn", "slurm_account": "a", "slurm_qos": "high",
        "slurm_constraint": "volta32gb", "slurm_additional_parameters": {"exclusive": True},
        "slurm_array_parallelism": 4, "slurm_signal_delay_s": 90,
    }
    assert SlurmOptions(gpus_per_node=4, tasks_per_node=1).ntasks_per_node == 1


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"gpus_per_node": -1}, {"cpus_per_task": 0}, {"mem_gb": 0},
                                 {"timeout_min": 0}, {"tasks_per_node": 0}])
def test_bad_options_are_user_errors(bad):
    with pytest.raises(OperaError, match=next(iter(bad))):
        SlurmOptions(**bad).executor_parameters()


def test_sbatch_reason_is_one_line():
    err = "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    assert sbatch_reason(err) == "Requested node configuration is not available"
    assert sbatch_reason("sbatch: error: invalid partition specified: x\n") == "invalid partition specified: x"
    assert sbatch_reason("") == "sbatch failed without a message"


def test_requeueable_resubmits_the_same_call():
    wrapped = Requeueable(square)
    assert wrapped(3) == 9
    delayed = wrapped.checkpoint(3)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is wrapped and delayed.args == (3,) and delayed.result() == 9


# ------------------------------------------------------------------------ tests on the cluster
@pytest.mark.slurm
def test_cluster_is_up(slurm_cluster):
    assert slurm_cluster.node_state() == "idle"
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    assert submitit.AutoExecutor.which() == "slurm"


@pytest.mark.slurm
def test_two_tasks_get_ranks_0_1_and_world_2(slurm_cluster, tmp_path):
    opts = SlurmOptions(tasks_per_node=2, cpus_per_task=1, timeout_min=5, job_name="ranks")
    job = submit(report_env, options=opts, folder=tmp_path / "%j")
    info = describe(job)
    assert info.job_id == job.job_id and info.stdout.name.endswith("_0_log.out") and str(info).startswith("SLURM job")
    out = io.StringIO()
    first = wait_and_tail(job, timeout=JOB_TIMEOUT_S, out=out)
    results = job.results()
    assert first == results[0]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world"] for r in results} == {2}
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert all(r["gathered"] == [0, 1] for r in results)  # a real gloo group across the two tasks
    assert "task rank=0 world=2" in out.getvalue()  # tailed from task 0's log


@pytest.mark.slurm
def test_interrupted_job_is_requeued_and_resumes_from_its_state(slurm_cluster, tmp_path):
    state_file = tmp_path / "state.json"
    job = submit(resumable_counter, str(state_file), 30, 0.25, options=SlurmOptions(timeout_min=5, job_name="requeue"),
                 folder=tmp_path / "%j")

    def progressed() -> bool:
        try:
            return json.loads(state_file.read_text())["step"] >= 4
        except (OSError, ValueError):
            return False

    _wait_for(progressed, JOB_TIMEOUT_S, "the job to make progress")
    interrupted_at = time.time()
    job._interrupt()  # submitit's preemption simulation: SIGTERM then USR2 -> checkpoint -> requeue
    state = wait_and_tail(job, timeout=JOB_TIMEOUT_S, tail=False)

    assert state["step"] == 30
    starts = state["starts"]
    assert len(starts) == 2, starts
    assert starts[0]["step"] == 0 and starts[0]["restart_count"] == 0
    assert starts[1]["step"] >= 4, "the requeued job started from scratch instead of resuming"
    assert starts[1]["restart_count"] == 1 and starts[1]["job_id"] == starts[0]["job_id"] == job.job_id
    # how long the requeue took is printed, not asserted: a timing belongs in a benchmark
    print(f"\nrequeue latency: {starts[1]['time'] - interrupted_at:.1f}s")


@pytest.mark.slurm
def test_impossible_requests_fail_at_submit_with_a_clear_error(slurm_cluster, tmp_path):
    with pytest.raises(OperaError, match=r"SLURM refused the job: .*nodes=99") as too_many_nodes:
        submit(square, 1, options=SlurmOptions(nodes=99, timeout_min=1), folder=tmp_path / "%j")
    with pytest.raises(OperaError, match=r"SLURM refused the job: .*cpus_per_task=") as too_many_cpus:
        submit(square, 1, options=SlurmOptions(cpus_per_task=slurm_cluster.cpus + 1, timeout_min=1),
               folder=tmp_path / "%j")
    with pytest.raises(OperaError, match=r"SLURM refused the job: .*[Pp]artition") as bad_partition:
        submit(square, 1, options=SlurmOptions(partition="no_such_partition", timeout_min=1), folder=tmp_path / "%j")
    for err in (too_many_nodes, too_many_cpus, bad_partition):
        message = str(err.value)
        assert "\n" not in message and "sbatch: error" not in message
        print(f"\n{message}")
    assert not slurm_cluster.run(["squeue", "-h", "--name=opera"]).stdout.strip()  # nothing left pending


@pytest.mark.slurm
def test_array_runs_every_call_in_order(slurm_cluster, tmp_path):
    jobs = submit_array(square, [(x,) for x in range(3)], options=SlurmOptions(timeout_min=5, array_parallelism=2),
                        folder=tmp_path / "%j")
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array
    assert [wait_and_tail(j, timeout=JOB_TIMEOUT_S, tail=False) for j in jobs] == [0, 1, 4]


@pytest.mark.slurm
def test_cancelled_job_raises_instead_of_hanging(slurm_accounting, tmp_path):
    job = submit(sleep_for, 300, options=SlurmOptions(timeout_min=10, job_name="cancel"), folder=tmp_path / "%j")
    _wait_for(lambda: job.state == "RUNNING" or describe(job).stdout.exists(), JOB_TIMEOUT_S, "the job to start")
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        wait_and_tail(job, timeout=JOB_TIMEOUT_S, tail=False)
