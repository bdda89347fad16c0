"""``SupervisionHierarchy``: the OPERA objective as a stack of task spaces over one backbone.

From the base up (Eq. 35): Y^mask = Y, Y^self = g(Y), Y^full = h(Y^self). The total loss is the
sum of the spaces' weighted losses (Eq. 9, Eq. 36); with the default weights and spec
``self,full`` it is the official OPERA loss
``0.5 (ctr(q1,k2) + ctr(q2,k1)) + 0.5 CE(view1) + 0.5 CE(view2)`` (Eq. 34).

The training loop needs nothing but ``out = hierarchy(views=[x1, x2], targets={"class": y})``,
``out.loss.backward()``, ``hierarchy.momentum_update(m)`` and ``hierarchy.on_step(progress)``. Because every term of the loss
depends on the online outputs of one view only (the keys, masks and labels it is compared with are
detached), the step may instead run the online branch one view at a time and backpropagate each
view's terms before the next view's forward (``view_ids=[i]``, ``state=out.state``): the same
gradients, with the activations of one view alive instead of all (``opera.engine.step``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import opera.supervisions  # noqa: F401  (registers the built-in spaces)
from opera.backbones import create_backbone, feature_dim, get_spec, is_token_backbone
from opera.errors import OperaError, suggest
from opera.hierarchy.teacher import MomentumTeacher
from opera.supervisions.base import INSTANCE_LEVEL, SPACES, BuildContext, Progress, Stage, TaskSpace, make_options

ARRANGEMENTS = ("A", "B", "C", "naive")


class StepState:
    """What one step computes once and shares between calls over subsets of its views (the
    momentum keys, the MIM masks): pass ``out.state`` to the next call of the same step. A plain
    class, not a dataclass or tuple, so DistributedDataParallel passes it through untouched."""

    __slots__ = ("stage",)

    def __init__(self, stage: Stage):
        self.stage = stage


@dataclass
class HierarchyOutput:
    """``loss``: the scalar to backpropagate; ``losses``: the weighted term of each space;
    ``logs``: detached values worth logging (per-space accuracies, unweighted terms). For a subset
    of the views, each is that subset's share; the shares of a partition add up to the whole.
    ``state``: the step's shared state, for a next call over other views of the same step."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    state: StepState | None = field(default=None, repr=False, compare=False)


