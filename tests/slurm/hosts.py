"""Hosts of their own on this machine, made of Linux namespaces, for a multi-node test cluster.

``HostNamespaces(("node1", "node2")).create(tmpdir)`` makes, as root, with iproute2 and util-linux:

* a bridge in the root namespace holding ``10.213.X.1/24`` (``X`` a subnet no address of this
  machine uses yet), and per host a network namespace joined to it by a veth pair, its end
  ``eth0`` holding ``10.213.X.1N``; hosts reach each other and the root namespace over the
  bridge, and nothing else (no route out, no forwarding);
* a hosts file naming every host (``tmpdir/hosts``).

``command(host, argv)`` wraps ``argv`` to run as that host: in its network namespace, with its own
hostname (a UTS namespace), its own pids (a pid namespace, ``argv`` its pid 1, with its own
``/proc``) and the hosts file bind-mounted over ``/etc/hosts`` in a mount namespace of its own
(the machine's ``/etc/hosts`` is never touched). When the wrapped process ends, everything in its
pid namespace ends with it. ``remove()`` kills what is left in the namespaces (by pid) and deletes
every namespace, link and address this object made; it is safe to call twice or after a partial
``create``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "10.213"
TOOLS = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux"}


class NamespaceError(RuntimeError):
    """Namespaces cannot be made here (its message is one line naming why)."""


@dataclass(frozen=True)
class Host:
    name: str  # its hostname, and its SLURM NodeName
    netns: str  # `ip netns` name
    addr: str  # its address on the bridge
    veth: str  # the root namespace's end of its link


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NamespaceError(f"`ip {' '.join(args)}` failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return out


def _free_subnet(start: int) -> int:
    used = set(re.findall(rf"inet {re.escape(PREFIX)}\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout))
    for i in range(256):
        x = (start + i) % 250 + 1
        if str(x) not in used:
            return x
    raise NamespaceError(f"no free {PREFIX}.X.0/24 subnet on this machine")


class HostNamespaces:
    """Hosts ``names`` as namespaces joined by a bridge (see the module docstring)."""

    def __init__(self, names: tuple[str, ...] = ("node1", "node2")):
        self.names = names
        self.tag = f"{os.getpid() % 0x10000:04x}"
        self.bridge = f"opbr{self.tag}"
        self.hosts: list[Host] = []
        self.hosts_file: Path | None = None
        self.controller_addr = ""
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here (one line), or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
        if missing:
            return f"{', '.join(missing)} not installed: run .ci/install_slurm.sh"
        return None

    def create(self, root: str | os.PathLike) -> HostNamespaces:
        reason = self.unavailable()
        if reason:
            raise NamespaceError(reason)
        subnet = f"{PREFIX}.{_free_subnet(os.getpid() % 250)}"
        self.controller_addr = f"{subnet}.1"
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names, start=1):
                host = Host(name, f"opera-{self.tag}-{name}", f"{subnet}.{10 + i}", f"op{self.tag}n{i}")
                _ip("netns", "add", host.netns)
                self._made.append(("netns", host.netns))
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                self._made.append(("link", host.veth))
                _ip("link", "set", host.veth, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                self.hosts.append(host)
            self.hosts_file = Path(root) / "hosts"
            self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts))
            self.hosts_file.chmod(0o644)
            probe = subprocess.run(self.command(self.hosts[0], ["hostname"]), capture_output=True, text=True,
                                   timeout=30)
            if probe.returncode != 0 or probe.stdout.strip() != self.hosts[0].name:
                raise NamespaceError("cannot start a process with its own hostname, pids and /etc/hosts "
                                     f"(unshare --uts --pid --mount-proc): {(probe.stderr or probe.stdout).strip()}")
        except BaseException:
            self.remove()
            raise
        return self

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` as it runs on ``host`` (its pid 1; SIGTERM to the returned command ends it)."""
        assert self.hosts_file is not None, "namespaces not created"
        setup = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup fs slurmd reads
        return ["nsenter", f"--net=/run/netns/{host.netns}",
                "unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", "--",
                "sh", "-c", setup, "sh", host.name, str(self.hosts_file), *[str(a) for a in argv]]

    def pids(self) -> list[int]:
        """Processes still running in any of the namespaces (as the root namespace numbers them)."""
        pids: list[int] = []
        for kind, name in self._made:
            if kind == "netns":
                out = _ip("netns", "pids", name, check=False)
                pids += [int(p) for p in out.stdout.split() if p.isdigit()]
        return pids

    def remove(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)  # a veth whose namespace is gone is gone already
        self._made = []
        self.hosts = []
