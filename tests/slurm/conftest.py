"""The session-wide one-node SLURM cluster (see cluster.py). Started once, stopped at the end.

Without the binaries the slurm tests are *skipped with a message* telling to run
``.ci/install_slurm.sh``; once installed they run (a broken cluster fails them, never skips).
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

from cluster import INSTALL_HINT, SlurmCluster, missing_binaries  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_binaries(accounting=False)
    if missing:
        pytest.skip(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root/munge/mysql: run the slurm tests as root")
    # Jobs import the functions they run (and opera) by name, like an installed package would.
    saved_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(HERE)] + ([saved_pythonpath] if saved_pythonpath else [])
    )
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
