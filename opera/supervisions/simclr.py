"""The instance space ``simclr``: SimCLR's NT-Xent over the gathered global batch, no teacher.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020),
Eq. 1. z = g(h) is the projector output of a view (g: this space's MLP on the backbone output h),
sim(u, v) = u.v / (|u| |v|). Over the 2N views of the *global* batch (N images from every rank,
two views each), the anchor i with positive j (the other view of its image) has

    l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)

and the loss is the mean of l over all 2N anchors (the paper's L = 1/2N sum_k [l(2k-1, 2k) +
l(2k, 2k-1)]), times ``weight``. There is no momentum teacher and no stop-gradient: every z of
the denominator carries gradient, so the negatives from other ranks are gathered *with* gradient
(SimCLR's ``tpu_cross_replica_concat``, solo-learn's ``GatherLayer``): each rank computes the mean
over its own anchors against every rank's z, the gradient of the gathered z flows back to the
rank that made it, and DistributedDataParallel's average over ranks is the gradient of the mean
over the global batch. With more than two views each anchor has every other view of its image as
a positive and the term is the mean over them of -log(...) (Khosla et al. 2020's L^sup_out with
the image as the label, which is SimCLR's l for two views).

Defaults (the official repository, github.com/google-research/simclr):

* projector ``layers=3``, hidden width = the backbone width (2048 for ResNet-50), output
  ``dim=128``: SimCLR v2's ``--num_proj_layers=3 --proj_out_dim=128`` with
  ``mid_dim = hiddens.shape[-1]`` (``model_util.projection_head``). SimCLR v1 is ``layers=2``
  (``--num_nlh_layers=1``: one hidden layer). Every layer is a bias-free linear map followed by
  BatchNorm (the hidden ones with ReLU), and the last BatchNorm has a scale but no shift
  (``linear_layer(..., use_bias=False, use_bn=True)`` -> ``batch_norm_relu(center=False)``).
* ``temperature=0.1``: the repository's ``--temperature`` default and its README's ImageNet
  command (batch 4096, LARS, "the default hyperparameters in our paper"); the README's CIFAR-10
  command uses ``temperature=0.5`` (``--set simclr.temperature=0.5``).
* ``docs/recipes/simclr_r50_100ep_b4096.yaml`` is that ImageNet command, each value cited.
* SimCLR runs the 2N views as one batch through the network with BatchNorm statistics over all
  replicas (``--global_bn=True``): ``train.concat_views=true`` with ``train.sync_bn`` (the
  default) reproduces that; opera's default runs each view alone, as MoCo-v3 does.

The per-view step (``train.per_view``, the default). NT-Xent is *not* a sum of per-view terms
against detached targets: view 1's z is in the denominators of view 0's anchors and carries
gradient there. The space still gives the joint gradients exactly when the step runs its online
views one at a time: a call over views ``ids`` returns

    L(z_ids, sg(z_rest)) - sg(L) + sg(share of the anchors in ids)

whose gradient with respect to z_ids is the joint loss's (the other views enter at their values)
and whose values over a partition add up to L. The other views' z come from the earlier calls of
the step (detached) or, for views not run yet, from a forward without gradient through the same
encoder (the spaces below included, e.g. ``mask``), with the random state forked so that the
later online forward of that view draws the same masks and drop-path (nothing else draws between
the two), and with BatchNorm normalising by the batch's statistics without updating its running
ones, so they are updated once per view as in the joint step. The price is one extra forward without gradient of the views not yet run;
``train.per_view=false`` (or ``train.concat_views=true``) runs the step jointly without it.

Published: ``simclr/projector`` (the z the loss compares). SimCLR has no predictor, so nothing
with a predictor's role is published: a class space stacked on ``simclr`` reads what is (the
projector output; arrangement B or A, there is no C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, Encoder, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp


@dataclass
class SimCLROptions:
    """Options of ``simclr`` (the official ``--proj_out_dim``, ``--num_proj_layers``, ``--temperature``)."""

    dim: int = option(128, help="projector output width (SimCLR's proj_out_dim 128)", min=1)
    mlp_dim: int | None = option(None, help="projector hidden width; None: the backbone width (SimCLR's mid_dim)", min=1)
    layers: int = option(3, help="projector layers: 3 as SimCLR v2, 2 as SimCLR v1", min=1)
    temperature: float = option(0.1, help="tau: 0.1 the official ImageNet default, 0.5 the v1 CIFAR-10 setting",
                                min=0, min_exclusive=True)
    weight: float = option(1.0, help="loss weight", min=0)
    gather_distributed: bool = option(True, help="negatives from every rank, gathered with gradient (SimCLR's global batch)")


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``x`` concatenated along dim 0; the gradient of the local rows is the sum over
    ranks of the gradients of their copies (``tpu_cross_replica_concat``, solo-learn's GatherLayer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank, concatenated in rank order, differentiable (identity alone)."""
    if not distributed.is_initialized() or distributed.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def nt_xent_terms(z: list[torch.Tensor], candidates: list[torch.Tensor], offset: int, temperature: float) -> torch.Tensor:
    """l of every local anchor, shape (views, local batch).

    ``z[v]``: this rank's L2-normalised z of view v (the anchors); ``candidates[v]``: every rank's
    z of view v (the gathered batch, M rows, this rank's at ``offset``). Anchor (v, i) is compared
    with all V*M candidates but itself; its positives are the other views of image offset + i.
    """
    views, m = len(candidates), candidates[0].shape[0]
    everything = torch.cat(candidates, dim=0)  # (V*M, d): view-major, as SimCLR's concat of the two views
    rows = []
    for v, q in enumerate(z):
        n = q.shape[0]
        logits = (q @ everything.T).to(torch.promote_types(q.dtype, torch.float32)) / temperature  # fp32 at least under autocast
        own = torch.arange(n, device=q.device) + offset
        logits = logits.index_put((torch.arange(n, device=q.device), own + v * m),
                                  torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))  # k != i
        log_den = torch.logsumexp(logits, dim=1)
        pos = torch.stack([logits.gather(1, (own + u * m)[:, None])[:, 0] for u in range(views) if u != v], dim=1)
        rows.append(log_den - pos.mean(dim=1))
    return torch.stack(rows)


