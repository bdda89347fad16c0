"""The class space ``full``: Y^full = h(Y^self) (Eq. 8) and the softmax loss on it (Eq. 9, 34).

``h`` is an MLP (default ``Linear -> BN -> ReLU -> Linear``, output = the number of classes of the
data). Its hidden width defaults to the instance embedding width ``self.dim``, as the official
class head ``_build_mlp(2, dim, dim, num_classes)`` (256 without a ``self`` space). Where it attaches is the arrangement of Fig. 4:

* ``C`` (OPERA): on the predictor output q, so h follows g and Y^full = h(Y^self);
* ``B``: on the projector output, beside the predictor;
* ``A``: on the backbone features y, beside the whole instance space;
* ``naive``: no mapping h at all - a linear classifier on the instance representation q itself,
  so both supervisions act on the same representation (Eq. 4) and contradict each other on
  same-class pairs (Eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opera.errors import OperaError
from opera.supervisions.base import SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp
from opera.supervisions.losses import class_cross_entropy

#: representation each arrangement feeds to the class space
ARRANGEMENT_SOURCE = {"A": "backbone", "B": "projector", "C": "predictor", "naive": "predictor"}


@dataclass
class ClassOptions:
    """Options of the class space (paper Fig. 6: layers, Fig. 8: hidden width)."""

    layers: int = 2
    hidden: int | None = None  # None: the instance embedding width self.dim (official), 256 without 'self'
    weight: float = 0.5  # the official loss: 0.5 CE(view1) + 0.5 CE(view2)
    label_smoothing: float = 0.0


@SPACES.register("full")
class ClassSpace(TaskSpace):
    """Fully supervised class space with the ``class_head`` MLP."""

    name = "full"
    level = 2
    Options = ClassOptions

    def __init__(self, source: str, in_dim: int, num_classes: int, options: ClassOptions, naive: bool,
                 instance_dim: int = 256):
        super().__init__()
        self.options = options
        self.source = source
        layers = 1 if naive else options.layers
        self.resolved_hidden = int(options.hidden or instance_dim)
        self.class_head = build_mlp(layers, in_dim, self.resolved_hidden, num_classes, last_bn=False)

    @classmethod
    def build(cls, ctx: BuildContext, options: ClassOptions) -> "ClassSpace":
        if not ctx.num_classes or ctx.num_classes < 2:
            raise OperaError(
                f"the class space 'full' needs the number of classes of the data (got {ctx.num_classes}); "
                "pass num_classes=K or use a labelled dataset"
            )
        source = ARRANGEMENT_SOURCE[ctx.arrangement]
        instance_dim = ctx.dims.get("predictor", 256)  # the instance embedding width (self.dim)
        space = cls(source, ctx.dims[source], ctx.num_classes, options, naive=ctx.arrangement == "naive",
                    instance_dim=instance_dim)
        ctx.dims["class_logits"] = ctx.num_classes
        return space

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: ``weight * CE(h(source_i), y)`` each (Eq. 9)."""
        if stage.labels is None:
            raise OperaError("the class space 'full' needs labels; pass labels=... or drop 'full' from the hierarchy")
        logits = stage.apply(self.class_head, stage.get(self.source, ids))
        for i, lg in zip(ids, logits):
            stage.reps[i]["class_logits"] = lg
        ce = sum(class_cross_entropy(lg, stage.labels, self.options.label_smoothing) for lg in logits)
        n = len(stage.views)
        with torch.no_grad():
            acc = sum(lg.argmax(1).eq(stage.labels).float().mean() for lg in logits) / n
        return SpaceOutput(self.options.weight * ce, {"full/ce": ce.detach() / n, "full/acc": acc})
