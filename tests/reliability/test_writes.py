"""Every file opera writes is written atomically, and every write error (no room, a file-size limit,
no permission, a read-only filesystem) is one line naming the file, what it holds and the fix,
exit 2, with the previous files intact and no temporary file left (docs/reliability.md, "Writes").

The failures are real: RLIMIT_FSIZE makes the kernel fail the write that crosses the limit with
EFBIG, exactly where ENOSPC or EDQUOT would come on a full disk or quota."""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess

import pytest
import torch

from opera.files import PARTIAL, WriteFailed, atomic_write, atomic_write_text
from opera.engine.logging import METRICS, RunLogger
from tests.reliability.test_disk_full import file_size_limit


def limited(nbytes: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_the_run_lock_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, child, one_line):
    opera_argv, env = child
    out = tmp_path / "run"
    done = subprocess.run(opera_argv(out), env=env, preexec_fn=limited(64), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert f"cannot write {out / '.opera.lock'} (the run lock): File too large" in line, line
    assert "no lock was taken" in line and "ulimit -f" in line
    assert files(tmp_path) == []  # the folder made for the run is gone again, and no .opera.lock.*.tmp


def test_a_config_yaml_that_does_not_fit_is_not_left_torn(tmp_path, child, one_line):
    opera_argv, env = child
    out = tmp_path / "run"
    done = subprocess.run(opera_argv(out), env=env, preexec_fn=limited(1024), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert f"cannot write {out / 'config.yaml'} (the run's configuration): File too large" in line, line
    assert "no config.yaml was written" in line
    assert "config.yaml" not in files(out) and not [n for n in files(out) if n.endswith(".tmp")]


def test_metrics_and_tensorboard_write_errors_are_one_line(tmp_path):
    logger = RunLogger(tmp_path, enabled=True, tensorboard=True)
    with file_size_limit(300), pytest.raises(WriteFailed) as info:
        for step in range(100):
            logger.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
    msg = str(info.value)
    assert "\n" not in msg and "File too large" in msg and "ulimit -f" in msg
    assert f"cannot write {tmp_path / METRICS} (the metrics log)" in msg or f"cannot write {tmp_path / 'tb'}" in msg
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines() if line.endswith("}")]
    assert rows and rows[0]["step"] == 0  # what was written before stays



def test_a_tensorboard_write_error_is_one_line(tmp_path):
    logger = RunLogger(tmp_path, enabled=True, tensorboard=True)
    logger._file.close()
    logger._file = open("/dev/null", "a")  # the metrics rows go nowhere: the event file crosses the limit
    with file_size_limit(400), pytest.raises(WriteFailed) as info:
        for step in range(200):
            logger.log({"loss": float(step)}, step)
    msg = str(info.value)
    assert f"cannot write {tmp_path / 'tb'} (the TensorBoard events): File too large" in msg and "\n" not in msg


@pytest.mark.parametrize("code, fix", [(errno.EACCES, "writable for this user"), (errno.EROFS, "read-write"),
                                       (errno.ENOSPC, "free space"), (errno.EDQUOT, "quota"),
                                       (errno.EFBIG, "ulimit -f")])
def test_each_write_error_names_its_fix_and_keeps_the_previous_file(tmp_path, code, fix):
    path = tmp_path / "results.json"
    atomic_write_text(path, "previous\n", "the evaluation's results")

    def fails(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(code, "as the kernel says it")

    with pytest.raises(WriteFailed) as info:
        atomic_write(path, fails, what="the evaluation's results")
    msg = str(info.value)
    assert msg.startswith(f"cannot write {path} (the evaluation's results): as the kernel says it")
    assert fix in msg and "the previous results.json is intact" in msg and "\n" not in msg
    assert path.read_text() == "previous\n" and files(tmp_path) == ["results.json"]


def test_an_evaluation_result_and_an_export_that_do_not_fit_are_one_line(tmp_path):
    from opera.evals.export import write_export

    state = {"w": torch.randn(256, 256)}
    with file_size_limit(4096), pytest.raises(WriteFailed, match=r"\(the torchvision export\): File too large"):
        write_export(state, "torchvision", tmp_path / "r.pth", {}, {})
    with file_size_limit(16), pytest.raises(WriteFailed, match=r"report.md \(the report\): File too large"):
        atomic_write_text(tmp_path / "report.md", "x" * 1000, "the report")
    assert files(tmp_path) == []


def test_temporary_file_names_are_the_writers_own():
    ours = [".last.pt.k2j_x9ab.tmp", ".last.prev.pt.4242.tmp", ".config.yaml.abcdefgh.tmp",
            ".opera.lock." + "0" * 32 + ".tmp", ".opera.lock.stale-" + "f" * 32]
    theirs = [".opera.lock", "last.pt", ".last.pt.tmp", "notes.tmp", ".my notes.tmp", ".cache.ABCDEFGH.tmp",
              ".opera.lock.stale-xyz"]
    assert [n for n in ours if PARTIAL.match(n)] == ours
    assert [n for n in theirs if PARTIAL.match(n)] == []
