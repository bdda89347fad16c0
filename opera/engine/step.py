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


def prepare_model(model: torch.nn.Module, device: torch.device | str, channels_last: bool | None = None) -> torch.nn.Module:
    """Move ``model`` (a hierarchy) to ``device`` and pick its memory format.

    ``channels_last=None`` turns it on for CNN backbones (every 4-D weight, so the convolutions of
    the online and momentum encoders run in NHWC); token backbones stay as they are. The choice is
    kept in ``model.opera_channels_last``. Values are unchanged; only strides differ.
    """
    from opera.backbones import is_token_backbone

    model = model.to(device)
    if channels_last is None:
        channels_last = not is_token_backbone(getattr(model, "backbone", model))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.opera_channels_last = bool(channels_last)
    return model


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
    # one host sync for all terms; the names are looked up only when something is wrong
    finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in out.losses.values()])).all()
    bad = [] if bool(finite) else [name for name, value in out.losses.items() if not math.isfinite(float(value.detach()))]
    if bad:
        terms = ", ".join(f"{n}={float(out.losses[n].detach())}" for n in bad)
        raise NonFiniteLoss(f"non-finite loss at step {step} ({terms}); the last good checkpoint is kept - lower optim.base_lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    hierarchy.momentum_update(ema_momentum)
    return out
