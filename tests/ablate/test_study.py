"""Variants, validation and resuming of ablation studies (a real tiny study: seconds per cell)."""

from __future__ import annotations

import json

import pytest

import opera.engine.pretrain as pretrain_mod
from opera.ablate.records import CELL_FILE, cell_dir, load_study
from opera.ablate.study import (
    arrangement_variants,
    cell_config,
    create_study,
    hierarchy_variants,
    label_variants,
    run_cell,
    run_study,
    split_values,
    sweep_variants,
)
from opera.errors import OperaError


def test_arrangement_and_hierarchy_variants():
    vs = arrangement_variants("A,B,C")
    assert [v.name for v in vs] == ["A", "B", "C"]
    assert vs[1].overrides == ["hierarchy=self,full", "arrangement=B"]
    hv = {v.name: v.overrides for v in hierarchy_variants("self,full,self+full,naive,mask+self+full,mask+self")}
    assert hv["self"] == ["hierarchy=self", "arrangement=null"]
    assert hv["full"] == ["hierarchy=full", "arrangement=null"]
    assert hv["self+full"] == ["hierarchy=self,full", "arrangement=C"]
    assert hv["naive"] == ["hierarchy=self,full", "arrangement=naive"]
    assert hv["mask+self+full"][0] == "hierarchy=mask,self,full"
    assert hv["mask+self"][0] == "hierarchy=mask,self"
    with pytest.raises(OperaError, match="unknown arrangement 'D'"):
        arrangement_variants("A,D")
    with pytest.raises(OperaError, match="unknown hierarchy variant"):
        hierarchy_variants("self,fulll")


def test_label_variants_run_self_once_and_the_others_per_fraction():
    vs = label_variants("1%,10%,100%", "self,full,self+full")
    assert [v.name for v in vs] == ["self", "full@1%", "full@10%", "full@100%", "self+full@1%", "self+full@10%",
                                    "self+full@100%"]
    by = {v.name: v.overrides for v in vs}
    assert by["self"] == ["hierarchy=self", "arrangement=null"]  # labels do not reach it: one run, not three
    assert by["self+full@1%"] == ["hierarchy=self,full", "arrangement=C", "data.labels=1%"]
    assert len({v.dirname for v in vs}) == len(vs)
    with pytest.raises(OperaError, match="--labels '0%'"):
        label_variants("0%,10%", "full")
    with pytest.raises(OperaError, match="repeats"):
        label_variants("10%,10%", "full")


def test_sweep_axes_grid_and_fixed_values():
    assert split_values("1,2,[0.9,0.99]") == ["1", "2", "[0.9,0.99]"]
    variants, fixed = sweep_variants(["full.layers=1,2", "self.dim=64,128", "train.epochs=1"])
    assert fixed == ["train.epochs=1"]
    assert [v.name for v in variants] == ["full.layers=1 self.dim=64", "full.layers=1 self.dim=128",
                                          "full.layers=2 self.dim=64", "full.layers=2 self.dim=128"]
    assert variants[3].overrides == ["full.layers=2", "self.dim=128"]
    assert variants[0].dirname == "full.layers=1_self.dim=64"
    with pytest.raises(OperaError, match="at least one key with several values"):
        sweep_variants(["full.layers=2"])
    with pytest.raises(OperaError, match="given twice"):
        sweep_variants(["full.layers=1,2", "full.layers=3,4"])


def test_cell_config_applies_base_variant_and_seed(tmp_path):
    variants, fixed = sweep_variants(["full.layers=1,3"])
    create_study("sweep", variants, output=tmp_path, command="c", seeds=2, overrides=fixed + ["train.epochs=2"])
    study = load_study(tmp_path)
    cfg = cell_config(study, study.variants[1], 1)
    assert (cfg.spaces["full"].layers, cfg.train.epochs, cfg.train.seed, cfg.data.spec) == (3, 2, 1, "digits:0-6")
    assert study.transfer == "digits:7-9"  # the held-out classes of the default digits:0-6
    assert [c[1] for c in study.cells()] == [0, 0, 1, 1]  # seed-major


def test_a_study_written_before_the_labelled_rename_resumes(tmp_path):
    """study.json of a study created when the keys were data.unlabeled / data.labeled_per_batch:
    read under the new names, so the same study (now --set data.labelled_per_batch=...) resumes."""
    variants = label_variants("1%", "full")
    create_study("labels", variants, output=tmp_path, command="c", seeds=1, overrides=["data.labelled_per_batch=2"])
    path = tmp_path / "study.json"
    text = path.read_text().replace("labelled_per_batch", "labeled_per_batch").replace('"unlabelled"', '"unlabeled"')
    path.write_text(text)
    study = load_study(tmp_path)
    assert study.base["data"]["labelled_per_batch"] == 2 and "unlabelled" in study.base["data"]
    assert study.overrides == ["data.labelled_per_batch=2"]
    assert cell_config(study, study.variants[0], 0).data.labelled_per_batch == 2
    create_study("labels", variants, output=tmp_path, command="c", seeds=1, overrides=["data.labelled_per_batch=2"])


