"""The instance space ``self``: MoCo-v3 on top of the backbone (Appendix B, Eq. 34).

Y^self = g(Y) (Eq. 8) is the online predictor output q = predictor(projector(y)); the keys k come
from the momentum encoder (a copy of the backbone and projector updated by EMA, never by
gradients). The loss is the symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` times ``weight``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from opera.backbones import pooled_features
from opera.errors import OperaError
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp
from opera.supervisions.losses import info_nce


@dataclass
class InstanceOptions:
    """Options of the instance space (MoCo-v3's ``--moco-dim``, ``--moco-mlp-dim``, ``--moco-t``)."""

    dim: int = 256  # instance embedding width (paper Fig. 7)
    mlp_dim: int = 4096  # hidden width of projector and predictor
    projector_layers: int | None = None  # None: 2 for CNNs, 3 for ViTs (MoCo-v3)
    predictor_layers: int = 2
    temperature: float | None = None  # tau; None: MoCo-v3's 1.0 for CNNs (ResNet-50), 0.2 for ViTs
    weight: float = 0.5  # the official loss: 0.5 (ctr(q1,k2) + ctr(q2,k1))
    gather_distributed: bool = True  # negatives from every rank, as MoCo-v3


@SPACES.register("self")
class InstanceSpace(TaskSpace):
    """Contrastive instance space. Publishes the ``projector`` and ``predictor`` representations."""

    name = "self"
    level = 1
    Options = InstanceOptions

    def __init__(self, backbone: nn.Module, in_dim: int, options: InstanceOptions, token_backbone: bool):
        super().__init__()
        self.options = options
        proj_layers = options.projector_layers or (3 if token_backbone else 2)
        self.projector = build_mlp(proj_layers, in_dim, options.mlp_dim, options.dim, last_bn=True)
        # MoCo-v3: the ViT predictor ends in a BatchNorm without affine parameters, the ResNet one does not
        self.predictor = build_mlp(options.predictor_layers, options.dim, options.mlp_dim, options.dim, last_bn=token_backbone)
        self.momentum_encoder = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for module in (self.momentum_encoder, self.momentum_projector):
            for p in module.parameters():
                p.requires_grad = False
        self.resolved_projector_layers = proj_layers
        self.resolved_temperature = options.temperature if options.temperature is not None else (0.2 if token_backbone else 1.0)

    @classmethod
    def build(cls, ctx: BuildContext, options: InstanceOptions) -> "InstanceSpace":
        space = cls(ctx.backbone, ctx.dims["backbone"], options, ctx.token_backbone)
        ctx.dims["projector"] = options.dim
        ctx.dims["predictor"] = options.dim
        return space

    def momentum_pairs(self, backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(backbone, self.momentum_encoder), (self.projector, self.momentum_projector)]

    @torch.no_grad()
    def keys(self, stage: Stage) -> list[torch.Tensor]:
        """k_i = momentum_projector(momentum_encoder(x_i)) for the unmasked views, computed once
        per step (cached in ``stage.extras["keys"]``) whichever subset of online views asks first.

        The momentum encoder runs the views as one batch where the hierarchy found that exact
        (``stage.extras["fuse_backbone"]``: a backbone without BatchNorm, or ``concat_views``);
        the projector follows ``stage.apply`` (per view unless ``concat_views``).
        """
        if "keys" in stage.extras:
            return stage.extras["keys"]
        views = stage.views
        if stage.extras.get("fuse_backbone") and len(views) > 1:
            feats = list(pooled_features(self.momentum_encoder, torch.cat(views, 0)).chunk(len(views), 0))
        else:
            feats = [pooled_features(self.momentum_encoder, x) for x in views]
        stage.extras["keys"] = keys = stage.apply(self.momentum_projector, feats)
        return keys

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: for two views view i contributes ctr(q_i, k_{1-i}), so all views
        give ``ctr(q1, k2) + ctr(q2, k1)``; for n > 2 views, sum_{j != i} ctr(q_i, k_j) * 2 / (n (n - 1))."""
        n = len(stage.views)
        if n < 2:
            raise OperaError(
                f"the instance space 'self' needs at least two views of each image, got {n}; "
                "pass views=[x1, x2] (two augmentations) or drop 'self' from the hierarchy"
            )
        z = stage.apply(self.projector, stage.get("backbone", ids))
        q = stage.apply(self.predictor, z)
        for i, zi, qi in zip(ids, z, q):
            stage.reps[i]["projector"], stage.reps[i]["predictor"] = zi, qi
        k = self.keys(stage)
        t, gather = self.resolved_temperature, self.options.gather_distributed
        ctr = sum(info_nce(qi, k[j], t, gather) for i, qi in zip(ids, q) for j in range(n) if j != i)
        if n > 2:
            ctr = ctr * 2 / (n * (n - 1))
        logs = {"self/ctr": ctr.detach()}
        if 0 in ids:  # local top-1 of the positive key among this rank's keys (view 1 against the last view's keys)
            with torch.no_grad():
                q0 = q[ids.index(0)]
                logs["self/acc"] = (q0 @ torch.nn.functional.normalize(k[-1], dim=1).T).argmax(1).eq(
                    torch.arange(len(q0), device=q0.device)).float().mean()
        return SpaceOutput(self.options.weight * ctr, logs)
