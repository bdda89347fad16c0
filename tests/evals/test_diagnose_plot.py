"""``opera run diagnose --plot umap|tsne``: every space's 2-D embedding beside its similarity
histogram, one PNG per space, listed in results.json; and the collapse statistics of every space."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from opera.engine.collapse import statistics
from opera.evals.diagnose import EMBEDDING_POINTS, DiagnoseConfig, heldout_classes, run_diagnose

PNG = b"\x89PNG\r\n\x1a\n"
SPACES = ["backbone", "self/projector", "self/predictor", "full/logits"]


def test_heldout_classes_are_those_the_pretraining_data_did_not_select():
    assert heldout_classes("digits", "digits:0-4", 10) == [5, 6, 7, 8, 9]
    assert heldout_classes("digits:3-6", "digits:0-4", 4) == [2, 3]  # labels 2, 3 are digits 5, 6
    assert heldout_classes("digits:0-4", "digits", 5) == []
    assert heldout_classes("digits:0-2", None, 3) is None  # a bare backbone: unknown
    assert heldout_classes("digits:0-2", "/data/folder", 3) == [0, 1, 2]  # another dataset: all new


@pytest.mark.slow
def test_plot_tsne_draws_every_space_with_one_point_per_image(trained_run, tmp_path):
    out = tmp_path / "diag"
    res = run_diagnose(DiagnoseConfig(checkpoint=str(trained_run), data="digits", output=str(out), num_images=80,
                                      tensorboard=False, plot="tsne"))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["plots"]) == set(SPACES) == set(res["plots"])
    for space, path in saved["plots"].items():
        assert path.endswith("embedding_" + space.replace("/", "_") + ".png")
        with open(path, "rb") as f:
            assert f.read(8) == PNG
    emb = saved["embedding"]
    assert (emb["method"], emb["requested"], emb["images"]) == ("tsne", "tsne", 80)
    assert emb["heldout_classes"] == [5, 6, 7, 8, 9]  # pretrained on digits 0-4
    points = np.load(emb["points"])
    assert points["labels"].shape == (80,) and set(np.unique(points["labels"])) <= set(range(10))
    assert np.array_equal(points["heldout"], points["labels"] >= 5) and points["heldout"].any()
    for space in SPACES:
        xy = points[space]
        assert xy.shape == (80, 2) and np.isfinite(xy).all() and xy.std(0).min() > 0
    # the collapse statistics of every space, on demand
    for space in SPACES:
        m = saved["metrics"][space]
        assert m["rankme"] > 1.5 and m["std"] > 0 and m["std_sqrt_d"] > 0
    assert saved["metrics"]["full/logits"]["rankme"] <= 5 + 1e-3  # 5 classes: logits of rank at most 5


@pytest.mark.slow
def test_collapse_statistics_in_results_equal_those_of_the_representations(trained_run, tmp_path):
    import torch

    from opera.data import EvalTransform, build_dataset
    from opera.evals.common import load_eval_backbone
    from opera.evals.diagnose import load_hierarchy

    out = tmp_path / "d"
    res = run_diagnose(DiagnoseConfig(checkpoint=str(trained_run), output=str(out), num_images=64, tensorboard=False))
    assert "plots" not in res and not (out / EMBEDDING_POINTS).exists()  # no --plot: no plot
    h = load_hierarchy(load_eval_backbone(str(trained_run), None, None, "digits:0-4", 0)).eval()
    ds = build_dataset("digits:0-4", "val", EvalTransform(32))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64].sort().values.tolist()
    reps = h.representations(torch.stack([ds[i][0] for i in idx]))
    for space, z in reps.items():
        want = statistics(z.double())
        for key in ("rankme", "std"):
            assert res["metrics"][space][key] == pytest.approx(want[key], rel=1e-4)


@pytest.mark.slow
def test_cli_plot_umap_falls_back_to_tsne_without_umap_learn(trained_run, tmp_path):
    # umap made unimportable in the child (as when umap-learn is not installed)
    code = ("import sys; sys.modules['umap'] = None; sys.argv = ['opera'] + sys.argv[1:]; "
            "from opera.cli import main; main()")
    out = tmp_path / "fallback"
    done = subprocess.run([sys.executable, "-c", code, "run", "diagnose", "-c", str(trained_run), "--num-images", "40",
                           "--plot", "umap", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "umap-learn is not installed" in done.stdout
    saved = json.loads((out / "results.json").read_text())
    assert (saved["embedding"]["method"], saved["embedding"]["requested"]) == ("tsne", "umap")
    assert all(open(p, "rb").read(8) == PNG for p in saved["plots"].values())


@pytest.mark.slow
def test_cli_plot_umap_with_umap_learn(trained_run, tmp_path):
    pytest.importorskip("umap")
    out = tmp_path / "umap"
    done = subprocess.run([sys.executable, "-m", "opera", "run", "diagnose", "-c", str(trained_run), "--data", "digits",
                           "--num-images", "60", "--plot", "umap", "-o", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["embedding"]["method"] == "umap" and len(saved["plots"]) == 4
    assert np.load(saved["embedding"]["points"])["backbone"].shape == (60, 2)


@pytest.mark.slow
def test_cli_refuses_an_unknown_plot_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "opera", "run", "diagnose", "-c", "random:resnet_tiny", "--plot", "pca",
                           "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "pca" in err[0] and "umap" in err[0] and "tsne" in err[0]
