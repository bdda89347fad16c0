"""The evaluation commands take pretraining's launch options, from the CLI as typed.

* ``opera run knn|linear --nproc 2`` (real subprocesses, gloo) writes the results of one process;
* the README's 8-GPU and 4 x 8-GPU linear-probe and fine-tuning commands and its 4 x 8-GPU kNN
  command, run as written with
  only ``submit`` replaced, submit one requeueable job of ``nodes x 8`` tasks whose protocol
  config has absolute paths and the recipe's global batch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import opera.launch.options as launch_options
from opera.cli import app
from opera.evals.finetune import FinetuneConfig
from opera.evals.knn import KNNConfig
from opera.evals.linear import LinearConfig
from opera.launch.options import run_task

ROOT = Path(__file__).resolve().parents[2]
SECTION = "### Evaluations at the paper's scale"


def opera(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "opera", "run", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("protocol,args", [
    ("knn", []),
    ("linear", ["--epochs", "2", "--batch-size", "64", "--grid", "--grid-lrs", "1,10"]),
])
@pytest.mark.slow
def test_nproc_2_from_the_cli_gives_the_results_of_one_process(trained_run, tmp_path, protocol, args):
    common = [protocol, "--checkpoint", str(trained_run), "--data", "digits:0-3", "--device", "cpu", *args]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = opera([*common, *extra, "-o", str(tmp_path / name)], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert two["evaluation"] == "offline" and two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=1e-6)
    assert two["metrics"]["top5"] == pytest.approx(one["metrics"]["top5"], abs=1e-6)
    if protocol == "linear":
        assert two["lr_scaling"]["world_size"] == 2 and two["lr_scaling"]["per_rank_batch"] == 32
        assert two["linear_grid"]["winner"] == one["linear_grid"]["winner"]
        assert two["linear_grid"]["selection_split"] == "train-held-out"
    print(f"\n{protocol}: top1 {one['metrics']['top1']:.2f} (1 process) vs {two['metrics']['top1']:.2f} (--nproc 2)")


def readme_commands() -> list[str]:
    body = (ROOT / "README.md").read_text().split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_eval_commands_submit_one_requeueable_job_per_command(tmp_path, monkeypatch):
    submitted = []

    class FakeJob:
        job_id = "77"

        class paths:
            stdout = tmp_path / "77_0_log.out"
            stderr = tmp_path / "77_0_log.err"

    def fake_submit(fn, *args, options=None, folder=None):
        submitted.append((fn, args, options))
        return FakeJob()

    monkeypatch.setattr(launch_options, "submit", fake_submit)
    monkeypatch.chdir(tmp_path)
    lines = readme_commands()
    assert len(lines) == 5
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["opera", "run"]
        result = CliRunner().invoke(app, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "submitted SLURM job 77" in result.output
    kinds = []
    for (fn, args, options), line in zip(submitted, lines):
        assert fn is run_task
        cfg = args[1]
        nodes = 4 if "--nodes 4" in line else 1
        assert options.nodes == nodes and options.ntasks_per_node == 8 and options.gpus_per_node == 8
        assert Path(cfg.output).is_absolute() and cfg.data == "/datasets/imagenet" and cfg.workers == 10
        if isinstance(cfg, LinearConfig):
            assert cfg.grid and cfg.epochs == 90 and cfg.batch_size == 1024  # C.1; lr = 0.1 x 1024 / 256 over any world
            kinds.append(("linear", nodes))
        elif isinstance(cfg, KNNConfig):
            kinds.append(("knn", nodes))
        else:
            assert isinstance(cfg, FinetuneConfig) and cfg.recipe == "finetune_100ep" and cfg.epochs == 100
            assert cfg.batch_size == 1024 and cfg.batch_size % (8 * nodes) == 0  # global batch over 8 or 32 GPUs
            kinds.append(("finetune", nodes))
    assert kinds == [("linear", 1), ("linear", 4), ("knn", 4), ("finetune", 1), ("finetune", 4)]
