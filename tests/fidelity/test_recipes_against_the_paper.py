"""Every shipped pretraining and finetuning recipe, held against the paper and the official code.

Sources (cited per row):
  [P§4.1]  the paper, Implementation Details: batch 1024/2048/4096, LARS for R50, AdamW for DeiT,
           "the other settings the same as the original MoCo-v3"; class head hidden width 256.
  [P C.1]  the paper, Appendix C.1: finetuning with AdamW, lr 5e-4, wd 0.05, cosine; batch 1024+;
           linear probe SGD, batch 1024, lr 0.1 (R50) / 3.0 (DeiT-S), wd 0, momentum 0.9.
  [M100]   MoCo-v3 CONFIG.md, ResNet-50 100-epoch: main_moco.py defaults (lr .6, wd 1e-6, m .99,
           t 1.0, warmup 10, dim 256, mlp 4096) with --moco-m-cos --crop-min=.2.
  [M300]   MoCo-v3 CONFIG.md, ResNet-50 300-epoch: --lr=.3 --epochs=300 --moco-m-cos --crop-min=.2.
  [MViT]   MoCo-v3 CONFIG.md, ViT-Small/Base: --optimizer=adamw --lr=1.5e-4 --weight-decay=.1
           --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2 (crop-min default .08).
  [Maug]   MoCo-v3 main_moco.py augmentation1/2: blur p 1.0 / 0.1, solarize p 0 / 0.2.
  [DeiT]   the DeiT recipe MoCo-v3 finetunes with: lr 5e-4 per 512, warmup 5, drop path 0.1,
           label smoothing 0.1, Mixup 0.8, CutMix 1.0, RandAugment m9, random erasing 0.25.
Where the paper gives no value: the 150-epoch ResNet-50 rows follow [M100] (MoCo-v3 has no
150-epoch ResNet config); the 100/150-epoch DeiT rows follow [MViT] (its only ViT schedule).
"""

from __future__ import annotations

import re

import pytest

from opera.configs import list_recipes, load_config
from opera.data import PretrainTransform

# recipe family -> expected settings, each with its source
R50 = {"backbone.name": "resnet50", "optim.name": "lars", "optim.weight_decay": 1e-6, "optim.momentum": 0.9,
       "optim.warmup_epochs": 10, "optim.ema_momentum": 0.99, "optim.ema_cosine": True, "data.crop_min": 0.2,
       "self.temperature": 1.0, "self.dim": 256, "self.mlp_dim": 4096, "self.projector_layers": None,
       "self.predictor_layers": 2, "full.layers": 2, "full.hidden": None, "hierarchy": "self,full", "arrangement": "C"}
DEIT = {"optim.name": "adamw", "optim.base_lr": 1.5e-4, "optim.weight_decay": 0.1, "optim.betas": (0.9, 0.999),
        "optim.exclude_1d_decay": False, "optim.warmup_epochs": 40, "optim.ema_momentum": 0.99,
        "optim.ema_cosine": True, "data.crop_min": 0.08, "self.temperature": 0.2, "self.dim": 256,
        "self.mlp_dim": 4096, "backbone.stop_grad_patch_embed": True, "backbone.patch_size": 16,
        "full.layers": 2, "full.hidden": None, "hierarchy": "self,full", "arrangement": "C"}
PRETRAIN_TABLE = [
    # (recipe pattern, expected, source)
    (r"r50_100ep_b(\d+)", {**R50, "optim.base_lr": 0.6, "train.epochs": 100}, "[P§4.1] [M100]"),
    (r"r50_150ep_b(\d+)", {**R50, "optim.base_lr": 0.6, "train.epochs": 150}, "[P§4.1] [M100] (no official 150ep)"),
    (r"r50_300ep_b(\d+)", {**R50, "optim.base_lr": 0.3, "train.epochs": 300}, "[P§4.1] [M300]"),
    (r"deits_(\d+)ep_b(\d+)", {**DEIT, "backbone.name": "deit_small"}, "[P§4.1] [MViT]"),
    (r"deitb_(\d+)ep_b(\d+)", {**DEIT, "backbone.name": "deit_base"}, "[P§4.1] [MViT]"),
]
FINETUNE = {"base_lr": 5e-4, "lr_batch_base": 512, "weight_decay": 0.05, "betas": (0.9, 0.999), "warmup_epochs": 5,
            "drop_path": 0.1, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "randaug_ops": 2,
            "randaug_magnitude": 9, "reprob": 0.25, "crop_min": 0.08, "layer_decay": None}  # [P C.1] [DeiT]


