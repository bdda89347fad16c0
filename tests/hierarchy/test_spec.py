"""Hierarchy specs: the spaces go from the base up (Eq. 35: mask < self < full), and every bad spec is
a one-line ``OperaError`` that names the valid choices or the fix."""

from __future__ import annotations

import pytest
import torch

from opera.errors import OperaError
from opera.hierarchy import ARRANGEMENTS, SupervisionHierarchy, parse_spec

SMALL = {"self": {"mlp_dim": 64, "dim": 32}}


def build(spec, backbone="resnet_tiny", **kw):
    options = {k: v for k, v in SMALL.items() if k in str(spec)}
    options.update(kw.pop("options", {}))
    return SupervisionHierarchy.from_spec(spec, backbone=backbone, img_size=32, **kw, **options)


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(OperaError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- good specs
@pytest.mark.parametrize(
    "spec,expected",
    [("self", ("self",)), ("full", ("full",)), ("self,full", ("self", "full")), ("self+full", ("self", "full")),
     (" mask , self ,full", ("mask", "self", "full")), (["self", "full"], ("self", "full"))],
)
def test_parse_spec_accepts_base_up_orders(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,arrangement,expected",
    [("self,full", None, "C"), ("self,full", "B", "B"), ("self,full", "naive", "naive"), ("full", None, "A"),
     ("full", "A", "A"), ("self", None, "C")],
)
def test_default_arrangement(spec, arrangement, expected):
    """C (OPERA, Fig. 4) when self and full are stacked; A for full alone (h on the backbone)."""
    h = build(spec, arrangement=arrangement, num_classes=5 if "full" in spec else None)
    assert h.arrangement == expected
    assert h.spec == ",".join(parse_spec(spec))
    if "full" in spec:
        source = {"A": "backbone", "B": "self/projector", "C": "self/predictor", "naive": "self/predictor"}[expected]
        assert h.spaces["full"].source == source


def test_projector_depth_follows_mocov3():
    """MoCo-v3: a 2-layer projector for CNNs, 3 layers for ViTs; the predictor has 2."""
    assert build("self").spaces["self"].resolved_projector_layers == 2
    vit = build("self", backbone="vit_tiny", backbone_options={"depth": 1})
    assert vit.spaces["self"].resolved_projector_layers == 3


# --------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    "spec,needles",
    [
        ("self,self", ["repeats", "mask, self, full"]),
        ("foo", ["unknown task space 'foo'", "mask, self, full"]),
        ("selff", ["did you mean self"]),
        ("full,mask", ["out of order", "'mask,full'"]),
        ("full,self", ["out of order", "'self,full'"]),
        ("", ["empty", "mask,self,full"]),
        ("self,,full", ["empty", "mask,self,full"]),
        ([], ["empty", "mask,self,full"]),
    ],
)
def test_bad_spec_strings(spec, needles):
    one_line_error(lambda: parse_spec(spec), *needles)
    one_line_error(lambda: build(spec, num_classes=5), *needles)


def test_arrangement_b_without_full():
    """An arrangement places the class space; with spec 'self' there is none to place."""
    one_line_error(lambda: build("self", arrangement="B"), "'B'", "no 'full'", "self,full")


def test_arrangement_b_without_self():
    """B and C attach h to the instance space (Fig. 4); with spec 'full' only A is possible."""
    one_line_error(lambda: build("full", arrangement="B", num_classes=5), "no 'self'", "self,full", "arrangement A")
    one_line_error(lambda: build("full", arrangement="C", num_classes=5), "no 'self'", "arrangement A")


def test_unknown_arrangement_names_the_valid_ones():
    one_line_error(lambda: build("self,full", arrangement="D", num_classes=5), "'D'", ", ".join(ARRANGEMENTS))


@pytest.mark.parametrize("spec", ["mask,self", "mask", "mask,self,full"])
def test_mask_on_a_cnn(spec):
    """Y^mask = Y needs patch tokens (Appendix E); a ResNet has none."""
    one_line_error(lambda: build(spec, num_classes=5), "'mask'", "resnet_tiny", "CNN", "vit_tiny", "drop 'mask'")


@pytest.mark.parametrize("num_classes", [None, 0, 1])
def test_full_without_num_classes(num_classes):
    """No 'class' label set (or one of fewer than 2 classes): one line naming the space and the set."""
    one_line_error(lambda: build("self,full", num_classes=num_classes), "'full'", "'class'")


def test_options_for_a_space_not_in_the_spec():
    one_line_error(
        lambda: build("self", options={"full": {"hidden": 16}}), "'full'", "no 'full'", "drop them or add 'full'"
    )
    one_line_error(lambda: build("self,full", num_classes=5, options={"mask": {"ratio": 0.3}}), "no 'mask'")


def test_unknown_option_group_and_key():
    one_line_error(lambda: build("self", options={"slef": {}}), "'slef'", "did you mean self")
    one_line_error(lambda: build("self", options={"self": {"dimm": 8}}), "self.dimm", "did you mean dim", "mlp_dim")


def test_bad_mask_ratio():
    one_line_error(
        lambda: build("mask", backbone="vit_tiny", backbone_options={"depth": 1}, options={"mask": {"ratio": 1.0}}),
        "mask.ratio", "(0, 1)",
    )


def test_backbone_without_timm_interface():
    one_line_error(lambda: build("self", backbone=torch.nn.Linear(3, 3)), "num_features", "create_backbone")


def test_full_needs_labels_at_forward():
    h = build("self,full", num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    one_line_error(lambda: h([x, x]), "labels", "drop 'full'")


def test_self_needs_two_views():
    """The instance loss contrasts views of the same image (Eq. 34): one view is a user error."""
    h = build("self")
    one_line_error(lambda: h([torch.randn(4, 3, 32, 32)]), "'self'", "two views")
