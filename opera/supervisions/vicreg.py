"""The instance space ``vicreg``: Variance-Invariance-Covariance Regularization, no teacher.

Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning" (ICLR 2022). Z = [z_1, ..., z_n] and Z' are the projector ("expander")
outputs of the two views of a batch of n images, each z in R^d, z^j the j-th coordinate over the
batch. The paper's terms:

* Eq. 1, variance: v(Z) = 1/d sum_j max(0, gamma - S(z^j, eps)), S(x, eps) = sqrt(Var(x) + eps);
* Eq. 3-4, covariance: C(Z) = 1/(n-1) sum_i (z_i - zbar)(z_i - zbar)^T,
  c(Z) = 1/d sum_{i != j} [C(Z)]_{i,j}^2;
* Eq. 5, invariance: s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2;
* Eq. 6: l(Z, Z') = lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')].

The space computes what the official code computes (github.com/facebookresearch/vicreg,
``main_vicreg.py``, ``VICReg.forward``), which differs from Eq. 5 and Eq. 6 in two scalings:

* invariance = ``F.mse_loss(z, z')``: the mean over the n x d entries, i.e. s(Z, Z') / d;
* variance = (v(Z) + v(Z')) / 2: each view's mean hinge is halved before they are added;
* covariance = c(Z) + c(Z'), as Eq. 4, with Var and C unbiased (n - 1);

    loss = weight * (sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance)

so the repository's defaults ``sim_coeff=25, std_coeff=25, cov_coeff=1`` (its ``--sim-coeff``,
``--std-coeff``, ``--cov-coeff``: lambda, mu, nu) weigh s, v(Z) + v(Z') and c(Z) + c(Z') of Eq. 6 by
25/d, 12.5 and 1. The hinge target gamma is 1 and eps 1e-4 (``relu(1 - std)``, ``sqrt(var + 0.0001)``).

Across ranks (the official semantics). The invariance term is each rank's *local* mean; the
variance and covariance terms are batch statistics of the *global* batch: every rank gathers Z
and Z' with gradient (the official ``FullGatherLayer``, here :func:`~opera.supervisions.simclr.
gather_with_grad`: the backward sums the gathered gradients over ranks) and computes the same
two terms. DistributedDataParallel's average of the ranks' gradients is then exactly the gradient
of the one-process loss on the concatenated batch (the local invariance means average to the
global one; the gathered terms' gradients are summed over W ranks, then divided by W), and the
mean of the ranks' losses is that loss. ``gather_distributed=false`` computes the statistics per
rank instead (not the official code). C divides by (rows gathered - 1), the official
``args.batch_size - 1``.

The loss needs the whole batch of both views at once (the batch statistics of each view, the
pairs of the invariance term), so the space is ``joint_only``: the training step runs its views
jointly, and a call over one view is a one-line error. With more than two global views (not in
the official code) the loss is the mean of the two-view loss over the pairs of views.

Defaults of the official repository (``main_vicreg.py``'s arguments): ``--mlp 8192-8192-8192``,
the projector ``Linear -> BN -> ReLU`` twice (the linears with a bias), then a ``Linear`` without
bias, so ``layers=3, mlp_dim=8192, dim=8192`` (``Projector``); ``--sim-coeff 25 --std-coeff 25
--cov-coeff 1``; the optimizer LARS (eta 0.001, momentum 0.9, weight decay and the trust ratio
skipped on 1-D parameters, ``exclude_bias_and_norm``: opera's LARS), ``--wd 1e-6``, lr = base-lr
x batch / 256 with 10 warm-up epochs then cosine; the README's ImageNet run is ``--epochs 1000
--batch-size 2048 --base-lr 0.2`` (``docs/recipes/vicreg_r50_1000ep_b2048.yaml``, each value
cited). Each view goes through the network alone (opera's default, BatchNorm per view), with
SyncBatchNorm under DDP (``train.sync_bn``).

Where opera differs from the official code, none of it in the loss's formula: the loss is
computed in float32 at least with autocast off (under the official fp16 autocast the d x d
covariance product ``x.T @ x`` runs in half precision); the official cosine ends at 0.001 x the peak
lr, opera's at 0; and the augmentation is MoCo-v3's pair (the same as VICReg's
``augmentations.py`` but for bilinear instead of bicubic resizing of the crops).

Published: ``vicreg/projector`` (Z). VICReg has no predictor: a class space stacked on
``vicreg`` reads the projector output (arrangement B, the default here) or the backbone (A).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.simclr import gather_with_grad


@dataclass
class VICRegOptions:
    """Options of ``vicreg`` (the official ``--mlp``, ``--sim-coeff``, ``--std-coeff``, ``--cov-coeff``)."""

    dim: int = option(8192, help="projector output width d (the last of VICReg's --mlp 8192-8192-8192)", min=1)
    mlp_dim: int = option(8192, help="projector hidden width (VICReg's --mlp 8192-8192-8192)", min=1)
    layers: int = option(3, help="projector linear layers (3: the three widths of VICReg's --mlp)", min=1)
    sim_coeff: float = option(25.0, help="lambda: weight of the invariance term mse(z, z') (VICReg's --sim-coeff 25)", min=0)
    std_coeff: float = option(25.0, help="mu: weight of the variance term (v(Z) + v(Z'))/2 (VICReg's --std-coeff 25)", min=0)
    cov_coeff: float = option(1.0, help="nu: weight of the covariance term c(Z) + c(Z') (VICReg's --cov-coeff 1)", min=0)
    gamma: float = option(1.0, help="gamma of Eq. 1: the standard deviation the variance hinge asks for (official 1)",
                          min=0, min_exclusive=True)
    eps: float = option(1e-4, help="eps of Eq. 1: S = sqrt(Var + eps) (official 0.0001)", min=0, min_exclusive=True)
    weight: float = option(1.0, help="loss weight", min=0)
    gather_distributed: bool = option(True, help="variance and covariance over every rank's batch, gathered with "
                                      "gradient (the official code); false: per rank")


def vicreg_projector(layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """VICReg's ``Projector``: ``Linear -> BatchNorm1d -> ReLU`` per hidden layer (the linear with
    a bias), then a ``Linear`` without bias."""
    widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-2], widths[1:-1]):
        modules += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    modules.append(nn.Linear(widths[-2], widths[-1], bias=False))
    return nn.Sequential(*modules)


def invariance_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(z, z')``: the mean of (z - z')^2 over the n x d entries (Eq. 5's s / d)."""
    return F.mse_loss(z1, z2)


