"""USR2 under submitit: :class:`opera.launch.slurm.Requeueable` holds submitit's requeue back until
the running loop has finished its step and written ``last.pt``.

submitit's own handler requeues and ``sys.exit``s wherever the main thread is; in a landing CI run
that was inside ``torch.save`` of a fine-tuning checkpoint, whose writer then failed on the cut
file ("unexpected pos ...") and the requeued job was reported failed. Here a stand-in for
submitit's handler (rank 0: record, then ``SystemExit(-1)``; other ranks: return) is installed for
USR2, and the signal is sent from inside a checkpoint write.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from opera.engine.checkpoint import atomic_write
from opera.engine.stop import GracefulStop, Stopped
from opera.launch.slurm import DeferredRequeue, Requeueable

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
USR2 = getattr(signal, "SIGUSR2", 0)


class FakeSubmitit:
    """What submitit's ``checkpoint_and_try_requeue`` does, observable: task 0 requeues and exits."""

    def __init__(self, out: Path, rank: int = 0):
        self.out, self.rank, self.calls = out, rank, []

    def __call__(self, signum, frame):
        last = self.out / "last.pt"
        self.calls.append(last.read_text() if last.exists() else None)
        if self.rank == 0:
            raise SystemExit(-1)


@pytest.fixture
def submitit_usr2(tmp_path):
    handlers = []

    def install(rank: int = 0) -> FakeSubmitit:
        fake = FakeSubmitit(tmp_path, rank)
        handlers.append(signal.signal(USR2, fake))
        return fake

    yield install
    for previous in handlers[:1]:
        signal.signal(USR2, previous)


def train(out: Path, steps: int, signal_at: int, sig: int | tuple[int, ...] = USR2) -> None:
    """A loop that checkpoints every step; at ``signal_at`` the signal arrives in the middle of the write."""
    with GracefulStop() as stop:
        for step in range(1, steps + 1):
            def write(tmp: str, step: int = step) -> None:
                with open(tmp, "w") as f:
                    f.write(f"step {step} ")
                    if step == signal_at:
                        for one in sig if isinstance(sig, tuple) else (sig,):
                            os.kill(os.getpid(), one)  # its Python handler runs before the next line
                    f.write("complete")

            atomic_write(out / "last.pt", write)
            signum = stop.requested()
            if signum:
                raise Stopped(step, signum)


def test_usr2_inside_a_checkpoint_write_requeues_after_the_write_and_the_step(submitit_usr2, tmp_path):
    fake = submitit_usr2()
    with pytest.raises(SystemExit) as exited:
        Requeueable(train)(tmp_path, 10, 3)
    assert exited.value.code == -1
    # submitit was called once, after last.pt of the signalled step was whole (before: the write was cut, None)
    assert fake.calls == ["step 3 complete"]
    assert (tmp_path / "last.pt").read_text() == "step 3 complete"
    assert signal.getsignal(USR2) is fake  # submitit's handler is back once the call has ended


def test_a_loop_that_reaches_no_step_boundary_is_requeued_after_the_grace_and_its_error_is_not_a_failure(
        submitit_usr2, tmp_path):
    fake = submitit_usr2()

    def stuck(out: Path) -> None:
        with GracefulStop():
            try:
                os.kill(os.getpid(), USR2)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # a long evaluation that checks no stop flag
                    time.sleep(0.01)
            except SystemExit:
                raise RuntimeError("unexpected pos 7678400 vs 7678292") from None  # torch.save's writer, cut

    start = time.monotonic()
    with pytest.raises(SystemExit):
        Requeueable(stuck, grace_s=0.3)(tmp_path)
    assert fake.calls == [None] and time.monotonic() - start < 20


def test_without_a_training_loop_usr2_requeues_at_once(submitit_usr2, tmp_path):
    fake = submitit_usr2()

    def setup_phase(out: Path) -> None:
        os.kill(os.getpid(), USR2)
        raise AssertionError("submitit's handler should have exited")

    with pytest.raises(SystemExit):
        Requeueable(setup_phase)(tmp_path)
    assert fake.calls == [None]


def test_other_tasks_stop_at_the_step_then_wait_for_task_0s_requeue(submitit_usr2, tmp_path, monkeypatch):
    fake = submitit_usr2(rank=1)
    monkeypatch.setattr(DeferredRequeue, "WAIT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(Stopped) as stopped:
        Requeueable(train)(tmp_path, 10, 2)
    assert stopped.value.step == 2 and stopped.value.signum == USR2
    assert fake.calls == ["step 2 complete"] and time.monotonic() - start >= 0.3


def test_sigint_under_submitit_is_a_plain_stop_not_a_requeue(submitit_usr2, tmp_path):
    fake = submitit_usr2()
    # Python's own Ctrl-C handler, as in a terminal (a suite started in the background inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Stopped) as stopped:
            Requeueable(train)(tmp_path, 10, 4, sig=signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.signum == signal.SIGINT and stopped.value.step == 4
    assert fake.calls == []


@pytest.mark.parametrize("disposition", [signal.SIG_DFL, signal.SIG_IGN])
def test_outside_submitit_usr2_is_left_alone(disposition):
    previous = signal.signal(USR2, disposition)
    try:
        seen = []
        assert Requeueable(lambda: seen.append(signal.getsignal(USR2)) or 7)() == 7
        assert seen == [disposition] and signal.getsignal(USR2) == disposition
    finally:
        signal.signal(USR2, previous)


def test_a_preemption_after_a_sigint_still_requeues(submitit_usr2, tmp_path):
    fake = submitit_usr2()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):
            Requeueable(train)(tmp_path, 10, 2, sig=(signal.SIGINT, USR2))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fake.calls == ["step 2 complete"]
