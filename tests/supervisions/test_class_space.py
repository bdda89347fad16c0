"""Where the class space attaches over any instance space: arrangements A/B/C read what the
instance space below publishes (``<name>/projector``, ``<name>/predictor``), not ``self``'s names."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from opera.supervisions import SPACES
from opera.supervisions.base import SpaceOutput, TaskSpace
from opera.supervisions.heads import build_mlp

SMALL = {"self": {"dim": 8, "mlp_dim": 16}, "byol": {"dim": 8, "mlp_dim": 16}}


def build(spec: str, arrangement=None, **options):
    torch.manual_seed(0)
    instance = spec.split(",")[0]
    return SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", label_sets={"class": 3, "coarse": 2}, img_size=16,
                                          arrangement=arrangement, **{instance: SMALL.get(instance, {})}, **options)


SOURCES = {"A": "backbone", "B": "{}/projector", "C": "{}/predictor", "naive": "{}/predictor"}


@pytest.mark.parametrize("instance", ["byol", "self"])
@pytest.mark.parametrize("arrangement", ["A", "B", "C", "naive"])
def test_the_class_head_reads_the_instance_spaces_published_output(instance, arrangement):
    """byol,full: C on byol/predictor, B on byol/projector, A on the backbone; self,full as before."""
    h = build(f"{instance},full", arrangement)
    want = SOURCES[arrangement].format(instance)
    assert h.spaces["full"].source == want
    d = h.describe()
    assert d["arrangement"] == arrangement and d["derived"]["full"]["source"] == want
    assert d["derived"]["full"]["hidden"] == 8  # the instance embedding width, as self.dim for 'self'
    # the class loss reaches the instance modules below its attachment and none above it
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    h(views=views, targets={"class": torch.tensor([0, 1, 2, 0, 1, 2])}).losses["full"].backward()
    space = h.spaces[instance]
    reached = {m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(space, m).parameters())
               for m in ("projector", "predictor")}
    assert reached == {"projector": arrangement != "A", "predictor": arrangement in ("C", "naive")}


def test_byol_full_defaults_to_c_and_supcon_and_coarse_stack_alike():
    assert build("byol,full").describe()["arrangement"] == "C"
    assert build("byol,full").spaces["full"].source == "byol/predictor"
    h = build("byol,supcon", "C", supcon={"dim": 8, "hidden": 16})
    assert h.spaces["supcon"].source == "byol/predictor"
    # the teacher copies byol's predictor too, on the way to the supcon keys
    assert set(h.teacher.heads) == {"byol_projector", "byol_predictor", "supcon_embedding"}
    h = build("byol,full,coarse", "B")
    assert (h.spaces["full"].source, h.spaces["coarse"].source) == ("byol/projector", "full/logits")


@dataclass
class _ProjectorOnlyOptions:
    dim: int = 8


class _ProjectorOnly(TaskSpace):
    """An instance space with a projector and no predictor (SimCLR's shape)."""

    name = "projonly"
    level = 1
    Options = _ProjectorOnlyOptions

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.projector = build_mlp(2, in_dim, 16, dim, last_bn=False)

    @classmethod
    def build(cls, ctx, options):
        space = cls(ctx.dims["backbone"], options.dim)
        ctx.publish(space.key("projector"), options.dim, "backbone", space.projector, cls.name)
        return space

    def represent(self, reps):
        reps[self.key("projector")] = self.projector(reps["backbone"])

    def forward(self, stage, ids):
        z = stage.apply(self.projector, stage.get("backbone", ids))
        for i, zi in zip(ids, z):
            stage.reps[i][self.key("projector")] = zi
        return SpaceOutput(sum(zi.pow(2).mean() for zi in z), {})


@pytest.fixture
def projector_only():
    SPACES.register("projonly")(_ProjectorOnly)
    try:
        yield
    finally:
        SPACES.unregister("projonly")


@pytest.mark.parametrize("arrangement", ["C", "naive"])
def test_c_over_an_instance_space_without_a_predictor_is_refused_in_one_line(projector_only, arrangement):
    """Never a silent fall-back to the backbone: the error names the arrangement, the instance
    space and the arrangements that work."""
    with pytest.raises(OperaError) as err:
        build("projonly,full", arrangement)
    msg = str(err.value)
    assert "\n" not in msg and repr(arrangement) in msg and "'projonly'" in msg and "A or B" in msg


def test_the_default_over_an_instance_space_without_a_predictor_is_b(projector_only):
    """Left to the default, the class head goes on the projector output (the representation such a
    space's loss acts on) and the hierarchy says B; A and B work when asked for."""
    h = build("projonly,full")
    assert h.arrangement == "B" and h.describe()["arrangement"] == "B"
    assert h.spaces["full"].source == "projonly/projector"
    assert build("projonly,full", "B").spaces["full"].source == "projonly/projector"
    assert build("projonly,full", "A").spaces["full"].source == "backbone"


def test_b_or_c_without_any_instance_space_is_still_refused():
    with pytest.raises(OperaError) as err:
        SupervisionHierarchy.from_spec("full", backbone="resnet_tiny", num_classes=3, img_size=16, arrangement="C")
    msg = str(err.value)
    assert "\n" not in msg and "no 'self'" in msg and "'byol'" in msg and "arrangement A" in msg
