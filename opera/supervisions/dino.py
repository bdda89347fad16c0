"""The instance space ``dino``: self-distillation with no labels (Caron et al., ICCV 2021).

A student network (the backbone and this space's head) is trained to match a momentum teacher
(an EMA copy of the backbone and of the whole head, owned by the hierarchy:
``ctx.want_teacher("dino/prototypes")``). With g the network (backbone then head), the student's
output of a view x is turned into a distribution over K dimensions by a softmax with temperature
tau_s (paper Eq. 1)

    P_s(x)^(i) = exp(g_s(x)^(i) / tau_s) / sum_k exp(g_s(x)^(k) / tau_s),

and the teacher's likewise with tau_t, after centering (Sec. 3.1, "Avoiding collapse"):
P_t(x) = softmax((g_t(x) - c) / tau_t). The loss (Eq. 3) is

    min  sum_{x in {x1^g, x2^g}}  sum_{x' in V, x' != x}  H(P_t(x), P_s(x')),   H(a, b) = -a log b,

over the global views x (the teacher sees them alone) and every view x' of the student, global
and local (multi-crop). The official ``DINOLoss.forward`` (main_dino.py) takes the mean of H over
the batch for each pair (teacher global view iq, student view v != iq) and divides the sum by
the number of pairs; that is this space's loss, times ``weight``. The center follows Eq. 4,

    c <- m c + (1 - m) (1/B) sum_i g_t(x_i),

after the loss, with the teacher outputs of every global view (``update_center``: summed,
all-reduced over ranks, divided by rows x world size). The loss itself is not gathered: each
rank's mean over its batch, averaged by DDP's gradient all-reduce, is the mean over the global
batch; only the center is all-reduced.

The head is the official ``DINOHead`` (vision_transformer.py): an MLP of ``layers`` linear maps
(``in -> hidden_dim -> ... -> bottleneck_dim``, GELU between them, BatchNorm before each GELU only
with ``use_bn``; weights trunc_normal(std .02), biases 0), the output L2-normalised, then a
weight-normalised ``Linear(bottleneck_dim, dim, bias=False)`` (the *prototypes*, official
``last_layer``) whose norm g is filled with 1 and frozen when ``norm_last_layer`` (its direction v
keeps PyTorch's default Linear initialisation, as the official layer is built after the MLP's
initialisation).

Defaults (facebookresearch/dino, main_dino.py's arguments, DINOHead and DINOLoss):

* ``dim`` 65536 (``--out_dim``: K, the head's output width), ``hidden_dim`` 2048,
  ``bottleneck_dim`` 256, ``layers`` 3 (``nlayers``), ``use_bn`` False (``--use_bn_in_head``;
  the README's ResNet-50 command does not set it), ``norm_last_layer`` True (the README's
  "boosting" ViT-S/16 run sets it false);
* ``student_temp`` 0.1 and ``center_momentum`` 0.9 (``DINOLoss``'s defaults, which main_dino.py
  does not override);
* the teacher temperature: ``warmup_teacher_temp`` 0.04, ``teacher_temp`` 0.04,
  ``warmup_teacher_temp_epochs`` 0: ``np.linspace(warmup, final, W)`` over the first W epochs,
  then constant, indexed by the integer epoch (the "boosting" run: 0.07 after 30 epochs);
* ``freeze_last_layer`` 1: during the first epoch the prototypes' gradients are dropped before
  the optimizer step (``cancel_gradients_last_layer``: ``p.grad = None``, so AdamW skips them,
  weight decay included): :meth:`DINOSpace.after_backward`;
* ``--momentum_teacher`` 0.996, raised to 1 along a cosine: opera's ``optim.ema_momentum`` with
  ``optim.ema_cosine=true`` (the hierarchy's teacher), set by the recipe
  ``docs/recipes/dino_vits16_100ep_b512.yaml``, which maps the rest of the official command.

The hidden and bottleneck widths keep their official names and ``dim`` is K, the width to shrink
for a small head: with DINO's std-.02 initialisation a narrow hidden layer leaves the bottleneck z
tiny, and the L2 normalisation scales z's gradient by 1/|z|, so such a head collapses at once.

Per view and per step. The teacher's targets ``P_t`` of every global view are made once per step,
with the center as it was before the step, and the center is then updated once (``stage.extras``
holds the targets for the later calls of the same step), so a step that runs its views one at a
time makes the same loss, gradients and center as one call over all views: view v's share is
``sum_{iq != v} H(P_t(x_iq), P_s(x_v)) / (number of pairs)``. The center is a buffer (saved in
checkpoints), updated in training mode only (a loss computed in eval mode leaves it alone). The teacher temperature and the frozen-prototypes
epoch follow ``on_step``'s integer epoch, as the official code indexes them by ``epoch``.

Multi-crop: the step's views are the global views ``0..G-1`` first, then the local crops
(``Stage.global_views``; ``data.local_crops``, ``data.local_size``, ``data.local_crop_scale``;
a ViT then interpolates its position embedding to each crop's grid, timm's
``dynamic_img_size``, as DINO's ``interpolate_pos_encoding``); the teacher sees the global views
only, and its backbone has no stochastic depth (``want_teacher(..., drop_path=False)``: the
official teacher ViT is built without ``drop_path_rate``). With two views and no local
crops this is DINO's 2-crop version.

Published: ``dino/projector``, the MLP's bottleneck output before the L2 normalisation (the
representation a class space stacked on ``dino`` reads: like ``byol/projector`` and
``simclr/projector``, the projector's output before the normalisation the loss applies; the
normalisation belongs to the prototype scoring), and ``dino/prototypes``, the K scores
``last_layer(z / |z|)`` the softmax reads. DINO has no predictor, so ``dino,full`` defaults to
arrangement B (the class head on ``dino/projector``); C is a one-line error.

Where opera differs from the official code (not in the loss): the teacher starts as a copy of the
student and is updated before the step's forward with this step's momentum (MoCo-v3's order; the
official update follows the optimizer step); the head runs on each view alone (BatchNorm statistics per view with ``use_bn``), where the
official ``MultiCropWrapper`` runs it on all crops concatenated (``train.concat_views=true``
does that); the official weight-decay schedule (0.04 to 0.4, cosine), gradient clipping
(``--clip_grad 3.0``), the final learning rate ``--min_lr`` 1e-6 (opera decays to 0) and fp16
autocast with a GradScaler (opera: bf16 by default, ``train.amp=fp16`` for the scaler) are
settings of the training loop that opera's recipe states but cannot all reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, Progress, SpaceOutput, Stage, TaskSpace


@dataclass
class DINOOptions:
    """Options of ``dino`` (the official ``DINOHead`` and ``DINOLoss`` arguments)."""

    dim: int = option(65536, help="K: the head's output width, the number of prototypes (DINO's --out_dim 65536)", min=1)
    hidden_dim: int = option(2048, help="hidden width of the head's MLP (DINOHead hidden_dim 2048)", min=1)
    bottleneck_dim: int = option(256, help="the MLP's output width (dino/projector), L2-normalised before the "
                                 "prototypes (DINOHead bottleneck_dim 256)", min=1)
    layers: int = option(3, help="linear layers of the MLP (DINOHead nlayers 3; 1: one Linear to the bottleneck)", min=1)
    use_bn: bool = option(False, help="BatchNorm after each hidden Linear (--use_bn_in_head, default false)")
    norm_last_layer: bool = option(True, help="freeze the prototypes' weight-norm g at 1 (--norm_last_layer; the "
                                   "README's boosted ViT-S/16 run sets false)")
    student_temp: float = option(0.1, help="tau_s of Eq. 1 (DINOLoss student_temp 0.1)", min=0, min_exclusive=True)
    teacher_temp: float = option(0.04, help="tau_t after the warm-up (--teacher_temp 0.04; boosted run 0.07)",
                                 min=0, min_exclusive=True)
    warmup_teacher_temp: float = option(0.04, help="tau_t at epoch 0 (--warmup_teacher_temp 0.04)", min=0, min_exclusive=True)
    warmup_teacher_temp_epochs: int = option(0, help="epochs of the linear tau_t warm-up (--warmup_teacher_temp_epochs "
                                             "0; boosted run 30)", min=0)
    center_momentum: float = option(0.9, help="m of the center's EMA, Eq. 4 (DINOLoss center_momentum 0.9)", min=0, max=1)
    freeze_last_layer: int = option(1, help="epochs during which the prototypes get no update (--freeze_last_layer 1)", min=0)
    weight: float = option(1.0, help="loss weight (the official loss has weight 1)", min=0)


def teacher_temperature(epoch: int, options: DINOOptions) -> float:
    """tau_t at integer ``epoch``: the official ``teacher_temp_schedule[epoch]``, i.e.
    ``np.linspace(warmup_teacher_temp, teacher_temp, W)`` over the first W epochs, then ``teacher_temp``."""
    w = options.warmup_teacher_temp_epochs
    if epoch < w:
        return float(np.linspace(options.warmup_teacher_temp, options.teacher_temp, w)[epoch])
    return float(options.teacher_temp)


def dino_mlp(in_dim: int, hidden: int, bottleneck: int, layers: int, use_bn: bool) -> nn.Sequential:
    """DINOHead's ``mlp``: Linear(+BN)+GELU per hidden layer, a last Linear to the bottleneck;
    every Linear trunc_normal(std .02) with zero bias (``_init_weights``)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
    modules: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(d_in, d_out)
        nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
        modules.append(linear)
        if i < layers - 1:
            modules += [nn.BatchNorm1d(d_out), nn.GELU()] if use_bn else [nn.GELU()]
    return nn.Sequential(*modules)


