"""Linear, k-NN, fine-tuning and transfer on digits: a trained backbone beats a random one.

The ``trained_run`` fixture (conftest) trains resnet_tiny with labels on digits:0-4 for a few
epochs; ``random:resnet_tiny`` is the same architecture untrained.
"""

import json

import pytest
import torch

from opera.backbones import pooled_features
from opera.evals import common
from opera.evals.common import FrozenBackboneError, check_frozen, load_eval_backbone, sha256_file, snapshot_state
from opera.evals.finetune import finetune_config, run_finetune
from opera.evals.knn import KNNConfig, run_knn
from opera.evals.linear import LinearConfig, run_linear
from opera.evals.transfer import TransferConfig, run_transfer

RANDOM = "random:resnet_tiny"


def _check_results_file(out, results, checkpoint_file=None):
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results))
    for key in ("protocol", "metrics", "checkpoint", "config", "data", "seed", "wall_time_s", "versions"):
        assert key in data, key
    assert data["wall_time_s"] > 0
    assert data["config"]["checkpoint"] == results["checkpoint"]["source"]
    if checkpoint_file is not None:
        assert data["checkpoint"]["sha256"] == sha256_file(checkpoint_file)
        assert data["checkpoint"]["backbone_spec"]["name"] == "resnet_tiny"
    return data


def test_linear_trained_beats_random(trained_run, tmp_path):
    res = {}
    for name, ck in (("trained", str(trained_run)), ("random", RANDOM)):
        out = tmp_path / name
        res[name] = run_linear(LinearConfig(checkpoint=ck, data="digits", output=str(out)))
        data = _check_results_file(out, res[name], trained_run / "backbone.safetensors" if name == "trained" else None)
        assert data["config"]["epochs"] == 90 and data["metrics"]["frozen_check"] == "passed"
        assert data["data"]["num_classes"] == 10 and data["data"]["train_images"] + data["data"]["val_images"] == 1797
        assert list((out / "tb").glob("events.out.tfevents.*"))
    t, r = res["trained"]["metrics"], res["random"]["metrics"]
    print(f"linear digits top1: trained {t['top1']:.1f} random {r['top1']:.1f}")
    assert t["top1"] > 80.0
    assert t["top1"] > r["top1"] + 20.0
    assert t["top5"] >= t["top1"]


def test_knn_trained_beats_random(trained_run, tmp_path):
    t = run_knn(KNNConfig(checkpoint=str(trained_run), data="digits", output=str(tmp_path / "t"), tensorboard=False))
    r = run_knn(KNNConfig(checkpoint=RANDOM, data="digits", output=str(tmp_path / "r"), tensorboard=False))
    _check_results_file(tmp_path / "t", t, trained_run / "backbone.safetensors")
    print(f"knn digits top1: trained {t['metrics']['top1']:.1f} random {r['metrics']['top1']:.1f}")
    assert t["metrics"]["top1"] > 65.0
    assert t["metrics"]["top1"] > r["metrics"]["top1"] + 20.0
    assert t["metrics"]["bank_size"] == t["data"]["train_images"] > 1400 and t["metrics"]["k"] == 20


@pytest.mark.slow
def test_finetune_trained_beats_random(trained_run, tmp_path):
    res = {}
    for name, ck in (("trained", str(trained_run)), ("random", RANDOM)):
        cfg = finetune_config("auto", checkpoint=ck, data="digits", output=str(tmp_path / name), epochs=1,
                              warmup_epochs=0, tensorboard=False)
        assert cfg.recipe == "digits" and cfg.mixup == 0
        res[name] = run_finetune(cfg)["metrics"]
    print(f"finetune digits (1 epoch) top1: trained {res['trained']['top1']:.1f} random {res['random']['top1']:.1f}")
    assert res["trained"]["top1"] > 55.0
    assert res["trained"]["top1"] > res["random"]["top1"] + 25.0


def test_finetune_with_mixup_randaug_layer_decay_runs(trained_run, tmp_path):
    """The ImageNet recipe's machinery (Mixup/CutMix, RandAugment, erasing, drop path, layer decay)."""
    cfg = finetune_config("finetune_100ep", checkpoint=str(trained_run), data="digits:0-3", output=str(tmp_path),
                          epochs=1, batch_size=64, max_steps=3, layer_decay=0.75, tensorboard=False)
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.randaug_magnitude == 9 and cfg.drop_path == 0.1
    res = run_finetune(cfg)
    assert res["metrics"]["steps"] == 3
    assert 0.0 <= res["metrics"]["top1"] <= 100.0
    assert res["config"]["recipe"] == "finetune_100ep"


