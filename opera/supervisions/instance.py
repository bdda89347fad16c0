"""The instance space ``self``: MoCo-v3 on top of the backbone (Appendix B, Eq. 34).

Y^self = g(Y) (Eq. 8) is the online predictor output q = predictor(projector(y)); the keys k come
from the momentum encoder (MoCo-v3's copy of the backbone and projector updated by EMA, never by
gradients), which the hierarchy owns as its teacher: the space asks for the teacher's
``self/projector``. The loss is the symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` times ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp
from opera.supervisions.losses import info_nce


@dataclass
class InstanceOptions:
    """Options of the instance space (MoCo-v3's ``--moco-dim``, ``--moco-mlp-dim``, ``--moco-t``)."""

    dim: int = option(256, help="instance embedding width (paper Fig. 7)", min=1)
    mlp_dim: int = option(4096, help="hidden width of projector and predictor", min=1)
    projector_layers: int | None = option(None, help="None: 2 for CNNs, 3 for ViTs (MoCo-v3)", min=1)
    predictor_layers: int = option(2, help="layers of the predictor MLP", min=1)
    temperature: float | None = option(None, help="tau; None: MoCo-v3's 1.0 for CNNs (ResNet-50), 0.2 for ViTs",
                                       min=0, min_exclusive=True)
    weight: float = option(0.5, help="loss weight: the official loss is 0.5 (ctr(q1,k2) + ctr(q2,k1))", min=0)
    gather_distributed: bool = option(True, help="negatives from every rank, as MoCo-v3")


@SPACES.register("self")
class InstanceSpace(TaskSpace):
    """Contrastive instance space. Publishes ``self/projector`` and ``self/predictor``."""

    name = "self"
    level = 1
    Options = InstanceOptions

    def __init__(self, in_dim: int, options: InstanceOptions, token_backbone: bool):
        super().__init__()
        self.options = options
        proj_layers = options.projector_layers or (3 if token_backbone else 2)
        self.projector = build_mlp(proj_layers, in_dim, options.mlp_dim, options.dim, last_bn=True)
        # MoCo-v3: the ViT predictor ends in a BatchNorm without affine parameters, the ResNet one does not
        self.predictor = build_mlp(options.predictor_layers, options.dim, options.mlp_dim, options.dim, last_bn=token_backbone)
        self.resolved_projector_layers = proj_layers
        self.resolved_temperature = options.temperature if options.temperature is not None else (0.2 if token_backbone else 1.0)

    @classmethod
    def build(cls, ctx: BuildContext, options: InstanceOptions) -> "InstanceSpace":
        space = cls(ctx.dims["backbone"], options, ctx.token_backbone)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        ctx.publish(space.key("predictor"), options.dim, space.key("projector"), space.predictor, cls.name)
        ctx.want_teacher(space.key("projector"))  # MoCo-v3's momentum encoder: backbone + projector
        return space

    def keys(self, stage: Stage) -> list[torch.Tensor]:
        """k_i = momentum projector(momentum encoder(x_i)) of the unmasked views: the teacher's
        ``self/projector``, computed once per step whichever subset of online views asks first."""
        return stage.teacher_rep(self.key("projector"))

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = z = self.projector(reps["backbone"])
        reps[self.key("predictor")] = self.predictor(z)

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: for two views view i contributes ctr(q_i, k_{1-i}), so all views
        give ``ctr(q1, k2) + ctr(q2, k1)``; for n > 2 views, sum_{j != i} ctr(q_i, k_j) * 2 / (n (n - 1))."""
        n = len(stage.views)
        _, q = self.online_heads(stage, ids, self.projector, self.predictor)
        k = self.keys(stage)
        t, gather = self.resolved_temperature, self.options.gather_distributed
        ctr = sum(info_nce(qi, k[j], t, gather) for i, qi in zip(ids, q) for j in range(n) if j != i)
        if n > 2:
            ctr = ctr * 2 / (n * (n - 1))
        logs = {self.key("ctr"): ctr.detach()}
        if 0 in ids:  # local top-1 of the positive key among this rank's keys (view 1 against the last view's keys)
            with torch.no_grad():
                q0 = q[ids.index(0)]
                logs[self.key("acc")] = (q0 @ torch.nn.functional.normalize(k[-1], dim=1).T).argmax(1).eq(
                    torch.arange(len(q0), device=q0.device)).float().mean()
        return SpaceOutput(self.options.weight * ctr, logs)
