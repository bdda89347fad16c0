"""One pretraining step - shared by the training loop and ``opera bench``."""

from __future__ import annotations

import contextlib
import math

import torch

from opera import distributed
from opera.errors import OperaError
from opera.hierarchy import HierarchyOutput


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA when ``amp`` is ``bf16`` (or ``auto``), fp16 autocast when ``amp`` is
    ``fp16`` (MoCo-v3's ``torch.cuda.amp.autocast``, for GPUs without fast bf16 such as V100s);
    ``bf16``/``fp16`` also run on the CPU; a no-op otherwise."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, amp: str) -> "torch.amp.GradScaler | None":
    """MoCo-v3's ``GradScaler`` for fp16 autocast (its state belongs in the checkpoint); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


#: under fp16, a run whose loss stays non-finite until the GradScaler's scale falls below this
#: diverged (it is not an overflow the scaler can absorb): it stops like an fp32 run.
MIN_LOSS_SCALE = 2.0 ** -16


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
               targets: "dict[str, torch.Tensor] | torch.Tensor | None", lr: float, ema_momentum: float, device: torch.device, amp: str = "auto",
               step: int = 0, per_view: bool = True, scaler: "torch.amp.GradScaler | None" = None,
               global_views: int | None = None) -> HierarchyOutput:
    """Momentum update, forward, backward, check the loss terms are finite, optimizer step.

    The momentum update comes first, with this step's ``ema_momentum``, as in MoCo-v3
    (``builder.forward`` calls ``_update_momentum_encoder(m)`` before computing the keys): the
    keys of step t come from the momentum encoder updated towards the online weights that step t
    starts from, with m_t of the schedule.

    ``model`` is what is called (the hierarchy, or its DDP wrapper); ``hierarchy`` is the bare
    module whose momentum teacher is updated. ``targets``: the batch's named label sets
    (``{"class": y}``; a bare tensor means ``{"class": y}``).

    ``per_view`` (default): the online branch runs one view at a time - forward view 1, backward
    its terms, then view 2 - so only one view's activations are alive, instead of all of them.
    The gradients are those of the joint loss (it is a sum of per-view terms against detached
    keys, masks and labels; ``tests/perf`` checks it), with peak memory down by up to the
    activations of one view. Under DDP the first backward runs in ``no_sync`` and the last one
    all-reduces the accumulated gradients, once. ``concat_views`` (views share BatchNorm
    statistics) always runs jointly, and so does a hierarchy with a ``joint_only`` space (Barlow
    Twins, VICReg: their losses need every view's batch at once).

    ``global_views`` (multi-crop): ``views[:global_views]`` are the global views, the rest local
    crops (``SupervisionHierarchy.forward``). Once the gradients are complete (all-reduced under
    DDP), the spaces' ``after_backward`` runs, then the optimizer step.

    ``scaler`` (fp16): the losses are scaled before each backward and ``scaler.step`` skips the
    optimizer step when a gradient overflowed, lowering the scale, as MoCo-v3's GradScaler does; a
    non-finite loss is such a skipped step, not an error, unless the scale has collapsed below
    ``MIN_LOSS_SCALE``.
    """
    hierarchy.momentum_update(ema_momentum)
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(views)
    joint = getattr(hierarchy, "concat_views", False) or getattr(hierarchy, "joint_only", None)
    groups = [[i] for i in range(n)] if per_view and n > 1 and not joint else [None]
    optimizer.zero_grad(set_to_none=True)
    outs: list[HierarchyOutput] = []
    for g, ids in enumerate(groups):
        last = g == len(groups) - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            part = {} if ids is None else {"view_ids": ids, "state": outs[-1].state if outs else None}
            if not outs and global_views is not None:
                part["global_views"] = global_views
            with autocast_context(device, amp):
                out = model(views=views, targets=targets, **part)
            (out.loss if scaler is None else scaler.scale(out.loss)).backward()
        out.state = None if last else out.state  # drop the step's keys and masks once the last view is done
        outs.append(out)
    out = outs[0] if len(outs) == 1 else _add_outputs(outs)
    if hasattr(hierarchy, "after_backward"):
        hierarchy.after_backward()
    # one host sync for all terms; the names are looked up only when something is wrong. The step
    # is not taken: the parameters stay those of the last good step. Under DDP every rank learns
    # whether any rank failed (one tiny all-reduce), so all of them stop together: otherwise the
    # others would step with the all-reduced NaN gradients, may checkpoint them, then hang.
    finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in out.losses.values()])).all()
    bad_ranks = distributed.ranks_where(~finite)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the (all-reduced) gradients hold an inf or NaN
        scaler.update()
        if not bad_ranks or scaler.get_scale() >= MIN_LOSS_SCALE:
            return out
    if bad_ranks:
        optimizer.zero_grad(set_to_none=True)
        bad = [name for name, value in out.losses.items() if not math.isfinite(float(value.detach()))]
        where = f" on rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}" if distributed.get_world_size() > 1 else ""
        terms = f" ({', '.join(f'{n}={float(out.losses[n].detach())}' for n in bad)})" if bad else ""
        raise NonFiniteLoss(f"non-finite loss at step {step}{where}{terms}; the last good checkpoint is kept - lower optim.base_lr or check the data")
    optimizer.step()
    return out


def _add_outputs(outs: list[HierarchyOutput]) -> HierarchyOutput:
    """The output of a whole step from those of a partition of its views (shares add up)."""
    losses = {k: sum(o.losses[k].detach() for o in outs) for k in outs[0].losses}
    logs: dict[str, torch.Tensor] = {}
    for o in outs:
        for k, v in o.logs.items():
            logs[k] = logs[k] + v if k in logs else v
    return HierarchyOutput(sum(o.loss.detach() for o in outs), losses, logs)
