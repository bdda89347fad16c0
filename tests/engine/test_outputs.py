"""The outputs of a pretraining run, which other tools and users rely on by name."""

from __future__ import annotations

import json
import time
import math
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from opera.configs import apply_overrides, load_config
import opera.engine.loop as loop
import opera.engine.pretrain as pretrain
from opera.backbones import create_backbone
from opera.data import build_dataset
from opera.engine.checkpoint import load_state, read_backbone_file
from opera.engine.optim import LARS
from opera.engine.pretrain import knn_monitor, run_pretrain
from opera.errors import OperaError
from opera.hierarchy import HierarchyOutput, SupervisionHierarchy

SMALL = ["data.spec=digits:0-3", "train.epochs=2", "train.batch_size=32", "self.mlp_dim=64", "self.dim=32",
         "train.log_every=2", "train.knn_every=1", "train.save_every_epochs=1"]


#: the fixture run logs every 4 steps; its 18-step epochs end between two log steps (16, 18, 20)
LOG_EVERY = 4
BATCH = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch run on 4 classes, recording the lr of every optimizer group at every step, with
    a clock that advances exactly 1 s per reading (so the logged throughput is a known number)."""
    out = tmp_path_factory.mktemp("run")
    applied: list[list[float]] = []
    real_step = LARS.step
    ticks = iter(range(10**6))

    def recording_step(self, closure=None):
        applied.append([g["lr"] for g in self.param_groups])
        return real_step(self, closure)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LARS, "step", recording_step)
        mp.setattr(loop, "time", SimpleNamespace(time=lambda: float(next(ticks)), perf_counter=time.perf_counter))
        run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL + [f"train.log_every={LOG_EVERY}"]), out)
    (out / "applied_lr.json").write_text(json.dumps(applied))
    return out


@pytest.mark.slow
def test_run_writes_every_named_output(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "backbone.safetensors", "epoch_0001.pt", "epoch_0002.pt"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["resolved"]["num_classes"] == 4
    assert cfg["resolved"]["optimizer"] == "lars"
    assert cfg["resolved"]["lr"] == pytest.approx(cfg["optim"]["base_lr"] * BATCH / 256)  # lr = base_lr * batch / 256


def test_built_class_head_has_one_output_per_class_of_the_data(run_dir):
    """digits:0-3 has 4 classes: the class head built and trained must output 4 logits."""
    model = load_state(run_dir / "last.pt")["model"]
    linear = sorted((k for k in model if k.startswith("spaces.full.class_head.") and model[k].ndim == 2),
                    key=lambda k: int(k.split(".")[3]))
    assert linear, sorted(model)[:10]
    assert model[linear[-1]].shape[0] == 4


def expected_lr(epoch: float, peak: float, warmup: float, epochs: float) -> float:
    """MoCo-v3's schedule written out: linear warmup, then half cosine to 0."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_lr_in_the_optimizer_follows_the_schedule_at_every_step(run_dir):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    peak, n = cfg["optim"]["base_lr"] * BATCH / 256, cfg["resolved"]["steps_per_epoch"]
    applied = json.loads((run_dir / "applied_lr.json").read_text())
    assert n == 576 // BATCH and len(applied) == 2 * n
    for k, lrs in enumerate(applied):
        want = expected_lr(k / n, peak, cfg["optim"]["warmup_epochs"], 2)
        assert lrs == pytest.approx([want] * len(lrs), abs=1e-12), f"step {k}"
    assert applied[n][0] == pytest.approx(peak)  # the first step of epoch 2 ends the 1-epoch warmup


def test_metrics_rows_name_every_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 18, 20, 24, 28, 32, 36]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    n, m = cfg["resolved"]["steps_per_epoch"], cfg["optim"]["ema_momentum"]
    applied = json.loads((run_dir / "applied_lr.json").read_text())
    previous = 0
    for r in train_rows:
        assert {"step", "lr", "ema_momentum", "img_per_s", "loss/self", "loss/full"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss/self"] + r["loss/full"], rel=1e-5)
        assert r["epoch"] == pytest.approx((r["step"] - 1) / n)  # the epoch at which the logged step ran
        assert r["lr"] == applied[r["step"] - 1][0]  # the logged lr is the one the optimizer used
        assert r["ema_momentum"] == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * r["epoch"] / 2)) * (1 - m), abs=1e-12)
        # the clock advances 1 s between two log rows: images since the previous row, per second
        assert r["img_per_s"] == BATCH * (r["step"] - previous), r
        previous = r["step"]
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(n, 1.0), (2 * n, 2.0)]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)


def test_knn_monitor_queries_the_held_out_split(monkeypatch):
    """The bank is the training split and the queries are the held-out split: querying the
    training split would let each query find itself and inflate the headline number."""
    import opera.engine.monitors as monitors

    cfg = apply_overrides(load_config("cpu_digits"), ["data.spec=digits:0-3", "train.knn_bank_per_class=0"])
    seen = {}
    real = monitors.knn_accuracy_sharded

    def spy(bank, bank_labels, queries, query_labels, *args, **kwargs):
        seen.update(bank=bank, bank_labels=bank_labels, query_labels=query_labels)
        seen["result"] = real(bank, bank_labels, queries, query_labels, *args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(monitors, "knn_accuracy_sharded", spy)
    backbone = create_backbone("resnet_tiny", img_size=cfg.backbone.img_size)
    top1 = knn_monitor(backbone, cfg, torch.device("cpu"), rank=0, world=1)
    train, val = build_dataset("digits:0-3", "train"), build_dataset("digits:0-3", "val")
    assert seen["query_labels"].tolist() == list(val.targets) and len(val) == 144
    assert seen["bank_labels"].tolist() == list(train.targets) and len(seen["bank"]) == 576
    assert top1 == pytest.approx(seen["result"]["top1"])


def test_backbone_loads_into_timm_strictly(run_dir):
    tensors, meta = read_backbone_file(run_dir / "backbone.safetensors")
    spec = meta["spec"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["timm_kwargs"].items()}
    model = timm.create_model(spec["timm_name"], pretrained=False, **kwargs)
    missing = model.load_state_dict(load_file(str(run_dir / "backbone.safetensors")), strict=True)
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


@pytest.mark.slow
def test_a_step_the_fp16_scaler_skipped_stays_out_of_the_epoch_means(tmp_path, monkeypatch):
    """A non-finite step (what GradScaler skips under train.amp=fp16) must not turn the epoch's
    mean loss into inf/NaN: the epoch row averages the finite steps only."""
    import dataclasses

    real_step, seen = pretrain.train_step, []

    def one_step_overflows(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if len(seen) == 3:
            out = dataclasses.replace(out, loss=torch.tensor(float("inf")))
        seen.append(float(out.loss))
        return out

    monkeypatch.setattr(pretrain, "train_step", one_step_overflows)
    result = run_pretrain(apply_overrides(load_config("cpu_digits"), SMALL + ["train.epochs=1", "train.knn_every=0"]), tmp_path)
    finite = [v for v in seen if math.isfinite(v)]
    assert len(seen) > 4 and len(finite) == len(seen) - 1
    assert result["loss"] == pytest.approx(sum(finite) / len(finite), rel=1e-6)
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith("loss"))
