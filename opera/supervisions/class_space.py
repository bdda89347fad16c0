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

"The instance space" is whichever level-1 space the hierarchy holds (``self``, ``byol``,
``simclr``, ...; the last one when there are several): B reads what it publishes as
``<name>/projector`` and C (and ``naive``) what it publishes as ``<name>/predictor``, so
``byol,full`` with C puts h on ``byol/predictor``. An instance space without a predictor
(``simclr``) has no C: asked for, C (or ``naive``) is a one-line error naming the arrangements
that work; left to the default, the arrangement is B, the head on the projector output z, which for
such a space is the representation its loss acts on (the role q plays for ``self``).

A class space above another class-level space (``coarse`` above ``full``) stacks on the output of
the one below it (Y^coarse = h'(Y^full)), whatever the arrangement.

Images without a label in the set (label ``-1``) are left out of the loss, which is the mean
over the labelled samples of the global batch (``labelled_mean_cross_entropy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opera import distributed
from opera.errors import OperaError
from opera.fields import option
from opera.supervisions.base import INSTANCE_LEVEL, SPACES, BuildContext, SpaceOutput, Stage, TaskSpace
from opera.supervisions.heads import build_mlp
from opera.supervisions.losses import labelled_mean_cross_entropy

#: the instance space's output each arrangement feeds to the lowest class-level space (None: the backbone's)
ARRANGEMENT_ROLE: dict[str, str | None] = {"A": None, "B": "projector", "C": "predictor", "naive": "predictor"}


def instance_space(ctx: BuildContext) -> str | None:
    """The instance space below (the last level-1 space of the hierarchy built so far), or None."""
    names = [n for n in ctx.spec if n in SPACES and SPACES.get(n).level == INSTANCE_LEVEL
             and any(rep.split("/")[0] == n for rep in ctx.reps)]
    return names[-1] if names else None


def class_source(ctx: BuildContext) -> str:
    """Where a class-level space attaches: the arrangement's choice for the lowest one (A/B/C of
    Fig. 4: the backbone, or the instance space's ``<name>/projector`` or ``<name>/predictor``;
    ``backbone`` without an instance space), the space below's output above that.

    An arrangement whose output the instance space does not publish is a one-line error naming
    the instance space and the arrangements that work; the default C (``ctx.arrangement_default``)
    becomes B, and ``ctx.arrangement`` says so."""
    if ctx.placed:
        return ctx.top
    role = ARRANGEMENT_ROLE[ctx.arrangement]
    instance = instance_space(ctx)
    if role is None or instance is None:
        return "backbone"
    source = f"{instance}/{role}"
    if source in ctx.reps:
        return source
    if ctx.arrangement_default and f"{instance}/projector" in ctx.reps:
        ctx.arrangement = "B"
        return f"{instance}/projector"
    works = ["A"] + [a for a, r in ARRANGEMENT_ROLE.items() if r is not None and f"{instance}/{r}" in ctx.reps]
    raise OperaError(
        f"arrangement {ctx.arrangement!r} attaches the class space to the instance space's {role} output, but "
        f"{instance!r} publishes no {source!r}; use arrangement {' or '.join(works)} with {instance!r}"
    )


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
                                "(official; the instance space's output width), 256 without one", min=1)
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
        instance = instance_space(ctx)  # the instance embedding width (self.dim), 256 without one
        instance_dim = next((ctx.dims[f"{instance}/{r}"] for r in ("predictor", "projector") if f"{instance}/{r}" in ctx.dims), 256)
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
