"""The evaluations that train (linear, finetune) own their --output like pretraining does; they
keep no checkpoint, so a signal stops them at once with one line and releases the lock (issue 12)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from opera.engine.rundir import LOCK

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


def test_sigterm_stops_finetune_in_one_line_and_frees_the_output(tmp_path, child):
    _, env = child
    out = tmp_path / "ft"
    argv = [sys.executable, "-m", "opera", "run", "finetune", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-1",
            "--epochs", "200", "--output", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "tb").is_dir() and proc.poll() is None and time.time() < deadline:  # tb/: training started
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines == ["SIGTERM received: stopping the fine-tuning; it keeps no checkpoint, rerun the same command to "
                     "run it again"], stderr
    assert not (out / LOCK).exists() and not (out / "results.json").exists()
