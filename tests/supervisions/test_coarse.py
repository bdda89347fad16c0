"""The ``coarse`` space: Y^coarse = h'(Y^full) on the data's coarse label set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from opera.data import build_dataset, dataset_label_sets
from opera.data.datasets import DIGITS_COARSE
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy

SETS = {"class": 5, "coarse": 3}


def build(spec="self,full,coarse", **kw):
    torch.manual_seed(0)
    return SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", label_sets=SETS, img_size=16,
                                          self={"dim": 16, "mlp_dim": 32}, **kw)


def test_coarse_stacks_on_the_fine_class_space():
    h = build()
    assert h.spaces["coarse"].source == "full/logits"
    assert h.spaces["coarse"].class_head[-1].out_features == 3 and h.spaces["coarse"].class_head[0].in_features == 5
    # without 'full' below, the arrangement places it (C: on the predictor)
    assert build("self,coarse").spaces["coarse"].source == "self/predictor"


def test_coarse_loss_is_the_cross_entropy_of_h_prime_of_y_full_by_hand():
    h = build()
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    y, c = torch.randint(0, 5, (6,)), torch.randint(0, 3, (6,))
    out = h(views=views, targets={"class": y, "coarse": c})
    sp, full, coarse = h.spaces["self"], h.spaces["full"], h.spaces["coarse"]
    with torch.no_grad():
        by_hand = 0.0
        for v in views:
            fine = full.class_head(sp.predictor(sp.projector(h.backbone(v))))
            by_hand = by_hand + F.cross_entropy(coarse.class_head(fine), c)
    torch.testing.assert_close(out.losses["coarse"], 0.5 * by_hand)
    # the fine and coarse logs do not overwrite each other
    assert {"full/ce", "full/acc", "coarse/ce", "coarse/acc"} <= set(out.logs)
    # the coarse loss trains the fine head below it (h' reads Y^full), never the other way round
    out.losses["coarse"].backward()
    assert full.class_head[0].weight.grad.abs().sum() > 0


def test_digits_has_a_documented_coarse_set():
    ds = build_dataset("digits", "train")
    assert dataset_label_sets(ds) == {"class": 10, "coarse": 3}
    for t, cc in zip(ds.targets[:200], ds.target_sets()["coarse"][:200]):
        assert ds.coarse_names[cc] == DIGITS_COARSE[ds.class_names[t]]


def test_data_without_a_coarse_set_is_one_line():
    with pytest.raises(OperaError) as err:
        SupervisionHierarchy.from_spec("self,full,coarse", backbone="resnet_tiny", num_classes=5, img_size=16)
    assert "\n" not in str(err.value) and "'coarse'" in str(err.value) and "class" in str(err.value)


@pytest.mark.slow
def test_cli_trains_self_full_coarse(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "self,full,coarse", "--epochs", "1",
                        "--output", str(out), "--set", "train.knn_every=0", "--set", "data.spec=digits:0-4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # step rows
    assert all(k in rows[-1] for k in ("loss/coarse", "coarse/ce", "full/ce", "self/ctr"))
