"""``--nproc N`` runs and signals: the launcher forwards SIGINT/SIGTERM to its processes once, the
run stops at one agreed step with last.pt written, one line says so, and the exit code is
128 + the signal; a batch that does not divide over the processes is refused before any process
starts. Real processes, real signals (docs/reliability.md, "Local multi-process runs")."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from opera.engine.checkpoint import LAST, load_state
from tests.reliability.test_signals import logged_step, start

NPROC = ["--nproc", "2", "--epochs", "60"]  # 540 steps: the signal always arrives mid-run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_stops_every_process_at_one_step(tmp_path, child, sig):
    opera_argv, env = child
    out = tmp_path / "run"
    proc = start(opera_argv(out, *NPROC), env)
    deadline = time.time() + 300
    while logged_step(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and logged_step(out) >= 2, proc.communicate()

    proc.send_signal(sig)  # to the launcher only, as `kill -INT <pid>` does
    stdout, stderr = proc.communicate(timeout=300)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.count(f"{name} received") == 1, stderr  # rank 0 says it once; the other rank is quiet
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped at step ")]
    assert len(stopped) == 1, stderr
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert stopped[0] == f"stopped at step {step}; rerun the same command to resume ({name}; last.pt holds that step)"
    assert int(load_state(out / LAST)["global_step"]) == step == logged_step(out)
    assert 2 <= step < 540 and "done" not in stdout

    again = subprocess.run(opera_argv(out, *NPROC, "--set", f"train.max_steps={step + 1}"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {out / LAST} at epoch" in again.stdout and f"step {step}" in again.stdout
    assert int(load_state(out / LAST)["global_step"]) == step + 1


def test_a_batch_that_does_not_divide_over_nproc_is_refused_before_any_process(tmp_path, child, one_line):
    opera_argv, env = child
    out = tmp_path / "run"
    t0 = time.monotonic()
    done = subprocess.run(opera_argv(out, "--nproc", "2", "--batch-size", "33"), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert "--batch-size 33 is not divisible by the 2 processes of --nproc 2" in line and "multiple of 2" in line
    assert not out.exists()  # nothing started, nothing written
    assert time.monotonic() - t0 < 60