def variance_term(z: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """Eq. 1's v(Z): the mean over coordinates of max(0, gamma - sqrt(Var(z^j) + eps)), Var unbiased."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4's c(Z): the sum of the squared off-diagonal entries of the unbiased covariance, / d."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0.0)
    return off_diagonal.pow(2).sum() / d


@SPACES.register("vicreg")
class VICRegSpace(TaskSpace):
    """VICReg instance space (joint only); publishes ``vicreg/projector``."""

    name = "vicreg"
    level = 1
    Options = VICRegOptions
    joint_only = True  # variance and covariance are statistics of each view's whole batch

    def __init__(self, in_dim: int, options: VICRegOptions):
        super().__init__()
        self.options = options
        self.projector = vicreg_projector(options.layers, in_dim, options.mlp_dim, options.dim)

    @classmethod
    def build(cls, ctx: BuildContext, options: VICRegOptions) -> "VICRegSpace":
        space = cls(ctx.dims["backbone"], options)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = self.projector(reps["backbone"])

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """The loss of all global views (``joint_only``: ``ids`` is every one of them)."""
        (z,) = self.online_heads(stage, ids, self.projector)
        o = self.options
        with torch.autocast(z[0].device.type, enabled=False):
            z = [zi.float() if zi.dtype in (torch.float16, torch.bfloat16) else zi for zi in z]
            gather = o.gather_distributed and distributed.get_world_size() > 1
            batch = [gather_with_grad(zi) if gather else zi for zi in z]  # the global batch of each view
            variance = [variance_term(zi, o.gamma, o.eps) for zi in batch]
            covariance = [covariance_term(zi) for zi in batch]
            pairs = list(itertools.combinations(range(len(z)), 2))
            inv = sum(invariance_term(z[i], z[j]) for i, j in pairs) / len(pairs)  # local, as the official
            var = sum(variance[i] / 2 + variance[j] / 2 for i, j in pairs) / len(pairs)
            cov = sum(covariance[i] + covariance[j] for i, j in pairs) / len(pairs)
            loss = o.sim_coeff * inv + o.std_coeff * var + o.cov_coeff * cov
        logs = {self.key("invariance"): inv.detach(), self.key("variance"): var.detach(),
                self.key("covariance"): cov.detach()}
        return SpaceOutput(o.weight * loss, logs)
