"""Partly labelled data: the labelled subset (balanced, seeded, written, reused on resume), unlabelled
images beside the labelled set, and batches with a fixed number of labelled images."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from opera.configs.schema import DataConfig
from opera.data import PretrainFeed, build_dataset, dataset_target_sets
from opera.data.labels import (
    LABELLED_FILE,
    WithUnlabelled,
    pretrain_data,
    read_labels_file,
    resolve_labelled,
    select_labelled,
)
from opera.data.loader import LabelledShareBatchSampler, ShardedBatchSampler
from opera.errors import OperaError


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", "train")


def per_class(ds, idx):
    y = dataset_target_sets(ds)["class"]
    return Counter(y[i] for i in idx)


def test_fraction_is_class_balanced_and_seeded(digits):
    idx = select_labelled(digits, "10%", seed=0)
    sizes = Counter(dataset_target_sets(digits)["class"])
    assert per_class(digits, idx) == {c: round(0.1 * n) for c, n in sizes.items()}
    assert idx == select_labelled(digits, "10%", seed=0)
    assert idx != select_labelled(digits, "10%", seed=1)
    assert set(per_class(digits, select_labelled(digits, "1%", seed=0)).values()) == {1}  # >= 1 per class
    assert set(per_class(digits, select_labelled(digits, "13/class", seed=5)).values()) == {13}


@pytest.mark.parametrize("spec", ["0%", "150%", "ten%", "0/class", "x/class", "500/class", "no/such/file.txt"])
def test_bad_labels_are_one_line_errors(digits, spec):
    with pytest.raises(OperaError) as e:
        select_labelled(digits, spec, seed=0)
    assert "\n" not in str(e.value) and "--labels" in str(e.value)


def test_written_list_is_reused_on_resume_and_a_changed_spec_fails(digits, tmp_path):
    first = resolve_labelled(digits, "10%", "digits", 0, tmp_path)
    names, spec = read_labels_file(tmp_path / LABELLED_FILE)
    assert spec == "10%" and len(names) == len(first)
    # a resumed run (even one whose seed changed) takes the written list, not a fresh draw
    assert resolve_labelled(digits, "10%", "digits", 7, tmp_path) == first
    with pytest.raises(OperaError, match="resume with --labels 10%"):
        resolve_labelled(digits, "1%", "digits", 0, tmp_path)
    with pytest.raises(OperaError, match="resume with --labels 10%"):
        resolve_labelled(digits, "all", "digits", 0, tmp_path)
    # the written file is itself a valid --labels FILE (what finetune and later runs pass)
    assert select_labelled(digits, str(tmp_path / LABELLED_FILE), seed=3) == first


def test_labels_file_by_name_and_bad_names(digits, tmp_path):
    f = tmp_path / "split.txt"
    a, b = digits.describe_item(3), digits.describe_item(40)  # names of the 1,797 digits: digits[<index>]
    f.write_text(f"# my split\n{b}\n\n{a}\n")
    assert select_labelled(digits, str(f), seed=0) == [3, 40]
    val = build_dataset("digits", "val").describe_item(0)
    f.write_text(f"{val}\n")  # a held-out image is not a training image
    with pytest.raises(OperaError, match="not a training image"):
        select_labelled(digits, str(f), seed=0)
    f.write_text("cat.jpg\n")
    with pytest.raises(OperaError, match="not a training image"):
        select_labelled(digits, str(f), seed=0)


def test_no_labels_option_changes_nothing(tmp_path):
    for labels in ("all", "100%"):
        ds, sets, summary = pretrain_data(dataclasses.replace(DataConfig(), labels=labels), 0, tmp_path)
        assert sets is None and summary == {} and not (tmp_path / LABELLED_FILE).exists()
        assert len(ds) == len(build_dataset("digits", "train"))


def feed(cfg: DataConfig, run_dir, seed=0, **kw):
    ds, sets, _ = pretrain_data(cfg, seed, run_dir)
    return PretrainFeed(ds, img_size=8, crop_min=0.5, flip=True, seed=seed, target_sets=sets, **kw), ds


def test_unlabelled_images_are_seen_and_carry_no_label(tmp_path):
    cfg = dataclasses.replace(DataConfig(), spec="digits:0-4", labels="10%", unlabelled="digits:5-9")
    f, ds = feed(cfg, tmp_path)
    assert isinstance(ds, WithUnlabelled) and f.in_memory
    n_lab = len(build_dataset("digits:0-4", "train"))
    labelled = 0
    for views, targets in f.epoch(64, 0, drop_last=False):
        assert len(views) == 2 and views[0].shape[0] == targets["class"].shape[0]
        labelled += int((targets["class"] >= 0).sum())
    table = f.target_sets["class"]
    assert bool((table[n_lab:] == -1).all()) and bool((f.target_sets["coarse"][n_lab:] == -1).all())
    assert labelled == int((table >= 0).sum()) == len(select_labelled(build_dataset("digits:0-4", "train"), "10%", 0))
    # every image of the epoch, the unlabelled ones included, is in some batch (self sees them)
    order = ShardedBatchSampler(len(ds), 64, drop_last=False, seed=0, epoch=0)
    assert sorted(i for b in order for i in b) == list(range(len(ds)))
    assert len(ds) > n_lab


def test_labelled_per_batch_exact_and_resumable():
    labelled, unlabelled = list(range(0, 20)), list(range(20, 300))
    world, per_rank, k = 2, 16, 8

    def batches(epoch, start=0):
        ranks = [list(LabelledShareBatchSampler(labelled, unlabelled, per_rank, k, seed=4, epoch=epoch, rank=r,
                                                world_size=world, start_step=start)) for r in range(world)]
        return list(zip(*ranks))

    for epoch in (0, 1):
        full = batches(epoch)
        assert len(full) == 300 // world // per_rank
        for step in full:
            for rank_batch in step:
                assert len(rank_batch) == per_rank and sum(i < 20 for i in rank_batch) == k // world
            assert len(set(step[0]) | set(step[1])) == world * per_rank  # no image twice in a global batch
        assert batches(epoch, start=3) == full[3:]  # mid-epoch resume
    assert batches(0) != batches(1)
    with pytest.raises(OperaError, match="labelled_per_batch"):
        LabelledShareBatchSampler(labelled, unlabelled, per_rank, 3, world_size=2)


def test_feed_labelled_per_batch_in_memory(tmp_path):
    cfg = dataclasses.replace(DataConfig(), labels="1%")
    f, _ = feed(cfg, tmp_path, labelled_per_batch=6)
    counts = [int((t["class"] >= 0).sum()) for _, t in f.epoch(32, 0)]
    assert counts and set(counts) == {6}
    again = [(v[0], t["class"]) for v, t in f.epoch(32, 0, start_step=2)]
    full = [(v[0], t["class"]) for v, t in f.epoch(32, 0)][2:]
    assert len(again) == len(full) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, full))


def _pretrain(out, *extra):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "self,full", "--labels", "10%", "--epochs", "1",
           "--batch-size", "64", "--set", "train.knn_every=0", "--set", "self.mlp_dim=64", "--set", "self.dim=32",
           "--set", "train.log_every=1", "--device", "cpu", "--output", str(out), *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_pretrain_with_10_percent_labels_writes_and_reuses_the_list(tmp_path):
    import json

    out = tmp_path / "run"
    first = _pretrain(out, "--set", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    written = (out / LABELLED_FILE).read_text()
    names, spec = read_labels_file(out / LABELLED_FILE)
    assert spec == "10%" and len(names) == len(select_labelled(build_dataset("digits", "train"), "10%", 0))
    again = _pretrain(out, "--set", "train.max_steps=4")  # resumes at step 2 with the same list
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and (out / LABELLED_FILE).read_text() == written
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["full/labelled"] for r in rows if "full/labelled" in r]
    assert len(counts) == 4 and all(0 <= c < 64 for c in counts) and sum(counts) > 0
    changed = _pretrain(out, "--labels", "1%")
    assert changed.returncode != 0
    err = changed.stderr.strip().splitlines()
    assert len(err) == 1 and "resume with --labels 10%" in err[0]


def test_finetune_subset_reuses_the_pretraining_list(digits, tmp_path):
    from opera.data.labels import labelled_subset

    run = tmp_path / "run"
    run.mkdir()
    written = resolve_labelled(digits, "10%", "digits", 4, run)  # what pretraining with seed 4 wrote
    (run / "last.pt").write_bytes(b"")
    for checkpoint in (run, run / "last.pt"):
        sub = labelled_subset(digits, "10%", "digits", 0, str(checkpoint))  # the finetune seed 0 would draw others
        assert list(sub.indices) == written and sub.num_classes == digits.num_classes
        assert sub.targets == [digits.targets[i] for i in written]
        assert list(labelled_subset(digits, "run", "digits", 0, str(checkpoint)).indices) == written
    fresh = labelled_subset(digits, "10%", "digits", 0, "random:resnet_tiny")
    assert list(fresh.indices) == select_labelled(digits, "10%", 0) != written
    assert labelled_subset(digits, "all", "digits", 0, str(run)) is digits
    with pytest.raises(OperaError, match="--labels run needs"):
        labelled_subset(digits, "run", "digits", 0, str(tmp_path))


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_unlabelled_folder_beside_digits_is_deterministic_and_resumable(tmp_path, augment_on):
    from torchvision.io import write_png

    folder = tmp_path / "extra" / "unlabelled"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(12):  # loose images, some in a subfolder: no class folders
        write_png(torch.randint(0, 255, (3, 10 + i % 3, 12), dtype=torch.uint8, generator=g),
                  str(folder / ("sub" if i % 2 else "") / f"img{i}.png"))
    cfg = dataclasses.replace(DataConfig(), spec="digits:0-1", unlabelled=str(folder), augment_on=augment_on)
    f, ds = feed(cfg, tmp_path / "run")
    n_lab = len(build_dataset("digits:0-1", "train"))
    assert len(ds) == n_lab + 12 and not f.in_memory and bool((f.target_sets["class"][n_lab:] == -1).all())
    first = list(f.epoch(16, 0, drop_last=False))
    assert sum(int((t["class"] < 0).sum()) for _, t in first) == 12  # every unlabelled image, once
    resumed = list(f.epoch(16, 0, start_step=3, drop_last=False))
    assert len(resumed) == len(first) - 3
    for (va, ta), (vb, tb) in zip(resumed, first[3:]):
        assert torch.equal(ta["class"], tb["class"]) and all(torch.equal(a, b) for a, b in zip(va, vb))


def test_unlabelled_auto_needs_the_folder_beside_train(tmp_path):
    from opera.data.labels import build_unlabelled

    with pytest.raises(OperaError, match="unlabelled/ folder beside train/"):
        build_unlabelled("auto", "digits")
    with pytest.raises(OperaError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        build_unlabelled(str(tmp_path / "empty"), "digits")


def test_unlabelled_auto_names_an_unlabeled_folder_to_rename(tmp_path):
    """A data folder made before the rename has unlabeled/ beside train/: the error says to rename it."""
    from opera.data.labels import build_unlabelled

    for sub in ("train/cat", "unlabeled"):
        (tmp_path / sub).mkdir(parents=True)
    with pytest.raises(OperaError, match="finds unlabeled/: rename it unlabelled/") as err:
        build_unlabelled("auto", str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_readme_partly_labelled_command_runs_as_written(tmp_path):
    """The README's line, exactly as typed, on the embedded digits (in a scratch working directory)."""
    import os
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = readme.split("## Partly labelled data", 1)[1].split("\n## ", 1)[0]
    line = re.findall(r"```bash\n(.*?)```", body, flags=re.S)[0].strip()
    assert line == "opera run pretrain --hierarchy self,full --labels 10% --epochs 1"
    argv = shlex.split(line)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "opera", *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / LABELLED_FILE).is_file() and (runs[0] / "backbone.safetensors").is_file()
    assert read_labels_file(runs[0] / LABELLED_FILE)[1] == "10%"


