"""A tiny real run shared by the reliability tests, and ways to run the CLI on it (in this process
or as a real child process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: one epoch of 9 steps on digits 0-1; a checkpoint every step, one epoch file, and last.prev.pt kept
#: (train.keep_last_prev) so that the tests see every file a resume may fall back to
TINY = ["run", "pretrain", "--hierarchy", "self,full", "--data", "digits:0-1", "--epochs", "1", "--batch-size", "32",
        "--seed", "3", "--set", "train.knn_every=0", "--set", "self.mlp_dim=64", "--set", "self.dim=32",
        "--set", "full.hidden=64", "--set", "train.log_every=1", "--set", "train.save_every_steps=1",
        "--set", "train.save_every_epochs=1", "--set", "train.keep_last_prev=true"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def opera_argv(output: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "opera", *TINY, "--output", str(output), *more]


HOLD = ("import sys, time; from opera.engine.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder_process(tmp_path):
    """A real second process that owns ``tmp_path/run`` until killed."""
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run: last.pt (step 9), last.prev.pt (step 8), epoch_0001.pt (step 9, a hard
    link to last.pt; in run_copy, a separate copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    subprocess.run(opera_argv(out), check=True, env=child_env(), timeout=600, capture_output=True)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, free to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def opera_main(capsys, monkeypatch):
    """``opera ARGS`` in this process, through the console entry point: (exit code, stdout, stderr)."""
    from opera.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["opera", *args])
        with _exit_code() as code:
            main()
        streams = capsys.readouterr()
        return code[0], streams.out, streams.err

    return run


class _exit_code:
    """Context manager holding ``[exit code]``: 0 when the body returns, SystemExit's code otherwise."""

    def __enter__(self) -> list[int]:
        self.code = [0]
        return self.code

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is SystemExit:
            self.code[0] = exc.code if isinstance(exc.code, int) else 1
            return True
        return False


@pytest.fixture
def child():
    """(argv of the tiny run into OUTPUT plus more arguments, environment) for a real child process."""
    return opera_argv, child_env()


@pytest.fixture
def one_line():
    """The only non-empty line of a stream (fails on more, or on a traceback)."""

    def check(err: str) -> str:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, f"expected one line, got:\n{err}"
        return lines[0]

    return check


@pytest.fixture
def tiny():
    """The CLI arguments of the tiny run (without --output)."""
    return list(TINY)