def _get(cfg, key: str):
    if "." not in key:
        return getattr(cfg, key)
    section, name = key.split(".")
    return getattr(cfg.spaces[section] if section in cfg.spaces else getattr(cfg, section), name)


def paper_recipes() -> list[str]:
    return [r for r in list_recipes() if not r.startswith("cpu_")]


def test_every_paper_recipe_has_a_row():
    for recipe in paper_recipes():
        assert any(re.fullmatch(p, recipe) for p, _, _ in PRETRAIN_TABLE), f"{recipe} is not held against the paper"


@pytest.mark.parametrize("recipe", paper_recipes())
def test_pretraining_recipe_matches_the_paper_and_moco_v3(recipe):
    pattern, expected, source = next(row for row in PRETRAIN_TABLE if re.fullmatch(row[0], recipe))
    cfg = load_config(recipe)
    numbers = [int(n) for n in re.findall(r"\d+", recipe)]
    assert cfg.train.batch_size == numbers[-1] and cfg.train.batch_size in (1024, 2048, 4096), source
    if recipe.startswith("deit"):
        assert cfg.train.epochs == numbers[0]
    for key, want in expected.items():
        assert _get(cfg, key) == pytest.approx(want) if isinstance(want, float) else _get(cfg, key) == want, \
            f"{recipe}: {key} = {_get(cfg, key)!r}, {source} says {want!r}"


def test_the_augmentation_is_moco_v3s_asymmetric_pair():
    """[Maug]: view 1 blurs always and never solarizes; view 2 blurs with 0.1 and solarizes with 0.2."""
    t = PretrainTransform(32, crop_min=0.2)
    probs = []
    for view in (t.view1, t.view2):
        blur = next(op for op in view.transforms if "Blur" in repr(op))
        solar = next(op for op in view.transforms if "Solarize" in type(op).__name__)
        probs.append((blur.p, solar.p))
    assert probs == [(1.0, 0.0), (0.1, 0.2)]


@pytest.mark.parametrize("recipe,epochs", [("finetune_100ep", 100), ("finetune_150ep", 150),
                                          ("finetune_200ep", 200), ("finetune_300ep", 300)])
def test_finetune_recipe_matches_appendix_c1(recipe, epochs):
    from opera.evals.finetune import finetune_config

    cfg = finetune_config(recipe)
    assert cfg.epochs == epochs and cfg.batch_size in (1024, 2048, 4096)
    for key, want in FINETUNE.items():
        assert getattr(cfg, key) == want, f"{recipe}: {key} = {getattr(cfg, key)!r}, [P C.1]/[DeiT] say {want!r}"


def test_linear_probe_defaults_match_appendix_c1():
    """[P C.1]: SGD, batch 1024, lr 0.1 (R50) / 3.0 (DeiT-S), wd 0, momentum 0.9."""
    from opera.backbones import create_backbone
    from opera.evals.linear import LinearConfig, resolve_base_lr

    cfg = LinearConfig()
    assert (cfg.batch_size, cfg.weight_decay, cfg.momentum, cfg.epochs) == (1024, 0.0, 0.9, 90)
    assert resolve_base_lr(cfg, create_backbone("resnet_tiny", img_size=32)) == 0.1
    assert resolve_base_lr(cfg, create_backbone("vit_tiny", img_size=32)) == 3.0
