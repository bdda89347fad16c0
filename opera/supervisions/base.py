"""What every task space shares: the registry, the build context and the per-step stage.

A task space is one module (``mask``, ``self``, ``full``). The hierarchy builds the spaces from
the base up; each one reads a representation below it (by name) and may publish new ones for the
spaces above it. Adding a space is one new file with a subclass registered in ``SPACES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from opera.errors import OperaError, suggest
from opera.registry import Registry

# encode(x, view_ids) -> tokens: runs the backbone on views ``view_ids`` concatenated in ``x``.
Encoder = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class BuildContext:
    """What a space sees when it is built: the backbone and the representations below it."""

    backbone: nn.Module
    dims: dict[str, int]  # representation name -> width, e.g. {"backbone": 2048}
    num_classes: int | None
    arrangement: str
    spec: tuple[str, ...]
    token_backbone: bool


@dataclass
class Stage:
    """One training step's data as it climbs the hierarchy.

    ``reps[i][name]`` is representation ``name`` of view ``i`` (``tokens``, ``backbone``,
    ``projector``, ``predictor``, ...); ``apply`` runs a module on the given views, separately
    (BatchNorm statistics per view, MoCo-v3's default) or concatenated. ``extras`` holds what the
    spaces compute once per step and share between calls over subsets of the views (the momentum
    keys, the MIM masks), so a step may run its online views one at a time.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor | None
    reps: list[dict[str, torch.Tensor]]
    concat_views: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def apply(self, module: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.concat_views and len(xs) > 1:
            return list(module(torch.cat(xs, dim=0)).chunk(len(xs), dim=0))
        return [module(x) for x in xs]

    def get(self, name: str, ids: list[int] | None = None) -> list[torch.Tensor]:
        return [self.reps[i][name] for i in (range(len(self.reps)) if ids is None else ids)]


@dataclass
class SpaceOutput:
    """A space's contribution: its weighted loss and detached values to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskSpace(nn.Module):
    """Base class of a task space. Subclasses set ``name``, ``level`` and ``Options``."""

    name: ClassVar[str]
    level: ClassVar[int]  # position from the base: mask 0 < self 1 < full 2
    Options: ClassVar[type]

    @classmethod
    def build(cls, ctx: BuildContext, options: Any) -> "TaskSpace":
        raise NotImplementedError

    def wrap_encoder(self, encode: Encoder, stage: Stage, backbone: nn.Module) -> Encoder:
        """Change how the backbone sees the online views (only the ``mask`` space does)."""
        return encode

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:  # pragma: no cover - abstract
        """The loss terms of the online views ``ids`` (all of them, or one subset of a partition).

        Every space's loss is a sum over the online views of terms that depend on that view's
        online outputs and on detached, step-wide targets (keys, masks, labels), so the terms of
        the subsets of a partition add up to the loss of all views, and so do their ``logs``
        (each is that subset's share: a mean over all views is written as sum / number of views).
        """
        raise NotImplementedError

    def momentum_pairs(self, backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs that the momentum update keeps in step."""
        return []


SPACES: Registry[type[TaskSpace]] = Registry("task space")


def make_options(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, naming any unknown key and the valid ones."""
    values = dict(values or {})
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise OperaError(f"unknown option {where}.{key}{suggest(key, valid)}; valid: {', '.join(valid)}")
    return cls(**values)
