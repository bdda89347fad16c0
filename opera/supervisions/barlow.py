"""The instance space ``barlow``: Barlow Twins' redundancy reduction (Zbontar et al., ICML 2021).

z^A and z^B are the projector outputs of the two views of a batch of N images. Each is batch
normalised per unit (a BatchNorm without affine parameters, over that view alone), and the
cross-correlation matrix of Eq. 2 is taken over the batch:

    C_ij = sum_b z^A_bi z^B_bj / ( sqrt(sum_b (z^A_bi)^2) sqrt(sum_b (z^B_bj)^2) )
         = (1/N) sum_b BN(z^A)_bi BN(z^B)_bj                      (z mean-centred over the batch)

(the second line is the official ``c = bn(z1).T @ bn(z2) / batch_size``; the two agree up to
BatchNorm's eps 1e-5 under the square roots). The loss is Eq. 1,

    L_BT = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,

times ``weight``. C needs the whole batch of both views at once, so the space is ``joint_only``:
the step runs its views together, never one at a time. With more than two views the loss is the
mean of L_BT over the pairs of views (two views: L_BT itself).

Defaults of the official code (facebookresearch/barlowtwins, ``main.py``), whose README gives
``python main.py /path/to/imagenet/`` (every flag at its default) for the released model:

* projector ``--projector 8192-8192-8192``: ``layers=3``, ``mlp_dim=8192``, ``dim=8192``; bias-free
  linear maps, the hidden ones followed by BatchNorm and ReLU, the last one by nothing;
* ``self.bn = nn.BatchNorm1d(8192, affine=False)``, applied to z1 and z2 separately;
* ``--lambd 0.0051``; the loss ``on_diag + lambd * off_diag`` is not scaled (``weight=1``; the
  code once multiplied it by ``--scale-loss``, 1/32 by default, facebookresearch/vissl#230:
  ``weight=0.03125`` reproduces that);
* the whole model goes through ``nn.SyncBatchNorm.convert_sync_batchnorm``: opera's
  ``train.sync_bn`` (the default) does the same, so under DDP every BatchNorm, this space's
  included, normalises over the global batch of its view.

The global batch under DDP (``gather_distributed``, the default). The official code divides each
rank's ``bn(z1).T @ bn(z2)`` by the *global* batch size and sums the ranks' matrices with
``torch.distributed.all_reduce(c)``: the loss is that of C over the global batch, the same on
every rank. ``torch.distributed.all_reduce`` is not differentiable: the backward of each rank goes
through its own share of C only, and DistributedDataParallel averages the ranks' gradients, so the
official gradient is the gradient of the global loss divided by the number of processes
(facebookresearch/barlowtwins#8, lightly-ai/lightly#1977). opera reproduces exactly that
(``C = C_rank + sg(sum_ranks C_rank - C_rank)``); ``tests/supervisions/test_barlow.py`` checks it on
2 gloo processes. A consequence to know when changing the number of GPUs: LARS's trust ratio
cancels the scale for the weights except against the weight decay, but the biases and norms,
which LARS neither adapts nor decays, move by 1/world_size of the global loss's gradient.

Where opera differs from the official code:

* C and the loss are computed in float32 at least, outside autocast (the official code runs them
  under fp16 autocast);
* one learning rate for every parameter group: the official LARS gives the weights
  ``--learning-rate-weights 0.2`` and the biases and BatchNorm parameters ``--learning-rate-biases
  0.0048`` (both times batch / 256); opera's LARS uses ``optim.base_lr`` for both (it exempts the
  1-D parameters from decay and trust ratio, as the official LARS does);
* the cosine schedule decays to 0, the official one to 0.001 of its peak;
* the augmentation is MoCo-v3's pair, which is Barlow Twins' (blur 1.0/0.1, solarize 0/0.2,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2), with a bilinear crop where Barlow Twins'
  is bicubic.

``docs/recipes/barlow_r50_1000ep_b2048.yaml`` is the official ImageNet run, each value cited.

Published: ``barlow/projector`` (the z whose cross-correlation the loss shapes). Barlow Twins has
no predictor and no momentum teacher: a class space stacked on ``barlow`` reads the projector
output (arrangement B, or A).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp


@dataclass
class BarlowOptions:
    """Options of ``barlow`` (the official ``--projector``, ``--lambd``)."""

    dim: int = option(8192, help="projector output width, the size of C (the official projector 8192-8192-8192)", min=1)
    mlp_dim: int = option(8192, help="projector hidden width (8192)", min=1)
    layers: int = option(3, help="projector linear layers (3: two hidden layers, then the output layer)", min=1)
    lambd: float = option(0.0051, help="lambda of Eq. 1, the weight of the off-diagonal terms (--lambd 0.0051)", min=0)
    weight: float = option(1.0, help="loss weight (the official loss is unscaled)", min=0)
    gather_distributed: bool = option(True, help="C over the global batch: every rank's share summed, as the official "
                                                 "all_reduce (its gradient: this rank's share only)")


def cross_correlation(na: torch.Tensor, nb: torch.Tensor, gather: bool) -> torch.Tensor:
    """C of Eq. 2 from the batch-normalised views: ``na.T @ nb / N`` (N: the global batch).

    With ``gather`` under several processes, the value is the sum of every rank's share and the
    gradient flows through this rank's share alone (the official non-differentiable all_reduce)."""
    world = distributed.get_world_size() if gather else 1
    c = na.T @ nb / (na.shape[0] * world)
    if world > 1:
        c = c + (distributed.all_reduce_sum(c) - c).detach()
    return c


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The d(d-1) entries C_ij, i != j, of a square matrix, without a copy: after C_00, the
    flattened matrix is d-1 runs of d+1 entries, each d off-diagonal entries then C_kk."""
    d = c.shape[0]
    return c.flatten()[1:].view(d - 1, d + 1)[:, :-1]


def barlow_twins_terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1's two sums: the invariance term sum_i (1 - C_ii)^2 and the redundancy reduction
    term sum_{i != j} C_ij^2 (not yet weighted by lambda)."""
    return (1 - torch.diagonal(c)).pow(2).sum(), off_diagonal(c).pow(2).sum()


