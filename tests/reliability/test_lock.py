"""One writer per run directory: a second run refuses naming the holder; a lock left by a dead
process (this host), an earlier run of the same SLURM job, or a host whose heartbeat stopped is
taken over with a line saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from opera.engine import lock as rundir
from opera.engine.lock import LOCK, Holder, RunLock, _read_holder
from opera.errors import OperaError


def write_lock(run, **fields) -> None:
    holder = Holder.me().__dict__ | fields
    tmp = run / f"{LOCK}.test.tmp"  # whole, then renamed: as a real run writes it
    tmp.write_text(json.dumps(holder))
    os.utime(tmp, (holder["heartbeat"], holder["heartbeat"]))  # a lock last touched at its heartbeat
    tmp.replace(run / LOCK)


def test_second_run_refuses_naming_the_holder_then_takes_over_when_it_dies(holder_process, opera_main, tiny, one_line):
    run, proc = holder_process
    code, out, err = opera_main(*tiny, "--output", str(run), "--set", "train.max_steps=1")
    line = one_line(err)
    assert code == 2
    for needle in (f"pid {proc.pid}", f"host {socket.gethostname()}", "started 20", "is in use", "--output"):
        assert needle in line, line
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()  # refused before writing

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out, err = opera_main(*tiny, "--output", str(run), "--set", "train.max_steps=1")
    assert code == 0, err
    taken = [line for line in out.splitlines() if line.startswith("taking over the lock")]
    assert len(taken) == 1 and f"pid {proc.pid}" in taken[0] and "that process is gone" in taken[0], out
    assert not (run / LOCK).exists()  # released at the end


def test_live_holder_on_another_host_is_respected(tmp_path):
    write_lock(tmp_path, host="gpu-node-17", pid=4242)
    with pytest.raises(OperaError, match="in use by pid 4242 on host gpu-node-17"):
        RunLock(tmp_path).acquire()


def test_silent_host_is_taken_over(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPERA_LOCK_STALE_S", "60")
    write_lock(tmp_path, host="gpu-node-17", pid=4242, heartbeat=time.time() - 120)
    lock = RunLock(tmp_path).acquire()
    try:
        out = capsys.readouterr().out
        assert "taking over" in out and "gpu-node-17" in out and "last heartbeat was 120 s ago" in out
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "918273")
    write_lock(tmp_path, host="gpu-node-3", pid=77, slurm_job="918273")  # fresh heartbeat, other host
    with RunLock(tmp_path):
        assert "earlier run of this SLURM job 918273" in capsys.readouterr().out


def test_torn_lock_file_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK).write_text('{"host": "gpu-no')
    with RunLock(tmp_path):
        assert "empty or torn" in capsys.readouterr().out


def test_heartbeat_advances_and_a_lost_lock_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPERA_LOCK_HEARTBEAT_S", "0.05")
    lock = RunLock(tmp_path).acquire()
    written = (tmp_path / LOCK).read_text()
    first = _read_holder(tmp_path / LOCK).heartbeat
    deadline = time.time() + 30
    while _read_holder(tmp_path / LOCK).heartbeat == first and time.time() < deadline:
        time.sleep(0.05)
    assert _read_holder(tmp_path / LOCK).heartbeat > first
    assert (tmp_path / LOCK).read_text() == written  # touched, never rewritten
    lock.check_owner()  # still ours
    write_lock(tmp_path, host="gpu-node-9", pid=31337)  # another run judged us dead and took over
    while lock.lost_to is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(OperaError, match="lost the lock .* to pid 31337 on host gpu-node-9"):
        lock.check_owner()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 31337  # their lock is left alone


def test_a_takeover_landing_inside_a_heartbeat_is_not_overwritten(tmp_path, monkeypatch):
    """The race window: the heartbeat has just read its own lock when another run takes over. The
    beat must not clobber the newcomer's lock; the old run finds out at the next beat."""
    monkeypatch.setenv("OPERA_LOCK_HEARTBEAT_S", "0.05")
    real_read, raced = rundir._read_holder, []

    def read_then_lose_the_race(path):
        holder = real_read(path)
        if not raced and path == tmp_path / LOCK and holder is not None and holder.pid == os.getpid():
            raced.append(True)
            write_lock(tmp_path, host="gpu-node-9", pid=31337)  # lands after the check, before the touch
        return holder

    lock = RunLock(tmp_path).acquire()
    monkeypatch.setattr(rundir, "_read_holder", read_then_lose_the_race)
    deadline = time.time() + 30
    while lock.lost_to is None and time.time() < deadline:
        time.sleep(0.05)
    assert raced
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 31337  # the newcomer's lock survived the beat
    with pytest.raises(OperaError, match="lost the lock .* to pid 31337 on host gpu-node-9"):
        lock.check_owner()
    lock.release()
