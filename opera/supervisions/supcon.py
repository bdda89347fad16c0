"""The supervised contrastive space ``supcon``: full supervision as pairwise similarity learning.

The paper's unified view (Eq. 1-3) writes every supervision as similarity learning between pairs
whose positives the supervision defines. ``full`` instantiates the class level with class proxies
(a softmax over the class head's weights, Eq. 9, 34); ``supcon`` instantiates the same level with
*samples*: for an anchor i, the positives are every sample of the batch with the same label
(supervised contrastive learning, Khosla et al. 2020), gathered across ranks:

    J^supcon = weight * sum_views mean_{labelled anchors i} [ -1/|P(i)| sum_{p in P(i)}
               log( exp(q_i . k_p / tau) / sum_{a in A} exp(q_i . k_a / tau) ) ]

q_i = normalize(u(Y_i)) is the online embedding of view i (u: this space's MLP ``embed``, on the
representation the arrangement chooses, like ``full``: C = Y^self); the keys k come from the
hierarchy's momentum teacher (its EMA copies of the backbone, of the modules up to that
representation and of ``embed``) for the *other* views of every image of the global batch, as
MoCo-v3's keys do, so every term involves one view's online output and detached targets (the
per-view step stays exact). A = all those keys, P(i) = the keys whose image has i's label (its
own image's other view included). Anchors without a label (-1) are left out; unlabelled keys
stay as negatives only. The mean is over the labelled anchors of the global batch, as ``full``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.class_space import class_source, labelled_count
from opera.supervisions.heads import build_mlp


@dataclass
class SupConOptions:
    layers: int = option(2, help="MLP embed: Linear -> BN -> ReLU -> Linear (1: a linear map)", min=1)
    hidden: int | None = option(None, help="None: the width of the representation it reads", min=1)
    dim: int = option(128, help="the embedding width (SupCon's 128)", min=1)
    temperature: float = option(0.1, help="SupCon's tau", min=0, min_exclusive=True)
    weight: float = option(0.5, help="loss weight, as full's 0.5 per view", min=0)
    labels: str = option("class", help="the data's label set this space is supervised with")
    gather_distributed: bool = option(True, help="keys and their labels from every rank")


def supcon_terms(q: torch.Tensor, keys: torch.Tensor, anchor_labels: torch.Tensor, key_labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Per-anchor supervised contrastive losses (0 for an anchor without a label or positives)."""
    logits = F.normalize(q, dim=1) @ F.normalize(keys.detach(), dim=1).T / temperature
    log_prob = logits.log_softmax(dim=1)
    positive = (key_labels[None, :] == anchor_labels[:, None]) & (anchor_labels[:, None] >= 0)
    n_pos = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / n_pos.clamp_min(1)
    return per_anchor * (n_pos > 0)


@SPACES.register("supcon")
class SupConSpace(TaskSpace):
    """Supervised contrastive class space; publishes ``supcon/embedding``."""

    name = "supcon"
    level = 2
    Options = SupConOptions
    placed_by_arrangement = True

    def __init__(self, source: str, in_dim: int, options: SupConOptions, naive: bool):
        super().__init__()
        self.options = options
        self.source = source
        self.resolved_source = source
        self.resolved_hidden = int(options.hidden or in_dim)
        self.embed = build_mlp(1 if naive else options.layers, in_dim, self.resolved_hidden, options.dim, last_bn=False)

    @classmethod
    def build(cls, ctx: BuildContext, options: SupConOptions) -> "SupConSpace":
        ctx.label_size(cls.name, options.labels)
        source = class_source(ctx)
        space = cls(source, ctx.dims[source], options, naive=ctx.arrangement == "naive" and not ctx.placed)
        ctx.publish(space.key("embedding"), options.dim, source, space.embed, cls.name)
        ctx.want_teacher(space.key("embedding"))
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("embedding")] = self.embed(reps[self.source])

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        y = stage.target(self.name, self.options.labels)
        count = labelled_count(stage, self.options.labels, y)
        keys = stage.teacher_rep(self.key("embedding"))
        gather = self.options.gather_distributed
        all_keys = [distributed.all_gather_no_grad(k) if gather else k for k in keys]
        key_labels = distributed.all_gather_no_grad(y) if gather else y
        q = stage.apply(self.embed, stage.get(self.source, ids))
        n = len(stage.views)
        world = distributed.get_world_size() if gather else 1
        total = 0.0
        for i, qi in zip(ids, q):
            stage.reps[i][self.key("embedding")] = qi
            others = [j for j in range(n) if j != i] or [i]
            k = torch.cat([all_keys[j] for j in others])
            labels_k = key_labels.repeat(len(others))
            terms = supcon_terms(qi, k, y, labels_k, self.options.temperature)
            total = total + terms.sum() * world / count.clamp_min(1).to(terms.dtype)
        logs = {self.key("loss"): total.detach() / n}
        if 0 in ids:
            logs[self.key("labelled")] = count.detach().float()
        return SpaceOutput(self.options.weight * total, logs)
