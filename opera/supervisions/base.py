"""What every task space shares: the registry, the build context, the per-step stage.

A task space is one module (``mask``, ``self``, ``full``, ``coarse``, ``supcon``). The hierarchy
builds the spaces from the base up; each one reads a representation below it (by name) and
publishes its own for the spaces above it. Adding a space is one new file with a subclass
registered in ``SPACES``; nothing else in the package names it:

* its **keys** (logs, losses, representations) derive from its registered name (``key``);
* the **labels** it needs are a named label set (``{"class": y, "coarse": c}``) that the data
  provides; it asks the build context for the size (``BuildContext.label_size``) and the stage
  for the tensor (``Stage.target``). A label of ``-1`` means "none" (an unlabelled image);
* a **momentum teacher** (an EMA copy of the backbone and of any published head) is owned by the
  hierarchy: a space asks for the teacher's version of a representation
  (``BuildContext.want_teacher`` at build time, ``Stage.teacher_rep`` in a step), and the
  hierarchy copies each module on the way once, however many spaces ask;
* ``on_step(progress)`` tells a space where training is, for schedules inside a space;
  ``after_backward()`` runs once the step's gradients are complete, before the optimizer step;
* ``joint_only``: a space whose loss needs the whole batch of every view at once (batch
  statistics across views, Barlow Twins' cross-correlation, VICReg's covariance) says so, and the
  step then runs its views jointly instead of one at a time (``train.per_view``);
* ``multi_crop``: a space that reads the local crops too (DINO). A step's views are its global
  views first (``Stage.global_views``), then any local crops (``data.local_crops``); every other
  space, and the momentum teacher, sees only the global views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from opera.errors import OperaError, suggest
from opera.fields import check_value
from opera.registry import Registry

# encode(x, view_ids) -> tokens: runs the backbone on views ``view_ids`` concatenated in ``x``.
Encoder = Callable[[torch.Tensor, list[int]], torch.Tensor]

#: the label of an image that has none in a label set (masked out of every space that needs it)
NO_LABEL = -1

#: the level of the instance spaces (``self``, ``byol``, ...): what arrangements B and C attach to
INSTANCE_LEVEL = 1


@dataclass
class Published:
    """A representation a space publishes: its width, and how it is made from the one below
    (``module(source)``), so the momentum teacher can make its own version of it."""

    dim: int
    source: str | None = None
    module: nn.Module | None = None
    owner: str | None = None


@dataclass
class BuildContext:
    """What a space sees when it is built: the backbone, the representations below it, the data's
    label sets (name -> number of classes) and the arrangement (Fig. 4)."""

    backbone: nn.Module
    label_sets: dict[str, int]
    arrangement: str
    spec: tuple[str, ...]
    token_backbone: bool
    reps: dict[str, Published] = field(default_factory=dict)
    #: the representation the space directly below published last (``backbone`` at the start)
    top: str = "backbone"
    #: whether an arrangement-placed space (``full``, ``supcon``) is already below
    placed: bool = False
    #: the arrangement was not asked for (the default C, which becomes B over an instance space
    #: without a predictor; ``class_space.class_source``)
    arrangement_default: bool = False
    #: representations whose teacher version some space asked for
    teacher_wanted: list[str] = field(default_factory=list)
    #: the teacher's backbone keeps the student's stochastic depth (MoCo-v3 builds both encoders
    #: alike); a space may ask for a teacher without it (DINO: ``want_teacher(..., drop_path=False)``)
    teacher_drop_path: bool = True

    @property
    def dims(self) -> dict[str, int]:
        return {name: p.dim for name, p in self.reps.items()}

    def publish(self, name: str, dim: int, source: str | None = None, module: nn.Module | None = None,
                owner: str | None = None) -> None:
        if name in self.reps:
            raise OperaError(f"representation {name!r} is published twice; space keys must be unique")
        self.reps[name] = Published(int(dim), source, module, owner)
        self.top = name

    def label_size(self, space: str, label_set: str) -> int:
        """The number of classes of ``label_set``, or a one-line error naming what the data has."""
        have = ", ".join(sorted(self.label_sets)) or "none (unlabelled data)"
        if label_set not in self.label_sets:
            raise OperaError(
                f"the space {space!r} needs the label set {label_set!r} but the data has: {have}; "
                f"use data with a {label_set!r} label set or drop {space!r} from the hierarchy"
            )
        size = int(self.label_sets[label_set])
        if size < 2:
            raise OperaError(f"the space {space!r} needs at least 2 classes in label set {label_set!r}, the data has {size}")
        return size

    def want_teacher(self, name: str, drop_path: bool = True) -> None:
        """Ask for the momentum teacher's version of representation ``name`` (EMA copies of the
        backbone and of every module from it up to ``name``); ``drop_path=False``: the teacher's
        backbone runs without stochastic depth."""
        if not drop_path:
            self.teacher_drop_path = False
        if name not in self.reps:
            raise OperaError(f"no representation {name!r} to copy into the momentum teacher; have: {', '.join(self.reps)}")
        if name not in self.teacher_wanted:
            self.teacher_wanted.append(name)


@dataclass(frozen=True)
class Progress:
    """Where training is (``on_step``): the fractional epoch, the global step and their totals."""

    epoch: float
    step: int
    epochs: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)


class TeacherRepresentations(Protocol):
    """What a step may ask of the momentum teacher (:class:`opera.hierarchy.teacher.MomentumTeacher`):
    its version of a representation of every view, computed once per step."""

    def rep(self, stage: Stage, name: str) -> list[torch.Tensor]: ...


@dataclass
class Stage:
    """One training step's data as it climbs the hierarchy.

    ``reps[i][name]`` is representation ``name`` of view ``i`` (``tokens``, ``backbone``,
    ``self/projector``, ...); ``targets`` the step's named label sets; ``apply`` runs a module on
    the given views, separately (BatchNorm statistics per view, MoCo-v3's default) or concatenated.
    ``extras`` holds what the spaces compute once per step and share between calls over subsets of
    the views (the teacher's representations, the MIM masks, the labelled counts), so a step may
    run its online views one at a time.
    """

    views: list[torch.Tensor]
    targets: dict[str, torch.Tensor]
    reps: list[dict[str, torch.Tensor]]
    concat_views: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherRepresentations | None = None  # the hierarchy's momentum teacher
    #: the views ``0..global_views-1`` are the global views, the rest local crops (None: all global)
    global_views: int | None = None

    @property
    def n_global(self) -> int:
        """How many leading views are global (what the teacher and the single-crop spaces see)."""
        return len(self.views) if self.global_views is None else int(self.global_views)

    def global_stage(self) -> "Stage":
        """This stage restricted to its global views: the same per-view dicts, labels and step
        extras (so what a space publishes on one is seen on the other), without the local crops."""
        g = self.n_global
        if g == len(self.views):
            return self
        return Stage(self.views[:g], self.targets, self.reps[:g], self.concat_views, self.extras, self.teacher, g)

    def apply(self, module: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.concat_views and len(xs) > 1:
            return list(module(torch.cat(xs, dim=0)).chunk(len(xs), dim=0))
        return [module(x) for x in xs]

    def get(self, name: str, ids: list[int] | None = None) -> list[torch.Tensor]:
        return [self.reps[i][name] for i in (range(len(self.reps)) if ids is None else ids)]

    def target(self, space: str, label_set: str) -> torch.Tensor:
        if label_set not in self.targets:
            have = ", ".join(sorted(self.targets)) or "none"
            raise OperaError(f"the space {space!r} needs labels {label_set!r} but the batch carries: {have}; "
                             f"pass targets={{{label_set!r}: y}} or drop {space!r} from the hierarchy")
        return self.targets[label_set]

    def teacher_rep(self, name: str) -> list[torch.Tensor]:
        """The momentum teacher's representation ``name`` of every view (computed once per step)."""
        if self.teacher is None:
            raise OperaError(f"representation {name!r} of the momentum teacher was asked for, but no space asked for a teacher at build time")
        return self.teacher.rep(self, name)


@dataclass
class SpaceOutput:
    """A space's contribution: its weighted loss and detached values to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskSpace(nn.Module):
    """Base class of a task space. Subclasses set ``name``, ``level`` and ``Options``.

    ``placed_by_arrangement``: the space is a class-level supervision whose input the arrangement
    chooses (A: backbone, B: projector, C: predictor; Fig. 4); the lowest such space is placed by
    the arrangement and any above it stacks on the one below.
    """

    name: ClassVar[str]
    level: ClassVar[int]  # position from the base: mask 0 < self 1 < full, supcon 2 < coarse 3
    Options: ClassVar[type]
    placed_by_arrangement: ClassVar[bool] = False
    token_only: ClassVar[bool] = False  # needs a ViT backbone (patch tokens)
    #: the loss needs every view of the batch at once (not a sum of per-view terms against detached
    #: targets): the step runs such a hierarchy jointly, and a call over a subset of views is refused
    joint_only: ClassVar[bool] = False
    #: the space reads the local crops (views past ``Stage.global_views``); others see global views only
    multi_crop: ClassVar[bool] = False

    def key(self, what: str) -> str:
        """``"<space name>/<what>"``: every log and representation key of the space."""
        return f"{self.name}/{what}"

    @classmethod
    def build(cls, ctx: BuildContext, options: Any) -> "TaskSpace":
        raise NotImplementedError

    def wrap_encoder(self, encode: Encoder, stage: Stage, backbone: nn.Module) -> Encoder:
        """Change how the backbone sees the online views (only the ``mask`` space does)."""
        return encode

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:  # pragma: no cover - abstract
        """The loss terms of the online views ``ids`` (all of them, or one subset of a partition).

        Every space's loss is a sum over the online views of terms that depend on that view's
        online outputs and on detached, step-wide targets (teacher outputs, masks, labels), so
        the terms of the subsets of a partition add up to the loss of all views, and so do their
        ``logs`` (each is that subset's share: a mean over all views is written as sum / number
        of views).
        """
        raise NotImplementedError

    def online_heads(self, stage: Stage, ids: list[int], *heads: nn.Module) -> list[list[torch.Tensor]]:
        """The online views ``ids`` through ``heads`` in turn from the backbone (an instance
        space's projector, then its predictor), each output published in ``stage.reps`` under
        ``<name>/projector`` and ``<name>/predictor``; one list per head. The space needs two
        views of each image (one line otherwise)."""
        n = stage.n_global
        if n < 2:
            raise OperaError(
                f"the instance space {self.name!r} needs at least two views of each image, got {n}; "
                f"pass views=[x1, x2] (two augmentations) or drop {self.name!r} from the hierarchy"
            )
        outputs, x = [], stage.get("backbone", ids)
        for head, role in zip(heads, ("projector", "predictor")):
            x = stage.apply(head, x)
            for i, xi in zip(ids, x):
                stage.reps[i][self.key(role)] = xi
            outputs.append(x)
        return outputs

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        """Add this space's representations of one batch of unmasked images to ``reps`` (which
        holds ``backbone`` and those of the spaces below): what ``diagnose`` measures."""

    def on_step(self, progress: Progress) -> None:
        """Called by the training loop before every step (schedules inside a space)."""

    def after_backward(self) -> None:
        """Called by the step once all of its gradients are accumulated (and all-reduced under
        DDP), before the optimizer step: e.g. DINO's ``cancel_gradients_last_layer``."""

    def momentum_pairs(self, backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs of the space's own that the momentum update keeps in
        step, beside the hierarchy's teacher (which most spaces use instead)."""
        return []


SPACES: Registry[type[TaskSpace]] = Registry("task space")


def make_options(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, naming any unknown key and the valid ones, and
    checking every value against the range or choices its field states (:func:`opera.fields.option`)."""
    values = dict(values or {})
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise OperaError(f"unknown option {where}.{key}{suggest(key, valid)}; valid: {', '.join(valid)}")
    options = cls(**values)
    for f in fields(cls):
        check_value(f"{where}.{f.name}", getattr(options, f.name), f)
    return options
