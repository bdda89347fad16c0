"""Every bad input to ``opera run pretrain`` is one line on stderr, exit code 2, no traceback,
and nothing in the output directory is overwritten (issue: pretraining end to end)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from opera.cli import main

FAST = ["--epochs", "1", "--batch-size", "16", "--set", "train.knn_every=0", "--set", "self.mlp_dim=64"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["opera", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def make_tree(root: Path, n: int = 4, corrupt: str | None = None) -> Path:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()).save(d / f"{i}.jpg")
    if corrupt:
        (root / "train" / "cat" / corrupt).write_bytes(b"this is not a jpeg")
    return root


def test_missing_data_path(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, str(tmp_path / "nope"))


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    code, _, err = run_cli(["run", "pretrain", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err)
    assert "image" in err.lower()


def test_corrupt_image_is_named(tmp_path, capsys):
    root = make_tree(tmp_path / "tree", corrupt="broken.jpg")
    code, _, err = run_cli(["run", "pretrain", "--data", str(root), "--batch-size", "4", "-o", str(tmp_path / "o"),
                            "--epochs", "1", "--set", "train.knn_every=0", "--set", "self.mlp_dim=64"], capsys)
    assert_one_line_error(code, err, "broken.jpg")


def test_unknown_hierarchy_token(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "--hierarchy", "self,fulll", "-o", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, "fulll", "full")


def test_mask_on_cnn(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "--hierarchy", "mask,self,full", "--backbone", "resnet_tiny", "-o", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, "mask", "vit_tiny")


def test_unknown_backbone_suggests(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "--backbone", "resnet_tiniest", "-o", str(tmp_path / "o"), *FAST], capsys)
    assert_one_line_error(code, err, "resnet_tiny")


def test_batch_larger_than_dataset(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "--data", "digits:0-1", "--batch-size", "4096", "-o", str(tmp_path / "o"),
                            "--epochs", "1", "--set", "train.knn_every=0"], capsys)
    assert_one_line_error(code, err, "4096")


def test_output_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(["run", "pretrain", "-o", str(blocker / "run"), *FAST], capsys)
    assert_one_line_error(code, err, "not writable")


def test_unknown_config_key(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", "-o", str(tmp_path / "o"), "--set", "train.epoch=3"], capsys)
    assert_one_line_error(code, err, "train.epochs")


def test_resume_from_other_hierarchy_overwrites_nothing(tmp_path, capsys):
    first = tmp_path / "first"
    code, _, err = run_cli(["run", "pretrain", "--hierarchy", "self", "-o", str(first), "--set", "train.max_steps=1", *FAST], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    code, _, err = run_cli(["run", "pretrain", "--hierarchy", "self,full", "-o", str(first), *FAST], capsys)
    assert_one_line_error(code, err, "hierarchy")
    after = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    assert before == after
    other = tmp_path / "other"
    code, _, err = run_cli(["run", "pretrain", "--backbone", "vit_tiny", "--resume", str(first / "last.pt"), "-o", str(other), *FAST], capsys)
    assert_one_line_error(code, err, "backbone")


def test_usage_errors_exit_2_without_traceback(capsys):
    code, _, err = run_cli(["run", "pretrain", "--epochs", "abc"], capsys)
    assert code == 2 and "Traceback" not in err and "--epochs" in err
    code, _, err = run_cli(["run", "nosuch"], capsys)
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--labels", "0%"], "--labels 10%"),
    (["--labels", "12"], "10%"),
    (["--labels", "0/class"], "13/class"),
    (["--labels", "900/class"], "or fewer"),
    (["--unlabelled", "no/such/folder"], "no/such/folder"),
    (["--labels", "10%", "--set", "data.labelled_per_batch=7", "--batch-size", "4"], "labelled_per_batch"),
])
def test_bad_labels_and_unlabelled_are_one_line(tmp_path, capsys, args, needle):
    code, _, err = run_cli(["run", "pretrain", *FAST, *args, "--output", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("item, old, new", [
    ("data.unlabeled=digits:5-9", "data.unlabeled", "data.unlabelled"),
    ("data.labeled_per_batch=8", "data.labeled_per_batch", "data.labelled_per_batch"),
])
def test_a_renamed_key_names_its_new_name(tmp_path, capsys, item, old, new):
    code, _, err = run_cli(["run", "pretrain", *FAST, "--set", item, "--output", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, f"{old} was renamed {new}", f"--set {new}=")
    assert not (tmp_path / "run").exists()


def test_the_old_unlabeled_flag_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["run", "pretrain", *FAST, "--unlabeled", "x", "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err and "--unlabeled" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, key", [
    (["--set", "optim.base_lr=-1"], "optim.base_lr"),
    (["--set", "optim.ema_momentum=2"], "optim.ema_momentum"),
    (["--set", "self.dim=0"], "self.dim"),
    (["--epochs", "0"], "train.epochs"),
    (["--set", "full.layers=0"], "full.layers"),
    (["--set", "full.label_smoothing=2"], "full.label_smoothing"),
    (["--set", "train.amp=fp32"], "train.amp"),
    (["--set", "mask.ratio=1"], "mask.ratio"),
])
def test_out_of_range_values_are_one_line_before_training(tmp_path, capsys, args, key):
    """Each of these would otherwise train (one step: train.max_steps=1) or fail with a traceback;
    validated at load, it is one line naming the key and the fix, and no run directory is made."""
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "pretrain", *FAST, "--set", "train.max_steps=1", *args, "-o", str(out)], capsys)
    assert_one_line_error(code, err, key, f"--set {key}=")
    assert not out.exists()
