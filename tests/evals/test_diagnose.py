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
    # cosines by hand: |(1,0)|=1, |(0.9,0.1)| = sqrt(0.82); cos((1,0),(0.9,0.1)) = 0.9/sqrt(0.82)
    c_same, c_diff = 0.9 / 0.82 ** 0.5, 0.1 / 0.82 ** 0.5
    c_cross = (0.9 * 0.1 + 0.1 * 0.9) / 0.82  # (0.9,0.1) vs (0.1,0.9)
    torch.testing.assert_close(groups["same_class"], torch.full((4,), c_same))
    torch.testing.assert_close(groups["different_class"].sort().values,
                               torch.tensor([0.0, 0.0, c_diff, c_diff, c_diff, c_diff, c_cross, c_cross]).sort().values)
    m = summarize(groups)
    assert m["view"] == pytest.approx(1.0) and m["same_class"] == pytest.approx(c_same)
    assert m["different_class"] == pytest.approx((4 * c_diff + 2 * c_cross) / 8)
    assert (m["view_pairs"], m["same_class_pairs"], m["different_class_pairs"]) == (4, 4, 8)
    assert m["gap_view_same"] == pytest.approx(1.0 - c_same) and m["ordering_holds"]
    assert m["gap_same_different"] == pytest.approx(c_same - (4 * c_diff + 2 * c_cross) / 8)
    assert m["same_class_std"] == pytest.approx(0.0, abs=1e-6) and m["view_std"] == pytest.approx(0.0, abs=1e-6)
    assert m["different_class_std"] == pytest.approx(float(groups["different_class"].std()))
    # two views farther apart than two images of a class: the ordering is violated
    m = summarize(pair_similarities(z1, torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]]), labels))
    assert not m["ordering_holds"]


def test_diagnose_run_dir_measures_every_space(trained_run, tmp_path):
    out = tmp_path / "diag"
    res = run_diagnose(DiagnoseConfig(checkpoint=str(trained_run), output=str(out), num_images=96, tensorboard=False))
    assert res["spaces"] == ["backbone", "self/projector", "self/predictor", "full/logits"]
    assert res["data"]["spec"] == "digits:0-4"  # the run's pretraining data by default
    for space in res["spaces"]:
        m = res["metrics"][space]
        # 96 images: 96 view pairs, and the 96 x 95 cross-image pairs split into same / different class
        assert m["view_pairs"] == 96 and m["same_class_pairs"] + m["different_class_pairs"] == 96 * 95
        assert m["gap_view_same"] == pytest.approx(m["view"] - m["same_class"], abs=1e-12)
        assert m["gap_same_different"] == pytest.approx(m["same_class"] - m["different_class"], abs=1e-12)
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
    with pytest.raises(OperaError, match=r"config key split must be one of train, val, got 'test'; set --set split="):
        run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", split="test", output=str(tmp_path)))
    with pytest.raises(OperaError, match="at least two"):
        run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", data="digits:3", output=str(tmp_path), num_images=8))
