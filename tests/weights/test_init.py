"""``opera run pretrain --init SPEC`` and ``opera run linear --checkpoint SPEC`` through the CLI.

The state a run starts from is read at its first real step: ``train_step`` is wrapped (and
called), so what is checked is the hierarchy the loop trains, after setup and resume.
"""

from __future__ import annotations

import json

import pytest
import torch

import opera.engine.pretrain as pretrain_mod
from opera.backbones import create_backbone
from opera.engine.checkpoint import export_backbone, load_state
from tests.cli.test_bad_inputs import assert_one_line_error, run_cli
from tests.weights.test_formats import DIM, MLP, dinov2_folder, hierarchy, main_moco_checkpoint

FAST = ["--data", "digits:0-3", "--epochs", "1", "--batch-size", "16", "--set", "train.knn_every=0",
        "--set", f"self.mlp_dim={MLP}", "--set", f"self.dim={DIM}", "--set", f"full.hidden={DIM}",
        "--set", "train.max_steps=1"]  # OPERA's class head: _build_mlp(2, dim, dim, classes)


@pytest.fixture
def first_step(monkeypatch):
    """The hierarchy's state dict when the loop calls its first ``train_step`` (then the real step runs)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = pretrain_mod.train_step

    def spy(model, hierarchy, *args, **kwargs):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in hierarchy.state_dict().items()})
        return real(model, hierarchy, *args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "train_step", spy)
    return seen


def opera_backbone_file(path, seed: int = 5):
    torch.manual_seed(seed)
    backbone = create_backbone("resnet_tiny", img_size=32)
    export_backbone(backbone, path)
    return backbone.state_dict()


def sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_init_from_an_opera_backbone_then_resume(tmp_path, capsys, first_step):
    loaded = opera_backbone_file(tmp_path / "init.safetensors")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "init.safetensors"), "-o", str(out), *FAST], capsys)
    assert code == 0, err
    start = first_step[0]
    assert same(sub(start, "backbone."), loaded)  # the first step's backbone is the file's
    assert same(sub(start, "teacher.backbone."), loaded)  # the self teacher starts as the online backbone
    assert same(sub(start, "teacher.heads.self_projector."), sub(start, "spaces.self.projector."))
    line = next(s for s in stdout.splitlines() if "--init took" in s)
    assert line.startswith(f"read {tmp_path / 'init.safetensors'} as an opera checkpoint: 78 backbone tensors matched")
    assert "--init took backbone; the momentum teacher's backbone and projector start as copies of the online ones" in line
    assert "random init: class head, predictor, projector; optimizer and schedules start fresh" in line
    sha = json.loads(json.dumps(load_state(out / "last.pt")["identity"]["init"]))
    assert sha["spec"] == str(tmp_path / "init.safetensors") and len(sha["sha256"]) == 64
    assert "sha256: " + sha["sha256"] in (out / "config.yaml").read_text()

    # a resume with the same --init continues from last.pt without reading the weights again
    first_step.clear()
    after_one = load_state(out / "last.pt")["model"]
    code, stdout, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "init.safetensors"), "-o", str(out),
                                 *FAST[:-1], "train.max_steps=2"], capsys)
    assert code == 0, err
    assert "--init took" not in stdout and "resuming from" in stdout
    assert same(sub(first_step[0], "backbone."), sub(after_one, "backbone."))

    # another --init is refused in one line
    opera_backbone_file(tmp_path / "other.safetensors", seed=6)
    code, _, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "other.safetensors"), "-o", str(out),
                            *FAST[:-1], "train.max_steps=3"], capsys)
    assert_one_line_error(code, err, "was written by another pretraining run: init", "other.safetensors")


def test_init_from_an_official_main_moco_checkpoint(tmp_path, capsys, first_step):
    h = hierarchy("resnet_tiny", classes=4)  # digits:0-3 has 4 classes: OPERA's class head fits
    main_moco_checkpoint(h, False, tmp_path / "opera.pth.tar")
    code, stdout, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "opera.pth.tar"), "--backbone", "resnet_tiny",
                                 "-o", str(tmp_path / "run"), *FAST], capsys)
    assert code == 0, err
    start, source = first_step[0], h.state_dict()
    assert same(start, source)  # backbone, projector, predictor, momentum encoder and class head all from the file
    line = next(s for s in stdout.splitlines() if "--init took" in s)
    assert "as an OPERA main_moco.py checkpoint" in line and "random init" not in line
    assert "--init took backbone, projector, momentum projector, momentum backbone, predictor, class head" in line

    h10 = hierarchy("resnet_tiny", classes=10)  # a class head for another label set stays at random init
    main_moco_checkpoint(h10, False, tmp_path / "ten.pth.tar")
    first_step.clear()
    code, stdout, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "ten.pth.tar"), "--backbone", "resnet_tiny",
                                 "-o", str(tmp_path / "run10"), *FAST], capsys)
    assert code == 0, err
    assert "left at random init where the source's shape differs: class head" in stdout
    assert same(sub(first_step[0], "teacher.backbone."), sub(h10.state_dict(), "teacher.backbone."))
    assert first_step[0]["spaces.full.class_head.3.weight"].shape[0] == 4


@pytest.mark.slow
def test_init_from_a_dinov2_folder_at_another_size(tmp_path, capsys, first_step):
    dinov2_folder(tmp_path / "dinov2", img_size=42)
    code, stdout, err = run_cli(["run", "pretrain", "--init", str(tmp_path / "dinov2"), "--hierarchy", "self",
                                 "--backbone", "timm:vit_small_patch14_dinov2", "--img-size", "28", "-o", str(tmp_path / "run"),
                                 *FAST], capsys)
    assert code == 0, err
    line = next(s for s in stdout.splitlines() if "--init took" in s)
    assert "as a timm local-dir folder (config.json + model.safetensors)" in line
    assert "position embeddings resampled from 3x3 to 2x2 (timm's resample_abs_pos_embed)" in line
    start = first_step[0]
    assert start["backbone.pos_embed"].shape == (1, 5, 384)
    assert same(sub(start, "teacher.backbone."), sub(start, "backbone."))


def test_bad_init_inputs_are_one_line(tmp_path, capsys):
    opera_backbone_file(tmp_path / "tiny.safetensors")
    vit = hierarchy("vit_tiny")
    main_moco_checkpoint(vit, True, tmp_path / "vit.pth.tar")
    cases = [
        (["--init", str(tmp_path / "missing.pth")], "put the file there"),
        (["--init", str(tmp_path / "tiny.safetensors"), "--backbone", "resnet18"], "holds a 'resnet_tiny' backbone, not 'resnet18'"),
        (["--init", str(tmp_path / "vit.pth.tar"), "--backbone", "vit_tiny", "--set", "backbone.patch_size=8"],
         "has 4x4 patches but the backbone uses 8x8"),
    ]
    for i, (args, needle) in enumerate(cases):
        code, _, err = run_cli(["run", "pretrain", *args, "-o", str(tmp_path / f"run{i}"), *FAST], capsys)
        assert_one_line_error(code, err, needle)


def test_linear_probe_of_an_official_checkpoint(tmp_path, capsys):
    h = hierarchy("resnet_tiny")
    main_moco_checkpoint(h, False, tmp_path / "moco.pth.tar")
    code, stdout, err = run_cli(["run", "linear", "--checkpoint", str(tmp_path / "moco.pth.tar"), "--backbone", "resnet_tiny",
                                 "--data", "digits:0-1", "--epochs", "1", "--output", str(tmp_path / "lin")], capsys)
    assert code == 0, err
    assert f"read {tmp_path / 'moco.pth.tar'} as an OPERA main_moco.py checkpoint" in stdout
    results = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert results["checkpoint"]["kind"] == "mocov3" and len(results["checkpoint"]["sha256"]) == 64
    assert results["checkpoint"]["backbone_spec"]["name"] == "resnet_tiny"


def test_evaluations_name_where_to_put_a_hub_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["run", "knn", "--checkpoint", "hf-hub:timm/vit_small_patch14_dinov2.lvd142m",
                            "--output", str(tmp_path / "knn")], capsys)
    assert_one_line_error(code, err, "opera never downloads", "--local-dir DIR")
    assert not (tmp_path / "knn").exists()