@SPACES.register("barlow")
class BarlowTwinsSpace(TaskSpace):
    """Barlow Twins instance space; publishes ``barlow/projector``."""

    name = "barlow"
    level = 1
    Options = BarlowOptions
    joint_only = True  # C needs the whole batch of both views

    def __init__(self, in_dim: int, options: BarlowOptions):
        super().__init__()
        self.options = options
        self.projector = build_mlp(options.layers, in_dim, options.mlp_dim, options.dim, last_bn=False)
        self.norm = nn.BatchNorm1d(options.dim, affine=False)  # the official self.bn, per view

    @classmethod
    def build(cls, ctx: BuildContext, options: BarlowOptions) -> "BarlowTwinsSpace":
        space = cls(ctx.dims["backbone"], options)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = self.projector(reps["backbone"])

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Eq. 1 over every view (``ids`` is all of them: the space is ``joint_only``); with more
        than two views, the mean over the pairs of views."""
        (z,) = self.online_heads(stage, ids, self.projector)
        dtype = torch.promote_types(z[0].dtype, torch.float32)
        pairs = [(a, b) for a in range(len(z)) for b in range(a + 1, len(z))]
        with torch.autocast(z[0].device.type, enabled=False):  # C and the loss in float32 at least
            normed = [self.norm(zv.to(dtype)) for zv in z]  # each view over its own batch
            terms = [barlow_twins_terms(cross_correlation(normed[a], normed[b], self.options.gather_distributed))
                     for a, b in pairs]
        on_diag = torch.stack([on for on, _ in terms]).mean()
        off_diag = torch.stack([off for _, off in terms]).mean()
        loss = on_diag + self.options.lambd * off_diag
        logs = {self.key("loss"): loss.detach(), self.key("on_diag"): on_diag.detach(),
                self.key("off_diag"): off_diag.detach()}
        return SpaceOutput(self.options.weight * loss, logs)
