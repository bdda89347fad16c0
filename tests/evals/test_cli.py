"""The Typer functions mount on an app (as opera.cli does) and run end to end."""

import json

import pytest
import typer
from typer.testing import CliRunner

from opera.errors import OperaError
from opera.evals import cli


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    run = typer.Typer()
    for name, fn in cli.COMMANDS.items():
        run.command(name)(fn)
    app.add_typer(run, name="run")
    app.command("export")(cli.export)
    return app


def test_help_of_every_command(app):
    runner = CliRunner()
    for name in cli.COMMANDS:
        res = runner.invoke(app, ["run", name, "--help"])
        assert res.exit_code == 0, res.output
        assert "--checkpoint" in res.output and "random:" in res.output
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "detectron2" in res.output


@pytest.mark.slow
def test_knn_and_export_from_the_command_line(app, trained_run, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "knn", "--checkpoint", str(trained_run), "--data", "digits:5-9", "--k", "10",
                              "--output", str(tmp_path / "knn")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert data["config"]["k"] == 10 and data["data"]["val"] == "digits:5-9" and data["metrics"]["top1"] > 50
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_run), "--format", "mmdet"])
    assert res.exit_code == 0, res.output
    assert (trained_run / "export" / "backbone_mmdet.pth").is_file()
    assert json.loads((trained_run / "export" / "results.json").read_text())["metrics"]["format"] == "mmdet"


def test_user_errors_reach_the_cli_as_opera_errors(app, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--checkpoint", "random:resnet_tiny", "--format", "onnx", "--output", str(tmp_path)])
    assert isinstance(res.exception, OperaError) and "valid: timm, torchvision, detectron2, mmdet" in str(res.exception)
    res = runner.invoke(app, ["run", "linear", "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert isinstance(res.exception, OperaError) and "does not exist" in str(res.exception)
