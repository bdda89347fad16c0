"""``--set key=value`` on every evaluation command: the same mechanism as pretraining's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from opera.cli import app

runner = CliRunner()


def opera(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opera", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["linear", "knn", "finetune", "transfer", "diagnose"])
def test_unknown_key_is_one_line_naming_the_command(command, tmp_path):
    r = opera("run", command, "--checkpoint", "random:resnet_tiny", "--output", str(tmp_path / "o"), "--set", "no_such_key=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert f"'opera run {command}'" in line and "no_such_key" in line and "valid:" in line


@pytest.mark.slow
def test_wrong_type_is_one_line(tmp_path):
    r = opera("run", "knn", "--checkpoint", "random:resnet_tiny", "--set", "k=many")
    assert r.returncode == 2 and "k expects an integer" in r.stderr


def test_a_set_value_reaches_the_protocol(tmp_path):
    out = tmp_path / "knn"
    r = runner.invoke(app, ["run", "knn", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-1", "--output", str(out),
                            "--set", "k=3", "--set", "temperature=0.5"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["k"], cfg["temperature"]) == (3, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["transfer", "diagnose"])
def test_single_process_commands_take_the_launch_options_but_refuse_nproc(command):
    """transfer and diagnose take --slurm like every command; --nproc 2 is a one-line error there."""
    r = opera("run", command, "--checkpoint", "random:resnet_tiny", "--nproc", "2")
    assert r.returncode == 2 and "one process" in r.stderr and "--slurm" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_options_do_not_repeat_the_configs_defaults():
    """An option that is a field of the protocol's config defaults to None (not given): the
    dataclass alone holds the value, and only options given on the command line are passed."""
    import dataclasses
    import inspect

    from opera.evals import cli as evals_cli
    from opera.evals.diagnose import DiagnoseConfig
    from opera.evals.finetune import FinetuneConfig
    from opera.evals.knn import KNNConfig
    from opera.evals.linear import LinearConfig
    from opera.evals.transfer import TransferConfig

    classes = {"linear": LinearConfig, "knn": KNNConfig, "finetune": FinetuneConfig, "transfer": TransferConfig,
               "diagnose": DiagnoseConfig}
    for name, fn in evals_cli.COMMANDS.items():
        fields = {f.name for f in dataclasses.fields(classes[name])}
        for pname, p in inspect.signature(fn).parameters.items():
            if pname in fields and pname not in ("checkpoint", "recipe"):
                assert p.default.default is None, f"opera run {name} --{pname} repeats a default: {p.default.default!r}"


def test_linear_defaults_come_from_the_dataclass(tmp_path, monkeypatch):
    import opera.evals.linear as linear_mod

    seen = {}
    monkeypatch.setattr(linear_mod, "run_linear", lambda cfg: seen.update(cfg=cfg))
    r = runner.invoke(app, ["run", "linear", "--checkpoint", "random:resnet_tiny", "--output", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    defaults = linear_mod.LinearConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.bn, cfg.grid, cfg.seed, cfg.device, cfg.data) == \
        (defaults.epochs, defaults.batch_size, defaults.weight_decay, defaults.bn, defaults.grid, defaults.seed,
         defaults.device, defaults.data)
    r = runner.invoke(app, ["run", "linear", "--checkpoint", "random:resnet_tiny", "--output", str(tmp_path / "o"),
                            "--epochs", "3", "--grid", "--grid-lrs", "1,2", "--set", "grid_lr_scales=[1, 2, 4]"])
    assert r.exit_code == 0, r.output
    assert (seen["cfg"].epochs, seen["cfg"].grid, seen["cfg"].grid_lr_scales) == (3, True, (1.0, 2.0, 4.0))
