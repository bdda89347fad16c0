"""``opera --help`` and every command's ``--help`` answer without importing torch (the CLI's
start-up; its speed is in BENCHMARKS.md): the commands are defined from torch-free modules, and
the protocols import torch when they run."""

from __future__ import annotations

import json
import subprocess
import sys

HELP_EVERYWHERE = r"""
import json, sys
import typer
from typer.testing import CliRunner
from opera.cli import app

def paths(cmd, prefix=()):
    yield prefix
    if hasattr(cmd, "commands"):  # a group (typer bundles its own click)
        for name, sub in cmd.commands.items():
            yield from paths(sub, prefix + (name,))

runner = CliRunner()
seen = []
for path in paths(typer.main.get_command(app)):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, (path, result.output)
    assert "Usage" in result.output, (path, result.output)
    seen.append({"command": " ".join(path), "torch": "torch" in sys.modules})
print(json.dumps(seen))
"""


def test_every_help_answers_without_importing_torch():
    done = subprocess.run([sys.executable, "-c", HELP_EVERYWHERE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    commands = {s["command"] for s in seen}
    assert {"", "run", "run pretrain", "run linear", "run knn", "run finetune", "bench", "ablate", "export"} <= commands
    assert [s["command"] for s in seen if s["torch"]] == []


def test_the_console_entry_point_prints_help_without_torch():
    code = "import runpy, sys; sys.argv = ['opera', '--help']\ntry:\n    runpy.run_module('opera', run_name='__main__')\n" \
           "except SystemExit as e:\n    assert not e.code, e.code\nprint('TORCH', 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout and done.stdout.strip().endswith("TORCH False")