@pytest.mark.slow
def test_transfer_digits_held_out_classes(trained_run, tmp_path):
    """Pretrained on digits:0-4 (config.yaml), evaluated on the held-out digits 5-9."""
    res = {}
    for name, ck in (("trained", str(trained_run)), ("random", RANDOM)):
        out = tmp_path / name
        res[name] = run_transfer(TransferConfig(checkpoint=ck, suite="digits", output=str(out), epochs=2,
                                                linear_epochs=30, tensorboard=False))
        for proto in ("linear", "knn", "finetune"):
            assert (out / proto / "results.json").is_file()
    assert res["trained"]["data"] == {"pretraining": "digits:0-4", "target": "digits:5,6,7,8,9", "held_out": True}
    assert res["random"]["data"]["target"] == "digits:5-9"
    t, r = res["trained"]["metrics"], res["random"]["metrics"]
    print("transfer digits 5-9 top1:", {p: (round(t[p]["top1"], 1), round(r[p]["top1"], 1)) for p in t})
    for proto in ("linear", "knn", "finetune"):
        assert t[proto]["top1"] > r[proto]["top1"] + 10.0, proto
    assert t["linear"]["top1"] > 75.0


def test_linear_augmented_mode_runs(trained_run, tmp_path):
    res = run_linear(LinearConfig(checkpoint=str(trained_run), data="digits:0-4", output=str(tmp_path), epochs=2,
                                  batch_size=256, augment=True, crop_min=0.6, tensorboard=False))
    assert res["metrics"]["augment"] is True and res["metrics"]["frozen_check"] == "passed"
    assert res["metrics"]["top1"] > 50.0


def test_frozen_check_catches_a_backbone_that_changed(trained_run, tmp_path, monkeypatch):
    """A feature extractor that (wrongly) runs the backbone in train mode updates the BatchNorm
    statistics: the linear protocol must refuse its result."""
    real = common.extract_features

    def leaky(backbone, dataset, *a, **kw):
        backbone.train()
        with torch.no_grad():
            pooled_features(backbone, torch.stack([dataset[i][0] for i in range(8)]))
        backbone.eval()
        return real(backbone, dataset, *a, **kw)

    monkeypatch.setattr("opera.evals.linear.extract_features", leaky)
    with pytest.raises(FrozenBackboneError, match="frozen backbone changed"):
        run_linear(LinearConfig(checkpoint=str(trained_run), data="digits:0-1", output=str(tmp_path), epochs=1, tensorboard=False))
    assert not (tmp_path / "results.json").exists()


def test_check_frozen_detects_a_single_weight_change(trained_run):
    model = load_eval_backbone(str(trained_run)).model
    ref = snapshot_state(model)
    check_frozen(model, ref)
    with torch.no_grad():
        model.layer4[0].conv2.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(FrozenBackboneError, match="layer4.0.conv2.weight"):
        check_frozen(model, ref)


@pytest.mark.slow
def test_vit_finetune_with_layer_decay_and_linear_lr(tmp_path):
    """ViTs: layer-wise lr decay groups (timm) and the C.1 linear-probe base lr of 3.0."""
    from opera.evals.common import load_eval_backbone
    from opera.evals.finetune import build_classifier, param_groups
    from opera.evals.linear import resolve_base_lr

    loaded = load_eval_backbone("random:vit_tiny")
    model = build_classifier(loaded, 3, drop_path=0.1)
    cfg = finetune_config("finetune_100ep", checkpoint="random:vit_tiny", output=str(tmp_path), layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in param_groups(model, cfg)})
    assert scales[-1] == 1.0 and len(scales) == len(model.blocks) + 2 and scales[0] == pytest.approx(0.75 ** 13)
    assert resolve_base_lr(LinearConfig(), loaded.model) == 3.0
    res = run_finetune(finetune_config("finetune_100ep", checkpoint="random:vit_tiny", data="digits:0-1", output=str(tmp_path),
                                       epochs=1, batch_size=16, max_steps=2, layer_decay=0.75, tensorboard=False))
    assert res["metrics"]["steps"] == 2