def test_bad_studies_fail_before_running(tmp_path):
    with pytest.raises(OperaError, match="needs a ViT backbone"):
        create_study("hierarchy", hierarchy_variants("self,mask+self+full"), output=tmp_path / "a", command="c")
    with pytest.raises(OperaError, match="unknown config key"):
        create_study("arrangements", arrangement_variants("A"), output=tmp_path / "b", command="c", overrides=["full.layerz=2"])
    with pytest.raises(OperaError, match="unknown evaluation"):
        create_study("arrangements", arrangement_variants("A"), output=tmp_path / "c", command="c", evals="linear,finetune")
    with pytest.raises(OperaError, match="unknown linear option"):
        create_study("arrangements", arrangement_variants("A"), output=tmp_path / "d", command="c", eval_options=["linear.epoch=3"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rerun_with_another_study_is_refused(tmp_path):
    create_study("arrangements", arrangement_variants("A,C"), output=tmp_path, command="first", seeds=1)
    with pytest.raises(OperaError, match="holds another study"):
        create_study("arrangements", arrangement_variants("A,C"), output=tmp_path, command="second", overrides=["full.layers=3"])
    again = create_study("arrangements", arrangement_variants("A,C"), output=tmp_path, command="again", seeds=2)
    assert again.command == "first" and again.seeds == [0, 1] and len(again.invocations) == 2


@pytest.mark.slow
def test_interrupted_study_resumes_without_rerunning_finished_cells(tiny_study, monkeypatch, one_thread):
    """A finished cell is never rerun; a half-finished one resumes from last.pt; the report is
    rebuilt from the partial results in between."""
    from opera.ablate.report import build_report

    study = load_study(tiny_study)
    c_dir = cell_dir(tiny_study, "C", 0)
    # C is half-finished: its pretraining stopped after 2 of its steps (last.pt written)
    half = cell_config(study, study.variant("C"), 0)
    half.train.max_steps = 2
    pretrain_mod.run_pretrain(half, c_dir / "pretrain")
    assert (c_dir / "pretrain" / "last.pt").is_file() and not (c_dir / CELL_FILE).exists()

    calls: list[tuple[str, int]] = []
    real = pretrain_mod.run_pretrain

    def counting(cfg, output, resume=None):
        calls.append((cfg.arrangement, cfg.train.seed))
        return real(cfg, output, resume)

    monkeypatch.setattr(pretrain_mod, "run_pretrain", counting)

    def interrupted(study_dir, variant, seed):  # the study is killed while C runs
        if variant == "C":
            raise KeyboardInterrupt
        return run_cell(study_dir, variant, seed)

    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_study, runner=interrupted, jobs=1)
    assert calls == [("A", 0)]
    a_cell = cell_dir(tiny_study, "A", 0) / CELL_FILE
    a_record = json.loads(a_cell.read_text())
    assert set(a_record["metrics"]) >= {"linear/top1", "knn/top1", "transfer_linear/top1", "transfer_knn/top1"}
    assert all(0 <= v <= 100 for v in a_record["metrics"].values())
    a_mtime = a_cell.stat().st_mtime_ns

    partial = build_report(tiny_study, quiet=True, plots=False)  # opera report DIR in between
    assert (partial["finished"], partial["pending"]) == (1, ["C/seed0"])

    result = run_study(tiny_study, jobs=1)  # the same command again
    assert calls == [("A", 0), ("C", 0)]  # only C pretrained, A not rerun
    assert result["skipped"] == 1 and result["ran"] == [("C", 0)]
    assert a_cell.stat().st_mtime_ns == a_mtime
    c_record = json.loads((c_dir / CELL_FILE).read_text())
    assert c_record["resumed"] and c_record["pretrain_finished"]
    rows = [json.loads(x) for x in (c_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]  # the step rows (an epoch's monitor row shares its last step)
    assert steps == sorted(steps) and steps[0] == 1 and len(steps) == len(set(steps))  # one run, continued
    assert result["report"]["finished"] == 2 and not result["report"]["pending"]
    assert (tiny_study / "report.md").is_file() and (tiny_study / "plots" / "loss_curves.png").is_file()

    calls.clear()
    result = run_study(tiny_study, jobs=1)  # everything finished: nothing runs
    assert calls == [] and result["skipped"] == 2


def test_finished_evaluations_are_not_rerun(tiny_study, monkeypatch, fake_cell):
    """A cell whose pretraining and some evaluations finished only runs the missing evaluations."""
    import opera.ablate.study as study_mod

    study = load_study(tiny_study)
    c_dir = cell_dir(tiny_study, "A", 0)
    (c_dir / "pretrain").mkdir(parents=True)
    ran: list[str] = []

    def fake_pretrain(cfg, output, resume=None):
        return {"finished": True}

    def fake_eval(study_, protocol, data, checkpoint, output, seed, device):
        ran.append(output.name)
        output.mkdir(parents=True, exist_ok=True)
        res = {"metrics": {"top1": 50.0, "top5": 90.0}}
        (output / "results.json").write_text(json.dumps(res))
        return res

    (c_dir / "eval_linear").mkdir()
    (c_dir / "eval_linear" / "results.json").write_text(json.dumps({"metrics": {"top1": 77.0}}))
    monkeypatch.setattr(pretrain_mod, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(study_mod, "_run_eval", fake_eval)
    rec = run_cell(tiny_study, "A", 0)
    assert ran == ["eval_knn", "eval_transfer_linear", "eval_transfer_knn"]
    assert rec["metrics"]["linear/top1"] == 77.0 and rec["metrics"]["knn/top1"] == 50.0
    assert study.eval_plan()[0] == ("linear", "linear", "digits:0-2")


@pytest.mark.slow
def test_parallel_jobs_run_every_cell_once(tmp_path, fake_cell):
    """--jobs 2: cells run in two spawned worker processes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import ablate_fake_runner

    create_study("arrangements", arrangement_variants("A,B,C"), output=tmp_path, command="c", seeds=1)
    fake_cell(tmp_path, "B", 0, {"linear/top1": 1.0})
    result = run_study(tmp_path, runner=ablate_fake_runner.fake_runner, jobs=2, threads=1)
    assert sorted(result["ran"]) == [("A", 0), ("C", 0)] and result["skipped"] == 1
    pids = {json.loads((cell_dir(tmp_path, v, 0) / CELL_FILE).read_text())["pid"] for v in "AC"}
    assert len(pids) >= 1 and all(p != __import__("os").getpid() for p in pids)
    assert result["report"]["finished"] == 3


def test_slurm_array_submits_only_unfinished_cells(tmp_path, monkeypatch, fake_cell):
    """--slurm: one array task per unfinished cell, driven by the absolute study path; --wait reports."""
    import opera.launch.options as options
    from opera.launch.options import LaunchOptions

    monkeypatch.chdir(tmp_path)
    create_study("arrangements", arrangement_variants("A,B,C"), output="study", command="c", seeds=1)
    fake_cell(tmp_path / "study", "B", 0, {"linear/top1": 1.0})
    submitted = []

    def fake_dispatch_array(fn, list_of_args, launch, folder=None):
        submitted.append((fn, list(list_of_args), launch, folder))
        return [f"job{i}" for i, _ in enumerate(list_of_args)]

    monkeypatch.setattr(options, "dispatch_array", fake_dispatch_array)
    result = run_study("study", launch=LaunchOptions(slurm=True, timeout_min=30))
    absolute = str(tmp_path / "study")
    fn, calls, launch, folder = submitted[0]
    assert fn is run_cell and calls == [(absolute, "A", 0), (absolute, "C", 0)]
    assert str(folder) == f"{absolute}/slurm/%j" and launch.timeout_min == 30
    assert result["jobs"] == ["job0", "job1"] and result["report"] is None

    def run_them(fn, list_of_args, launch, folder=None):  # --wait: the jobs ran when dispatch returns
        for _, variant, seed in list_of_args:
            fake_cell(tmp_path / "study", variant, seed, {"linear/top1": 2.0})
        return ["j"] * len(list_of_args)

    monkeypatch.setattr(options, "dispatch_array", run_them)
    result = run_study("study", launch=LaunchOptions(slurm=True, wait=True))
    assert result["report"]["finished"] == 3 and (tmp_path / "study" / "report.md").is_file()


def test_rerun_may_change_the_device(tmp_path):
    create_study("arrangements", arrangement_variants("A"), output=tmp_path, command="first", seeds=1)
    again = create_study("arrangements", arrangement_variants("A"), output=tmp_path, command="again", seeds=1, device="cpu")
    assert again.base["train"]["device"] == "cpu" and load_study(tmp_path).base["train"]["device"] == "cpu"
