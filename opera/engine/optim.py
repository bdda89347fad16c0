"""The optimizers of MoCo-v3's ``main_moco.py`` and its learning-rate and momentum schedules.

Weight decay follows the official code, optimizer by optimizer:

* LARS skips weight decay and the trust ratio on 1-D parameters (biases, norm affines): its
  ``step`` tests ``p.ndim > 1``.
* AdamW (and SGD) decay *every* parameter: ``torch.optim.AdamW(model.parameters(), lr,
  weight_decay=wd)``. ``exclude_1d=True`` (``optim.exclude_1d_decay``) is the common variant
  that exempts biases and norms from decay, as an option of its own name, never the default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opera.errors import OperaError


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in MoCo-v3, vectorised with ``torch._foreach`` ops.

    For a parameter group with ``lars=True``: ``g <- g + wd * p``; ``g <- g * eta |p| / |g|``
    (1 where either norm is 0); ``buf <- momentum * buf + g``; ``p <- p - lr * buf``.
    Groups with ``lars=False`` (biases, norms) skip weight decay and the trust ratio.

    The same arithmetic as MoCo-v3's per-parameter loop, in few passes over memory: the trust
    ratios of a group are computed at once (one ``stack`` of the norms, one ``where``), the
    scaled update is built in one scratch copy of the gradients, and that copy becomes the new
    momentum buffer (``buf_new = g' + momentum * buf``) instead of being added into the old one.
    ``p.grad`` is left untouched.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                # scratch copy: g + wd * p (MoCo-v3 adds the decay even when it is 0)
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (g_norm > 0), group["trust_coefficient"] * p_norm / g_norm,
                                    torch.ones_like(p_norm))
                torch._foreach_mul_(grads, trust.unbind(0))
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):  # first step: buf = momentum * 0 + g
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
            bufs = [st["mu"] for st in states]
            if group["lars"]:
                # the scratch copy becomes the new buffer: g' + momentum * buf
                torch._foreach_add_(grads, bufs, alpha=group["momentum"])
                for st, new in zip(states, grads):
                    st["mu"] = new
                bufs = grads
            else:  # grads are p.grad itself: update the buffers in place
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norms/1-d params (neither)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def optimizer_name(name: str, model: nn.Module) -> str:
    """``auto``: AdamW for token backbones (ViTs), LARS for CNNs, as MoCo-v3 / OPERA train them;
    otherwise ``name`` (lars | adamw | sgd)."""
    from opera.backbones import is_token_backbone

    if name == "auto":
        return "adamw" if is_token_backbone(getattr(model, "backbone", model)) else "lars"
    if name not in ("lars", "adamw", "sgd"):
        raise OperaError(f"unknown optimizer {name!r}; valid: auto, lars, adamw, sgd")
    return name


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), exclude_1d: bool = False) -> torch.optim.Optimizer:
    """``name`` in lars | adamw | sgd over the trainable parameters of ``model``.

    LARS always exempts 1-D parameters (the official LARS does); AdamW and SGD decay every
    parameter as ``main_moco.py`` does, unless ``exclude_1d`` (then 1-D parameters get no decay).
    """
    if name == "lars":
        return LARS(param_groups(model, weight_decay), lr=lr, momentum=momentum)
    if exclude_1d:
        groups = param_groups(model, weight_decay)
        for g in groups:
            g.pop("lars")
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if name == "adamw":
        # the fused kernel (CPU and CUDA): one pass per parameter instead of a dozen foreach ops
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {"foreach": True}))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(epoch: float, epochs: int, warmup_epochs: float, lr: float) -> float:
    """MoCo-v3: linear warmup over ``warmup_epochs`` (per iteration), then half-cosine to 0."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-8)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def ema_momentum_at(epoch: float, epochs: int, m: float, cosine: bool) -> float:
    """MoCo-v3 ``--moco-m-cos``: m rises from ``m`` to 1 along a half cosine."""
    if not cosine:
        return m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m)
