"""Resuming with another configuration is refused in one line listing every changed key; the
documented keys (RESUMABLE_CHANGES) may change, each said in one line."""

from __future__ import annotations

from opera.engine.checkpoint import LAST, load_state
import pickle

import pytest

from opera.engine.checkpoint import CheckpointUnreadable
from opera.engine.resume import RESUMABLE_CHANGES, check_config_drift, config_drift
from opera.engine.stop import Stopped
from opera.errors import OperaError


def test_changed_batch_and_lr_are_refused_listing_each_key(run_copy, opera_main, tiny, one_line):
    before = (run_copy / LAST).read_bytes()
    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--batch-size", "16", "--set", "optim.base_lr=1.0")
    line = one_line(err)
    assert code == 2
    assert "train.batch_size 32 -> 16" in line and "optim.base_lr 4.8 -> 1.0" in line, line
    assert "--output" in line and "train.epochs" in line  # the way out, and what may change
    assert (run_copy / LAST).read_bytes() == before  # nothing written


def test_allowed_changes_resume_with_one_line_each(run_copy, opera_main, tiny):
    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--epochs", "2", "--set", "train.max_steps=10",
                                "--set", "train.log_every=5")
    assert code == 0, err
    said = [line for line in out.splitlines() if line.startswith("resuming with ")]
    assert sorted(s.split(" (")[0] for s in said) == ["resuming with train.epochs 1 -> 2",
                                                      "resuming with train.log_every 1 -> 5",
                                                      "resuming with train.max_steps 0 -> 10"], said
    assert int(load_state(run_copy / LAST)["global_step"]) == 10  # continued from step 9, one more step


def test_drift_ignores_derived_values_and_unused_spaces():
    old = {"hierarchy": "self", "train": {"epochs": 1, "batch_size": 32}, "mask": {"ratio": 0.5},
           "resolved": {"world_size": 1}}
    new = {"hierarchy": "self", "train": {"epochs": 3, "batch_size": 32}, "mask": {"ratio": 0.7},
           "resolved": {"world_size": 8}}
    assert config_drift(old, new, ignore_sections={"mask"}) == ([], ["train.epochs 1 -> 3"])
    assert config_drift(old, new) == (["mask.ratio 0.5 -> 0.7"], ["train.epochs 1 -> 3"])
    assert set(RESUMABLE_CHANGES) >= {"train.epochs", "data.workers", "train.log_every"}


def test_an_option_newer_than_the_checkpoint_is_no_drift_at_its_default(tmp_path):
    old = {"train": {"epochs": 1}}  # written before train.new_option existed
    defaults = {"train": {"epochs": 20, "new_option": False}}
    assert check_config_drift(old, {"train": {"epochs": 1, "new_option": False}}, tmp_path, defaults=defaults) == []
    with pytest.raises(OperaError, match=r"train.new_option \(unset\) -> True"):
        check_config_drift(old, {"train": {"epochs": 1, "new_option": True}}, tmp_path, defaults=defaults)


def test_a_checkpoint_written_before_the_labelled_rename_resumes(tmp_path):
    """A checkpoint's stored config says data.unlabeled / data.labeled_per_batch (the names before
    they were renamed data.unlabelled / data.labelled_per_batch): read under the new names, no drift."""
    from opera.configs import PretrainConfig, apply_overrides, config_to_dict

    cfg = apply_overrides(PretrainConfig(), ["data.unlabelled=digits:5-9", "data.labelled_per_batch=8"])
    stored = config_to_dict(cfg)
    data = stored["data"]
    data["unlabeled"], data["labeled_per_batch"] = data.pop("unlabelled"), data.pop("labelled_per_batch")
    defaults = config_to_dict(PretrainConfig())
    assert check_config_drift(stored, config_to_dict(cfg), tmp_path, defaults=defaults) == []
    assert "unlabeled" in stored["data"]  # the checkpoint's dict is not changed
    other = config_to_dict(apply_overrides(PretrainConfig(), ["data.unlabelled=digits:5-9", "data.labelled_per_batch=4"]))
    with pytest.raises(OperaError, match=r"data.labelled_per_batch 8 -> 4"):  # a real change is still refused
        check_config_drift(stored, other, tmp_path, defaults=defaults)


def test_errors_cross_process_pools_intact():
    stopped = pickle.loads(pickle.dumps(Stopped(17, 15)))
    assert stopped.exit_code == 143 and str(stopped).startswith("stopped at step 17; rerun the same command")
    bad = pickle.loads(pickle.dumps(CheckpointUnreadable("cannot load x", "truncated")))
    assert bad.reason == "truncated" and str(bad) == "cannot load x"


def test_a_resumed_run_may_add_or_change_its_trackers(tmp_path):
    """Adding W&B/MLflow to a run on resume (or moving where W&B sends) changes no training: allowed,
    said in one line; a training key beside it is still refused."""
    old = {"train": {"epochs": 2, "loggers": "tensorboard", "wandb_mode": "auto", "batch_size": 32}}
    new = {"train": {"epochs": 2, "loggers": "tensorboard,mlflow", "wandb_mode": "offline", "batch_size": 32}}
    assert config_drift(old, new) == ([], ["train.loggers 'tensorboard' -> 'tensorboard,mlflow'",
                                          "train.wandb_mode 'auto' -> 'offline'"])
    new["train"]["batch_size"] = 64
    assert config_drift(old, new)[0] == ["train.batch_size 32 -> 64"]
