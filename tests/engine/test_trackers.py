"""W&B (offline) and MLflow (file store) beside TensorBoard (opera.engine.trackers, docs/trackers.md).

A pretraining run killed with SIGKILL after logging steps past its checkpoint and rerun holds one
tracker run with every step once, read back with each library's own reader: MLflow's
``MlflowClient``, and for W&B (whose offline runs no API reads) its ``.wandb`` transaction logs
parsed with wandb's own protobuf ``Record``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from opera.configs import load_config
from opera.engine.checkpoint import load_state
from opera.engine.trackers import flatten, read_ids, wandb_files, wandb_history, wandb_records
from opera.errors import OperaError

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--hierarchy", "self,full", "--data", "digits:0-3", "--epochs", "2", "--batch-size", "32", "--seed", "1",
        "--set", "train.knn_every=0", "--set", "self.mlp_dim=64", "--set", "self.dim=32", "--set", "train.log_every=1",
        "--set", "train.save_every_steps=6", "--set", "train.save_every_epochs=0"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    e.pop("WANDB_MODE", None)
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def pretrain_cmd(output: Path, loggers: str) -> list[str]:
    return [sys.executable, "-m", "opera", "run", "pretrain", *ARGS, "--set", f"train.loggers={loggers}",
            "--output", str(output)]


def logged_step(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")), default=0)


def kill_past_checkpoint(cmd: list[str], output: Path) -> tuple[int, int]:
    """Run ``cmd`` until it has logged step 8 (its checkpoint is at step 6), freeze it (SIGSTOP),
    note the last logged step and the checkpoint's, then SIGKILL it: (checkpoint step, logged step)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while logged_step(output) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    logged, ckpt = logged_step(output), load_state(output / "last.pt")["global_step"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt < logged, f"the kill came at a checkpoint (step {ckpt}): no step is replayed"
    return ckpt, logged


def resume(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def total_steps(output: Path) -> tuple[dict, int]:
    config = yaml.safe_load((output / "config.yaml").read_text())
    return config, config["resolved"]["steps_per_epoch"] * config["train"]["epochs"]


@pytest.mark.slow
def test_wandb_offline_kill_and_resume_is_one_run_with_every_step_once(tmp_path):
    out = tmp_path / "run"
    ckpt, logged = kill_past_checkpoint(pretrain_cmd(out, "wandb"), out)
    run_id = read_ids(out)["wandb"]["id"]
    stdout = resume(pretrain_cmd(out, "wandb"))
    assert f"W&B run {run_id} (continues)" in stdout
    config, total = total_steps(out)
    assert read_ids(out)["wandb"]["id"] == run_id

    files = wandb_files(out, run_id)
    assert len(files) == 2  # one offline segment per process, the same run id in both
    assert not [p for p in (out / "wandb").glob("*run-*") if not p.name.endswith(run_id) and p.is_dir()]
    for path in files:
        runs = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
        assert {r.run_id for r in runs} <= {run_id}  # the killed segment may hold nothing (see below)
    runs = [r.run for r in wandb_records(files[-1]) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_id == run_id
    # the resolved config (config.yaml) is the run's config
    seen = {u.key: json.loads(u.value_json) for r in runs for u in r.config.update}
    assert {k: v for k, v in seen.items() if not k.startswith("_")} == json.loads(json.dumps(config))

    rows = wandb_history(out, run_id)
    steps = [row["_step"] for row in rows if "loss" in row]
    assert Counter(steps) == Counter(range(1, total + 1)), "every step once"
    assert {"lr", "ema_momentum", "loss/self", "loss/full"} <= {k for row in rows for k in row}
    # W&B's service writes its offline log in blocks, so the killed process's rows may be lost
    # there: the resumed run sends the steps up to its checkpoint from metrics.jsonl, whose rows
    # (cut at the checkpoint, then the resumed run's) are the values W&B holds
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(metrics) == list(range(1, total + 1))
    held = {row["_step"]: row["loss"] for row in rows if "loss" in row}
    first = {row["_step"] for row in _history(files[0]) if "loss" in row}
    assert all(held[s] == pytest.approx(metrics[s]["loss"], rel=1e-6) for s in range(1, total + 1) if s not in first)
    assert not first or max(first) <= logged


def _history(path: Path) -> list[dict]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


@pytest.mark.slow
def test_mlflow_file_store_kill_and_resume_is_one_run_with_every_step_once(tmp_path):
    out = tmp_path / "run"
    ckpt, logged = kill_past_checkpoint(pretrain_cmd(out, "tensorboard,mlflow"), out)
    ids = read_ids(out)["mlflow"]
    stdout = resume(pretrain_cmd(out, "tensorboard,mlflow"))
    assert f"MLflow run {ids['run_id']} (continues)" in stdout
    config, total = total_steps(out)
    assert ids["tracking_uri"] == (out / "mlruns").resolve().as_uri() and read_ids(out)["mlflow"] == ids

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    experiment = client.get_experiment_by_name("opera")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["run_id"]] and runs[0].info.status == "FINISHED"
    for key in ("loss", "loss.self", "loss.full", "lr", "ema_momentum"):
        steps = [m.step for m in client.get_metric_history(ids["run_id"], key)]
        assert Counter(steps) == Counter(range(1, total + 1)), (key, steps)
    # the values of the steps before the kill are the first run's (metrics.jsonl's rows before the checkpoint)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    history = {m.step: m.value for m in client.get_metric_history(ids["run_id"], "loss")}
    assert all(history[s] == pytest.approx(rows[s]["loss"], rel=1e-6) for s in range(1, ckpt + 1))
    assert history[total] == pytest.approx(rows[total]["loss"], rel=1e-6)
    # the resolved config: every key as a param, the whole of it as the artifact config.yaml
    params = runs[0].data.params
    assert params == {k: str(v) for k, v in flatten(config).items()}
    artifact = Path(client.download_artifacts(ids["run_id"], "config.yaml", str(out / "dl")))
    assert yaml.safe_load(artifact.read_text()) == config
    assert (out / "tb").is_dir()


def test_an_unknown_logger_is_one_line_listing_the_choices():
    with pytest.raises(OperaError, match=r"unknown logger 'wandbb'.*did you mean wandb.*tensorboard, wandb, mlflow"):
        load_config(None, ["train.loggers=tensorboard,wandbb"])
    assert load_config(None, ["train.loggers= tensorboard , mlflow"]).train.loggers.replace(" ", "") == "tensorboard,mlflow"


@pytest.mark.slow
def test_a_missing_extra_is_one_line_before_training(tmp_path):
    """wandb made unimportable by a package earlier on sys.path whose import fails (what a missing
    install does): exit 2, one line naming the install command, nothing trained."""
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    out = tmp_path / "run"
    e = env()
    e["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{ROOT}"
    done = subprocess.run(pretrain_cmd(out, "tensorboard,wandb"), env=e, timeout=300, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert 'pip install -e ".[wandb]"' in lines[0] and "train.loggers" in lines[0]
    assert not out.exists() or not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_an_evaluation_logs_to_mlflow(tmp_path):
    out = tmp_path / "knn"
    cmd = [sys.executable, "-m", "opera", "run", "knn", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-3",
           "--output", str(out), "--set", "loggers=mlflow"]
    done = subprocess.run(cmd, env=env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    ids = read_ids(out)["mlflow"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=ids["tracking_uri"]).get_run(ids["run_id"])
    assert run.data.metrics["final.top1"] == pytest.approx(results["metrics"]["top1"])
    assert run.data.params["k"] == "20" and run.info.run_name == "knn"
    assert not (out / "tb").exists()  # loggers=mlflow: no TensorBoard
