"""Baseline: the pretraining step of the OFFICIAL OPERA code, re-implemented for timing.

The official OPERA implementation is a thin fork of MoCo-v3 (facebookresearch/moco-v3:
``moco/builder.py``, ``moco/optimizer.py``, ``main_moco.py``) with one extra MLP block (the
class head) after the online predictor and a softmax loss on it. This file re-writes that step
from its published structure - it is not a copy - keeping every implementation choice that costs
time or memory:

* the online encoder *contains* its projector (MoCo-v3 replaces ``fc``/``head`` with the MLP),
  and the momentum encoder is a second full copy of it;
* each view goes through the online encoder, predictor (and here the class head) separately,
  then, under ``torch.no_grad()``, the momentum update runs and each view goes through the
  momentum encoder separately (per-view BatchNorm statistics everywhere);
* the momentum update is a Python loop over parameters that re-binds ``param_m.data`` to a
  freshly allocated ``param_m.data * m + param_b.data * (1 - m)``;
* the keys go through ``concat_all_gather`` (here a world of one process: a gather into a list
  of fresh tensors and a ``torch.cat``, as ``all_gather`` would produce on one rank);
* ``contrastive_loss`` normalises q and k, takes ``einsum('nc,mc->nm') / T`` and returns the
  cross-entropy times ``2 T``;
* LARS is a Python loop over parameters: weight decay and the trust ratio (``torch.where``) for
  ``p.ndim > 1`` only, ``mu = momentum * mu + dp``, ``p -= lr * mu``; ViTs use
  ``torch.optim.AdamW(model.parameters(), lr, weight_decay=wd)`` with the library defaults (on a
  CPU that is the per-parameter loop implementation);
* ``optimizer.zero_grad()`` with the installed PyTorch's default (``set_to_none=True`` since
  PyTorch 2.0 - the conservative choice for the baseline).

The loss is weighted as opera's default ``self,full`` hierarchy (and the official OPERA loss):
``0.5 (ctr(q1, k2) + ctr(q2, k1)) + 0.5 CE(c1) + 0.5 CE(c2)``, so the two implementations give
the same number from the same weights. The backbone is the same timm network that opera builds
(``opera.backbones.create_backbone``), so both sides time the same architecture.

One structural detail is kept from MoCo-v3 although opera differs: the ViT predictor of MoCo-v3
ends in a BatchNorm without affine parameters (``_build_mlp(2, dim, mlp_dim, dim)`` with the
default ``last_bn=True``); the ResNet predictor does not. (A BatchNorm1d over 256 features of one
batch: no measurable time.)

    python benchmarks/official_step.py --backbone resnet18 --img-size 64 --batch-size 64 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from opera.backbones import create_backbone, is_token_backbone


# ---------------------------------------------------------------------- moco/builder.py
def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    mlp: list[nn.Module] = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            # follow SimCLR's design: the projector ends in a BN without affine parameters
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class Encoder(nn.Module):
    """A backbone whose classifier is the projector MLP (MoCo-v3's ``base_encoder.fc = mlp``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.head(y)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``all_gather`` the keys of every rank (no gradient); a world of one without a process group."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    tensors_gather = [torch.ones_like(tensor) for _ in range(world)]
    if world > 1:
        dist.all_gather(tensors_gather, tensor, async_op=False)
    else:
        tensors_gather[0].copy_(tensor)
    return torch.cat(tensors_gather, dim=0)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class OfficialOPERA(nn.Module):
    """MoCo-v3 (``MoCo_ResNet`` / ``MoCo_ViT``) plus OPERA's class head after the predictor."""

    def __init__(self, backbone: nn.Module, dim: int = 256, mlp_dim: int = 4096, T: float = 0.2,
                 num_classes: int = 10, class_hidden: int | None = None, self_weight: float = 0.5, full_weight: float = 0.5):
        super().__init__()
        self.T = T
        self.self_weight, self.full_weight = self_weight, full_weight
        vit = is_token_backbone(backbone)
        hidden_dim = int(backbone.num_features)
        self.base_encoder = Encoder(backbone, build_mlp(3 if vit else 2, hidden_dim, mlp_dim, dim))
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)  # initialize
            param_m.requires_grad = False  # not updated by gradient
        # MoCo_ResNet: _build_mlp(2, dim, mlp_dim, dim, False); MoCo_ViT: _build_mlp(2, dim, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)
        # OPERA: an extra MLP block (FC-BN-ReLU-FC) after the predictor, _build_mlp(2, dim, dim, C):
        # hidden = the instance width dim (256 in the paper)
        self.class_head = build_mlp(2, dim, class_hidden or dim, num_classes, last_bn=False)

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        """Momentum update of the momentum encoder (a Python loop over parameters)."""
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        k = concat_all_gather(k)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long, device=q.device) + N * _rank()
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor, m: float) -> torch.Tensor:
        # compute features
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        c1 = self.class_head(q1)
        c2 = self.class_head(q2)
        with torch.no_grad():  # no gradient
            self._update_momentum_encoder(m)  # update the momentum encoder
            # compute momentum features as targets
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        ctr = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        ce = nn.CrossEntropyLoss()(c1, labels) + nn.CrossEntropyLoss()(c2, labels)
        return self.self_weight * ctr + self.full_weight * ce


