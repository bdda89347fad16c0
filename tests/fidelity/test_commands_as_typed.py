"""The mission's commands, as a user types them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opera.cli import build_pretrain_config

ROOT = Path(__file__).resolve().parents[2]


def test_mask_hierarchy_without_backbone_picks_the_vit_recipe_and_says_so(capsys):
    cfg = build_pretrain_config(None, "mask,self,full", None, None, None, None, None, None, None, None, None, [])
    assert cfg.backbone.name == "vit_tiny" and cfg.hierarchy == "mask,self,full"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cpu_digits_vit" in out[0]
    plain = build_pretrain_config(None, "self,full", None, None, None, None, None, None, None, None, None, [])
    assert plain.backbone.name == "resnet_tiny"


@pytest.mark.slow
def test_mask_with_an_explicit_cnn_stays_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "mask,self,full",
                           "--backbone", "resnet_tiny", "--epochs", "1", "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resnet_tiny" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_mask_self_full_trains_from_the_cli_as_typed(tmp_path):
    """``opera run pretrain --hierarchy mask,self,full`` (a few steps here: --set train.max_steps)."""
    proc = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "mask,self,full",
                           "--epochs", "1", "--output", str(tmp_path / "r"), "--set", "train.max_steps=2",
                           "--set", "train.knn_every=0"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "cpu_digits_vit" in proc.stdout
    assert (tmp_path / "r" / "last.pt").is_file()


def test_ci_runs_the_readmes_two_commands_verbatim():
    """.ci/run executes what .ci/readme_commands.py reads from the README, not a copy of it."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import readme_commands
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text()
    cmds = readme_commands.commands(readme)
    assert cmds["test"].endswith("pytest -q") and "opera run pretrain --hierarchy self,full" in cmds["main"]
    for cmd in cmds.values():
        assert f"```bash\n{cmd}\n```" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'readme_commands.py "$readme" main' in ci and 'readme_commands.py "$readme" test' in ci
    assert "pip install" not in "\n".join(line for line in ci.splitlines() if not line.lstrip().startswith("#"))
