"""Fixtures of the evaluation tests: a supervised-trained ``resnet_tiny`` exported like an opera
run (``backbone.safetensors``, ``last.pt`` with a ``self,full`` hierarchy, ``config.yaml``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

PRETRAIN_SPEC = "digits:0-4"  # the classes seen in "pretraining"; 5-9 are held out


def _digits_tensors(spec: str, split: str, img_size: int = 32):
    from opera.data import EvalTransform, build_dataset

    ds = build_dataset(spec, split, EvalTransform(img_size))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return x, torch.tensor(ds.targets), ds.num_classes


def train_supervised_backbone(spec: str = PRETRAIN_SPEC, epochs: int = 4, seed: int = 0):
    """resnet_tiny trained with cross-entropy on ``spec`` (center crops + random shifts)."""
    from opera.backbones import create_backbone, pooled_features

    torch.manual_seed(seed)
    x, y, k = _digits_tensors(spec, "train")
    bb = create_backbone("resnet_tiny", img_size=32)
    head = torch.nn.Linear(bb.num_features, k)
    params = list(bb.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    bb.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i: i + 64]
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(head(pooled_features(bb, xb)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return bb.eval(), head.eval(), k


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run directory as ``opera run pretrain`` writes it, with a supervised-trained backbone."""
    from opera.configs import PretrainConfig, config_to_dict
    from opera.engine.checkpoint import export_backbone, save_state
    from opera.hierarchy import SupervisionHierarchy

    t = time.time()
    bb, head, k = train_supervised_backbone()
    run = tmp_path_factory.mktemp("trained_run")
    cfg = PretrainConfig()
    cfg.data.spec = PRETRAIN_SPEC
    h = SupervisionHierarchy.from_spec(cfg.hierarchy, backbone=bb, num_classes=k, arrangement=cfg.arrangement,
                                       img_size=cfg.backbone.img_size, **cfg.space_options())
    # the layout of opera.engine.pretrain: config.yaml with a "resolved" section, last.pt with
    # the hierarchy state, the backbone spec and the run identity, backbone.safetensors
    identity = {"hierarchy": h.spec, "arrangement": h.arrangement, "backbone": "resnet_tiny", "num_classes": k}
    export_backbone(bb, run / "backbone.safetensors")
    save_state({"model": h.state_dict(), "backbone_spec": bb.opera_spec.to_dict(), "identity": identity,
                "epoch": 4, "step_in_epoch": 0, "global_step": 48}, run / "last.pt")
    resolved = {**config_to_dict(cfg), "resolved": {"num_classes": k, **h.describe()}}
    (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    print(f"trained_run fixture: {time.time() - t:.1f}s")
    return run
