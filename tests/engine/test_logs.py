"""What a run prints where no terminal is attached (a SLURM or nohup log): a step line every
``train.log_every`` steps, not only one line per epoch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from opera.configs import PretrainConfig

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \(epoch (\d+)/(\d+)\) loss=\S+ .*loss/self=\S+ .*loss/full=\S+ .*\[\d+s\]$")


@pytest.mark.slow
def test_pretraining_into_a_file_prints_a_step_line_within_the_first_log_every_steps(tmp_path):
    log_every = PretrainConfig().train.log_every
    log = tmp_path / "log"
    with log.open("w") as out:  # stdout is a file, as under `opera run pretrain ... > log`
        proc = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "self,full",
                               "--output", str(tmp_path / "run"), "--set", f"train.max_steps={log_every}"],
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    steps = [m for m in map(STEP_LINE.match, lines) if m]
    assert steps, f"no step line in {lines}"
    first = steps[0]
    assert int(first.group(1)) == log_every and first.group(3) == "1"  # step 10, in the first epoch
    assert not any("\x1b[" in line for line in lines)  # no progress-bar escapes off a terminal


def test_the_epoch_line_leaves_the_collapse_statistics_and_monitor_times_to_metrics_jsonl(capsys):
    """The printed epoch line keeps the losses and the kNN accuracy; the collapse monitor's
    per-representation statistics and the monitors' wall times stay in metrics.jsonl only."""
    from opera.engine.logging import ProgressDisplay

    display = ProgressDisplay(enabled=True, total_steps=4, done_steps=0)
    display.epoch_end(0, 2, 2, 4, {"loss": 1.5, "knn_top1": 97.5, "knn_s": 0.8, "rank_s": 0.1,
                                   "online/rankme/backbone": 86.1, "online/areq/self/projector": 2.0,
                                   "online/std/full/logits": 0.04, "online/linear_top1": 55.0})
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 1/2 step 2/4 loss=1.5 knn_top1=97.5 online/linear_top1=55 [")
    assert "rankme" not in line and "areq" not in line and "std/" not in line and "_s=" not in line
