"""The session-wide SLURM clusters (see cluster.py), each started once and stopped at the end:
``slurm_cluster``, one node (this host), and ``two_nodes``, two hosts ``node1`` and ``node2`` made
of namespaces (hosts.py), started only when a test asks for it.

Without the binaries the slurm tests are *skipped with a message* telling to run
``.ci/install_slurm.sh``; the two-node tests also skip, in one line naming why, where namespaces
cannot be made. Once installed they run (a broken cluster fails them, never skips); CI fails on
any skip of tests/slurm where it is root with apt (.ci/check_skips.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # whatever pytest's import mode, cluster.py is importable as `cluster`
    sys.path.insert(0, str(HERE))

from cluster import INSTALL_HINT, MultiNodeCluster, SlurmCluster, missing_binaries  # noqa: E402
from hosts import HostNamespaces, NamespaceError  # noqa: E402


def _jobs_pythonpath() -> str:
    """Jobs import the functions they run (and opera) by name, like an installed package would."""
    saved = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO), str(HERE)] + ([saved] if saved else []))


def _skip_without_cluster() -> None:
    missing = missing_binaries(accounting=False)
    if missing:
        pytest.skip(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root/munge/mysql: run the slurm tests as root")


@pytest.fixture(scope="session")
def slurm_cluster():
    _skip_without_cluster()
    saved_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _jobs_pythonpath()
    root = tempfile.mkdtemp(prefix="opera-slurm-")  # under /tmp: reachable by the munge/mysql users
    cluster = SlurmCluster()
    try:
        cluster.start(root)
        yield cluster
    finally:
        cluster.stop()
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
        if os.environ.get("OPERA_KEEP_SLURM_DIR"):
            print(f"\nSLURM test cluster files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm_accounting(slurm_cluster):
    if not slurm_cluster.accounting:
        pytest.skip("SLURM accounting (slurmdbd + mariadb) not installed: run .ci/install_slurm.sh")
    return slurm_cluster


@pytest.fixture(scope="session")
def two_node_cluster():
    """node1 and node2, each its own slurmd, hostname, address, pids and /etc/hosts; the partition
    is named ``gpu`` like the README's. It leaves ``os.environ`` alone: use ``two_nodes``."""
    _skip_without_cluster()
    reason = HostNamespaces.unavailable()
    if reason:
        pytest.skip(f"cannot make the two-node cluster's hosts here: {reason}")
    root = tempfile.mkdtemp(prefix="opera-slurm2-")
    cluster = MultiNodeCluster(set_env=False, partition="gpu")
    try:
        try:
            cluster.start(root)
        except NamespaceError as e:
            pytest.skip(f"cannot make the two-node cluster's hosts here: {e}")
        print(f"\ntwo-node SLURM cluster up in {cluster.timings['start_s']:.1f}s (nodes {cluster.node_states()})")
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("OPERA_KEEP_SLURM_DIR"):
            print(f"\ntwo-node SLURM cluster files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def two_nodes(two_node_cluster, monkeypatch):
    """The two-node cluster, with sbatch/squeue/sacct (and submitit) pointed at it for this test."""
    for key, value in two_node_cluster.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", _jobs_pythonpath())
    return two_node_cluster
