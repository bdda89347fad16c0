"""``SupervisionHierarchy``: the OPERA objective as a stack of task spaces over one backbone.

From the base up (Eq. 35): Y^mask = Y, Y^self = g(Y), Y^full = h(Y^self). The total loss is the
sum of the spaces' weighted losses (Eq. 9, Eq. 36); with the default weights and spec
``self,full`` it is the official OPERA loss
``0.5 (ctr(q1,k2) + ctr(q2,k1)) + 0.5 CE(view1) + 0.5 CE(view2)`` (Eq. 34).

The training loop needs nothing but ``out = hierarchy(views=[x1, x2], labels=y)``,
``out.loss.backward()`` and ``hierarchy.momentum_update(m)``. Because every term of the loss
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
from opera.supervisions.base import SPACES, BuildContext, Stage, TaskSpace, make_options

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
    order = sorted(valid, key=lambda n: SPACES.get(n).level)
    if not tokens or any(not t for t in tokens):
        raise OperaError(f"empty task space in hierarchy {spec!r}; write spaces from the base up, e.g. {','.join(order)}")
    for t in tokens:
        if t not in SPACES:
            raise OperaError(f"unknown task space {t!r} in hierarchy {spec!r}{suggest(t, valid)}; valid spaces: {', '.join(order)}")
    if len(set(tokens)) != len(tokens):
        raise OperaError(f"hierarchy {spec!r} repeats a task space; each of {', '.join(order)} may appear once")
    levels = [SPACES.get(t).level for t in tokens]
    if levels != sorted(levels):
        fixed = ",".join(sorted(tokens, key=lambda n: SPACES.get(n).level))
        raise OperaError(f"hierarchy {spec!r} is out of order; spaces go from the base up ({', '.join(order)}): use {fixed!r}")
    return tuple(tokens)


def resolve_arrangement(spaces: tuple[str, ...], arrangement: str | None) -> str:
    """Default C when ``self`` and ``full`` are both present, A for ``full`` alone."""
    if arrangement is not None and arrangement not in ARRANGEMENTS:
        raise OperaError(f"unknown arrangement {arrangement!r}; valid: {', '.join(ARRANGEMENTS)}")
    if "full" not in spaces:
        if arrangement is not None:
            raise OperaError(
                f"arrangement {arrangement!r} places the class space, but hierarchy {','.join(spaces)!r} has no 'full'; "
                "add 'full' (e.g. self,full) or drop the arrangement"
            )
        return "C"
    if "self" not in spaces:
        if arrangement not in (None, "A"):
            raise OperaError(
                f"arrangement {arrangement!r} attaches 'full' to the instance space, but the hierarchy has no 'self'; "
                "use self,full or arrangement A"
            )
        return "A"
    return arrangement or "C"


def couples_samples(module: nn.Module) -> bool:
    """True if ``module`` has a layer whose output for one sample depends on the other samples of
    the batch in training mode (BatchNorm and its subclasses - SyncBatchNorm, timm's
    BatchNormAct2d - or timm's batch-statistics EvoNorms).

    A backbone without one (a ViT: LayerNorm, attention within a sample) gives the same output
    for a batch of concatenated views as for each view alone, so it may run the views as one batch.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        name = type(m).__name__
        if "BatchNorm" in name or name.startswith("EvoNorm") and "B" in name[len("EvoNorm"):]:
            return True
    return False


class SupervisionHierarchy(nn.Module):
    """A backbone and the task spaces stacked on it (``spaces``, a ModuleDict from the base up).

    ``fuse_views`` (off by default): when the backbone couples no samples (``couples_samples`` is
    False, e.g. a ViT), its online and momentum copies run all views of a step as one
    concatenated batch - the same outputs as one view at a time, in fewer, larger matrix products.
    The heads (with BatchNorm) still see each view alone unless ``concat_views``. BatchNorm
    backbones always run per view unless ``concat_views`` (which changes their statistics).
    Off by default because on the 2-core CPU box it raised peak RSS by ~10% for a speed-up that
    only showed under heavy contention (BENCHMARKS.md); worth trying on a GPU.
    """

    def __init__(self, backbone: nn.Module, spaces: dict[str, TaskSpace], arrangement: str, concat_views: bool = False,
                 fuse_views: bool = False):
        super().__init__()
        self.backbone = backbone
        self.spaces = nn.ModuleDict(spaces)
        self.arrangement = arrangement
        self.concat_views = concat_views
        self.fuse_views = fuse_views
        self.backbone_couples_samples = couples_samples(backbone)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        backbone: str | nn.Module,
        num_classes: int | None = None,
        arrangement: str | None = None,
        img_size: int = 224,
        concat_views: bool = False,
        fuse_views: bool = False,
        backbone_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> "SupervisionHierarchy":
        """Build the hierarchy ``spec`` (e.g. ``"mask,self,full"``) over ``backbone``.

        ``options`` holds one dict per space, keyed by its name: ``self={"dim": 256}``,
        ``full={"layers": 2, "hidden": 256}``, ``mask={"ratio": 0.5}``.
        """
        names = parse_spec(spec)
        arrangement = resolve_arrangement(names, arrangement)
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
        ctx = BuildContext(
            backbone=backbone,
            dims={"backbone": feature_dim(backbone)},
            num_classes=num_classes,
            arrangement=arrangement,
            spec=names,
            token_backbone=is_token_backbone(backbone),
        )
        spaces: dict[str, TaskSpace] = {}
        for name in names:
            space_cls = SPACES.get(name)
            spaces[name] = space_cls.build(ctx, make_options(space_cls.Options, options.get(name), name))
        return cls(backbone, spaces, arrangement, concat_views, fuse_views)

    @property
    def spec(self) -> str:
        return ",".join(self.spaces.keys())

    # ------------------------------------------------------------------ training step
    def forward(self, views: list[torch.Tensor] | None = None, labels: torch.Tensor | None = None, *,
                view_ids: list[int] | None = None, state: StepState | None = None) -> HierarchyOutput:
        """The loss of the online views ``view_ids`` (default: all) of one step.

        ``views``/``labels`` start a step; ``state=out.state`` continues the same step with other
        views (the momentum keys and masks are reused, not recomputed). Calling it for each part
        of a partition of the views and adding the losses gives exactly the loss of one call over
        all views (Eq. 9, 34, 36 are sums of per-view terms with detached targets).
        """
        if state is None:
            if views is None:
                raise OperaError("SupervisionHierarchy needs views=[x1, x2, ...] (or state=out.state to continue a step)")
            stage = Stage(list(views), labels, [{} for _ in views], self.concat_views)
            # one batch through the backbone (online here, momentum in the 'self' space) when exact
            stage.extras["fuse_backbone"] = len(views) > 1 and (self.concat_views or (
                self.fuse_views and not self.backbone_couples_samples and len({tuple(v.shape) for v in views}) == 1))
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
            logs.update(out.logs)
        loss = torch.stack(list(losses.values())).sum()
        return HierarchyOutput(loss, losses, logs, StepState(stage))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every (online, momentum) pair (MoCo)."""
        online: list[torch.Tensor] = []
        target: list[torch.Tensor] = []
        for space in self.spaces.values():
            for src, dst in space.momentum_pairs(self.backbone):
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
        module's current mode: ``backbone`` (y), and ``projector``/``predictor``/``class_logits``
        where the spaces exist. Used by the diagnostics of Corollary 1."""
        reps: dict[str, torch.Tensor] = {"backbone": self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)}
        if "self" in self.spaces:
            sp = self.spaces["self"]
            reps["projector"] = sp.projector(reps["backbone"])
            reps["predictor"] = sp.predictor(reps["projector"])
        if "full" in self.spaces:
            sp = self.spaces["full"]
            reps["class_logits"] = sp.class_head(reps[sp.source])
        return reps

    def describe(self) -> dict[str, Any]:
        spec = get_spec(self.backbone)
        return {
            "hierarchy": self.spec,
            "arrangement": self.arrangement,
            "backbone": spec.to_dict() if spec else type(self.backbone).__name__,
            "concat_views": self.concat_views,
            # what each space derived from the backbone and the spaces below it (tau, widths, depths)
            "derived": {name: {k[len("resolved_"):]: v for k, v in vars(space).items() if k.startswith("resolved_")}
                        for name, space in self.spaces.items()},
            "parameters": sum(p.numel() for _, p in self.trainable_parameters()),
        }
