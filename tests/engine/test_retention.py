"""What a run keeps on disk: epoch checkpoints hard-linked to the last.pt just written (copied
where links fail), pruned to train.keep_epoch_checkpoints, last.prev.pt only until the new
last.pt reads back; and a run resumes from what is kept."""

from __future__ import annotations

import os

import pytest
import torch

from opera.configs import apply_overrides, load_config
from opera.engine.checkpoint import (
    LAST,
    PREV,
    _drop_previous,
    disk_use,
    kept_epoch_count,
    load_state,
    read_backbone_file,
    save_state,
    write_epoch_checkpoint,
)
from opera.engine.pretrain import run_pretrain
from opera.errors import OperaError
from opera.files import link_or_copy


def step_of(path) -> int:
    return int(load_state(path)["global_step"])


def epochs_in(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("epoch_*.pt"))


def train_epochs(folder, keep, epochs=range(1, 6)):
    """What the loop does at each epoch end: last.pt, then its epoch file."""
    for e in epochs:
        save_state({"global_step": 10 * e, "w": torch.full((4,), float(e))}, folder / LAST, keep_previous=False)
        write_epoch_checkpoint(folder, e, keep)


def test_epoch_file_is_a_link_to_the_last_pt_just_written(tmp_path):
    train_epochs(tmp_path, -1, [1, 2])
    assert os.path.samefile(tmp_path / "epoch_0002.pt", tmp_path / LAST)
    assert not os.path.samefile(tmp_path / "epoch_0001.pt", tmp_path / LAST)  # last.pt was replaced, not rewritten
    assert [step_of(tmp_path / n) for n in epochs_in(tmp_path)] == [10, 20]


def test_a_count_keeps_the_newest_epochs_and_never_a_later_runs(tmp_path):
    save_state({"global_step": 999}, tmp_path / "epoch_0009.pt")  # left by another run in this folder
    train_epochs(tmp_path, 2)
    assert epochs_in(tmp_path) == ["epoch_0004.pt", "epoch_0005.pt", "epoch_0009.pt"]
    assert step_of(tmp_path / "epoch_0004.pt") == 40 and step_of(tmp_path / LAST) == 50


def test_a_list_keeps_those_epochs(tmp_path):
    train_epochs(tmp_path, (2, 4))
    assert epochs_in(tmp_path) == ["epoch_0002.pt", "epoch_0004.pt", "epoch_0005.pt"]  # 5: the newest, until pruned
    train_epochs(tmp_path, -1, [6])
    assert "epoch_0005.pt" in epochs_in(tmp_path)  # -1 removes nothing


def test_previous_last_goes_once_the_new_one_reads_back(tmp_path):
    save_state({"global_step": 1}, tmp_path / LAST, keep_previous=False)
    save_state({"global_step": 2}, tmp_path / LAST, keep_previous=False)
    assert not (tmp_path / PREV).exists() and step_of(tmp_path / LAST) == 2
    save_state({"global_step": 3}, tmp_path / LAST)  # keep_previous (the default of save_state)
    assert step_of(tmp_path / PREV) == 2


def test_previous_last_stays_while_the_new_one_does_not_read_back(tmp_path, capsys):
    save_state({"global_step": 1, "w": torch.ones(1000)}, tmp_path / PREV)
    save_state({"global_step": 2, "w": torch.ones(1000)}, tmp_path / LAST)
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    _drop_previous(tmp_path / LAST)
    assert step_of(tmp_path / PREV) == 1
    assert "did not read back" in capsys.readouterr().out


@pytest.mark.slow
def test_where_links_fail_the_epoch_file_is_a_copy(tmp_path):
    source = tmp_path / "last.pt"
    source.write_bytes(b"state")
    links = tmp_path / "links"
    links.mkdir()
    try:  # fill the file's link count (ext4: 65000); a filesystem without a limit links
        for i in range(70_000):
            os.link(source, links / str(i))
    except OSError:
        pass
    how = link_or_copy(source, tmp_path / "epoch_0001.pt", what="an epoch checkpoint")
    if source.stat().st_nlink < 65_000:
        pytest.skip("this filesystem has no link limit below 70000")
    assert how == "copied" and (tmp_path / "epoch_0001.pt").read_bytes() == b"state"
    assert not os.path.samefile(source, tmp_path / "epoch_0001.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "last.pt", "links"]  # no temporary file


def test_default_retention_keeps_a_300_epoch_deit_b_run_under_10_gib():
    cfg = load_config("deitb_300ep_b1024")
    t = cfg.train
    kept = kept_epoch_count(t.keep_epoch_checkpoints, t.epochs, t.save_every_epochs)
    assert kept == 3
    one = int(1.65 * 2**30)  # a DeiT-B MoCo-v3 state with AdamW: 1.61 GiB by state_bytes, about 1.65 GiB as a file
    rest, peak = disk_use(one, t.epochs, t.save_every_epochs, t.keep_epoch_checkpoints, t.keep_last_prev)
    assert (rest, peak) == (4 * one, 5 * one) and peak < 10 * 2**30


@pytest.mark.parametrize("value, needle", [("[15]", "does not write; list multiples of 10"),
                                           ("-2", "must be a count >= 0, -1 (all) or a list")])
def test_bad_retention_is_one_line(value, needle):
    with pytest.raises(OperaError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(load_config("cpu_digits"), [f"train.keep_epoch_checkpoints={value}"])


SMALL = ["data.spec=digits:0-1", "train.epochs=4", "train.batch_size=64", "self.mlp_dim=64", "self.dim=32",
         "train.knn_every=0", "train.save_every_epochs=1", "train.deterministic=true", "train.log_every=1"]


@pytest.mark.slow
def test_resume_after_pruning_matches_the_uninterrupted_run(tmp_path, capsys):
    clean, pruned = tmp_path / "clean", tmp_path / "pruned"
    run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL + ["train.keep_epoch_checkpoints=-1"]), clean)
    assert epochs_in(clean) == [f"epoch_000{e}.pt" for e in range(1, 5)] and not (clean / PREV).exists()
    assert os.path.samefile(clean / "epoch_0004.pt", clean / LAST)

    steps = step_of(clean / LAST) // 4
    run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL + ["train.keep_epoch_checkpoints=1",
                                                                     f"train.max_steps={3 * steps}"]), pruned)
    assert epochs_in(pruned) == ["epoch_0003.pt"] and not (pruned / PREV).exists()
    assert "keeps last.pt and up to 1 epoch_NNNN.pt" in capsys.readouterr().out
    (pruned / LAST).unlink()  # lost: the kept epoch file is what is left
    run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL + ["train.keep_epoch_checkpoints=1"]), pruned)
    assert f"no last.pt; resuming from epoch_0003.pt, the newest intact checkpoint (step {3 * steps})" \
        in capsys.readouterr().out
    assert epochs_in(pruned) == ["epoch_0004.pt"]
    a, _ = read_backbone_file(clean / "backbone.safetensors")
    b, _ = read_backbone_file(pruned / "backbone.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
