"""The rendezvous host of a SLURM job is the first host of its nodelist, also where ``scontrol``
cannot run (it needs the cluster's slurm.conf); tests/slurm/test_two_nodes.py checks these
against ``scontrol show hostnames`` on a real cluster."""

from __future__ import annotations

import pytest

from opera.distributed import first_host

HOSTLISTS = {"node1": "node1", "node[1-2]": "node1", "node[2,5-7]": "node2", "gpu[007-009,011],cpu1": "gpu007",
             "cpu1,gpu[007-009]": "cpu1", "r[1-2]-n[01-04]": "r1-n01"}


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_first_host_of_a_hostlist(nodelist):
    assert first_host(nodelist) == HOSTLISTS[nodelist]
