"""What the evaluation protocols actually apply: the linear probe's lr from its batch (C.1:
``base_lr x batch / 256``), layer-wise lr decay in the learning rates the fine-tuning optimizer
uses, and Mixup/CutMix/RandAugment on the batches the fine-tuned model sees."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from opera.evals import finetune
from opera.evals.finetune import finetune_config, run_finetune
from opera.evals.linear import LinearConfig, run_linear


def record_lrs(monkeypatch, optimizer_cls) -> list[dict[int, float]]:
    """At each step of any ``optimizer_cls``: the lr applied to each parameter (by ``id``)."""
    applied: list[dict[int, float]] = []
    real = optimizer_cls.step

    def step(self, *args, **kwargs):
        applied.append({id(p): g["lr"] for g in self.param_groups for p in g["params"]})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optimizer_cls, "step", step)
    return applied


def capture_classifier(monkeypatch) -> dict:
    """The fine-tuned model (``model``) and every batch it was called with in train mode (``inputs``)."""
    seen: dict = {"inputs": []}
    real = finetune.build_classifier

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: seen["inputs"].append(a[0].detach().clone()) if m.training else None)
        seen["model"] = model
        return model

    monkeypatch.setattr(finetune, "build_classifier", build)
    return seen


@pytest.mark.parametrize("base_lr,batch", [(0.2, 128), (None, 64)])
def test_linear_probe_lr_is_base_lr_times_batch_over_256(tmp_path, monkeypatch, base_lr, batch):
    applied = record_lrs(monkeypatch, torch.optim.SGD)
    res = run_linear(LinearConfig(checkpoint="random:resnet_tiny", data="digits:0-1", output=str(tmp_path), epochs=2,
                                  batch_size=batch, base_lr=base_lr, tensorboard=False))
    peak = (0.1 if base_lr is None else base_lr) * batch / 256  # None: C.1's 0.1 for a CNN
    assert res["metrics"]["lr"] == pytest.approx(peak)
    steps = 2 * math.ceil(288 / batch)  # digits:0-1: 288 training images, cached features
    assert len(applied) == steps
    for k, lrs in enumerate(applied):  # no warmup, per-iteration half cosine
        want = peak * 0.5 * (1 + math.cos(math.pi * k / steps))
        assert list(lrs.values()) == pytest.approx([want] * len(lrs), abs=1e-12), k


def test_finetune_applies_layer_decay_to_each_layer(tmp_path, monkeypatch):
    """ViT with depth 12 and layer decay 0.75: the head trains at lr, block i at lr * 0.75^(12-i),
    the patch embedding at lr * 0.75^13, at every step."""
    applied = record_lrs(monkeypatch, torch.optim.AdamW)
    seen = capture_classifier(monkeypatch)
    res = run_finetune(finetune_config("finetune_100ep", checkpoint="random:vit_tiny", data="digits:0-1",
                                       output=str(tmp_path), epochs=1, batch_size=16, max_steps=2, warmup_epochs=0,
                                       layer_decay=0.75, tensorboard=False))
    peak = 5e-4 * 16 / 512
    assert res["metrics"]["lr"] == pytest.approx(peak) and len(applied) == 2
    model = seen["model"]
    assert len(model.blocks) == 12
    steps_per_epoch = 288 // 16
    for step, lrs in enumerate(applied):
        cur = peak * 0.5 * (1 + math.cos(math.pi * step / steps_per_epoch))
        assert set(lrs) == {id(p) for p in model.parameters() if p.requires_grad}
        assert lrs[id(model.head.weight)] == pytest.approx(cur, abs=1e-15)
        assert lrs[id(model.patch_embed.proj.weight)] == pytest.approx(cur * 0.75 ** 13, abs=1e-15)
        for i, block in enumerate(model.blocks):
            for param in (block.attn.qkv.weight, block.norm1.bias, block.mlp.fc2.weight):
                assert lrs[id(param)] == pytest.approx(cur * 0.75 ** (12 - i), abs=1e-15), i
        ratios = sorted({round(lr / cur, 12) for lr in lrs.values()})
        assert ratios == sorted({round(0.75 ** k, 12) for k in range(14)})


def test_finetune_batches_are_mixed_and_randaugmented(tmp_path, monkeypatch):
    """The ImageNet recipe on digits: every training image goes through RandAugment (2 ops,
    magnitude 9), every batch through timm's Mixup/CutMix, and the model and the loss see the
    mixed images and the soft targets."""
    from timm import data as timm_data
    from timm import loss as timm_loss

    mixups: list[dict] = []

    class SpyMixup(timm_data.Mixup):
        def __call__(self, x, target):
            before = x.clone()
            x, target = super().__call__(x, target)
            mixups.append({"before": before, "after": x.clone(), "target": target.clone()})
            return x, target

    targets: list[torch.Tensor] = []
    real_loss = timm_loss.SoftTargetCrossEntropy.forward
    monkeypatch.setattr(timm_data, "Mixup", SpyMixup)
    monkeypatch.setattr(timm_loss.SoftTargetCrossEntropy, "forward",
                        lambda self, x, target: (targets.append(target.clone()), real_loss(self, x, target))[1])
    randaug = {"calls": 0, "changed": 0, "ops": set()}
    real_randaug = v2.RandAugment.forward

    def spy_randaug(self, *inputs):
        randaug["ops"].add((self.num_ops, self.magnitude))
        out = real_randaug(self, *inputs)
        randaug["calls"] += 1
        randaug["changed"] += not torch.equal(out, inputs[0])
        return out

    monkeypatch.setattr(v2.RandAugment, "forward", spy_randaug)
    seen = capture_classifier(monkeypatch)
    cfg = finetune_config("finetune_100ep", checkpoint="random:resnet_tiny", data="digits:0-3", output=str(tmp_path),
                          epochs=1, batch_size=16, max_steps=2, tensorboard=False)
    res = run_finetune(cfg)
    assert res["metrics"]["steps"] == 2

    assert randaug["ops"] == {(2, 9)} and randaug["calls"] >= 32  # every image of the 2 batches
    assert randaug["changed"] >= randaug["calls"] // 2
    assert len(mixups) == 2 and len(seen["inputs"]) == 2 and len(targets) == 2
    for mix, x, target in zip(mixups, seen["inputs"], targets):
        assert not torch.equal(mix["before"], mix["after"])  # the batch was mixed
        assert torch.equal(x, mix["after"])  # and the model saw the mixed batch
        assert torch.equal(target, mix["target"]) and target.shape == (16, 4)
        assert torch.allclose(target.sum(1), torch.ones(16))
        # label smoothing alone leaves 0.925 / 0.025; mixing two labels gives other weights
        assert target.max(1).values.lt(0.925 - 1e-6).any()