@pytest.mark.slow
def test_interrupted_partly_labelled_run_resumes_to_the_same_weights(tmp_path):
    """--labels 10%, --unlabelled and data.labelled_per_batch: stopped after 3 steps and rerun, the
    run ends with the weights of one never stopped (deterministic CPU mode)."""
    from opera.configs import apply_overrides, load_config
    from opera.engine.checkpoint import load_state
    from opera.engine.pretrain import run_pretrain

    def cfg(max_steps: int):
        return apply_overrides(load_config("cpu_digits"), [
            "data.spec=digits:0-2", "data.labels=10%", "data.unlabelled=digits:3-4", "data.labelled_per_batch=8",
            "train.epochs=2", "train.batch_size=64", "train.device=cpu", "train.knn_every=0", "train.deterministic=true",
            "self.mlp_dim=32", "self.dim=16", "full.hidden=16", "backbone.img_size=16", "train.save_every_epochs=0",
            f"train.max_steps={max_steps}"])

    run_pretrain(cfg(0), tmp_path / "clean")
    run_pretrain(cfg(3), tmp_path / "stopped")  # mid first epoch
    assert load_state(tmp_path / "stopped" / "last.pt")["global_step"] == 3
    run_pretrain(cfg(0), tmp_path / "stopped")
    a, b = load_state(tmp_path / "clean" / "last.pt"), load_state(tmp_path / "stopped" / "last.pt")
    assert a["global_step"] == b["global_step"] > 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert (tmp_path / "clean" / LABELLED_FILE).read_text() == (tmp_path / "stopped" / LABELLED_FILE).read_text()


