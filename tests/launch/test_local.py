"""launch_local: torchrun-like multi-process runs on this machine (gloo, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.errors import OperaError
from opera.launch import LocalLaunchError, launch_local

TIMEOUT_S = 120


def gather_ranks(out_dir: str) -> int:
    env = distributed.init("cpu", timeout_min=1)
    try:
        gathered = distributed.all_gather_no_grad(torch.tensor([env.rank]))
        record = {
            "rank": env.rank,
            "world": env.world_size,
            "local_rank": env.local_rank,
            "gathered": gathered.tolist(),
            "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
        }
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(record))
    finally:
        distributed.shutdown()
    return env.rank * 10


def fail_on_rank_one() -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("boom from rank one")


def opera_error_everywhere() -> None:
    raise OperaError("bad config key 'lr_'")


@pytest.mark.slow
def test_two_gloo_processes_all_gather_ranks(tmp_path):
    results = launch_local(gather_ranks, (str(tmp_path),), nproc=2, timeout=TIMEOUT_S)
    assert results == [0, 10]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        assert rec["rank"] == r and rec["world"] == 2 and rec["local_rank"] == r
        assert rec["gathered"] == [0, 1]
        assert rec["env"] == {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1"}
    assert "RANK" not in os.environ  # the parent's environment is untouched


@pytest.mark.slow
def test_failing_child_raises_naming_its_rank():
    with pytest.raises(LocalLaunchError, match=r"rank 1 of 2 failed.*boom from rank one") as info:
        launch_local(fail_on_rank_one, (), nproc=2, timeout=TIMEOUT_S)
    assert info.value.rank == 1


@pytest.mark.slow
def test_opera_error_in_child_stays_an_opera_error():
    with pytest.raises(OperaError, match="bad config key 'lr_'"):
        launch_local(opera_error_everywhere, (), nproc=2, timeout=TIMEOUT_S)


def test_bad_nproc_is_a_user_error():
    with pytest.raises(OperaError, match="nproc"):
        launch_local(gather_ranks, ("x",), nproc=0)
