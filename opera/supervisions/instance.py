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
    temperature: float = 0.2  # tau; MoCo-v3 uses 1.0 for ResNet-50, 0.2 for ViTs
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
        """k_i = momentum_projector(momentum_encoder(x_i)) for the unmasked views.

        The momentum encoder runs the views as one batch where the hierarchy found that exact
        (``stage.extras["fuse_backbone"]``: a backbone without BatchNorm, or ``concat_views``);
        the projector follows ``stage.apply`` (per view unless ``concat_views``).
        """
        views = stage.views
        if stage.extras.get("fuse_backbone") and len(views) > 1:
            feats = list(pooled_features(self.momentum_encoder, torch.cat(views, 0)).chunk(len(views), 0))
        else:
            feats = [pooled_features(self.momentum_encoder, x) for x in views]
        return stage.apply(self.momentum_projector, feats)

    def forward(self, stage: Stage) -> SpaceOutput:
        if len(stage.views) < 2:
            raise OperaError(
                f"the instance space 'self' needs at least two views of each image, got {len(stage.views)}; "
                "pass views=[x1, x2] (two augmentations) or drop 'self' from the hierarchy"
            )
        z = stage.apply(self.projector, stage.get("backbone"))
        q = stage.apply(self.predictor, z)
        for rep, zi, qi in zip(stage.reps, z, q):
            rep["projector"], rep["predictor"] = zi, qi
        k = self.keys(stage)
        t, gather = self.options.temperature, self.options.gather_distributed
        if len(q) == 2:  # symmetric: ctr(q1, k2) + ctr(q2, k1)
            ctr = info_nce(q[0], k[1], t, gather) + info_nce(q[1], k[0], t, gather)
        else:  # every ordered pair of distinct views
            pairs = [(i, j) for i in range(len(q)) for j in range(len(q)) if i != j]
            ctr = sum(info_nce(q[i], k[j], t, gather) for i, j in pairs) * 2 / len(pairs)
        with torch.no_grad():  # local top-1 of the positive key among this rank's keys
            acc = (q[0] @ torch.nn.functional.normalize(k[-1], dim=1).T).argmax(1).eq(torch.arange(len(q[0]), device=q[0].device)).float().mean()
        return SpaceOutput(self.options.weight * ctr, {"self/ctr": ctr.detach(), "self/acc": acc})

