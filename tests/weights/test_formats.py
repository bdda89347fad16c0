"""``read_weights`` reads every format the field hands out into an opera backbone that gives the
same features as the source, and its heads under the hierarchy's names.

The official checkpoints are built here from opera's own modules with the official code's
structure: ``main_moco.py``'s ``save_checkpoint`` dict ``{epoch, arch, state_dict, optimizer,
scaler}`` around the DDP-wrapped ``MoCo_ResNet`` / ``MoCo_ViT`` of ``moco/builder.py`` (the
projector replaces ``fc`` / ``head``; OPERA's builder adds ``fully_projector``), whose key names are
checked against that module tree built from torchvision / timm and ``_build_mlp``;
``convert_to_deit.py``'s and ``main_lincls.py``'s dicts; timm and torchvision state dicts; and a
DINOv2-shaped ``config.json`` + ``model.safetensors`` folder, whose resampled position embeddings
are checked against timm's own loading of the same weights (``checkpoint_filter_fn``).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from opera.backbones import pooled_features
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from opera.supervisions.heads import build_mlp  # moco/builder.py's _build_mlp, layer for layer
from opera.weights import read_weights

#: moco/builder.py's modules in the DDP-wrapped state_dict <- the opera hierarchy's modules (same layers)
OFFICIAL = {"module.base_encoder.{proj}.": "spaces.self.projector.", "module.momentum_encoder.{proj}.": "teacher.heads.self_projector.",
            "module.base_encoder.": "backbone.", "module.momentum_encoder.": "teacher.backbone.",
            "module.predictor.": "spaces.self.predictor.", "module.fully_projector.": "spaces.full.class_head."}
DIM, MLP = 16, 32


class OfficialMoCo(nn.Module):
    """The module tree of OPERA's ``MoCo_ResNet`` / ``MoCo_ViT`` (MoCo-v3's plus ``fully_projector``),
    for its ``state_dict`` names."""

    def __init__(self, encoder, vit: bool, classes: int):
        super().__init__()
        self.base_encoder, self.momentum_encoder = encoder(), encoder()
        proj = "head" if vit else "fc"
        hidden = getattr(self.base_encoder, proj).weight.shape[1]
        for enc in (self.base_encoder, self.momentum_encoder):
            setattr(enc, proj, build_mlp(3 if vit else 2, hidden, MLP, DIM, last_bn=True))
        self.predictor = build_mlp(2, DIM, MLP, DIM, last_bn=vit)
        self.fully_projector = build_mlp(2, DIM, DIM, classes, last_bn=False)


def official_keys(vit: bool, classes: int = 10) -> set[str]:
    """``model.state_dict()`` names of main_moco.py's DDP-wrapped model (``module.`` prefix)."""
    if vit:  # MoCo-v3's vits.py is timm's VisionTransformer; vit_tiny at 32 px has 4x4 patches
        encoder = lambda: timm.models.vision_transformer.VisionTransformer(  # noqa: E731
            img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=MLP)
    else:  # torchvision's ResNet-18 with one BasicBlock per stage (MoCo-v3's models.__dict__[arch])
        from torchvision.models.resnet import BasicBlock, ResNet

        encoder = lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=MLP)  # noqa: E731
    return {f"module.{k}" for k in OfficialMoCo(encoder, vit, classes).state_dict()}


#: timm's ResNet-18 of one block per stage: torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``, names and all
RESNET = {"layers": (1, 1, 1, 1)}


def hierarchy(backbone: str, classes: int = 10, seed: int = 1) -> SupervisionHierarchy:
    torch.manual_seed(seed)
    h = SupervisionHierarchy.from_spec("self,full", backbone=backbone, num_classes=classes, img_size=32,
                                       backbone_options=RESNET if backbone == "resnet18" else None,
                                       self={"dim": DIM, "mlp_dim": MLP})
    with torch.no_grad():  # the teacher distinct from the online modules, BN statistics not at their init
        for v in h.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.01)
    return h.eval()


def main_moco_checkpoint(h: SupervisionHierarchy, vit: bool, path, with_class_head: bool = True) -> dict:
    """main_moco.py's ``save_checkpoint`` dict of the hierarchy's tensors under the official names."""
    proj = "head" if vit else "fc"
    state: dict[str, torch.Tensor] = {}
    for k, v in h.state_dict().items():
        for official, ours in OFFICIAL.items():
            if k.startswith(ours):
                state[official.format(proj=proj) + k[len(ours):]] = v.clone()
                break
    if not with_class_head:
        state = {k: v for k, v in state.items() if not k.startswith("module.fully_projector.")}
    ckpt = {"epoch": 100, "arch": "vit_tiny" if vit else "resnet18", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "scaler": {"scale": 65536.0}}
    torch.save(ckpt, path)
    return ckpt


