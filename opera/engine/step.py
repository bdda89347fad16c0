"""One pretraining step - shared by the training loop and ``opera bench``."""

from __future__ import annotations

import contextlib
import math

import torch

from opera.errors import OperaError
from opera.hierarchy import HierarchyOutput


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA when ``amp`` is ``bf16`` (or ``auto``); a no-op otherwise."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NonFiniteLoss(OperaError):
    """A NaN or inf loss: the run stops, the last good checkpoint is kept."""


def train_step(model: torch.nn.Module, hierarchy, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               labels: torch.Tensor | None, lr: float, ema_momentum: float, device: torch.device, amp: str = "auto",
               step: int = 0) -> HierarchyOutput:
    """Forward both views, check the loss terms are finite, backward, step, momentum update.

    ``model`` is what is called (the hierarchy, or its DDP wrapper); ``hierarchy`` is the bare
    module whose momentum encoder is updated.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast_context(device, amp):
        out = model(views=views, labels=labels)
    bad = [name for name, value in out.losses.items() if not math.isfinite(float(value.detach()))]
    if bad:
        terms = ", ".join(f"{n}={float(out.losses[n].detach())}" for n in bad)
        raise NonFiniteLoss(f"non-finite loss at step {step} ({terms}); the last good checkpoint is kept - lower optim.base_lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    hierarchy.momentum_update(ema_momentum)
    return out
