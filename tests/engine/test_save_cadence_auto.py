"""``train.save_every_steps=auto``: the cadence follows from a measured write and step (writes
under 2% of the time, at most 30 minutes of steps apart); the run says it in one line; a run
killed and resumed under it ends with the uninterrupted weights; the default stays 50."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from opera.configs import load_config
from opera.engine.checkpoint import AUTO_SAVE_MAX_LOST_S, AUTO_SAVE_SHARE, auto_save_every, load_state, read_backbone_file
from opera.errors import OperaError
from tests.engine.test_resume import ARGS, env, kill_midway


def test_the_cadence_keeps_writes_under_the_share_and_the_loss_under_the_cap():
    # a ResNet-50 last.pt (1.6 s) at 0.4 s a step: 200 steps, 2.0% of the time
    assert auto_save_every(1.6, 0.4) == 200
    for write_s, step_s in [(1.6, 0.4), (0.05, 2.3), (7.0, 0.11), (0.3, 1e-3)]:
        n = auto_save_every(write_s, step_s)
        if n * step_s <= AUTO_SAVE_MAX_LOST_S and n > 1:
            assert write_s / (n * step_s) <= AUTO_SAVE_SHARE < write_s / ((n - 1) * step_s)  # the fewest steps that do
    # a slow write beside slow steps: the 30-minute cap wins over the 2%
    assert auto_save_every(60.0, 10.0) == 180 and 180 * 10.0 == AUTO_SAVE_MAX_LOST_S
    assert auto_save_every(0.0, 1.0) == 1 and auto_save_every(5.0, 4000.0) == 1  # at least every step


def test_auto_is_an_option_and_the_default_stays_fifty():
    from opera.configs.schema import PretrainConfig

    assert PretrainConfig().train.save_every_steps == 50
    assert load_config(None, ["train.save_every_steps=auto"]).train.save_every_steps == "auto"
    with pytest.raises(OperaError, match=r"train.save_every_steps='often' must be a number of steps >= 0 or auto"):
        load_config(None, ["train.save_every_steps=often"])


@pytest.mark.slow
def test_auto_cadence_is_printed_and_a_killed_run_resumes_exactly(tmp_path):
    args = [a if a != "train.save_every_steps=1" else "train.save_every_steps=auto" for a in ARGS]

    def cmd(output):
        return [sys.executable, "-m", "opera", "run", "pretrain", *args, "--output", str(output)]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run = subprocess.run(cmd(clean), env=env(), timeout=600, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    said = re.search(r"checkpoint cadence: last.pt every (\d+) steps \(train.save_every_steps=auto: a write took", run.stdout)
    assert said is not None and run.stdout.count("checkpoint cadence:") == 1, run.stdout[-2000:]
    total = load_state(clean / "last.pt")["global_step"]

    stopped = kill_midway(cmd(killed), killed, total)
    done = subprocess.run(cmd(killed), env=env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"step {stopped}" in done.stdout and "checkpoint cadence:" in done.stdout  # resumed, measured again
    a, _ = read_backbone_file(clean / "backbone.safetensors")
    b, _ = read_backbone_file(killed / "backbone.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