def features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pooled_features(backbone.eval(), x)


@pytest.mark.parametrize("vit", [False, True], ids=["resnet18", "vit_tiny"])
def test_main_moco_checkpoint_reads_backbone_and_heads(tmp_path, vit):
    h = hierarchy("vit_tiny" if vit else "resnet18")
    ckpt = main_moco_checkpoint(h, vit, tmp_path / "checkpoint_0099.pth.tar")
    assert set(ckpt["state_dict"]) == official_keys(vit)  # the official layout, not one of ours

    w = read_weights(str(tmp_path / "checkpoint_0099.pth.tar"), backbone_options=None if vit else RESNET)

    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(features(w.backbone, x), features(h.backbone, x))
    state = h.state_dict()
    assert set(w.heads) == {k for k in state if not k.startswith("backbone.")}
    assert all(torch.equal(w.heads[k], state[k]) for k in w.heads)
    assert w.format == "mocov3" and len(w.sha256) == 64
    n = len(h.backbone.state_dict())
    assert w.report.startswith(f"read {tmp_path / 'checkpoint_0099.pth.tar'} as an OPERA main_moco.py checkpoint")
    assert f"{n} backbone tensors matched, 0 missing, 0 unexpected (skipped epoch, arch, optimizer, scaler)" in w.report
    assert "\n" not in w.report


def test_mocov3_checkpoint_without_class_head_and_a_vit_at_another_size(tmp_path):
    h = hierarchy("vit_tiny")
    main_moco_checkpoint(h, True, tmp_path / "moco.pth.tar", with_class_head=False)

    w = read_weights(str(tmp_path / "moco.pth.tar"), backbone="vit_tiny", img_size=64, backbone_options={"patch_size": 4})

    assert "as a MoCo-v3 main_moco.py checkpoint" in w.report
    assert "position embeddings resampled from 8x8 to 16x16" in w.report
    assert not any(k.startswith("spaces.full.") for k in w.heads)
    assert w.backbone.pos_embed.shape[1] == 1 + 16 * 16 and w.heads["teacher.backbone.pos_embed"].shape == w.backbone.pos_embed.shape
    assert torch.equal(w.backbone.blocks[3].attn.qkv.weight, h.backbone.blocks[3].attn.qkv.weight)


def test_convert_to_deit_output(tmp_path):
    h = hierarchy("vit_tiny")
    state = main_moco_checkpoint(h, True, tmp_path / "moco.pth.tar")["state_dict"]
    # convert_to_deit.py: keep module.base_encoder.* but its head, prefix removed; save {'model': ...}
    model = {k[len("module.base_encoder."):]: v for k, v in state.items()
             if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head")}
    torch.save({"model": model}, tmp_path / "deit.pth")

    w = read_weights(str(tmp_path / "deit.pth"), backbone="vit_tiny")

    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(w.backbone, x), features(h.backbone, x))
    assert w.format == "mocov3-deit" and w.heads == {}
    assert "as a MoCo-v3 convert_to_deit.py output" in w.report and "nothing skipped" in w.report
    with pytest.raises(OperaError, match="does not name its architecture; pass --backbone"):
        read_weights(str(tmp_path / "deit.pth"))


def test_main_lincls_checkpoint_skips_the_linear_classifier(tmp_path):
    h = hierarchy("resnet_tiny")
    state = {f"module.{k}": v for k, v in h.backbone.state_dict().items()}
    state.update({"module.fc.weight": torch.randn(10, 256), "module.fc.bias": torch.zeros(10)})
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "best_acc1": 71.2,
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "lincls.pth.tar")

    w = read_weights(str(tmp_path / "lincls.pth.tar"), backbone="resnet_tiny")

    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(w.backbone, x), features(h.backbone, x))
    assert w.format == "mocov3-lincls" and w.heads == {}
    assert "skipped fc (the classifier), epoch, arch, best_acc1, optimizer" in w.report


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict(tmp_path, suffix):
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=7).eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    w = read_weights(str(path), backbone="vit_tiny")

    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(w.backbone, x), features(model, x))
    assert w.format == "timm" and "as a timm state dict" in w.report and "skipped head (the classifier)" in w.report