def parse_spec(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"mask,self,full"`` -> ``("mask", "self", "full")``, validated (order from the base up).

    ``+`` is accepted as a separator too (``self+full``), as the ablation variants write it.
    """
    if isinstance(spec, str):
        tokens = [t.strip() for t in spec.replace("+", ",").split(",")]
    else:
        tokens = [str(t).strip() for t in spec]
    valid = SPACES.names()
    chain, listing = _spaces_by_level()
    if not tokens or any(not t for t in tokens):
        raise OperaError(f"empty task space in hierarchy {spec!r}; write spaces from the base up, e.g. {','.join(chain)}")
    for t in tokens:
        if t not in SPACES:
            raise OperaError(f"unknown task space {t!r} in hierarchy {spec!r}{suggest(t, valid)}; valid spaces: {listing}")
    if len(set(tokens)) != len(tokens):
        raise OperaError(f"hierarchy {spec!r} repeats a task space; each of {listing} may appear once")
    levels = [SPACES.get(t).level for t in tokens]
    if levels != sorted(levels):
        fixed = ",".join(sorted(tokens, key=lambda n: SPACES.get(n).level))
        raise OperaError(f"hierarchy {spec!r} is out of order; use {fixed!r} (spaces go from the base up: {listing})")
    return tuple(tokens)


def _spaces_by_level() -> tuple[list[str], str]:
    """The first registered space of each level from the base up (``mask, self, full, coarse``),
    and that chain with the other spaces of each level beside it, as error messages name them:
    ``mask, self, full, coarse (at self's level also byol, simclr; at full's level also supcon)``."""
    groups: dict[int, list[str]] = {}
    for name in SPACES.names():
        groups.setdefault(SPACES.get(name).level, []).append(name)
    levels = [groups[level] for level in sorted(groups)]
    chain = [group[0] for group in levels]
    others = [f"at {group[0]}'s level also {', '.join(group[1:])}" for group in levels if len(group) > 1]
    return chain, ", ".join(chain) + (f" ({'; '.join(others)})" if others else "")


def resolve_arrangement(spaces: tuple[str, ...], arrangement: str | None) -> str:
    """Default C when an instance space (level 1: ``self``, ``byol``, ...) and an
    arrangement-placed space (``full``, ``supcon``) are both present, A when there is no instance
    space to attach to. (A default C over an instance space without a predictor becomes B at
    build time: ``class_space.class_source``.)"""
    if arrangement is not None and arrangement not in ARRANGEMENTS:
        raise OperaError(f"unknown arrangement {arrangement!r}; valid: {', '.join(ARRANGEMENTS)}")
    placed = [n for n in spaces if SPACES.get(n).placed_by_arrangement]
    if not placed:
        if arrangement is not None:
            names = [repr(n) for n in SPACES.names() if SPACES.get(n).placed_by_arrangement]
            names_text = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
            raise OperaError(
                f"arrangement {arrangement!r} places the class space, but hierarchy {','.join(spaces)!r} has no {names_text}; "
                "add one (e.g. self,full) or drop the arrangement"
            )
        return "C"
    if not any(SPACES.get(n).level == INSTANCE_LEVEL for n in spaces):
        if arrangement not in (None, "A"):
            others = [repr(n) for n in SPACES.names() if SPACES.get(n).level == INSTANCE_LEVEL and n != "self"]
            also = f" nor any other instance space ({', '.join(others)})" if others else ""
            raise OperaError(
                f"arrangement {arrangement!r} attaches {placed[0]!r} to the instance space, but the hierarchy has no 'self'{also}; "
                f"use self,{placed[0]} or arrangement A"
            )
        return "A"
    return arrangement or "C"


class SupervisionHierarchy(nn.Module):
    """A backbone, the task spaces stacked on it (``spaces``, a ModuleDict from the base up) and,
    when a space asked for one, the momentum ``teacher`` (:class:`MomentumTeacher`).

    ``concat_views``: the views of a step run as one batch everywhere (shared BatchNorm
    statistics; not MoCo-v3's default, which runs each view alone).
    """

    def __init__(self, backbone: nn.Module, spaces: dict[str, TaskSpace], arrangement: str, concat_views: bool = False,
                 teacher: MomentumTeacher | None = None, label_sets: dict[str, int] | None = None):
        super().__init__()
        self.backbone = backbone
        self.spaces = nn.ModuleDict(spaces)
        self.teacher = teacher
        self.arrangement = arrangement
        self.concat_views = concat_views
        self.label_sets = dict(label_sets or {})
        self.register_load_state_dict_pre_hook(_rename_old_momentum_keys)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        backbone: str | nn.Module,
        label_sets: dict[str, int] | None = None,
        num_classes: int | None = None,
        arrangement: str | None = None,
        img_size: int = 224,
        concat_views: bool = False,
        backbone_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> "SupervisionHierarchy":
        """Build the hierarchy ``spec`` (e.g. ``"mask,self,full"``) over ``backbone``.

        ``label_sets`` names the data's label sets and their sizes (``{"class": 1000}``; digits
        also has ``{"coarse": 3}``); ``num_classes=K`` is short for ``{"class": K}``. A space that
        needs a label set the data lacks is a one-line error naming what the data has.
        ``options`` holds one dict per space, keyed by its name: ``self={"dim": 256}``,
        ``full={"layers": 2, "hidden": 256}``, ``mask={"ratio": 0.5}``.
        """
        names = parse_spec(spec)
        arrangement_default = arrangement is None
        arrangement = resolve_arrangement(names, arrangement)
        if label_sets is None:
            label_sets = {"class": int(num_classes)} if num_classes else {}
        elif num_classes is not None and label_sets.get("class") != num_classes:
            raise OperaError(f"num_classes={num_classes} disagrees with label_sets {label_sets}; pass one of them")
        for key in options:
            if key not in SPACES:
                raise OperaError(f"unknown option group {key!r}{suggest(key, SPACES.names())}; valid: {', '.join(SPACES.names())}")
            if key not in names:
                raise OperaError(f"options for {key!r} were given but the hierarchy {','.join(names)!r} has no {key!r}; drop them or add {key!r}")
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, img_size=img_size, **(backbone_options or {}))
        elif not all(hasattr(backbone, a) for a in ("num_features", "forward_features", "forward_head")):
            raise OperaError(
                f"backbone {type(backbone).__name__} lacks timm's interface (num_features, forward_features, forward_head); "
                "build it with opera.backbones.create_backbone or timm.create_model(..., num_classes=0)"
            )
        ctx = BuildContext(backbone=backbone, label_sets=dict(label_sets), arrangement=arrangement, spec=names,
                           token_backbone=is_token_backbone(backbone), arrangement_default=arrangement_default)
        ctx.publish("backbone", feature_dim(backbone))
        spaces: dict[str, TaskSpace] = {}
        for name in names:
            space_cls = SPACES.get(name)
            spaces[name] = space_cls.build(ctx, make_options(space_cls.Options, options.get(name), name))
            if space_cls.placed_by_arrangement:
                ctx.placed = True
        teacher = MomentumTeacher(backbone, ctx.reps, ctx.teacher_wanted) if ctx.teacher_wanted else None
        return cls(backbone, spaces, ctx.arrangement, concat_views, teacher, label_sets)

    @classmethod
    def from_config(cls, cfg: Any, label_sets: dict[str, int] | None) -> "SupervisionHierarchy":
        """The hierarchy of a :class:`~opera.configs.PretrainConfig` over data with ``label_sets``."""
        b = cfg.backbone
        return cls.from_spec(
            cfg.hierarchy,
            backbone=b.name,
            label_sets=label_sets or {},
            arrangement=cfg.arrangement,
            img_size=b.img_size,
            concat_views=cfg.train.concat_views,
            backbone_options={"patch_size": b.patch_size, "stop_grad_patch_embed": b.stop_grad_patch_embed,
                              "drop_path_rate": b.drop_path_rate or None},
            **cfg.space_options(),
        )

    @property
    def spec(self) -> str:
        return ",".join(self.spaces.keys())

    # ------------------------------------------------------------------ training step
    def forward(self, views: list[torch.Tensor] | None = None, targets: dict[str, torch.Tensor] | torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None, view_ids: list[int] | None = None,
                state: StepState | None = None) -> HierarchyOutput:
        """The loss of the online views ``view_ids`` (default: all) of one step.

        ``views``/``targets`` start a step (``targets``: the named label sets, ``{"class": y}``;
        a bare tensor, or ``labels=y``, means ``{"class": y}``); ``state=out.state`` continues the
        same step with other views (the teacher's outputs and the masks are reused, not
        recomputed). Calling it for each part of a partition of the views and adding the losses
        gives exactly the loss of one call over all views (Eq. 9, 34, 36 are sums of per-view
        terms with detached targets).
        """
        if state is None:
            if views is None:
                raise OperaError("SupervisionHierarchy needs views=[x1, x2, ...] (or state=out.state to continue a step)")
            if targets is None:
                targets = labels
            if isinstance(targets, torch.Tensor):
                targets = {"class": targets}
            stage = Stage(list(views), dict(targets or {}), [{} for _ in views], self.concat_views, teacher=self.teacher)
            # one batch through the backbone (online here, the teacher's too) when the views share statistics
            stage.extras["fuse_backbone"] = len(views) > 1 and self.concat_views
        else:
            stage = state.stage
        n = len(stage.views)
        ids = list(range(n)) if view_ids is None else [int(i) for i in view_ids]
        if not ids or any(not 0 <= i < n for i in ids) or len(set(ids)) != len(ids):
            raise OperaError(f"view_ids {view_ids!r} must be distinct view indices in 0..{n - 1}")
        if self.concat_views and len(ids) != n:
            raise OperaError("concat_views runs all views as one batch (shared BatchNorm statistics); it cannot run a subset of the views")
        encode = lambda x, view_ids: self.backbone.forward_features(x)  # noqa: E731
        for space in self.spaces.values():
            encode = space.wrap_encoder(encode, stage, self.backbone)
        if stage.extras["fuse_backbone"] and len(ids) > 1:
            tokens = encode(torch.cat([stage.views[i] for i in ids], 0), ids).chunk(len(ids), 0)
        else:
            tokens = [encode(stage.views[i], [i]) for i in ids]
        for i, t in zip(ids, tokens):
            stage.reps[i]["tokens"] = t
            stage.reps[i]["backbone"] = self.backbone.forward_head(t, pre_logits=True)
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        for name, space in self.spaces.items():
            out = space(stage, ids)
            losses[name] = out.loss
            clash = set(out.logs) & set(logs)
            if clash:
                raise OperaError(f"space {name!r} logs {sorted(clash)[0]!r}, which another space logs too; derive keys from the space name (TaskSpace.key)")
            logs.update(out.logs)
        loss = torch.stack(list(losses.values())).sum()
        return HierarchyOutput(loss, losses, logs, StepState(stage))

    def on_step(self, progress: Progress) -> None:
        """Tell every space where training is (before each step)."""
        for space in self.spaces.values():
            space.on_step(progress)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Every (online, target) pair the momentum update keeps in step: the teacher's, then the spaces' own."""
        pairs = self.teacher.momentum_pairs() if self.teacher is not None else []
        for space in self.spaces.values():
            pairs += space.momentum_pairs(self.backbone)
        return pairs

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every (online, momentum) pair (MoCo)."""
        online: list[torch.Tensor] = []
        target: list[torch.Tensor] = []
        for src, dst in self.momentum_pairs():
            online.extend(src.parameters())
            target.extend(dst.parameters())
        if target:
            torch._foreach_lerp_(target, online, 1.0 - m)

    # ------------------------------------------------------------------ inspection
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every representation of the hierarchy for one batch of (unmasked) images, in the
        module's current mode: ``backbone`` (y), then each space's (``self/projector``,
        ``self/predictor``, ``full/logits``, ...). Used by the diagnostics of Corollary 1."""
        reps: dict[str, torch.Tensor] = {"backbone": self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)}
        for space in self.spaces.values():
            space.represent(reps)
        return reps

    def describe(self) -> dict[str, Any]:
        spec = get_spec(self.backbone)
        return {
            "hierarchy": self.spec,
            "arrangement": self.arrangement,
            "backbone": spec.to_dict() if spec else type(self.backbone).__name__,
            "concat_views": self.concat_views,
            "label_sets": dict(self.label_sets),
            "teacher": list(self.teacher.wanted) if self.teacher is not None else [],
            # what each space derived from the backbone and the spaces below it (tau, widths, depths)
            "derived": {name: {k[len("resolved_"):]: v for k, v in vars(space).items() if k.startswith("resolved_")}
                        for name, space in self.spaces.items()},
            "parameters": sum(p.numel() for _, p in self.trainable_parameters()),
        }


#: where checkpoints written before the hierarchy owned the teacher kept the momentum copies
_OLD_MOMENTUM_KEYS = {"spaces.self.momentum_encoder.": "teacher.backbone.",
                      "spaces.self.momentum_projector.": "teacher.heads.self_projector."}


def _rename_old_momentum_keys(module, state_dict, prefix, *args) -> None:
    """Load a checkpoint whose momentum copies sat in the instance space (opera <= 0.3)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_MOMENTUM_KEYS.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break
