"""The class space ``full``: Y^full = h(Y^self) (Eq. 8) and the softmax loss on it (Eq. 9, 34).

``h`` is an MLP (default ``Linear -> BN -> ReLU -> Linear``, output = the number of classes of the
data's label set ``labels``, default ``class``). Its hidden width defaults to the instance
embedding width ``self.dim``, as the official class head ``_build_mlp(2, dim, dim, num_classes)``
(256 without a ``self`` space). Where it attaches is the arrangement of Fig. 4:

* ``C`` (OPERA): on the predictor output q, so h follows g and Y^full = h(Y^self);
* ``B``: on the projector output, beside the predictor;
* ``A``: on the backbone features y, beside the whole instance space;
* ``naive``: no mapping h at all - a linear classifier on the instance representation q itself,
  so both supervisions act on the same representation (Eq. 4) and contradict each other on
  same-class pairs (Eq. 5).

A class space above another class-level space (``coarse`` above ``full``) stacks on the output of
the one below it (Y^coarse = h'(Y^full)), whatever the arrangement.

Images without a label in the set (label ``-1``) are left out of the loss, which is the mean
over the labelled samples of the global batch (``labelled_mean_cross_entropy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opera import distributed
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp
from opera.supervisions.losses import labelled_mean_cross_entropy

#: representation each arrangement feeds to the lowest class-level space
ARRANGEMENT_SOURCE = {"A": "backbone", "B": "self/projector", "C": "self/predictor", "naive": "self/predictor"}


def class_source(ctx: BuildContext) -> str:
    """Where a class-level space attaches: the arrangement's choice for the lowest one (A/B/C of
    Fig. 4, ``backbone`` without an instance space), the space below's output above that."""
    if ctx.placed:
        return ctx.top
    source = ARRANGEMENT_SOURCE[ctx.arrangement]
    return source if source in ctx.reps else "backbone"


def labelled_count(stage: Stage, label_set: str, labels: torch.Tensor) -> torch.Tensor:
    """The number of labelled samples (label >= 0) of ``label_set`` in the global batch, once per step."""
    key = f"labelled_count/{label_set}"
    if key not in stage.extras:
        stage.extras[key] = distributed.all_reduce_sum_no_grad((labels >= 0).sum())
    return stage.extras[key]


@dataclass
class ClassOptions:
    """Options of the class space (paper Fig. 6: layers, Fig. 8: hidden width)."""

    layers: int = option(2, help="layers of the class head MLP (Fig. 6)", min=1)
    hidden: int | None = option(None, help="hidden width (Fig. 8); None: the instance embedding width self.dim "
                                "(official), 256 without 'self'", min=1)
    weight: float = option(0.5, help="loss weight: the official loss is 0.5 CE(view1) + 0.5 CE(view2)", min=0)
    label_smoothing: float = option(0.0, help="label smoothing of the cross-entropy", min=0, max=1, max_exclusive=True)
    labels: str = option("class", help="the data's label set this space is supervised with")


@SPACES.register("full")
class ClassSpace(TaskSpace):
    """Fully supervised class space with the ``class_head`` MLP; publishes ``<name>/logits``."""

    name = "full"
    level = 2
    Options = ClassOptions
    placed_by_arrangement = True

    def __init__(self, source: str, in_dim: int, num_classes: int, options: ClassOptions, naive: bool,
                 instance_dim: int = 256):
        super().__init__()
        self.options = options
        self.source = source
        layers = 1 if naive else options.layers
        self.resolved_hidden = int(options.hidden or instance_dim)
        self.resolved_source = source
        self.resolved_classes = int(num_classes)
        self.class_head = build_mlp(layers, in_dim, self.resolved_hidden, num_classes, last_bn=False)

    @classmethod
    def build(cls, ctx: BuildContext, options: ClassOptions) -> "ClassSpace":
        num_classes = ctx.label_size(cls.name, options.labels)
        source = class_source(ctx)
        instance_dim = ctx.dims.get("self/predictor", 256)  # the instance embedding width (self.dim)
        space = cls(source, ctx.dims[source], num_classes, options,
                    naive=ctx.arrangement == "naive" and not ctx.placed, instance_dim=instance_dim)
        ctx.publish(space.key("logits"), num_classes, source, space.class_head, cls.name)
        return space

    def represent(self, reps: dict[str, torch.Tensor]) -> None:
        reps[self.key("logits")] = self.class_head(reps[self.source])

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: ``weight * CE(h(source_i), y)`` each (Eq. 9), over the labelled samples."""
        y = stage.target(self.name, self.options.labels)
        count = labelled_count(stage, self.options.labels, y)
        logits = stage.apply(self.class_head, stage.get(self.source, ids))
        for i, lg in zip(ids, logits):
            stage.reps[i][self.key("logits")] = lg
        ce = sum(labelled_mean_cross_entropy(lg, y, count, self.options.label_smoothing) for lg in logits)
        n = len(stage.views)
        with torch.no_grad():
            labelled = y >= 0
            local = labelled.sum().clamp_min(1)
            acc = sum((lg.argmax(1).eq(y) & labelled).sum() / local for lg in logits) / n
        logs = {self.key("ce"): ce.detach() / n, self.key("acc"): acc}
        if 0 in ids:
            logs[self.key("labelled")] = count.detach().float()
        return SpaceOutput(self.options.weight * ce, logs)