def test_torchvision_resnet_state_dict(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(3)
    tv = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet.pth")

    w = read_weights(str(tmp_path / "resnet.pth"), backbone="resnet18", backbone_options={"layers": (1, 1, 1, 1)})

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = torch.flatten(nn.Sequential(*list(tv.children())[:-1])(x), 1)  # torchvision's forward without fc
    torch.testing.assert_close(features(w.backbone, x), reference, rtol=0, atol=1e-6)
    assert w.format == "torchvision" and "skipped fc (the classifier)" in w.report


def dinov2_folder(folder, img_size: int = 28) -> nn.Module:
    """timm's ``vit_small_patch14_dinov2`` (random weights) as a local-dir folder: config.json in
    timm's format + model.safetensors."""
    torch.manual_seed(4)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0).eval()
    folder.mkdir()
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("url", "hf_hub_id")}
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2", "num_classes": 0,
                                                    "num_features": 384, "model_args": {"img_size": img_size},
                                                    "pretrained_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


@pytest.mark.slow
def test_dinov2_folder_at_another_size_matches_timm(tmp_path):
    source = dinov2_folder(tmp_path / "dinov2", img_size=28)

    w = read_weights(str(tmp_path / "dinov2"), img_size=56)

    assert w.format == "hf-dir" and w.backbone.opera_spec.name == "timm:vit_small_patch14_dinov2"
    assert "as a timm local-dir folder (config.json + model.safetensors)" in w.report
    assert w.report.endswith("position embeddings resampled from 2x2 to 4x4 (timm's resample_abs_pos_embed)")
    # timm's own loading of these weights at 56 px (checkpoint_filter_fn resamples the position embedding)
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0).eval()
    reference.load_state_dict(checkpoint_filter_fn(load_file(str(tmp_path / "dinov2" / "model.safetensors")), reference))
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(features(w.backbone, x), features(reference, x), rtol=0, atol=1e-5)
    at_own_size = read_weights(str(tmp_path / "dinov2"))
    assert "resampled" not in at_own_size.report
    assert torch.equal(features(at_own_size.backbone, x[:, :, :28, :28]), features(source, x[:, :, :28, :28]))


def test_opera_last_pt_and_backbone_file(tmp_path):
    from opera.engine.checkpoint import export_backbone, save_state

    h = hierarchy("resnet_tiny")
    export_backbone(h.backbone, tmp_path / "backbone.safetensors")
    save_state({"model": h.state_dict(), "backbone_spec": h.backbone.opera_spec.to_dict(), "epoch": 1}, tmp_path / "last.pt")
    x = torch.randn(2, 3, 32, 32)
    for spec in ("backbone.safetensors", "last.pt"):
        w = read_weights(str(tmp_path / spec))
        assert w.format == "opera" and torch.equal(features(w.backbone, x), features(h.backbone, x))
    assert read_weights(str(tmp_path / "backbone.safetensors")).heads == {}
    run_dir = read_weights(str(tmp_path))  # a run directory: its last.pt, with the heads
    assert run_dir.file.name == "last.pt" and set(run_dir.heads) == {k for k in h.state_dict() if not k.startswith("backbone.")}


def test_bad_inputs_are_one_line(tmp_path):
    h = hierarchy("resnet_tiny")
    main_moco_checkpoint(h, False, tmp_path / "moco.pth.tar")
    vit = hierarchy("vit_tiny")
    main_moco_checkpoint(vit, True, tmp_path / "vit.pth.tar")
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "extra": 1}, tmp_path / "odd.pth")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "none.pth")
    cases = {
        ("hf-hub:timm/vit_small_patch14_dinov2.lvd142m", None): "opera never downloads",
        (str(tmp_path / "missing.pth"), None): "put the file there",
        (str(tmp_path / "moco.pth.tar"), "resnet50"): "holds a 'resnet18' backbone (its arch entry), not 'resnet50'",
        (str(tmp_path / "moco.pth.tar"), None): "its backbone does not fit backbone 'resnet18': missing layer1.1.conv1.weight",
        (str(tmp_path / "odd.pth"), "resnet_tiny"): "looks like a MoCo-v3 convert_to_deit.py output ({'model': ...}), but",
        (str(tmp_path / "none.pth"), "resnet_tiny"): "is none of the weight formats opera reads (entries epoch, notes)",
    }
    for (spec, backbone), needle in cases.items():
        with pytest.raises(OperaError) as err:
            read_weights(spec, backbone=backbone)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(OperaError, match="has 4x4 patches but the backbone uses 8x8; build it with patch size 4"):
        read_weights(str(tmp_path / "vit.pth.tar"), backbone="vit_tiny", img_size=64)  # vit_tiny's default: img/8
