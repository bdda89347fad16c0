"""The Typer commands: opera ablate arrangements|hierarchy|sweep and opera report DIR."""

from __future__ import annotations

import pytest
import json

import typer
from typer.testing import CliRunner

from opera.ablate.cli import ablate_app, report
from opera.errors import OperaError


def make_app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(ablate_app, name="ablate")
    app.command("report")(report)
    return app


runner = CliRunner()


def test_dry_run_lists_cells(tmp_path):
    res = runner.invoke(make_app(), ["ablate", "hierarchy", "--seeds", "2", "--dry-run", "-o", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    assert "4 variants x 2 seeds = 8 cells" in res.output and "mask+self+full left out" in res.output
    assert not (tmp_path / "h").exists()
    res = runner.invoke(make_app(), ["ablate", "labels", "--fractions", "1%,10%", "--dry-run", "-o", str(tmp_path / "l")])
    assert res.exit_code == 0 and "5 variants x 3 seeds = 15 cells" in res.output and "full@1%" in res.output
    res = runner.invoke(make_app(), ["ablate", "sweep", "--set", "full.layers=1,2,3", "--set", "train.epochs=2", "--dry-run"])
    assert res.exit_code == 0 and "3 variants x 3 seeds = 9 cells" in res.output and "2 epochs" in res.output


def test_usage_errors_are_opera_errors(tmp_path):
    res = runner.invoke(make_app(), ["ablate", "hierarchy", "--variants", "self,mask+self+full", "-o", str(tmp_path / "x")])
    assert isinstance(res.exception, OperaError) and "needs a ViT backbone" in str(res.exception)
    res = runner.invoke(make_app(), ["report", str(tmp_path)])
    assert isinstance(res.exception, OperaError) and "not an ablation study" in str(res.exception)
    res = runner.invoke(make_app(), ["ablate", "arrangements", "--partition", "gpu", "--dry-run"])
    assert isinstance(res.exception, OperaError) and "--slurm" in str(res.exception)


@pytest.mark.slow
def test_sweep_end_to_end_and_report(tmp_path, one_thread, tiny_overrides):
    out = tmp_path / "sweep"
    args = ["ablate", "sweep", "--set", "full.layers=1,3", "--seeds", "1", "--data", "digits:0-2", "--transfer", "none",
            "--evals", "knn", "--jobs", "1", "--threads", "1", "-o", str(out)]
    for item in tiny_overrides:
        args += ["--set", item]
    res = runner.invoke(make_app(), args)
    assert res.exit_code == 0, (res.output, res.exception)
    study = json.loads((out / "study.json").read_text())
    assert study["command"].startswith("opera ablate sweep --set full.layers=1,3 --set train.epochs=1")
    assert "--data digits:0-2" in study["command"] and study["transfer"] is None
    assert [v["name"] for v in study["variants"]] == ["full.layers=1", "full.layers=3"]
    for layers in (1, 3):
        cfg = (out / "cells" / f"full.layers={layers}" / "seed0" / "pretrain" / "config.yaml").read_text()
        assert f"layers: {layers}" in cfg
    md = (out / "report.md").read_text()
    assert study["command"] in md and "| full.layers=3 | 1 |" in md
    assert "kNN top-1" in res.output  # the rich table in the terminal
    (out / "report.md").unlink()
    res = runner.invoke(make_app(), ["report", str(out), "--no-plots"])
    assert res.exit_code == 0 and (out / "report.md").is_file() and "2/2 cells" in res.output


def test_command_line_names_opera_however_it_was_started(monkeypatch):
    """``python -m opera ablate ...`` is recorded as ``opera ablate ...`` (not ``opera -m opera ...``)."""
    import click

    from opera.ablate.cli import command_line

    monkeypatch.setattr("sys.argv", ["pytest"])
    for prog in ("opera", "python -m opera"):
        root = click.Context(click.Group(prog), info_name=prog)
        ablate = click.Context(click.Group("ablate"), info_name="ablate", parent=root)
        cmd = click.Command("hierarchy", params=[click.Option(["--seeds"], default=3)])
        ctx = click.Context(cmd, info_name="hierarchy", parent=ablate)
        ctx.params = {"seeds": 1}
        assert command_line(ctx) == "opera ablate hierarchy --seeds 1", prog


BAD_STUDIES = [
    (["sweep", "--set", "full.layerz=1,2"], "unknown config key 'full.layerz'"),
    (["sweep", "--set", "full.layers=0,2"], "full.layers=0 is out of range"),
    (["sweep", "--set", "full.layers=1,2", "--set", "optim.base_lr=-1"], "optim.base_lr=-1.0 is out of range"),
    (["sweep", "--set", "full.layers=1,2", "--seeds", "0"], "--seeds must be a positive integer"),
    (["sweep", "--set", "full.layers=1,2", "--jobs", "0"], "--jobs must be a positive integer"),
    (["sweep", "--set", "full.layers=1,2", "--threads", "0"], "--threads must be a positive integer"),
    (["sweep", "--set", "full.layers=1,2", "--eval-set", "linear.epochz=3"], "unknown linear option 'epochz'"),
    (["sweep", "--set", "full.layers=1,2", "--eval-set", "knn.k=many"], "knn.k expects an integer"),
    (["sweep", "--set", "full.layers=1,2", "--evals", "linear,finetune"], "unknown evaluation"),
    (["arrangements", "--set", "train.epochs=0"], "train.epochs=0 is out of range"),
    (["hierarchy", "--variants", "self,mask+self+full"], "needs a ViT backbone"),
]


def test_dry_run_refuses_what_the_real_run_refuses(tmp_path):
    """--dry-run goes through the real run's checks: the same one-line error, and neither writes anything."""
    for i, (args, needle) in enumerate(BAD_STUDIES):
        out = tmp_path / f"s{i}"
        dry = runner.invoke(make_app(), ["ablate", *args, "--dry-run", "-o", str(out)])
        real = runner.invoke(make_app(), ["ablate", *args, "-o", str(out)])
        for res in (dry, real):
            assert isinstance(res.exception, OperaError), (args, res.output)
            assert needle in str(res.exception) and "\n" not in str(res.exception), (args, str(res.exception))
        assert str(dry.exception) == str(real.exception)
        assert not out.exists(), args


def test_dry_run_prints_the_validated_study(tmp_path):
    res = runner.invoke(make_app(), ["ablate", "sweep", "--set", "full.layers=1,2", "--eval-set", "linear.epochs=3",
                                     "--seeds", "1", "--dry-run", "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "2 variants x 1 seeds = 2 cells" in res.output and "transfer digits:7-9" in res.output
    assert not (tmp_path / "s").exists()


def test_eval_set_uses_the_config_parser():
    from opera.ablate.study import parse_eval_options

    opts = parse_eval_options(["linear.grid_lr_scales=[1, 2]", "linear.base_lr=none", "knn.temperature=1"], ["linear", "knn"])
    assert opts == {"linear": {"grid_lr_scales": (1.0, 2.0), "base_lr": None}, "knn": {"temperature": 1.0}}
