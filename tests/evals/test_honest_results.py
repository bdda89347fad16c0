"""Results say what was measured: a transfer target the run saw in pretraining is recorded and said
as not held out, k-NN records the k its queries voted with, and an export's usage line loads the
file for the backbone that was exported (or the format refuses a backbone it cannot describe).

Every case runs the real command line (``opera.cli.main``) on runs made here: a ``resnet_tiny``
"pretrained" on all ten digits or on ``digits:0-4`` (random weights; the runs' ``config.yaml``
holds what they were pretrained on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli.test_bad_inputs import assert_one_line_error, run_cli


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def make_run(root: Path, spec: str) -> Path:
    """A run directory as ``opera run pretrain --data SPEC`` leaves it (backbone.safetensors and
    config.yaml), with random ``resnet_tiny`` weights."""
    from opera.backbones import create_backbone
    from opera.configs import PretrainConfig, config_to_dict
    from opera.engine.checkpoint import export_backbone

    torch.manual_seed(0)
    root.mkdir(parents=True)
    export_backbone(create_backbone("resnet_tiny", img_size=32), root / "backbone.safetensors")
    cfg = PretrainConfig()
    cfg.data.spec = spec
    (root / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return root


@pytest.fixture(scope="module")
def all_digits_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "all_digits", "digits")


@pytest.fixture(scope="module")
def half_digits_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "digits_0-4", "digits:0-4")


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# ----------------------------------------------------------------------------- held out or not
@pytest.mark.parametrize(("pretraining", "target", "held"), [
    ("digits:0-4", "digits:5-9", True),
    ("digits", "digits:5-9", False),
    ("digits:0-6", "digits:5-9", False),
    ("digits:0-4", "digit_scenes:5-9", True),
    ("digits", "digit_scenes", False),
    (None, "digits:5-9", True),  # random:/timm: baselines saw no data
    ("digits", "coco=/data/coco", True),
    ("cifar10=/data", "digits:5-9", True),
    ("cifar10=/data", "ade20k=/data/ade", None),  # two real datasets: not comparable
])
def test_held_out_compares_the_pretraining_classes_with_the_target(pretraining, target, held):
    from opera.evals.transfer import held_out, held_out_note

    run_config = {"data": {"spec": pretraining}} if pretraining else None
    record = held_out(run_config, target)
    assert record == {"pretraining": pretraining, "target": target, "held_out": held}
    assert (held_out_note(record) is None) == (held is not False)


def test_a_partly_seen_target_names_the_shared_classes_and_the_unseen_ones():
    from opera.evals.transfer import held_out, held_out_note

    note = held_out_note(held_out({"data": {"spec": "digits:0-6"}}, "digits:5-9"))
    assert note.startswith("digits:5-9 is not held out: the run was pretrained on digits:0-6 (classes 0-6, 5-6 included)")
    assert note.endswith("--target digits:7-9 evaluates on the classes it did not see")


NOT_HELD_OUT = ("note: digits:5-9 is not held out: the run was pretrained on digits (all ten classes, 5-9 included), so these "
                "results measure classes it saw in pretraining, not transfer to unseen classes; to measure transfer, pretrain "
                "on a subset (e.g. --data digits:0-4) and evaluate on the rest")


@pytest.mark.parametrize(("run", "data", "notes"), [
    pytest.param("all_digits_run", {"pretraining": "digits", "target": "digits:5-9", "held_out": False}, [NOT_HELD_OUT],
                 marks=pytest.mark.slow, id="pretrained-on-all-ten"),
    pytest.param("half_digits_run", {"pretraining": "digits:0-4", "target": "digits:5,6,7,8,9", "held_out": True}, [],
                 id="pretrained-on-0-4"),
])
def test_digits_transfer_records_and_says_whether_the_target_is_held_out(run, data, notes, request, tmp_path, capsys):
    out = tmp_path / "transfer"
    code, stdout, err = run_cli(["run", "transfer", "--suite", "digits", "--checkpoint", str(request.getfixturevalue(run)),
                                 "--protocols", "knn", "--output", str(out)], capsys)
    assert code == 0, err
    assert results(out)["data"] == data
    assert lines_starting(stdout, "note:") == notes


@pytest.mark.parametrize("suite", ["segmentation", pytest.param("detection", marks=pytest.mark.slow)])
def test_dense_transfer_records_what_the_run_was_pretrained_on(all_digits_run, half_digits_run, suite, tmp_path, capsys):
    for run, pretraining, held in ((all_digits_run, "digits", False), (half_digits_run, "digits:0-4", True)):
        out = tmp_path / run.name
        code, stdout, err = run_cli(["run", "transfer", "--suite", suite, "--recipe", f"digits_{suite}_probe", "--iters", "1",
                                     "--checkpoint", str(run), "--output", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        data = results(out)["data"]
        assert data["spec"] == "digit_scenes:5-9"
        assert (data["pretraining"], data["held_out"]) == (pretraining, held)
        notes = lines_starting(stdout, "note:")
        if held:
            assert notes == [], stdout
        else:
            assert len(notes) == 1 and notes[0].startswith(
                "note: digit_scenes:5-9 is not held out: the run was pretrained on digits (all ten classes, 5-9 included)"), stdout


# ----------------------------------------------------------------------------- k-NN's k
def test_knn_records_the_k_its_queries_voted_with(all_digits_run, tmp_path, capsys):
    """digits:0-1 has 288 training images: --k 100000 votes with all 288, exactly as --k 288 does."""
    code, stdout, err = run_cli(["run", "knn", "--checkpoint", str(all_digits_run), "--data", "digits:0-1", "--k", "100000",
                                 "--output", str(tmp_path / "big")], capsys)
    assert code == 0, err
    big = results(tmp_path / "big")["metrics"]
    assert big["bank_size"] == 288
    assert (big["k"], big["k_requested"]) == (288, 100000)
    assert lines_starting(stdout, "note:") == [
        "note: k=100000 is more than the 288 images of the bank (digits:0-1, train split): each query voted with all 288 "
        "of them, recorded as k=288 (k_requested=100000); a k below 288 votes with nearest neighbours only"]
    code, stdout, err = run_cli(["run", "knn", "--checkpoint", str(all_digits_run), "--data", "digits:0-1", "--k", "288",
                                 "--output", str(tmp_path / "all")], capsys)
    assert code == 0, err
    same = results(tmp_path / "all")["metrics"]
    assert (same["top1"], same["top5"], same["k"]) == (big["top1"], big["top5"], 288)
    assert lines_starting(stdout, "note:") == []


# ----------------------------------------------------------------------------- export usage
def _usage_line(stdout: str, out: Path) -> str:
    printed = lines_starting(stdout, "usage: ")
    assert len(printed) == 1, stdout
    usage = printed[0][len("usage: "):]
    assert usage == results(out)["metrics"]["usage"]
    return usage


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_the_printed_torchvision_line_loads_the_export_strictly(name, tmp_path, capsys):
    import torchvision

    from opera.evals.common import load_eval_backbone

    out = tmp_path / name
    code, stdout, err = run_cli(["export", "--checkpoint", f"random:{name}", "--format", "torchvision", "--output", str(out)], capsys)
    assert code == 0, err
    usage = _usage_line(stdout, out)
    scope = {"torch": torch, "torchvision": torchvision}
    exec(usage, scope)  # the line as printed: its load_state_dict is strict
    model = scope["m"].eval()
    opera_model = load_eval_backbone(f"random:{name}").model.eval()  # the same seeded random weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), opera_model(x), rtol=1e-4, atol=1e-4)


def test_torchvision_format_refuses_a_backbone_no_torchvision_model_builds(all_digits_run, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, err = run_cli(["export", "--checkpoint", str(all_digits_run), "--format", "torchvision",
                                 "--output", str(out)], capsys)
    assert_one_line_error(code, err, "error: backbone 'resnet_tiny' (BasicBlock stages [1, 1, 1, 1], widths [32, 64, 128, 256]) "
                          "is built by none of torchvision's ResNets",
                          "--format torchvision takes resnet18, resnet34, resnet50, resnet101, resnet152",
                          "export this one with --format timm")
    assert not out.exists()


@pytest.mark.slow
def test_detectron2_and_mmdet_usage_name_the_exported_depth(all_digits_run, tmp_path, capsys):
    """A ResNet-18's lines configure depth 18 (and its 64-channel res2 / FPN inputs), not R-50's;
    resnet_tiny's say that no stock config builds it."""
    code, stdout, err = run_cli(["export", "--checkpoint", "random:resnet18", "--format", "detectron2",
                                 "--output", str(tmp_path / "d2")], capsys)
    assert code == 0, err
    assert " MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 " in _usage_line(stdout, tmp_path / "d2")
    code, stdout, err = run_cli(["export", "--checkpoint", "random:resnet18", "--format", "mmdet",
                                 "--output", str(tmp_path / "mm")], capsys)
    assert code == 0, err
    usage = _usage_line(stdout, tmp_path / "mm")
    assert "backbone=dict(type='ResNet', depth=18, init_cfg=dict(type='Pretrained'" in usage
    state = torch.load(tmp_path / "mm" / "backbone_mmdet.pth", weights_only=True)["state_dict"]
    channels = [state[f"backbone.layer{i}.1.bn2.weight"].shape[0] for i in range(1, 5)]
    assert f"neck=dict(in_channels={channels})" in usage and channels == [64, 128, 256, 512]
    for fmt in ("detectron2", "mmdet"):
        out = tmp_path / f"tiny_{fmt}"
        code, stdout, err = run_cli(["export", "--checkpoint", str(all_digits_run), "--format", fmt, "--output", str(out)], capsys)
        assert code == 0, err
        assert lines_starting(stdout, "usage:") == []
        assert lines_starting(stdout, "note:") == [
            f"note: no stock {fmt} config builds this backbone (BasicBlock stages [1, 1, 1, 1], widths [32, 64, 128, 256]): "
            f"{out / f'backbone_{fmt}.pth'} holds its weights under {fmt}'s names for a ResNet with those stages built in code"]
