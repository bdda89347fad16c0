"""The instance space ``byol``: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

The online network is the backbone, a projector g and a predictor q, both
``Linear -> BN -> ReLU -> Linear`` (hidden 4096, output 256: official ``networks.MLP``); the
target network is an EMA copy of the backbone and projector, which the hierarchy owns as its
momentum teacher (``ctx.want_teacher("byol/projector")``), never trained by gradients. For two
views v, v' of an image, with q_theta the online prediction and z'_xi the target projection,
BYOL's Eq. 2 is

    L(v, v') = || q_theta(v)/|q_theta(v)| - z'_xi(v')/|z'_xi(v')| ||^2 = 2 - 2 cos(q_theta(v), z'_xi(v')),

symmetrised (Eq. 3) over the views: ``L = L(v, v') + L(v', v)``, each a mean over the batch
(the official ``byol_experiment.loss_fn``: ``regression_loss(prediction_view1, projection_view2)
+ regression_loss(prediction_view2, projection_view1)``, then ``jnp.mean``). The space's loss is
``weight * L``. With n > 2 views, view i is paired with every other view and the sum is scaled
by 2 / (n (n - 1)), as ``self`` does.

BYOL has no negatives: each term involves one image's own views only, so nothing is gathered
across ranks; each rank's mean over its local batch, averaged by DDP's gradient all-reduce, is
the mean over the global batch (equal local batches, which the loader guarantees).

Defaults of the official repository (deepmind-research/byol, ``configs/byol.py``): projector
hidden 4096, output 256, predictor hidden 4096; BN decay 0.9 (PyTorch momentum 0.1), eps 1e-5;
LARS (eta 1e-3, momentum 0.9, biases and norms excluded), lr = base * batch / 256 with 10 warm-up
epochs then cosine; presets by epochs {40: 0.45, 100: 0.45, 300: 0.3, 1000: 0.2} for the base lr,
{40: 1e-6, 100: 1e-6, 300: 1e-6, 1000: 1.5e-6} for the weight decay and {40: 0.97, 100: 0.99,
300: 0.99, 1000: 0.996} for the target EMA tau_base (the paper's headline run: 1000 epochs,
batch 4096, lr 0.2, wd 1.5e-6, tau_base 0.996). Its schedule ``tau = 1 - (1 - tau_base)
(cos(pi k / K) + 1) / 2`` (``schedules.target_ema``) is opera's ``optim.ema_momentum`` with
``optim.ema_cosine=true`` (the hierarchy's teacher; the same MoCo-v3 ``--moco-m-cos`` rule), so
BYOL's tau_base is set there: ``--set optim.ema_momentum=0.996`` (the CPU recipe keeps its 0.99;
``docs/recipes/byol_r50_1000ep_b4096.yaml`` sets BYOL's values).

Differences from the official code, none in the loss: the teacher starts as a copy of the online
weights (the official target is initialised with another seed; the paper reports no difference),
and the EMA update comes before the optimizer step (MoCo-v3's order, as for ``self``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp


@dataclass
class BYOLOptions:
    """Options of the ``byol`` space (official ``network_config``)."""

    dim: int = option(256, help="projector and predictor output width (BYOL's projector_output_size 256)", min=1)
    mlp_dim: int = option(4096, help="hidden width of projector and predictor (BYOL's 4096)", min=1)
    weight: float = option(1.0, help="loss weight: the official loss is L(v,v') + L(v',v) (Eq. 3)", min=0)


def byol_regression(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| q/|q| - z/|z| ||^2 = 2 - 2 cos(q, z)`` (Eq. 2) against a detached target ``z``."""
    return 2.0 - 2.0 * (F.normalize(q, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)


@SPACES.register("byol")
class BYOLSpace(TaskSpace):
    """BYOL instance space. Publishes ``byol/projector`` and ``byol/predictor``."""

    name = "byol"
    level = 1
    Options = BYOLOptions

    def __init__(self, in_dim: int, options: BYOLOptions):
        super().__init__()
        self.options = options
        self.projector = build_mlp(2, in_dim, options.mlp_dim, options.dim, last_bn=False)
        self.predictor = build_mlp(2, options.dim, options.mlp_dim, options.dim, last_bn=False)

    @classmethod
    def build(cls, ctx: BuildContext, options: BYOLOptions) -> "BYOLSpace":
        space = cls(ctx.dims["backbone"], options)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        ctx.publish(space.key("predictor"), options.dim, space.key("projector"), space.predictor, cls.name)
        ctx.want_teacher(space.key("projector"))  # BYOL's target network: EMA backbone + projector
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = z = self.projector(reps["backbone"])
        reps[self.key("predictor")] = self.predictor(z)

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: view i contributes mean_b L(v_i, v_{1-i}), so both views give
        Eq. 3's ``L(v, v') + L(v', v)``."""
        n = len(stage.views)
        _, q = self.online_heads(stage, ids, self.projector, self.predictor)
        target = stage.teacher_rep(self.key("projector"))  # z'_xi of every view, once per step
        loss = sum(byol_regression(qi, target[j]).mean() for i, qi in zip(ids, q) for j in range(n) if j != i)
        if n > 2:
            loss = loss * 2 / (n * (n - 1))
        return SpaceOutput(self.options.weight * loss, {self.key("loss"): loss.detach()})
