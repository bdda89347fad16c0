"""Every hierarchy can fit one fixed batch: the objective of Eq. 9 / Eq. 34 (and Eq. 36 with ``mask``)
falls clearly within a few dozen optimiser steps, and so does each space's own term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opera.hierarchy import SupervisionHierarchy

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

STEPS = 30
NUM_CLASSES = 4

CASES = [
    ("self", None, "resnet_tiny"),
    ("full", None, "resnet_tiny"),
    ("self,full", "A", "resnet_tiny"),
    ("self,full", "B", "resnet_tiny"),
    ("self,full", "C", "resnet_tiny"),
    ("self,full", "naive", "resnet_tiny"),
    ("mask,self,full", None, "vit_tiny"),
    ("mask,self", None, "vit_tiny"),
]


def fixed_batch(n: int = 16, size: int = 32):
    """16 smooth images (so masked patches are predictable from their neighbours) and two fixed views:
    noise-perturbed copies, the second one mirrored."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    v1 = x + 0.05 * torch.randn(x.shape, generator=g)
    v2 = x.flip(-1) + 0.05 * torch.randn(x.shape, generator=g)
    return [v1, v2], torch.arange(n) % NUM_CLASSES


@pytest.mark.parametrize("spec,arrangement,backbone", CASES, ids=lambda v: str(v))
def test_one_batch_overfits(spec, arrangement, backbone):
    options = {}
    if "self" in spec:
        options["self"] = {"mlp_dim": 128, "dim": 32, "temperature": 0.2}  # tau fixed: the CNN default is 1.0
    if "full" in spec:
        options["full"] = {"hidden": 64}
    h = SupervisionHierarchy.from_spec(
        spec, backbone=backbone, arrangement=arrangement, img_size=32,
        num_classes=NUM_CLASSES if "full" in spec else None,
        backbone_options={"depth": 2, "patch_size": 8} if backbone == "vit_tiny" else None,
        **options,
    )
    views, labels = fixed_batch()
    labels = labels if "full" in spec else None
    opt = torch.optim.Adam([p for _, p in h.trainable_parameters()], lr=2e-3)
    history = []
    for _ in range(STEPS):
        out = h(views, labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        h.momentum_update(0.99)
        assert torch.isfinite(out.loss)
        history.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}})
    first, last = history[0], history[-1]
    assert set(first) == {"loss", *spec.split(",")}
    assert last["loss"] < 0.7 * first["loss"], f"{spec}: loss {first['loss']:.3f} -> {last['loss']:.3f}"
    for term in spec.split(","):  # each supervision learns, not only the easiest one
        assert last[term] < 0.9 * first[term], f"{spec}: {term} {first[term]:.3f} -> {last[term]:.3f}"