class Prototypes(nn.Module):
    """The end of DINOHead: ``last_layer(z / |z|)``, ``last_layer`` a weight-normalised
    ``Linear(bottleneck, K, bias=False)`` whose g starts at 1 (frozen with ``norm_last_layer``)."""

    def __init__(self, bottleneck: int, k: int, norm_last_layer: bool):
        super().__init__()
        self.last_layer = weight_norm(nn.Linear(bottleneck, k, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(z, dim=-1, p=2))


def dino_cross_entropy(p_teacher: torch.Tensor, student: torch.Tensor, student_temp: float) -> torch.Tensor:
    """mean_b H(P_t, P_s) = mean_b sum_k -P_t^(k) log softmax(g_s / tau_s)^(k) (Eq. 1, 3), against a detached P_t."""
    log_p = F.log_softmax(student.to(torch.promote_types(student.dtype, torch.float32)) / student_temp, dim=-1)
    return torch.sum(-p_teacher.detach() * log_p, dim=-1).mean()


@SPACES.register("dino")
class DINOSpace(TaskSpace):
    """DINO instance space; publishes ``dino/projector`` and ``dino/prototypes``; reads local crops."""

    name = "dino"
    level = 1
    Options = DINOOptions
    multi_crop = True

    def __init__(self, in_dim: int, options: DINOOptions):
        super().__init__()
        self.options = options
        self.projector = dino_mlp(in_dim, options.hidden_dim, options.bottleneck_dim, options.layers, options.use_bn)
        self.prototypes = Prototypes(options.bottleneck_dim, options.dim, options.norm_last_layer)
        self.register_buffer("center", torch.zeros(1, options.dim))
        self.epoch = 0
        self.teacher_temp = teacher_temperature(0, options)

    @classmethod
    def build(cls, ctx: BuildContext, options: DINOOptions) -> "DINOSpace":
        space = cls(ctx.dims["backbone"], options)
        ctx.publish(space.key("projector"), options.bottleneck_dim, "backbone", space.projector, cls.name)
        ctx.publish(space.key("prototypes"), options.dim, space.key("projector"), space.prototypes, cls.name)
        # the teacher: EMA backbone + the whole head, without stochastic depth (main_dino.py builds
        # the teacher ViT without drop_path_rate)
        ctx.want_teacher(space.key("prototypes"), drop_path=False)
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("projector")] = z = self.projector(reps["backbone"])
        reps[self.key("prototypes")] = self.prototypes(z)

    def on_step(self, progress: Progress) -> None:
        """The integer epoch indexes the teacher temperature and the frozen-prototypes epochs."""
        self.epoch = int(progress.epoch)
        self.teacher_temp = teacher_temperature(self.epoch, self.options)

    def after_backward(self) -> None:
        """``cancel_gradients_last_layer``: no update of the prototypes while epoch < freeze_last_layer."""
        if self.epoch < self.options.freeze_last_layer:
            for p in self.prototypes.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def teacher_targets(self, stage: Stage) -> list[torch.Tensor]:
        """P_t of every global view, softmax((g_t - c) / tau_t), once per step; then the center's
        update (Eq. 4) with those teacher outputs, all-reduced over ranks."""
        key = self.key("teacher_targets")
        if key not in stage.extras:
            outputs = stage.teacher_rep(self.key("prototypes"))
            outputs = [t.to(torch.promote_types(t.dtype, self.center.dtype)) for t in outputs]
            stage.extras[key] = [F.softmax((t - self.center) / self.teacher_temp, dim=-1) for t in outputs]
            if self.training:
                rows = torch.cat(outputs)
                batch_center = distributed.all_reduce_sum(rows.sum(dim=0, keepdim=True))
                batch_center = batch_center / (len(rows) * distributed.get_world_size())
                m = self.options.center_momentum
                self.center.mul_(m).add_(batch_center.to(self.center.dtype) * (1 - m))
        return stage.extras[key]

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Views ``ids``' share of Eq. 3: sum over (global iq, v in ids, v != iq) of
        mean_b H(P_t(x_iq), P_s(x_v)), divided by the number of such pairs over all views."""
        g, n = stage.n_global, len(stage.views)
        (z,) = self.online_heads(stage, ids, self.projector)
        scores = stage.apply(self.prototypes, z)
        for i, s in zip(ids, scores):
            stage.reps[i][self.key("prototypes")] = s
        targets = self.teacher_targets(stage)
        pairs = g * (n - 1)
        loss = sum(dino_cross_entropy(targets[iq], s, self.options.student_temp)
                   for v, s in zip(ids, scores) for iq in range(g) if iq != v) / pairs
        logs = {self.key("loss"): loss.detach()}
        if 0 in ids:
            logs[self.key("teacher_temp")] = torch.tensor(self.teacher_temp, dtype=loss.dtype, device=loss.device)
        return SpaceOutput(self.options.weight * loss, logs)
