"""The evaluations that train (linear, finetune) own their --output like pretraining does (issue
12) and, like it, a signal stops them after the current step with ``last.pt`` written at that
step, in one line, releasing the lock; the same command resumes from it."""

from __future__ import annotations

import pytest
import re
import signal
import subprocess
import sys
import time

import torch

from opera.engine.lock import LOCK

LINEAR = ["run", "linear", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-1", "--epochs", "1"]


def test_linear_refuses_an_output_in_use(holder_process, opera_main, one_line):
    out, proc = holder_process
    code, _, err = opera_main(*LINEAR, "--output", str(out))
    line = one_line(err)
    assert code == 2 and f"in use by pid {proc.pid}" in line
    assert not (out / "results.json").exists()


def test_linear_releases_its_lock(tmp_path, opera_main):
    code, _, err = opera_main(*LINEAR, "--output", str(tmp_path / "lin"))
    assert code == 0, err
    assert (tmp_path / "lin" / "results.json").is_file() and not (tmp_path / "lin" / LOCK).exists()


@pytest.mark.slow
def test_sigterm_stops_finetune_after_its_step_with_last_pt_and_frees_the_output(tmp_path, child):
    _, env = child
    out = tmp_path / "ft"
    argv = [sys.executable, "-m", "opera", "run", "finetune", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-1",
            "--epochs", "200", "--output", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:  # an epoch done
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines[0].startswith("SIGTERM received: finishing the current step, then writing last.pt"), stderr
    assert len(lines) == 2 and "Traceback" not in stderr, stderr
    stopped = re.fullmatch(r"stopped at step (\d+); rerun the same command to resume \(SIGTERM; last.pt holds that step\)",
                           lines[1])
    assert stopped, lines[1]
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["global_step"] == int(stopped.group(1)) and saved["epoch"] < 200
    assert not (out / LOCK).exists() and not (out / "results.json").exists()