def test_unlabelled_auto_takes_the_folder_beside_train(tmp_path):
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(1)
    for sub, n in (("train/cat", 3), ("train/dog", 3), ("val/cat", 1), ("val/dog", 1), ("unlabelled", 5)):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(n):
            write_png(torch.randint(0, 255, (3, 12, 12), dtype=torch.uint8, generator=g), str(tmp_path / sub / f"{i}.png"))
    cfg = dataclasses.replace(DataConfig(), spec=str(tmp_path), unlabelled="auto", labels="1/class")
    (tmp_path / "run").mkdir()
    ds, sets, summary = pretrain_data(cfg, 0, tmp_path / "run")
    assert summary == {"labelled_images": 2, "labelled_set_images": 6, "unlabelled_images": 5} and len(ds) == 11
    assert sets["class"][6:] == [-1] * 5 and sum(y >= 0 for y in sets["class"]) == 2
    names, _ = read_labels_file(tmp_path / "run" / LABELLED_FILE)
    assert len(names) == 2 and all(n.startswith(("train/cat/", "train/dog/")) for n in names)  # relative to --data
    f = tmp_path / "split.txt"
    f.write_text("".join(n.rsplit("/", 1)[-1] + "\n" for n in names[:1]))  # a bare file name, as SimCLR's lists
    with pytest.raises(OperaError, match="matches 2 images"):  # 0.png is in cat/ and dog/: ambiguous
        select_labelled(build_dataset(str(tmp_path), "train"), str(f), 0)
