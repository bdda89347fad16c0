"""A real SLURM cluster of one node, or of several nodes (namespaces as hosts: hosts.py),
started from a temp dir, for tests.

``SlurmCluster().start(tmpdir)`` starts, without systemd and without touching ``/etc``:

* ``munged`` as user ``munge``, with its own key and socket under ``tmpdir/munge``;
* with accounting (the default when installed): ``mariadbd`` as user ``mysql`` on a unix socket
  only (no TCP), and ``slurmdbd`` talking to it. Accounting makes ``sacct`` answer, which is how
  submitit learns that a job was cancelled or failed without writing a result: without it,
  ``job.result()`` of a cancelled job waits forever;
* ``slurmctld`` and ``slurmd`` for this host, on free ports, with every state/spool/pid/log file
  under ``tmpdir``; :class:`MultiNodeCluster` runs one ``slurmd`` per host of
  :class:`~hosts.HostNamespaces` (``node1``, ``node2``) instead.

It sets ``SLURM_CONF`` in ``os.environ`` so that ``sbatch``/``squeue``/``sacct`` (and submitit)
talk to this cluster, and ``stop()`` cancels the jobs, stops every daemon it started by PID, kills
any process still carrying this cluster's ``SLURM_CONF`` (job steps), and restores the
environment. Every wait has a timeout. Install the binaries with ``.ci/install_slurm.sh``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hosts import HostNamespaces

CORE_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
ACCOUNTING_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "sacct", "sacctmgr")
INSTALL_HINT = "SLURM not installed: run .ci/install_slurm.sh (as root)"

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing_binaries(accounting: bool = True) -> list[str]:
    names = CORE_BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    missing = [n for n in names if which(n) is None]
    for user in ("munge",) + (("mysql",) if accounting else ()):
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(f"user {user}")
    return missing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlurmClusterError(RuntimeError):
    pass


class SlurmCluster:
    """One controller + one compute node on this machine (see the module docstring)."""

    def __init__(self, accounting: bool | None = None, cluster_name: str = "opera", set_env: bool = True,
                 partition: str = "debug", first_job_id: int = 1):
        """``set_env=False``: leave ``os.environ`` alone (use :meth:`env` to talk to this cluster);
        ``partition``: the name of its one (default) partition; ``first_job_id``: where its job ids
        start (clusters of one test session must not share ids: submitit's state cache is
        process-wide and keyed by job id)."""
        if accounting is None:
            accounting = not missing_binaries(accounting=True)
        self.accounting = accounting
        self.cluster_name = cluster_name
        self.set_env = set_env
        self.partition = partition
        self.first_job_id = first_job_id
        self.root: Path | None = None
        self.hostname = socket.gethostname().split(".")[0]
        self.conf: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.node: dict[str, str] = {}
        self._saved_env: dict[str, str | None] = {}
        self._logs: dict[str, Path] = {}

    # ------------------------------------------------------------------ public
    def start(self, tmpdir: str | os.PathLike, timeout: float = 60.0) -> SlurmCluster:
        missing = missing_binaries(self.accounting)
        if missing:
            raise SlurmClusterError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        if os.geteuid() != 0:
            raise SlurmClusterError("the test SLURM cluster must be started as root (SlurmUser=root)")
        t0 = time.monotonic()
        self.root = Path(tmpdir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # munged and mariadbd run as their own users: they must be able to reach their dirs.
        os.chmod(self.root, self.root.stat().st_mode | 0o055)
        for p in self.root.parents:
            if not p.stat().st_mode & 0o001:
                raise SlurmClusterError(
                    f"{p} is not searchable by other users (munge, mysql): start the cluster in a "
                    "directory such as tempfile.mkdtemp() instead"
                )
        try:
            self._start_munge(timeout)
            if self.accounting:
                self._start_mariadb(timeout)
            self._write_slurm_conf()
            self._set_env()
            if self.accounting:
                self._start_slurmdbd(timeout)
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
            self._start_nodes(timeout)
            if self.accounting:
                self._wait(self._sacct_ok, timeout, "accounting (sacct)")
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.conf is not None and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.cancel_all(timeout=timeout)
        slurmds = [name for name in self.procs if name.startswith("slurmd-")]
        for name in (*slurmds, "slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc, timeout)
        self._kill_leftovers()
        self._restore_env()

    def cancel_all(self, timeout: float = 15.0) -> None:
        """Cancel every job of this cluster and wait (bounded) for the queue to empty."""
        self.run(["scancel", "--full", "--quiet", f"--user={pwd.getpwuid(os.getuid()).pw_name}"], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                return
            time.sleep(0.5)

    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM clients at this cluster."""
        assert self.conf is not None, "cluster not started"
        return {"SLURM_CONF": str(self.conf)}

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env()}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if check and out.returncode != 0:
            raise SlurmClusterError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def node_state(self) -> str:
        return self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()

    def log(self, name: str, tail: int = 40) -> str:
        p = self._logs.get(name)
        if p is None or not p.exists():
            return ""
        return "\n".join(p.read_text(errors="replace").splitlines()[-tail:])

    @property
    def cpus(self) -> int:
        return int(self.node.get("CPUs", "1"))

    # ----------------------------------------------------------------- daemons
    def _start_nodes(self, timeout: float) -> None:
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")

    def _controller_addr(self) -> str:
        """The address slurmctld is reached at, by the clients and by every slurmd."""
        return "127.0.0.1"

    def _node_lines(self) -> list[str]:
        """slurm.conf's node definitions and the files of their slurmd."""
        assert self.root is not None
        r = self.root
        node_line = " ".join(f"{k}={v}" for k, v in self.node.items() if k != "NodeName")
        self._logs["slurmd"] = r / "log/slurmd.log"
        return [
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmdPidFile={r / 'run/slurmd.pid'}",
            f"SlurmdLogFile={r / 'log/slurmd.log'}",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 {node_line} State=UNKNOWN",
        ]

    def _spawn(self, name: str, cmd: list, user: str | None = None, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        assert self.root is not None
        out = self.root / "log" / f"{name}.out"
        out.parent.mkdir(exist_ok=True)
        self._logs.setdefault(name, out)
        full_env = {**os.environ, **(env or {})}
        if self.conf is not None:
            full_env["SLURM_CONF"] = str(self.conf)
        with open(out, "ab") as fh:
            proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, user=user, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    def _start_munge(self, timeout: float) -> None:
        assert self.root is not None
        d = self.root / "munge"
        d.mkdir(exist_ok=True)
        d.chmod(0o755)  # munged wants the socket dir searchable by all
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        mu = pwd.getpwnam("munge")
        for p in (d, key):
            os.chown(p, mu.pw_uid, mu.pw_gid)
        self.munge_socket = d / "munge.socket"
        self._logs["munged"] = d / "munged.log"
        self._spawn("munged", [
            which("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}", "--num-threads=4",
        ], user="munge", cwd=d)
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")

    def _start_mariadb(self, timeout: float) -> None:
        assert self.root is not None
        d = self.root / "mysql"
        d.mkdir(exist_ok=True)
        my = pwd.getpwnam("mysql")
        os.chown(d, my.pw_uid, my.pw_gid)
        data = d / "data"
        self.mysql_socket = d / "mysqld.sock"
        cmd = [which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=mysql",
               "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve"]
        t0 = time.monotonic()
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, user="mysql", cwd=d,
                             timeout=timeout)
        if out.returncode != 0:
            raise SlurmClusterError(f"mariadb-install-db failed: {(out.stderr or out.stdout).strip()[-2000:]}")
        self.timings["mariadb_install_s"] = time.monotonic() - t0
        self._logs["mariadbd"] = d / "mariadbd.err"
        self._spawn("mariadbd", [
            which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={self.mysql_socket}",
            f"--pid-file={d / 'mariadbd.pid'}", f"--log-error={d / 'mariadbd.err'}", "--skip-networking",
            "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
            "--innodb-lock-wait-timeout=900", "--innodb-flush-log-at-trx-commit=0",
            "--skip-log-bin", "--performance-schema=OFF",
        ], user="mysql", cwd=d)
        self._wait(lambda: self._mysql_ok(), timeout, "mariadbd")

    def _mysql_ok(self) -> bool:
        cli = which("mariadb") or which("mysql")
        if cli is None:
            return self.mysql_socket.exists()
        try:
            out = subprocess.run([cli, f"--socket={self.mysql_socket}", "-uroot", "-e", "SELECT 1"],
                                 capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0

    def _start_slurmdbd(self, timeout: float) -> None:
        # libmariadb connects to "localhost" through $MYSQL_UNIX_PORT: our socket, no TCP.
        self._spawn("slurmdbd", [which("slurmdbd"), "-D"], env={"MYSQL_UNIX_PORT": str(self.mysql_socket)})
        self._wait(lambda: _port_open(self.dbd_port), timeout, "slurmdbd")

    def _write_slurm_conf(self) -> None:
        assert self.root is not None
        r = self.root
        for sub in ("state", "spool", "log", "run"):
            (r / sub).mkdir(exist_ok=True)
        self.node = _node_config()
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.dbd_port = _free_port()
        self._logs["slurmctld"] = r / "log/slurmctld.log"
        lines = [
            f"ClusterName={self.cluster_name}",
            f"FirstJobId={self.first_job_id}",
            f"SlurmctldHost={self.hostname}({self._controller_addr()})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=10: a requeued job restarts in ~12 s instead of ~163 s.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmctldPidFile={r / 'run/slurmctld.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # impossible requests (99 nodes, too many CPUs) fail at sbatch instead of pending forever
            "EnforcePartLimits=ALL",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
        ]
        if self.accounting:
            lines += [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={self.dbd_port}",
                f"AccountingStoragePass={self.munge_socket}",  # munge socket for slurmdbd traffic
                "JobCompType=jobcomp/none",
            ]
        else:
            lines += ["AccountingStorageType=accounting_storage/none"]
        lines += [
            *self._node_lines(),
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf = r / "slurm.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        if self.accounting:
            dbd = r / "slurmdbd.conf"  # slurmdbd reads it next to $SLURM_CONF
            self._logs["slurmdbd"] = r / "log/slurmdbd.log"
            dbd.write_text("\n".join([
                "AuthType=auth/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"DbdHost={self.hostname}",
                "DbdAddr=127.0.0.1",
                f"DbdPort={self.dbd_port}",
                "SlurmUser=root",
                "DebugLevel=info",
                f"LogFile={r / 'log/slurmdbd.log'}",
                f"PidFile={r / 'run/slurmdbd.pid'}",
                "StorageType=accounting_storage/mysql",
                "StorageHost=localhost",
                "StorageUser=root",
                "StorageLoc=slurm_acct_db",
            ]) + "\n")
            dbd.chmod(0o600)

    # ------------------------------------------------------------------ checks
    def _ok(self, cmd: list[str], needle: str) -> bool:
        try:
            out = self.run(cmd, check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and needle in out.stdout

    def _node_idle(self) -> bool:
        return self.node_state() == "idle"

    def _sacct_ok(self) -> bool:
        try:
            return self.run(["sacct", "-n", "-X", "-o", "JobID"], check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _wait(self, cond, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with code {proc.returncode} while waiting for {what}:\n{self.log(name)}"
                    )
            if cond():
                self.timings[f"{what}_s"] = time.monotonic() - t0
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs)
        raise SlurmClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    # --------------------------------------------------------------- env/stop
    def _set_env(self) -> None:
        if not self.set_env:
            return
        for k, v in self.env().items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}

    def _kill_leftovers(self) -> None:
        """Kill job steps still running with this cluster's SLURM_CONF (by PID, never by name)."""
        if self.conf is None:
            return
        marker = f"SLURM_CONF={self.conf}".encode()
        mine = {os.getpid(), os.getppid()}
        for pid in _pids_with_env(marker):
            if pid not in mine:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class MultiNodeCluster(SlurmCluster):
    """One controller + one slurmd per host of :class:`~hosts.HostNamespaces` (``node1``, ``node2``).

    Each slurmd runs as its host (own network namespace and address, hostname, pids and
    ``/etc/hosts``) and so does every job step it starts; slurmctld, slurmdbd, mariadbd and munged
    run in the root namespace, reached over the hosts' bridge. The nodes share this machine's
    files (like a cluster's shared filesystem) and clock. ``stop()`` also removes the namespaces.
    """

    def __init__(self, names: tuple[str, ...] = ("node1", "node2"), accounting: bool | None = None,
                 cluster_name: str = "opera2", set_env: bool = True, partition: str = "debug",
                 first_job_id: int = 100001):
        super().__init__(accounting=accounting, cluster_name=cluster_name, set_env=set_env, partition=partition,
                         first_job_id=first_job_id)
        self.hosts = HostNamespaces(names)

    def start(self, tmpdir: str | os.PathLike, timeout: float = 60.0) -> MultiNodeCluster:
        try:
            Path(tmpdir).mkdir(parents=True, exist_ok=True)
            self.hosts.create(tmpdir)
            super().start(tmpdir, timeout)
        except BaseException:
            self.hosts.remove()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        try:
            if self.conf is not None and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.cancel_all(timeout=timeout)
            for name, proc in self.procs.items():  # `unshare --fork` ignores SIGTERM: stop its child, the
                if name.startswith("slurmd-"):   # host's pid 1 (the whole host goes with it)
                    for pid in _children(proc.pid):
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
            super().stop(timeout)
        finally:
            self.hosts.remove()

    @property
    def node_names(self) -> list[str]:
        return [h.name for h in self.hosts.hosts]

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def _node_idle(self) -> bool:
        return self.node_states() == {name: "idle" for name in self.node_names}

    def _controller_addr(self) -> str:
        return self.hosts.controller_addr

    def _node_lines(self) -> list[str]:
        assert self.root is not None
        r = self.root
        node_line = " ".join(f"{k}={v}" for k, v in self.node.items() if k != "NodeName")
        for host in self.hosts.hosts:
            (r / "spool" / host.name).mkdir(parents=True, exist_ok=True)
            self._logs[f"slurmd-{host.name}"] = r / f"log/slurmd.{host.name}.log"
        return [  # %n: the node name, so each slurmd has its own spool, pid and log file
            f"SlurmdSpoolDir={r / 'spool/%n'}",
            f"SlurmdPidFile={r / 'run/slurmd.%n.pid'}",
            f"SlurmdLogFile={r / 'log/slurmd.%n.log'}",
            *(f"NodeName={h.name} NodeAddr={h.addr} {node_line} State=UNKNOWN" for h in self.hosts.hosts),
        ]

    def _start_nodes(self, timeout: float) -> None:
        for host in self.hosts.hosts:
            self._spawn(f"slurmd-{host.name}",
                        self.hosts.command(host, [which("slurmd"), "-D", "-N", host.name, "-f", str(self.conf)]))
        self._wait(self._node_idle, timeout, "every slurmd (nodes idle)")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the process that started it dies (a killed pytest)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _pids_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _node_config() -> dict[str, str]:
    """This host's node line, from ``slurmd -C`` (CPUs, sockets, cores, threads, memory)."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    fields = dict(re.findall(r"(\w+)=(\S+)", out.stdout.splitlines()[0] if out.stdout else ""))
    fields.pop("UpTime", None)
    if "CPUs" not in fields:
        fields = {"CPUs": str(os.cpu_count() or 1)}
    return fields


if __name__ == "__main__":  # manual use: python tests/slurm/cluster.py /tmp/x  (Ctrl-C stops it)
    import tempfile

    c = SlurmCluster().start(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="opera-slurm-"))
    print(f"export SLURM_CONF={c.conf}  # started in {c.timings['start_s']:.1f}s: {c.timings}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
