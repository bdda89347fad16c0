"""Backbones by name (timm interface), and MoCo-v3's ViT changes: fixed 2-D sin-cos position
embedding, stop-gradient after the patch projection (DeiT-S/B), zero-init last BN (ResNet)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck

from opera.backbones import create_backbone, feature_dim, get_spec, is_token_backbone
from opera.backbones.vit import sincos_2d_position_embedding
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy


@pytest.mark.parametrize(
    "name,kwargs,width,forward_size",
    [
        ("resnet_tiny", {"img_size": 32}, 256, 32),
        ("vit_tiny", {"img_size": 32}, 192, 32),
        ("resnet18", {}, 512, 32),
        ("mobilenetv3_small_050", {"img_size": 32}, None, 32),
        ("timm:mobilenetv3_small_050", {"img_size": 32}, None, None),
        ("resnet50", {}, 2048, None),
        ("deit_small", {}, 384, None),
    ],
)
def test_create_backbone_has_num_features(name, kwargs, width, forward_size):
    """Every backbone has timm's interface; y (Eq. 8) is forward_head(..., pre_logits=True)."""
    m = create_backbone(name, **kwargs)
    assert isinstance(m.num_features, int) and m.num_features > 0
    if width is not None:
        assert m.num_features == width
    for attr in ("forward_features", "forward_head"):
        assert callable(getattr(m, attr))
    assert get_spec(m).name == name
    if forward_size:
        m.eval()
        with torch.no_grad():
            y = m.forward_head(m.forward_features(torch.randn(2, 3, forward_size, forward_size)), pre_logits=True)
        assert y.shape == (2, feature_dim(m))


def test_feature_dim_is_the_pre_logits_width_not_num_features():
    """MobileNetV3's head has a hidden layer (288 -> 1024): y has feature_dim channels, and the
    instance space's projector is built on that width."""
    m = create_backbone("mobilenetv3_small_050", img_size=32)
    assert (m.num_features, feature_dim(m)) == (288, 1024)
    h = SupervisionHierarchy.from_spec(
        "self", backbone="mobilenetv3_small_050", img_size=32, self={"mlp_dim": 32, "dim": 16}
    )
    x = torch.randn(4, 3, 32, 32)
    out = h([x, x + 0.1 * torch.randn_like(x)])
    assert torch.isfinite(out.loss)
    assert h.representations(x)["backbone"].shape == (4, 1024)


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_tiny"])
def test_spec_rebuilds_the_same_model_in_plain_timm(name):
    """The weights load straight into timm.create_model(spec.timm_name, **spec.timm_kwargs)."""
    m = create_backbone(name, img_size=32, **({"depth": 1} if name == "vit_tiny" else {}))
    spec = get_spec(m)
    plain = timm.create_model(spec.timm_name, **spec.timm_kwargs)
    plain.load_state_dict(m.state_dict(), strict=True)
    assert m.num_features == plain.num_features


def test_token_backbones():
    assert is_token_backbone(create_backbone("vit_tiny", img_size=32, depth=1))
    assert not is_token_backbone(create_backbone("resnet_tiny", img_size=32))


# --------------------------------------------------------------------------- MoCo-v3 ViT
def mocov3_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3's ``build_2d_sincos_position_embedding`` (vits.py), written out for a square grid:
    ``grid_w, grid_h = meshgrid(arange(w), arange(h))`` ('ij'), omega_d = 1 / T^(d / (D/4)),
    PE = [sin(grid_w omega), cos(grid_w omega), sin(grid_h omega), cos(grid_h omega)],
    and a zero embedding for the class token."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe], dim=0)[None]


@pytest.mark.parametrize("name,kwargs", [("vit_tiny", {"img_size": 32, "depth": 1}), ("deit_small", {"depth": 1})])
def test_pos_embed_is_mocov3_fixed_sincos(name, kwargs):
    m = create_backbone(name, **kwargs)
    gh, gw = m.patch_embed.grid_size
    assert m.pos_embed.shape == (1, 1 + gh * gw, m.embed_dim)
    assert torch.allclose(m.pos_embed, mocov3_sincos(gh, gw, m.embed_dim), atol=1e-6)
    assert not m.pos_embed.requires_grad
    assert all(p is not m.pos_embed for p in m.parameters() if p.requires_grad)


