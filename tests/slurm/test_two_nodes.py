"""opera on a real two-node SLURM cluster (``node1``, ``node2``: namespaces of this machine, each with
its own slurmd, hostname, address, pids and ``/etc/hosts``; conftest.py, hosts.py), through the CLI
with the launch options of the README's 4-node commands, read from the README (:func:`readme_launch`:
2 nodes of one CPU task each instead of 4 of 8 GPUs; on CPU with gloo).

* pretraining on 2 nodes x 1 task gives the weights of ``--nproc 2`` on the same global batch;
* a preempted 2-node job requeues, resumes at the step ``last.pt`` holds and ends with those weights;
* the run lock across hosts: a run on node2 refuses while node1's holder beats, and takes a dead
  holder's lock over by its heartbeat (node1's pid means nothing on node2), then resumes its run;
* ``opera run linear`` / ``knn`` on 2 nodes give the one-process results;
* ``opera ablate ... --slurm``: the array's cells run on both nodes.

Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
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

DATA = "digits:0-3"  # 576 training images
RUN = ["--data", DATA, "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--set", "train.knn_every=0",
       "--set", "self.mlp_dim=64", "--set", "train.save_every_steps=2", "--set", "train.log_every=1",
       "--set", "train.max_steps=12"]
TOTAL_STEPS = 12  # of the 18 steps of 32 of one epoch of the 576 training images
TIMEOUT_S = 180
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_launch(command: str, nodes: int = 2) -> list[str]:
    """The launch options (from ``--slurm`` on) of the README's 4-node ``opera run <command>`` line, as
    run here: ``--nodes`` ``nodes``, one task per node for ``--gpus-per-node 8`` (on CPU), one CPU per
    task, a 30-minute limit; every other option (``--partition gpu`` ...) as the README writes it."""
    lines = [ln for ln in README.read_text().splitlines() if ln.startswith(f"opera run {command} ") and "--nodes 4" in ln]
    assert len(lines) == 1, f"README.md has {len(lines)} 4-node 'opera run {command}' lines; the tests run one"
    words = shlex.split(lines[0])
    words = words[words.index("--slurm"):]
    here = {"--nodes": ("--nodes", str(nodes)), "--gpus-per-node": ("--tasks-per-node", "1"),
            "--cpus-per-task": ("--cpus-per-task", "1"), "--timeout": ("--timeout", "30")}
    out, i = [], 0
    while i < len(words):
        if words[i] in here:
            out += here[words[i]]
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


TWO_NODES = readme_launch("pretrain")
ONE_NODE = readme_launch("pretrain", nodes=1)


def opera(args: list[str], timeout: float = TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "opera", *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def job_of(stdout: str, output: Path, tasks: int) -> submitit.SlurmJob:
    found = re.search(r"submitted SLURM job (\d+)", stdout)
    assert found, f"no job id printed:\n{stdout}"
    return submitit.SlurmJob(folder=output / "slurm" / "%j", job_id=found.group(1), tasks=tuple(range(tasks)))


def task_log(job: submitit.SlurmJob, task: int, kind: str = "out") -> str:
    info = describe(job)
    path = Path(str(info.stdout if kind == "out" else info.stderr).replace(f"{job.job_id}_0_log",
                                                                          f"{job.job_id}_{task}_log"))
    return path.read_text(errors="replace") if path.is_file() else ""


def hosts_of(log: str) -> list[str]:
    """The host of every start of the task (``opera task R/W (job J, restart K) on HOST: ...``)."""
    return re.findall(r"^opera task \d+/\d+ \(job \S+, restart \d+\) on (\S+):", log, flags=re.M)


def saved_step(output: Path) -> int:
    try:
        return int(torch.load(output / "last.pt", weights_only=True, map_location="cpu")["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def max_weight_difference(a: Path, b: Path) -> float:
    wa = torch.load(a / "last.pt", weights_only=True, map_location="cpu")["model"]
    wb = torch.load(b / "last.pt", weights_only=True, map_location="cpu")["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0 for k in wa)


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.3)


class Background:
    """``opera ARGS`` started now; :meth:`wait` returns its output folder once it has succeeded."""

    def __init__(self, args: list[str], output: Path):
        self.output = output
        self.done: subprocess.CompletedProcess | None = None
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-m", "opera", *args, "-o", str(output)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait(self) -> Path:
        if self.done is None:
            stdout, stderr = self.proc.communicate(timeout=TIMEOUT_S)
            self.done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)
        ok(self.done)
        return self.output


@pytest.fixture(scope="module")
def nproc_2(tmp_path_factory):
    """The reference: the same pretraining as 2 local processes (``--nproc 2``), never interrupted;
    it runs while the first two-node job is submitted and scheduled."""
    reference = Background(["run", "pretrain", "--nproc", "2", *RUN], tmp_path_factory.mktemp("nproc2") / "run")
    yield reference
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.communicate()


@pytest.fixture
def nproc_2_run(nproc_2) -> Path:
    out = nproc_2.wait()
    assert saved_step(out) == TOTAL_STEPS
    return out


@pytest.mark.slurm
def test_two_node_pretraining_equals_nproc_2(two_nodes, nproc_2, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    done = ok(opera(["run", "pretrain", *RUN, "-o", str(out), *TWO_NODES, "--wait"]))
    job = job_of(done.stdout, out, tasks=2)
    assert [hosts_of(task_log(job, t)) for t in (0, 1)] == [["node1"], ["node2"]]  # one task per host
    assert [r["global_step"] for r in job.results()] == [TOTAL_STEPS, TOTAL_STEPS]
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["per_rank_batch"] == 16
    diff = max_weight_difference(out, nproc_2.wait())
    print(f"\n2 nodes x 1 task (job {job.job_id}, {time.monotonic() - t0:.1f}s): max weight difference vs "
          f"--nproc 2 after {TOTAL_STEPS} steps: {diff:.3g}")
    assert diff == 0.0


@pytest.mark.slurm
def test_preempted_two_node_job_requeues_resumes_and_matches_an_uninterrupted_run(two_nodes, nproc_2_run, tmp_path):
    out = tmp_path / "run"
    job = job_of(ok(opera(["run", "pretrain", *RUN, "-o", str(out), *TWO_NODES], timeout=60)).stdout, out, tasks=2)
    wait_until(lambda: saved_step(out) >= 4, TIMEOUT_S, f"job {job.job_id} to save step 4:\n{task_log(job, 0)}")
    before = saved_step(out)
    assert before < TOTAL_STEPS, "the job ended before it could be interrupted"
    job._interrupt()  # preemption as submitit simulates it: USR2 to every task -> checkpoint -> requeue
    result = wait_and_tail(job, timeout=TIMEOUT_S, tail=False)

    log = task_log(job, 0)
    resumed = re.findall(r"resuming from (\S+) at epoch \d+, step (\d+)", log)
    stopped = re.findall(r"stopped at step (\d+) with last.pt written; requeueing the job", task_log(job, 0, "err"))
    print(f"\ntwo-node job {job.job_id}: last.pt at step {before} when preempted; stopped at step "
          f"{stopped}, requeued, resumed at step {resumed[0][1] if resumed else '?'}")
    assert len(resumed) == 1 and Path(resumed[0][0]) == out / "last.pt", log[-3000:]
    assert len(stopped) == 1 and before <= int(resumed[0][1]) == int(stopped[0]) < TOTAL_STEPS
    for task in (0, 1):  # both tasks started twice, the requeued job on both hosts again
        assert f"restart 1) on node{task + 1}" in task_log(job, task), task_log(job, task)[-2000:]
        assert sorted(hosts_of(task_log(job, task))) == [f"node{task + 1}"] * 2
    assert result["global_step"] == TOTAL_STEPS == saved_step(out)
    assert max_weight_difference(out, nproc_2_run) == 0.0


@pytest.mark.slurm
def test_run_lock_across_hosts_is_judged_by_heartbeat(two_nodes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("OPERA_LOCK_HEARTBEAT_S", "1")
    monkeypatch.setenv("OPERA_LOCK_STALE_S", "6")  # the jobs inherit both (sbatch exports the environment)
    long_run = [*RUN[:RUN.index("--epochs")], "--epochs", "20", *RUN[RUN.index("--epochs") + 2:-2]]  # no max_steps
    on_node1 = [*ONE_NODE, "--sbatch", "nodelist=node1"]
    on_node2 = [*ONE_NODE, "--sbatch", "nodelist=node2"]
    holder = job_of(ok(opera(["run", "pretrain", *long_run, "-o", str(out), *on_node1], timeout=60)).stdout, out, 1)
    wait_until(lambda: saved_step(out) >= 2, TIMEOUT_S, f"job {holder.job_id} on node1 to save step 2")
    lock = json.loads((out / ".opera.lock").read_text())
    assert lock["host"] == "node1" and lock["slurm_job"] == holder.job_id
    held_by = f"pid {lock['pid']} on host node1, SLURM job {holder.job_id}"

    # node1's run beats: node2 refuses, whatever node1's pid may be (or not be) on node2
    refused = opera(["run", "pretrain", *long_run, "-o", str(out), *on_node2, "--wait"])
    assert refused.returncode == 1, (refused.stdout[-2000:], refused.stderr[-2000:])
    job = job_of(refused.stdout, out, 1)
    assert hosts_of(task_log(job, 0)) == ["node2"]
    assert f"is in use by {held_by}" in task_log(job, 0, "err"), task_log(job, 0, "err")[-2000:]

    # node1 dies (SIGKILL: nothing released); once its heartbeat is stale, node2 takes over and resumes
    two_nodes.run(["scancel", "--signal=KILL", holder.job_id])
    wait_until(lambda: time.time() - (out / ".opera.lock").stat().st_mtime > 3, 60, "node1's heartbeat to stop")
    killed_at = saved_step(out)
    assert killed_at < 20 * 18
    target = killed_at + 2
    done = ok(opera(["run", "pretrain", *long_run, "--set", f"train.max_steps={target}", "-o", str(out), *on_node2,
                     "--wait"]))
    job = job_of(done.stdout, out, 1)
    log = task_log(job, 0)
    takeover = re.findall(rf"taking over the lock of {re.escape(str(out))} from {re.escape(held_by)}, started "
                          r".+?: its last heartbeat was (\d+) s ago", log)
    print(f"\nnode2 refused while node1's run beat; after node1 was killed at step {killed_at} it took the lock "
          f"over (heartbeat {takeover[0] if takeover else '?'} s old) and resumed to step {saved_step(out)}")
    assert len(takeover) == 1 and int(takeover[0]) >= 6, log[-3000:]
    assert hosts_of(log) == ["node2"] and f"step {killed_at}" in log
    assert saved_step(out) == target and not (out / ".opera.lock").exists()


@pytest.mark.slurm
def test_linear_and_knn_on_two_nodes_give_the_one_process_results(two_nodes, nproc_2_run, tmp_path):
    evals = {
        "knn": ["--checkpoint", str(nproc_2_run), "--data", DATA, "--bank-chunk", "100", "--query-chunk", "50"],
        "linear": ["--checkpoint", str(nproc_2_run), "--data", DATA, "--epochs", "1", "--batch-size", "64", "--grid",
                   "--grid-lrs", "1,10"],
    }
    jobs = {}
    for name, args in evals.items():  # both jobs at once: each takes one CPU on each node
        out = tmp_path / f"{name}-2nodes"
        jobs[name] = job_of(ok(opera(["run", name, *args, "-o", str(out), *readme_launch(name)], timeout=60)).stdout,
                            out, 2)
    for name, args in evals.items():
        ok(opera(["run", name, *args, "-o", str(tmp_path / f"{name}-1proc")]))
    for job in jobs.values():
        wait_and_tail(job, timeout=TIMEOUT_S, tail=False)
        assert [hosts_of(task_log(job, t)) for t in (0, 1)] == [["node1"], ["node2"]]
    one, two = ({name: json.loads((tmp_path / f"{name}-{n}" / "results.json").read_text())
                 for name in evals} for n in ("1proc", "2nodes"))
    k1, k2 = one["knn"]["metrics"], two["knn"]["metrics"]
    g1, g2 = one["linear"]["linear_grid"], two["linear"]["linear_grid"]
    print(f"\nknn top1 1 process {k1['top1']:.2f}, 2 nodes {k2['top1']:.2f}; linear heads (val top1) 1 process vs "
          f"2 nodes: {[(a['name'], a['val_top1'], b['val_top1']) for a, b in zip(g1['heads'], g2['heads'])]}")
    assert k2["world_size"] == 2 and k2["bank_sharded_over_ranks"] and k2["queries"] == k1["queries"]
    assert (k2["top1"], k2["top5"]) == pytest.approx((k1["top1"], k1["top5"]), abs=1e-6)
    assert two["linear"]["lr_scaling"]["world_size"] == 2 and g2["winner"] == g1["winner"]
    for a, b in zip(g1["heads"], g2["heads"], strict=True):
        assert a["name"] == b["name"] and b["val_top1"] == pytest.approx(a["val_top1"], abs=1e-6)
        assert b["holdout_top1"] == pytest.approx(a["holdout_top1"], abs=1e-6)


@pytest.mark.slurm
def test_ablate_array_cells_run_on_both_nodes(two_nodes, tmp_path):
    study = tmp_path / "study"
    done = ok(opera(["ablate", "sweep", "--set", "self.dim=16,32", "--seeds", "1", "--data", DATA, "--transfer",
                     "none", "--evals", "knn", "--set", "train.epochs=1", "--set", "train.max_steps=2",
                     "--set", "self.mlp_dim=64", "-o", str(study), *ONE_NODE, "--sbatch", "exclusive", "--wait"]))
    found = re.search(r"submitted SLURM job array (\d+) of 2 jobs", done.stdout)
    assert found, done.stdout[-3000:]
    logs = sorted((study / "slurm").glob(f"{found.group(1)}_*/*_0_log.out"))
    hosts = sorted(h for log in logs for h in hosts_of(log.read_text(errors="replace")))
    print(f"\nablate array {found.group(1)}: cells on {hosts}")
    assert hosts == ["node1", "node2"]  # one exclusive node per cell: both nodes ran one
    report = json.loads((study / "report.json").read_text())
    assert not report["pending"] and [len(row["cells"]) for row in report["rows"]] == [1, 1]


def test_the_readme_multinode_commands_are_the_ones_run_here():
    for command in ("pretrain", "linear", "knn"):
        assert readme_launch(command) == ["--slurm", "--partition", "gpu", "--nodes", "2", "--tasks-per-node", "1",
                                          "--cpus-per-task", "1", "--timeout", "30"], command


@pytest.mark.slurm
def test_the_rendezvous_host_is_the_first_that_scontrol_lists(two_nodes):
    from opera.distributed import first_host
    from tests.launch.test_slurm_hostlist import HOSTLISTS

    for nodelist in ["node[1-2]", *HOSTLISTS]:
        listed = two_nodes.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
        assert listed[0] == first_host(nodelist), nodelist
