"""The launch options of ``opera run ...`` (with_launch_options), dispatch, and torchrun compatibility."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from opera.errors import OperaError
from opera.launch import options as launch_options
from opera.launch.options import LaunchOptions, dispatch, dispatch_array, parse_sbatch, run_task, with_launch_options

FLAGS = ["--nproc", "--slurm", "--partition", "--nodes", "--gpus-per-node", "--tasks-per-node", "--cpus-per-task",
         "--mem-gb", "--timeout", "--account", "--qos", "--constraint", "--sbatch", "--job-name", "--wait"]


def make_app():
    app = typer.Typer()
    seen: dict = {}

    @app.command()
    @with_launch_options
    def train(name: str = typer.Option("x", "--name", help="a name"), launch: LaunchOptions = None) -> None:
        seen["name"], seen["launch"] = name, launch

    @app.command()
    def other() -> None:  # a second command, so that 'train' is a subcommand
        pass

    return app, seen, train


def test_decorator_adds_every_flag_with_help_and_passes_launch_options():
    app, seen, train = make_app()
    params = inspect.signature(train).parameters
    assert "launch" not in params and "name" in params
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in FLAGS:
        assert flag in help_text, flag
    assert all(p.default.help for n, p in params.items() if n != "name")  # help text on every option

    result = CliRunner().invoke(app, ["train", "--name", "y", "--slurm", "--nodes", "2", "--gpus-per-node", "8",
                                      "--cpus-per-task", "10", "--mem-gb", "64", "--timeout", "30", "--partition", "p",
                                      "--account", "a", "--qos", "q", "--constraint", "volta32gb",
                                      "--sbatch", "exclusive", "--sbatch", "mail-type=END", "--wait"])
    assert result.exit_code == 0, result.output
    launch = seen["launch"]
    assert seen["name"] == "y"
    assert launch == LaunchOptions(nproc=1, slurm=True, partition="p", nodes=2, gpus_per_node=8, cpus_per_task=10,
                                   mem_gb=64.0, timeout_min=30, account="a", qos="q", constraint="volta32gb",
                                   additional={"exclusive": True, "mail_type": "END"}, job_name="opera-train", wait=True)
    assert launch.ntasks_per_node == 8 and launch.world_size == 16
    params = launch.slurm_options().executor_parameters()
    assert params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["nodes"] == 2
    assert params["slurm_additional_parameters"] == {"exclusive": True, "mail_type": "END"}

    assert CliRunner().invoke(app, ["train"]).exit_code == 0
    assert seen["launch"] == LaunchOptions(job_name="opera-train")


def test_tasks_per_node_defaults():
    assert LaunchOptions(slurm=True, gpus_per_node=4).ntasks_per_node == 4  # one task per GPU
    assert LaunchOptions(slurm=True, nproc=3).ntasks_per_node == 3  # CPU-only cluster: --nproc tasks
    assert LaunchOptions(slurm=True, gpus_per_node=4, tasks_per_node=1).ntasks_per_node == 1
    assert LaunchOptions(slurm=True).ntasks_per_node == 1


@pytest.mark.parametrize("launch, match", [
    (LaunchOptions(nproc=0), "--nproc"),
    (LaunchOptions(nodes=2), r"--nodes is a SLURM option; add --slurm"),
    (LaunchOptions(gpus_per_node=8, timeout_min=5), r"--gpus-per-node, --timeout are SLURM options"),
    (LaunchOptions(additional={"exclusive": True}), "--sbatch"),
    (LaunchOptions(slurm=True, nodes=0), "nodes"),
    (LaunchOptions(slurm=True, nproc=2, gpus_per_node=8), "disagree"),
])
def test_bad_launch_options_are_one_line_errors(launch, match):
    with pytest.raises(OperaError, match=match) as err:
        launch.validate()
    assert "\n" not in str(err.value)


def test_parse_sbatch():
    assert parse_sbatch(["exclusive", "--mail-type=END", "gres=gpu:8"]) == {
        "exclusive": True, "mail_type": "END", "gres": "gpu:8"}
    for bad in ("=x", "key="):
        with pytest.raises(OperaError, match="KEY=VALUE"):
            parse_sbatch([bad])


def record(path: str, *values) -> str:
    Path(path).write_text(json.dumps([os.environ.get("RANK"), *values]))
    return "ok"


def test_dispatch_in_process(tmp_path):
    dispatch(record, (str(tmp_path / "r.json"), 1), LaunchOptions(), tmp_path)
    assert json.loads((tmp_path / "r.json").read_text()) == [None, 1]  # this process, no launcher


def test_dispatch_slurm_submits_requeueable_task_with_absolute_output(tmp_path, monkeypatch, capsys):
    calls = {}

    class FakeJob:
        job_id = "4242"

        class paths:
            stdout = tmp_path / "o/slurm/4242/4242_0_log.out"
            stderr = tmp_path / "o/slurm/4242/4242_0_log.err"

    def fake_submit(fn, *args, options=None, folder=None):
        calls.update(fn=fn, args=args, options=options)
        return FakeJob()

    monkeypatch.setattr(launch_options, "submit", fake_submit)
    monkeypatch.chdir(tmp_path)
    launch = LaunchOptions(slurm=True, nproc=2, cpus_per_task=1, timeout_min=7, job_name="t")
    dispatch(record, (Path("o"), "x"), launch, Path("o"))
    assert calls["fn"] is run_task and calls["args"][0] is record
    assert calls["args"][1:] == (tmp_path / "o", "x")  # output made absolute before submitting
    opts = calls["options"]
    assert opts.ntasks_per_node == 2 and opts.nodes == 1 and opts.timeout_min == 7 and opts.job_name == "t"
    assert opts.log_dir == str(tmp_path / "o" / "slurm" / "%j")
    out = capsys.readouterr().out
    assert "submitted SLURM job 4242" in out and "4242_0_log.out" in out and "scancel 4242" in out


def test_dispatch_array_runs_each_call_here_without_slurm(tmp_path):
    results = dispatch_array(record, [(str(tmp_path / f"{i}.json"), i) for i in range(3)], LaunchOptions())
    assert results == ["ok"] * 3
    assert [json.loads((tmp_path / f"{i}.json").read_text())[1] for i in range(3)] == [0, 1, 2]


def test_nested_launch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OperaError, match="torchrun"):
        dispatch(record, (str(tmp_path / "r.json"),), LaunchOptions(nproc=2), tmp_path)


def test_cli_rejects_slurm_flags_without_slurm(tmp_path):
    from opera.cli import app

    result = CliRunner().invoke(app, ["run", "pretrain", "--nodes", "2", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert isinstance(result.exception, OperaError) and "--slurm" in str(result.exception)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ real runs: --nproc and torchrun
TINY = ["--hierarchy", "self,full", "--data", "digits:0-1", "--epochs", "1", "--batch-size", "32", "--img-size", "16",
        "--device", "cpu", "--set", "train.knn_every=0", "--set", "self.mlp_dim=32", "--set", "self.dim=16",
        "--set", "full.hidden=16", "--set", "train.max_steps=3", "--set", "train.log_every=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _check_two_process_run(out: Path) -> None:
    assert "world_size: 2" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_cli_nproc_2(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", *TINY, "--nproc", "2", "-o", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_two_process_run(out)
    assert done.stdout.count("done") == 1


@pytest.mark.slow
def test_torchrun_module_entry(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "opera", "run", "pretrain", *TINY, "-o", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    _check_two_process_run(out)


def test_failed_job_followed_with_wait_is_one_line_exit_1(tmp_path, monkeypatch):
    import submitit

    class FakeJob:
        job_id = "77"

        class paths:
            stdout, stderr = tmp_path / "77_0_log.out", tmp_path / "77_0_log.err"

    def failing_wait(job, tail=True):
        raise submitit.core.utils.FailedJobError("Job (task=0) failed during processing with trace:\n"
                                                 "----------------------\nTraceback ...\nRuntimeError: boom\n")

    monkeypatch.setattr(launch_options, "submit", lambda fn, *a, options=None: FakeJob())
    monkeypatch.setattr(launch_options, "wait_and_tail", failing_wait)
    with pytest.raises(launch_options.SlurmJobFailed) as err:
        dispatch(record, ("x",), LaunchOptions(slurm=True, wait=True), tmp_path)
    message = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in message
    assert "SLURM job 77 did not finish: RuntimeError: boom" in message and "77_0_log.err" in message


def test_launch_options_are_slurm_options_plus_where_to_run():
    """LaunchOptions inherits every SLURM field (no second list to keep in step) and hands the
    job a plain SlurmOptions with the task count resolved."""
    from dataclasses import fields

    from opera.launch.slurm import SlurmOptions

    assert issubclass(LaunchOptions, SlurmOptions)
    own = {f.name for f in fields(LaunchOptions)} - {f.name for f in fields(SlurmOptions)}
    assert own == {"nproc", "slurm", "wait"}
    launch = LaunchOptions(slurm=True, nproc=3, partition="p", cpus_per_task=2, mem_gb=8.0, timeout_min=9,
                           account="a", qos="q", constraint="c", job_name="j", additional={"exclusive": True})
    opts = launch.slurm_options(log_dir="logs/%j")
    assert type(opts) is SlurmOptions and opts.tasks_per_node == 3 and opts.log_dir == "logs/%j"
    for name in ("partition", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos",
                 "constraint", "job_name", "additional"):
        assert getattr(opts, name) == getattr(launch, name), name
    assert opts.additional is not launch.additional
