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
from opera.supervisions.base import INSTANCE_LEVEL, SPACES, BuildContext, Progress, SpaceOutput, Stage, TaskSpace, make_options

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
        teacher = MomentumTeacher(backbone, ctx.reps, ctx.teacher_wanted, ctx.teacher_drop_path) if ctx.teacher_wanted else None
        return cls(backbone, spaces, ctx.arrangement, concat_views, teacher, label_sets)

    @classmethod
    def from_config(cls, cfg: Any, label_sets: dict[str, int] | None) -> "SupervisionHierarchy":
        """The hierarchy of a :class:`~opera.configs.PretrainConfig` over data with ``label_sets``."""
        b = cfg.backbone
        options = {"patch_size": b.patch_size, "stop_grad_patch_embed": b.stop_grad_patch_embed,
                   "drop_path_rate": b.drop_path_rate or None}
        backbone = create_backbone(b.name, img_size=b.img_size, **options)
        if getattr(cfg.data, "local_crops", 0) and is_token_backbone(backbone):
            # local crops are smaller than the global views: the ViT interpolates its position
            # embedding to each input's grid (DINO's interpolate_pos_encoding; timm's dynamic_img_size)
            backbone = create_backbone(b.name, img_size=b.img_size, dynamic_img_size=True, **options)
        return cls.from_spec(
            cfg.hierarchy,
            backbone=backbone,
            label_sets=label_sets or {},
            arrangement=cfg.arrangement,
            img_size=b.img_size,
            concat_views=cfg.train.concat_views,
            **cfg.space_options(),
        )

    @property
    def spec(self) -> str:
        return ",".join(self.spaces.keys())

    # ------------------------------------------------------------------ training step
    def forward(self, views: list[torch.Tensor] | None = None, targets: dict[str, torch.Tensor] | torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None, view_ids: list[int] | None = None,
                state: StepState | None = None, global_views: int | None = None) -> HierarchyOutput:
        """The loss of the online views ``view_ids`` (default: all) of one step.

        ``views``/``targets`` start a step (``targets``: the named label sets, ``{"class": y}``;
        a bare tensor, or ``labels=y``, means ``{"class": y}``); ``state=out.state`` continues the
        same step with other views (the teacher's outputs and the masks are reused, not
        recomputed). Calling it for each part of a partition of the views and adding the losses
        gives exactly the loss of one call over all views (Eq. 9, 34, 36 are sums of per-view
        terms with detached targets), unless a space is ``joint_only`` (then only all views at once).

        ``global_views=G`` (multi-crop): ``views[:G]`` are the global views and the rest local
        crops, which only the spaces that declare ``multi_crop`` (DINO) read; the momentum teacher
        and every other space see the global views alone.
        """
        if state is None:
            if views is None:
                raise OperaError("SupervisionHierarchy needs views=[x1, x2, ...] (or state=out.state to continue a step)")
            if targets is None:
                targets = labels
            if isinstance(targets, torch.Tensor):
                targets = {"class": targets}
            if global_views is not None and not 1 <= global_views <= len(views):
                raise OperaError(f"global_views={global_views} must be between 1 and the number of views ({len(views)})")
            if global_views is not None and global_views < len(views) and not any(s.multi_crop for s in self.spaces.values()):
                raise OperaError(f"{len(views) - global_views} local crops were given but no space of {self.spec!r} reads them; "
                                 "set data.local_crops=0 or add a multi-crop space (dino)")
            stage = Stage(list(views), dict(targets or {}), [{} for _ in views], self.concat_views, teacher=self.teacher,
                          global_views=global_views)
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
        if self.joint_only and len(ids) != n:
            raise OperaError(f"the space {self.joint_only!r} needs every view of the batch at once; run the step "
                             "jointly (train.per_view=false) instead of a subset of the views")
        g = stage.n_global
        global_stage = stage.global_stage()
        plain = lambda x, view_ids: self.backbone.forward_features(x)  # noqa: E731
        encode_global = encode_local = plain
        for space in self.spaces.values():
            encode_global = space.wrap_encoder(encode_global, stage if space.multi_crop else global_stage, self.backbone)
            if space.multi_crop:
                encode_local = space.wrap_encoder(encode_local, stage, self.backbone)
        tokens: dict[int, torch.Tensor] = {}
        if stage.extras["fuse_backbone"] and len(ids) > 1:
            # one batch per kind of view (the global views together, the local crops together: DINO's
            # grouping of the crops by resolution)
            for group, encode in (([i for i in ids if i < g], encode_global), ([i for i in ids if i >= g], encode_local)):
                if group:
                    tokens.update(zip(group, encode(torch.cat([stage.views[i] for i in group], 0), group).chunk(len(group), 0)))
        else:
            for i in ids:
                tokens[i] = (encode_global if i < g else encode_local)(stage.views[i], [i])
        for i in ids:
            stage.reps[i]["tokens"] = tokens[i]
            stage.reps[i]["backbone"] = self.backbone.forward_head(tokens[i], pre_logits=True)
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        global_ids = [i for i in ids if i < g]
        for name, space in self.spaces.items():
            if space.multi_crop:
                out = space(stage, ids)
            elif global_ids:
                out = space(global_stage, global_ids)
            else:  # a call over local crops only: nothing of this space's
                out = SpaceOutput(torch.zeros((), device=stage.views[ids[0]].device))
            losses[name] = out.loss
            clash = set(out.logs) & set(logs)
            if clash:
                raise OperaError(f"space {name!r} logs {sorted(clash)[0]!r}, which another space logs too; derive keys from the space name (TaskSpace.key)")
            logs.update(out.logs)
        loss = torch.stack(list(losses.values())).sum()
        return HierarchyOutput(loss, losses, logs, StepState(stage))

    @property
    def joint_only(self) -> str | None:
        """The first space whose loss needs every view at once (``TaskSpace.joint_only``), or None."""
        return next((name for name, space in self.spaces.items() if space.joint_only), None)

    def after_backward(self) -> None:
        """Once a step's gradients are complete, before the optimizer step (``TaskSpace.after_backward``)."""
        for space in self.spaces.values():
            space.after_backward()

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
