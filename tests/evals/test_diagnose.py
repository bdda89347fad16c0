"""Corollary 1 diagnostics: every representation space of a run, the ordering, the histogram."""

import json

import pytest
import torch

from opera.errors import OperaError
from opera.evals.diagnose import HISTOGRAM, DiagnoseConfig, pair_similarities, run_diagnose, summarize


def test_pair_groups_and_ordering():
    labels = torch.tensor([0, 0, 1, 1])
    z1 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    groups = pair_similarities(z1, z1.clone(), labels)
    assert groups["view"].numel() == 4 and groups["same_class"].numel() == 4 and groups["different_class"].numel() == 8
    torch.testing.assert_close(groups["view"], torch.ones(4))
    m = summarize(groups)
    assert m["view"] >= m["same_class"] >= m["different_class"] and m["ordering_holds"]
    # two views farther apart than two images of a class: the ordering is violated
    m = summarize(pair_similarities(z1, torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]]), labels))
    assert not m["ordering_holds"]


def test_diagnose_run_dir_measures_every_space(trained_run, tmp_path):
    out = tmp_path / "diag"
    res = run_diagnose(DiagnoseConfig(checkpoint=str(trained_run), output=str(out), num_images=96, tensorboard=False))
    assert res["spaces"] == ["backbone", "projector", "predictor", "class_logits"]
    assert res["data"]["spec"] == "digits:0-4"  # the run's pretraining data by default
    for space in res["spaces"]:
        m = res["metrics"][space]
        for pair in ("view", "same_class", "different_class"):
            assert -1.0 <= m[pair] <= 1.0
        assert m["view_pairs"] == 96
        assert m["ordering_holds"] == (m["view"] >= m["same_class"] >= m["different_class"])
    # the supervised backbone separates classes
    assert res["metrics"]["backbone"]["same_class"] > res["metrics"]["backbone"]["different_class"]
    png = out / HISTOGRAM
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["ordering_holds_all"] == all(saved["metrics"][s]["ordering_holds"] for s in res["spaces"])


def test_diagnose_backbone_only_and_errors(tmp_path):
    res = run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", data="digits:0-2", output=str(tmp_path),
                                      num_images=32, tensorboard=False))
    assert res["spaces"] == ["backbone"]
    with pytest.raises(OperaError, match="--split"):
        run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", split="test", output=str(tmp_path)))
    with pytest.raises(OperaError, match="at least two"):
        run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", data="digits:3", output=str(tmp_path), num_images=8))
