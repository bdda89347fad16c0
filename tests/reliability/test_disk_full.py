"""A write that fails partway (a full disk, a quota, a file-size limit) leaves the previous
checkpoint intact and stops the run with one line naming the file and the bytes it needs.

The failure is injected at the file layer with RLIMIT_FSIZE: the kernel fails the write that would
cross the limit with EFBIG, exactly where ENOSPC or EDQUOT would come on a full disk or quota."""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess

import pytest
import torch

from opera.engine.checkpoint import LAST, PREV, DiskFull, export_backbone, load_state, save_state


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Files of this process may not grow past ``nbytes`` (SIGXFSZ ignored: the write fails instead)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_failed_write_keeps_previous_last_and_names_bytes(tmp_path):
    save_state({"global_step": 1, "w": torch.zeros(10)}, tmp_path / LAST)
    big = {"global_step": 2, "w": torch.randn(1 << 20)}  # 4 MiB
    with file_size_limit(1 << 20), pytest.raises(DiskFull) as info:
        save_state(big, tmp_path / LAST)
    msg = str(info.value)
    assert f"cannot write {tmp_path / LAST}" in msg and "File too large" in msg
    assert f"needs about {4 * (1 << 20) + (1 << 16):,} bytes" in msg and "the previous last.pt is intact" in msg
    assert "\n" not in msg
    assert int(load_state(tmp_path / LAST)["global_step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temporary file left, no rotation done
    assert not (tmp_path / PREV).exists()


def test_backbone_export_failure_is_the_same_line(tmp_path):
    net = torch.nn.Linear(1024, 1024)
    with file_size_limit(1 << 16), pytest.raises(DiskFull, match="backbone.safetensors.*needs about"):
        export_backbone(net, tmp_path / "backbone.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_run_stops_with_one_line_when_the_checkpoint_does_not_fit(run_copy, child):
    opera_argv, env = child
    before = int(load_state(run_copy / LAST)["global_step"])
    limit = (run_copy / LAST).stat().st_size // 2  # metrics and config still fit, a checkpoint does not

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(opera_argv(run_copy, "--epochs", "2", "--set", "train.max_steps=11"), env=env,
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot write {run_copy / LAST}" in lines[0] and "needs about" in lines[0]
    assert "the previous last.pt is intact" in lines[0]
    assert int(load_state(run_copy / LAST)["global_step"]) == before  # the step-10 save failed; step 9 is kept
    assert not list(run_copy.glob(".*.tmp"))