def test_pos_embed_sincos_geometry():
    """Token t = (row r, column c), row-major as the patch tokens: the first half of the channels
    depends on one grid axis only and the second half on the other (MoCo-v3: row first)."""
    m = create_backbone("vit_tiny", img_size=32, patch_size=8, depth=1)  # 4 x 4 grid
    pe = m.pos_embed[0, 1:].reshape(4, 4, -1)  # (row, col, D)
    half = m.embed_dim // 2
    assert torch.allclose(pe[:, :, :half], pe[:, :1, :half].expand_as(pe[:, :, :half]))  # constant along a row
    assert torch.allclose(pe[:, :, half:], pe[:1, :, half:].expand_as(pe[:, :, half:]))  # constant down a column
    assert torch.allclose(pe[1, 0, 0], torch.tensor(1.0).sin())  # sin(row * omega_0) with omega_0 = 1
    # a rectangular grid (2 rows x 3 columns): the same split, rows first
    rect = sincos_2d_position_embedding(2, 3, 8).reshape(2, 3, 8)
    rows = torch.arange(2.0)[:, None] * torch.tensor([1.0, 0.01])
    cols = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.01])
    assert torch.allclose(rect[:, 0, :4], torch.cat([rows.sin(), rows.cos()], 1))
    assert torch.allclose(rect[0, :, 4:], torch.cat([cols.sin(), cols.cos()], 1))


def test_deit_small_freezes_the_patch_projection_by_default():
    """MoCo-v3's stop-gradient after the random patch projection (its ViT recipe), off for vit_tiny."""
    deit = create_backbone("deit_small", depth=1)
    assert not deit.patch_embed.proj.weight.requires_grad and not deit.patch_embed.proj.bias.requires_grad
    x = torch.randn(1, 3, 224, 224)
    deit.forward_features(x).sum().backward()
    assert deit.patch_embed.proj.weight.grad is None
    assert deit.blocks[0].attn.qkv.weight.grad is not None
    trainable = create_backbone("deit_small", depth=1, stop_grad_patch_embed=False)
    assert trainable.patch_embed.proj.weight.requires_grad
    tiny = create_backbone("vit_tiny", img_size=32, depth=1)
    assert tiny.patch_embed.proj.weight.requires_grad


def test_vit_rejects_an_image_size_that_is_not_a_multiple_of_the_patch():
    with pytest.raises(OperaError, match="multiple of the patch size 16"):
        create_backbone("deit_small", img_size=200)


# --------------------------------------------------------------------------- ResNets
@pytest.mark.parametrize("name,block,last_bn", [("resnet50", Bottleneck, "bn3"), ("resnet18", BasicBlock, "bn2"),
                                                ("resnet_tiny", BasicBlock, "bn2")])
def test_resnet_last_bn_of_each_block_is_zero_initialised(name, block, last_bn):
    """MoCo-v3 / Goyal et al.: each residual block starts as the identity (gamma = 0 on its last BN)."""
    m = create_backbone(name)
    blocks = [b for b in m.modules() if isinstance(b, block)]
    assert len(blocks) == {"resnet50": 16, "resnet18": 8, "resnet_tiny": 4}[name]
    for b in blocks:
        assert torch.all(getattr(b, last_bn).weight == 0)
        assert torch.any(b.bn1.weight != 0)  # only the last BN is zeroed
    assert torch.any(m.bn1.weight != 0)


# --------------------------------------------------------------------------- errors
def test_unknown_backbone_suggests_names():
    with pytest.raises(OperaError) as info:
        create_backbone("resnet5")
    msg = str(info.value)
    assert "\n" not in msg
    assert "unknown backbone 'resnet5'" in msg and "did you mean" in msg and "resnet50" in msg
    assert "timm.list_models()" in msg


def test_bad_backbone_option_is_a_user_error():
    with pytest.raises(OperaError, match="does not accept"):
        create_backbone("resnet_tiny", not_an_option=3)
