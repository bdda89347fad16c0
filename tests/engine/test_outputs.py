"""The outputs of a pretraining run, which other tools and users rely on by name."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from opera.configs import apply_overrides, load_config
from opera.engine.checkpoint import load_state, read_backbone_file
from opera.engine.pretrain import run_pretrain
from opera.errors import OperaError
from opera.hierarchy import HierarchyOutput, SupervisionHierarchy

SMALL = ["data.spec=digits:0-3", "train.epochs=2", "train.batch_size=32", "self.mlp_dim=64", "self.dim=32",
         "train.log_every=2", "train.knn_every=1", "train.save_every_epochs=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL), out)
    return out


def test_run_writes_every_named_output(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "backbone.safetensors", "epoch_0001.pt", "epoch_0002.pt"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["resolved"]["num_classes"] == 4
    assert cfg["resolved"]["optimizer"] == "lars"
    assert cfg["resolved"]["lr"] == pytest.approx(cfg["optim"]["base_lr"] * 32 / 256)  # lr = base_lr * batch / 256


def test_metrics_rows_name_every_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows, rows
    for r in train_rows:
        assert {"step", "lr", "ema_momentum", "img_per_s", "loss/self", "loss/full"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss/self"] + r["loss/full"], rel=1e-5)
    knn = [r for r in rows if "knn_top1" in r]
    assert len(knn) == 2 and all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)
    momenta = [r["ema_momentum"] for r in train_rows]
    assert momenta == sorted(momenta)  # cosine from m towards 1


def test_backbone_loads_into_timm_strictly(run_dir):
    tensors, meta = read_backbone_file(run_dir / "backbone.safetensors")
    spec = meta["spec"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["timm_kwargs"].items()}
    model = timm.create_model(spec["timm_name"], pretrained=False, **kwargs)
    missing, unexpected = model.load_state_dict(load_file(str(run_dir / "backbone.safetensors")), strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys
    state = load_state(run_dir / "last.pt")
    for k, v in tensors.items():
        torch.testing.assert_close(state["model"][f"backbone.{k}"], v)


def test_checkpoint_holds_no_pickled_code(run_dir):
    torch.load(run_dir / "last.pt", weights_only=True)  # raises if anything but tensors/plain values
    evil = run_dir / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Payload()}, evil)
    with pytest.raises(OperaError, match="evil.pt"):
        load_state(evil)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = SupervisionHierarchy.forward
    calls = {"n": 0}

    def poisoned(self, views=None, labels=None, **kw):
        out = real(self, views=views, labels=labels, **kw)
        calls["n"] += kw.get("state") is None  # steps, not calls (a step runs one call per view)
        if calls["n"] == 5:
            bad = out.losses["full"] * float("nan")
            return HierarchyOutput(out.losses["self"] + bad, {"self": out.losses["self"], "full": bad}, out.logs, out.state)
        return out

    monkeypatch.setattr(SupervisionHierarchy, "forward", poisoned)
    cfg = apply_overrides(load_config("cpu_digits"), SMALL + ["train.save_every_steps=2", "train.knn_every=0"])
    with pytest.raises(OperaError, match=r"step 4 .*full=nan"):
        run_pretrain(cfg, tmp_path)
    good = load_state(tmp_path / "last.pt")
    assert good["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