class _ScaleOnlyBatchNorm(nn.Module):
    """SimCLR's last BatchNorm of the projector: normalised, scaled per unit, no shift (``center=False``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.weight


@SPACES.register("simclr")
class SimCLRSpace(TaskSpace):
    """NT-Xent instance space; publishes ``simclr/projector``."""

    name = "simclr"
    level = 1
    Options = SimCLROptions

    def __init__(self, in_dim: int, options: SimCLROptions):
        super().__init__()
        self.options = options
        self.resolved_mlp_dim = int(options.mlp_dim or in_dim)
        self.projector = nn.Sequential(*build_mlp(options.layers, in_dim, self.resolved_mlp_dim, options.dim, last_bn=False),
                                       _ScaleOnlyBatchNorm(options.dim))

    @classmethod
    def build(cls, ctx: BuildContext, options: SimCLROptions) -> "SimCLRSpace":
        space = cls(ctx.dims["backbone"], options)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        return space

    def wrap_encoder(self, encode: Encoder, stage: Stage, backbone: nn.Module) -> Encoder:
        """Keep the online encoder of this step (the spaces below included): views a partial call
        has not run yet are encoded with it, without gradient. The encoder itself is unchanged."""
        stage.extras[self.key("encoder")] = (encode, backbone)
        return encode

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = self.projector(reps["backbone"])

    @torch.no_grad()
    def _ahead(self, stage: Stage, view: int) -> torch.Tensor:
        """z of a view the step runs later, as its online forward will make it: the same random
        draws (forked state), BatchNorm on the batch's statistics, its running statistics untouched."""
        cache: dict[int, torch.Tensor] = stage.extras.setdefault(self.key("ahead"), {})
        if view not in cache:
            encode, backbone = stage.extras[self.key("encoder")]
            x = stage.views[view]
            norms = [m for mod in (backbone, self.projector) for m in mod.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
            devices = [x.device] if x.device.type == "cuda" else []
            try:
                for m in norms:  # batch statistics as in training, running statistics untouched
                    m.track_running_stats = False
                with torch.random.fork_rng(devices=devices):
                    h = backbone.forward_head(encode(x, [view]), pre_logits=True)
                    cache[view] = self.projector(h)
            finally:
                for m in norms:
                    m.track_running_stats = True
        return cache[view]

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        n = len(stage.views)
        (projected,) = self.online_heads(stage, ids, self.projector)
        live = dict(zip(ids, projected))
        z = []
        for v in range(n):
            if v in live:
                z.append(live[v])
            elif self.key("projector") in stage.reps[v]:
                z.append(stage.reps[v][self.key("projector")].detach())  # run earlier in this step
            else:
                z.append(self._ahead(stage, v))
        z = [F.normalize(zv, dim=1) for zv in z]
        gather = self.options.gather_distributed and distributed.get_world_size() > 1
        if gather:
            candidates = [gather_with_grad(zv) if v in live else distributed.all_gather_no_grad(zv) for v, zv in enumerate(z)]
            offset = distributed.get_rank() * z[0].shape[0]
        else:
            candidates, offset = z, 0
        terms = nt_xent_terms(z, candidates, offset, self.options.temperature)  # (views, local batch)
        loss = terms.mean()
        share = terms[ids].sum() / terms.numel()
        if len(ids) < n:  # gradient of the joint loss w.r.t. these views' z, value: their anchors' share
            loss = loss - loss.detach() + share.detach()
        logs = {self.key("nt_xent"): share.detach()}
        if 0 in ids:  # local top-1: view 0's nearest other candidate is its positive in view 1
            with torch.no_grad():
                sims = z[0] @ torch.cat(candidates).T
                rows = torch.arange(len(z[0]), device=sims.device)
                sims[rows, rows + offset] = float("-inf")
                m = candidates[0].shape[0]
                logs[self.key("acc")] = sims.argmax(1).eq(rows + offset + m).float().mean()
        return SpaceOutput(self.options.weight * loss, logs)