# ---------------------------------------------------------------------- moco/optimizer.py
class LARS(torch.optim.Optimizer):
    """LARS for SGD with momentum; no weight decay or trust ratio for ``p.ndim <= 1``."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # if not normalization gamma/beta or bias
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


# ---------------------------------------------------------------------- main_moco.py
def build(backbone: str, img_size: int, patch_size: int | None = None, mlp_dim: int = 4096, dim: int = 256,
          num_classes: int = 10, lr: float = 0.1, weight_decay: float = 1e-6) -> tuple[OfficialOPERA, torch.optim.Optimizer]:
    options = {"patch_size": patch_size} if patch_size else {}
    net = create_backbone(backbone, img_size=img_size, **options)
    model = OfficialOPERA(net, dim=dim, mlp_dim=mlp_dim, num_classes=num_classes)
    if is_token_backbone(net):
        optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay)
    else:
        optimizer = LARS(model.parameters(), lr, weight_decay=weight_decay, momentum=0.9)
    return model, optimizer


def train_step(model: OfficialOPERA, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
               labels: torch.Tensor, lr: float, moco_m: float) -> torch.Tensor:
    """One iteration of ``main_moco.train`` (fp32: no autocast / GradScaler on a CPU)."""
    for param_group in optimizer.param_groups:  # adjust_learning_rate
        param_group["lr"] = lr
    loss = model(x1, x2, labels, moco_m)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def make_official_step(backbone: str, img_size: int, batch_size: int, threads: int = 2, patch_size: int | None = None,
                       mlp_dim: int = 4096, dim: int = 256, num_classes: int = 10):
    """``(step, model, meta)`` as ``opera.bench.make_step``: ``step(i)`` runs one official iteration."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, optimizer = build(backbone, img_size, patch_size, mlp_dim, dim, num_classes)
    model.train()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    x2 = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)

    def step(i: int) -> torch.Tensor:
        return train_step(model, optimizer, x1, x2, y, lr=optimizer.param_groups[0]["lr"], moco_m=0.99)

    meta = {"impl": "official", "backbone": backbone, "img_size": img_size, "batch_size": batch_size,
            "patch_size": patch_size, "mlp_dim": mlp_dim, "dim": dim, "num_classes": num_classes,
            "optimizer": type(optimizer).__name__.lower(), "threads": torch.get_num_threads()}
    return step, model, meta


def bench_official(backbone: str, img_size: int, batch_size: int, steps: int = 20, warmup: int = 3, threads: int = 2,
                   patch_size: int | None = None, mlp_dim: int = 4096, dim: int = 256, num_classes: int = 10) -> dict:
    """Time ``train_step`` on random in-memory images; the same protocol as ``opera.bench.bench_step``."""
    step, _, meta = make_official_step(backbone, img_size, batch_size, threads, patch_size, mlp_dim, dim, num_classes)
    times = []
    loss = None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    med = statistics.median(times)
    return {
        **meta, "steps": steps, "warmup": warmup,
        "img_per_s": batch_size / med,
        "s_per_step": med,
        "s_per_step_min": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="time the official OPERA/MoCo-v3 step")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=10)
    a = p.parse_args(argv)
    r = bench_official(a.backbone, a.img_size, a.batch_size, a.steps, a.warmup, a.threads, a.patch_size, a.mlp_dim, a.dim, a.num_classes)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
