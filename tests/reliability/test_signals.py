"""SIGTERM / SIGINT finish the current step, write last.pt at that step and exit non-zero with one
line; a second Ctrl-C aborts at once; a second run started meanwhile is refused.
Real processes, real signals."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from opera.engine.checkpoint import LAST, atomic_write, load_state, save_state

LONG = ["--epochs", "60"]  # 540 steps: the signal always arrives mid-run


def logged_step(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max((r.get("step", 0) for r in rows), default=0)


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a child whose SIGINT/SIGTERM are at their defaults, whatever this process inherited.

    A shell without job control starts background commands with SIGINT ignored; an ignored signal
    survives ``exec`` (Python then installs no Ctrl-C handler, and opera rightly leaves an ignored
    signal alone), a caught one is reset to the default. So catch both here while the child starts
    (``Popen`` returns once it has exec'd), instead of a ``preexec_fn``, which is unsafe in a
    process with threads."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def first_line(proc: subprocess.Popen) -> str:
    """The child's next non-empty stderr line; fails (instead of spinning on EOF) if it exits first."""
    while True:
        line = proc.stderr.readline()
        if line.strip():
            return line
        if not line:  # EOF: the child is gone without a word
            proc.wait(timeout=60)
            pytest.fail(f"the run exited ({proc.returncode}) before printing anything on stderr; "
                        f"stdout ends: {proc.stdout.read()[-2000:]!r}")


def wait_for_step(proc: subprocess.Popen, output: Path, step: int) -> None:
    deadline = time.time() + 300
    while logged_step(output) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert logged_step(output) >= step


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_last_pt_at_that_step(tmp_path, child):
    opera_argv, env = child
    out = tmp_path / "run"
    proc = start(opera_argv(out, *LONG), env)
    wait_for_step(proc, out, 2)
    second = subprocess.run(opera_argv(out, *LONG), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"in use by pid {proc.pid}" in second.stderr  # two runs, one directory

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1]
    step = int(last.split("stopped at step ")[1].split(";")[0])
    assert last == f"stopped at step {step}; rerun the same command to resume (SIGTERM; last.pt holds that step)"
    assert "Traceback" not in stderr
    assert int(load_state(out / LAST)["global_step"]) == step == logged_step(out)  # the step that was running finished
    assert 2 <= step < 540

    again = subprocess.run(opera_argv(out, *LONG, "--set", f"train.max_steps={step + 1}"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"step {step}" in again.stdout and "resuming from" in again.stdout
    assert int(load_state(out / LAST)["global_step"]) == step + 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_aborts_at_once_with_its_own_exit_code(tmp_path, child, sig):
    opera_argv, env = child
    out = tmp_path / "run"
    name = signal.Signals(sig).name
    proc = start(opera_argv(out, *LONG, "--batch-size", "256"), env)  # long steps: the second signal lands mid-step
    wait_for_step(proc, out, 1)  # step 2 has just begun
    proc.send_signal(sig)
    first = first_line(proc)  # the handler ran (its line): the step is still finishing
    assert f"{name} received: finishing the current step" in first
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    assert f"{name} again: aborting at once" in stderr
    assert "stopped at step" not in stderr and "Traceback" not in stderr
    assert not list(out.glob(".last.pt.*.tmp"))  # an aborted write leaves no temporary file
    if (out / LAST).exists():
        load_state(out / LAST)  # and whatever last.pt there is, is intact


def test_ctrl_c_inside_torch_save_is_an_interrupt_not_an_error(tmp_path):
    """torch wraps what a Python file's write raises in a RuntimeError; a second Ctrl-C landing
    in a checkpoint write must still abort as KeyboardInterrupt, leaving the previous file."""
    save_state({"global_step": 1}, tmp_path / LAST)

    def write(tmp: str) -> None:
        class Interrupted(io.FileIO):
            def write(self, b):  # the signal handler raising in the middle of the file's writes
                if self.tell() > 0:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the real SIGINT is handled here, by Python's default handler
                return super().write(b)

        with Interrupted(tmp, "w") as f:
            torch.save({"global_step": 2, "w": torch.randn(1 << 16)}, f)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if inherited ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / LAST, write)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert int(load_state(tmp_path / LAST)["global_step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_sys_exit_inside_torch_save_is_that_exit_not_an_error(tmp_path):
    """submitit's requeue handler calls sys.exit wherever the process is; inside a checkpoint write
    torch turned that into ``RuntimeError: ... unexpected pos`` (a landing CI failure). The write
    must end as the same SystemExit, leaving the previous file and no temporary one."""
    save_state({"global_step": 1}, tmp_path / LAST)

    def requeue_and_exit(signum, frame):
        raise SystemExit(-1)

    def write(tmp: str) -> None:
        class Requeued(io.FileIO):
            def write(self, b):
                if self.tell() > 0:
                    os.kill(os.getpid(), signal.SIGUSR1)  # its Python handler raises before the next line
                return super().write(b)

        with Requeued(tmp, "w") as f:
            torch.save({"global_step": 2, "w": torch.randn(1 << 16)}, f)

    previous = signal.signal(signal.SIGUSR1, requeue_and_exit)
    try:
        with pytest.raises(SystemExit) as exited:
            atomic_write(tmp_path / LAST, write)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert exited.value.code == -1
    assert int(load_state(tmp_path / LAST)["global_step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_a_stop_during_the_epoch_end_stops_there_with_last_pt_of_the_epoch(tmp_path, monkeypatch):
    """A signal landing in the epoch-end work (the kNN monitor, minutes on ImageNet) stops the run
    right after the epoch's last.pt instead of after the first step of the next epoch; a signal in
    the final epoch's end lets the finished run finish."""
    from opera.configs import apply_overrides, load_config
    from opera.engine import pretrain
    from opera.engine.stop import GracefulStop, Stopped

    cfg = apply_overrides(load_config("cpu_digits"), [
        "data.spec=digits:0-1", "train.epochs=3", "train.batch_size=64", "train.device=cpu", "train.knn_every=1",
        "self.mlp_dim=32", "self.dim=16", "full.hidden=16", "backbone.img_size=16", "train.save_every_epochs=0"])
    calls = []

    def knn_then_sigterm(*args) -> float:
        calls.append(True)
        GracefulStop.active().request(signal.SIGTERM)  # as the handler does when SIGTERM arrives now
        return 50.0

    monkeypatch.setattr(pretrain, "knn_monitor", knn_then_sigterm)
    with pytest.raises(Stopped) as stopped:
        pretrain.run_pretrain(cfg, tmp_path)
    per_epoch = 4  # 288 training images of digits 0-1, batches of 64, drop_last
    assert stopped.value.step == per_epoch and stopped.value.signum == signal.SIGTERM and len(calls) == 1
    assert int(load_state(tmp_path / LAST)["global_step"]) == per_epoch == logged_step(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] for r in rows if "knn_top1" in r] == [50.0]

    with pytest.raises(Stopped) as again:  # resumed at the epoch boundary: one more epoch, stopped at its end
        pretrain.run_pretrain(cfg, tmp_path)
    assert again.value.step == 2 * per_epoch and len(calls) == 2
    result = pretrain.run_pretrain(cfg, tmp_path)  # the last epoch's stop request does not stop a finished run
    assert result["global_step"] == 3 * per_epoch == int(load_state(tmp_path / LAST)["global_step"]) and len(calls) == 3
    assert (tmp_path / "backbone.safetensors").is_file()
