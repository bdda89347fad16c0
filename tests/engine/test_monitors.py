"""The online monitors of pretraining (opera.engine.monitors): a linear classifier trained on
detached features beside pretraining, logged every epoch and labelled ``online``."""

from __future__ import annotations

import json

import pytest
import torch

from opera.backbones import create_backbone, pooled_features
from opera.configs import apply_overrides, load_config
from opera.engine.checkpoint import load_state, save_state
from opera.engine.monitors import FeatureTap, OnlineLinearMonitor
from opera.engine.pretrain import run_pretrain
from opera.launch.local import launch_local

SMALL = ["data.spec=digits:0-3", "train.epochs=2", "train.batch_size=64", "train.knn_every=0", "self.mlp_dim=64",
         "train.online_linear=true", "train.save_every_epochs=0", "train.device=cpu"]


def blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return torch.randn(4, 16, generator=g)[y] * 3 + torch.randn(n, 16, generator=g), y


def test_tap_records_the_representation_of_the_forward_and_no_gradient_reaches_the_backbone():
    bb = create_backbone("resnet_tiny", img_size=32)
    tap = FeatureTap(bb)
    x = torch.randn(6, 3, 32, 32)
    y = pooled_features(bb, x)
    seen = tap.take(6)
    assert seen is not None and torch.equal(seen, y.detach()) and not seen.requires_grad
    assert tap.take(6) is None  # cleared
    monitor = OnlineLinearMonitor(bb.num_features, 4)
    monitor.update(seen, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert all(p.grad is None for p in bb.parameters())
    with torch.no_grad():
        pooled_features(bb, x)
    assert tap.take(6) is None  # evaluation passes (no grad) are not training batches
    tap.close()
    assert "forward_head" not in bb.__dict__


def test_monitor_learns_and_resumes_from_its_state(tmp_path):
    x, y = blobs()
    monitor = OnlineLinearMonitor(16, 4, lr=0.1)
    for _ in range(3):
        for i in range(0, len(x), 32):
            monitor.update(x[i: i + 32], y[i: i + 32])
        row = monitor.epoch_metrics()
    assert row["eval"] == "online" and row["online/linear_top1"] > 90.0
    save_state({"online_linear": monitor.state_dict()}, tmp_path / "m.pt")  # weights_only on load
    again = OnlineLinearMonitor(16, 4, lr=0.1)
    again.load_state_dict(load_state(tmp_path / "m.pt")["online_linear"])
    for a, b in ((monitor, again),):
        a.update(x[:32], y[:32])
        b.update(x[:32], y[:32])
        assert torch.equal(a.classifier[0].weight, b.classifier[0].weight)


def _two_rank_update(seed: int) -> dict[str, torch.Tensor]:
    from opera import distributed

    env = distributed.init("cpu")
    x, y = blobs(64, seed)
    lo, hi = distributed.shard_bounds(64, env.rank, env.world_size)
    monitor = OnlineLinearMonitor(16, 4)
    torch.manual_seed(0)
    monitor.classifier[0].weight.data.normal_(0, 0.01)
    for _ in range(3):
        monitor.update(x[lo:hi], y[lo:hi])
    row = monitor.epoch_metrics()
    distributed.shutdown()
    return {"weight": monitor.classifier[0].weight.detach().clone(), "top1": torch.tensor(row["online/linear_top1"])}


@pytest.mark.slow
def test_monitor_on_two_gloo_ranks_equals_one_process_on_the_whole_batch():
    one = _two_rank_update(3)
    ranks = launch_local(_two_rank_update, (3,), 2, timeout=120)
    for r in ranks:
        torch.testing.assert_close(r["weight"], one["weight"], rtol=1e-5, atol=1e-7)
        assert float(r["top1"]) == pytest.approx(float(one["top1"]))


@pytest.mark.slow
def test_pretraining_logs_online_linear_rows_every_epoch_and_checkpoints_the_monitor(tmp_path):
    cfg = apply_overrides(load_config("cpu_digits"), SMALL)
    run_pretrain(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if r.get("eval") == "online"]
    print("\nonline rows:", [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in online])
    assert [r["epoch"] for r in online] == [1.0, 2.0] and [r["step"] for r in online] == [9, 18]
    for r in online:
        assert 0.0 <= r["online/linear_top1"] <= 100.0 and 0.0 <= r["online/linear_val_top1"] <= 100.0
    assert not any("online/linear_top1" in r for r in rows if r.get("eval") != "online")
    state = load_state(tmp_path / "last.pt")["online_linear"]
    assert state["classifier"]["0.weight"].shape == (4, create_backbone("resnet_tiny").num_features)  # 4 classes


# ------------------------------------------------------------------------------- the kNN monitor
def test_fp16_bank_gives_the_fp32_knn_accuracy_on_digits():
    """The monitor keeps its bank in float16; on digits (a random resnet_tiny: features where many
    neighbours are close calls) the top-1 is the float32 bank's, query for query."""
    from opera.data import EvalTransform, build_dataset
    from opera.features import extract_features, knn_scores

    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny", img_size=32)
    tf = EvalTransform(32)
    train, val = build_dataset("digits", "train", transform=tf), build_dataset("digits", "val", transform=tf)
    bank32, bank_y = extract_features(backbone, train)
    bank16, _ = extract_features(backbone, train, dtype=torch.float16)
    queries, query_y = extract_features(backbone, val)
    assert bank16.dtype == torch.float16 and bank16.element_size() * 2 == bank32.element_size()
    pred32 = knn_scores(bank32, bank_y, queries, 10).argmax(1)
    pred16 = knn_scores(bank16, bank_y, queries, 10).argmax(1)
    assert int((pred16 != pred32).sum()) == 0
    assert 12.0 < 100.0 * float((pred32 == query_y).float().mean()) < 100.0  # above chance (10%): not all one class


def test_the_bank_subset_is_class_balanced_and_fixed():
    from opera.engine.monitors import balanced_subset

    y = [c for c in range(5) for _ in range(10 + 7 * c)] + [2] * 3  # classes of 10..38 images, unsorted tail
    keep = balanced_subset(y, 12)
    counts = torch.bincount(torch.as_tensor([y[i] for i in keep])).tolist()
    assert counts == [10, 12, 12, 12, 12] and keep.tolist() == sorted(set(keep.tolist()))
    assert keep.tolist() == balanced_subset(list(y), 12).tolist()  # fixed: the same images every epoch and run
    assert balanced_subset(y, 0) is None and balanced_subset(y, 100) is None  # the whole set


def test_the_monitor_states_its_bank_and_logs_its_wall_time(tmp_path, capsys):
    cfg = apply_overrides(load_config("cpu_digits"), [
        "data.spec=digits:0-3", "train.epochs=2", "train.batch_size=64", "train.knn_every=1", "self.mlp_dim=64",
        "train.save_every_epochs=0", "train.device=cpu", "train.knn_bank_per_class=50", "backbone.img_size=16"])
    run_pretrain(cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("kNN monitor: bank 200 of 576 train images, at most 50 per class") == 1  # said once
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert len(knn) == 2 and all(r["knn_s"] > 0 for r in knn)
    import yaml

    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["knn_bank_per_class"] == 50


def test_the_default_bank_is_the_whole_split_until_it_is_large(monkeypatch):
    """train.knn_bank_per_class=-1 (the default): the whole train split while it has at most
    KNN_FULL_BANK_MAX images (digits), 100 per class above; the log line says which rule applied."""
    from opera.engine import pretrain

    cfg = apply_overrides(load_config("cpu_digits"), ["data.spec=digits:0-3", "backbone.img_size=16"])
    assert cfg.train.knn_bank_per_class == -1
    sets = pretrain.knn_sets(cfg)
    assert len(sets.bank) == 576 and "the whole train split (576 images; train.knn_bank_per_class=-1: auto" in sets.line
    monkeypatch.setattr(pretrain, "KNN_FULL_BANK_MAX", 500)
    monkeypatch.setattr(pretrain, "KNN_AUTO_PER_CLASS", 100)
    sets = pretrain.knn_sets(cfg)
    counts = torch.bincount(torch.as_tensor([sets.bank.dataset.targets[i] for i in sets.bank.indices])).tolist()
    assert counts == [100] * 4 and "400 of 576 train images, at most 100 per class" in sets.line
