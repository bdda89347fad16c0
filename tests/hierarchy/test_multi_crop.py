"""Multi-crop steps: global views first, then local crops that only ``multi_crop`` spaces read.

The momentum teacher and every single-crop space (``self``, ``full``, ...) see the global views
alone, as DINO's teacher does; a multi-crop space sees every view. The per-view step over 2
global + 2 local views still gives the joint step's loss and gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from opera.engine.step import train_step
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from opera.supervisions import SPACES
from opera.supervisions.base import SpaceOutput, Stage, TaskSpace


@dataclass
class _ReaderOptions:
    weight: float = 1.0


class _CropReader(TaskSpace):
    """A multi-crop space: the mean squared backbone feature of each view it is given, through a
    learnt scale, plus the teacher's backbone of the global views (so it asks for the teacher)."""

    name = "cropreader"
    level = 9
    Options = _ReaderOptions
    multi_crop = True
    seen: list[list[int]] = []

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    @classmethod
    def build(cls, ctx, options):
        return cls()

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        type(self).seen.append(list(ids))
        target = stage.teacher_rep("backbone")  # global views only
        loss = sum((self.scale * stage.reps[i]["backbone"] - target[i % len(target)]).pow(2).mean() for i in ids)
        return SpaceOutput(loss, {self.key("n"): torch.tensor(float(len(ids)))})


@pytest.fixture
def reader():
    SPACES.register("cropreader")(_CropReader)
    _CropReader.seen = []
    yield _CropReader
    SPACES.unregister("cropreader")


def views_and_targets(n=6):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(n, 3, 16, 16, generator=g) for _ in range(3)]
    return views, {"class": torch.randint(0, 3, (n,), generator=g)}


def build(spec="self,full,cropreader", **kw):
    torch.manual_seed(0)
    return SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=32,
                                          self={"dim": 8, "mlp_dim": 16}, full={"hidden": 16}, **kw)


def test_single_crop_spaces_and_the_teacher_see_the_global_views_only(reader):
    h = build()
    views, targets = views_and_targets()
    out = h(views=views, targets=targets, global_views=2)
    stage = out.state.stage
    assert reader.seen == [[0, 1, 2, 3, 4]]
    assert [("self/projector" in r) for r in stage.reps] == [True, True, False, False, False]
    assert [("full/logits" in r) for r in stage.reps] == [True, True, False, False, False]
    assert all("backbone" in r for r in stage.reps)
    assert len(stage.extras["teacher"]["backbone"]) == 2  # DINO's teacher: global crops only
    # self's and full's losses are those of the two global views alone
    alone = copy.deepcopy(h)
    ref = alone(views=views[:2], targets=targets)
    for name in ("self", "full"):
        torch.testing.assert_close(out.losses[name], ref.losses[name])


def test_per_view_step_with_local_crops_equals_the_joint_step(reader):
    h = build()
    views, targets = views_and_targets()
    joint = copy.deepcopy(h)
    opt_j = torch.optim.SGD([p for _, p in joint.trainable_parameters()], lr=0.0)
    opt_v = torch.optim.SGD([p for _, p in h.trainable_parameters()], lr=0.0)
    torch.manual_seed(3)
    out_j = train_step(joint, joint, opt_j, views, targets, 0.0, 1.0, torch.device("cpu"), "off", per_view=False, global_views=2)
    torch.manual_seed(3)
    out_v = train_step(h, h, opt_v, views, targets, 0.0, 1.0, torch.device("cpu"), "off", per_view=True, global_views=2)
    assert reader.seen[1:] == [[0], [1], [2], [3], [4]]
    for k in out_j.losses:
        torch.testing.assert_close(out_v.losses[k], out_j.losses[k], rtol=1e-5, atol=1e-6, msg=k)
    gj = {k: p.grad for k, p in joint.named_parameters() if p.grad is not None}
    gv = {k: p.grad for k, p in h.named_parameters() if p.grad is not None}
    assert gj.keys() == gv.keys() and gj
    for k in gj:
        torch.testing.assert_close(gv[k], gj[k], rtol=1e-4, atol=1e-6, msg=k)


def test_concat_views_batches_the_global_views_and_the_local_crops_apart(reader):
    h = build(concat_views=True)
    views, targets = views_and_targets()
    out = h(views=views, targets=targets, global_views=2)
    assert out.losses["cropreader"].isfinite() and reader.seen == [[0, 1, 2, 3, 4]]


def test_local_crops_without_a_multi_crop_space_are_one_line(reader):
    h = build("self,full")
    views, targets = views_and_targets()
    with pytest.raises(OperaError) as err:
        h(views=views, targets=targets, global_views=2)
    msg = str(err.value)
    assert "\n" not in msg and "3 local crops" in msg and "data.local_crops=0" in msg
    with pytest.raises(OperaError) as err:
        h(views=views, targets=targets, global_views=0)
    assert "\n" not in str(err.value) and "global_views=0" in str(err.value)
