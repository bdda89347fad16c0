"""The writers: a checkpoint in MoCo-v3's layout that ``main_lincls.py --pretrained`` loads unchanged
(its loading loop reproduced literally), a folder that ``timm.create_model("local-dir:DIR")`` loads,
and their one-line refusals. The official structures are rebuilt here from the published code
(facebookresearch/moco-v3 ``moco/builder.py``, ``vits.py``, ``main_lincls.py``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from opera.backbones import create_backbone, pooled_features
from opera.errors import OperaError
from opera.files import WriteFailed
from opera.weights.writers import write_hf, write_mocov3
from benchmarks.official_step import build_mlp as _build_mlp  # moco/builder.py's _build_mlp, rewritten from its structure
from tests.reliability.test_disk_full import file_size_limit


class _DDP(nn.Module):
    """What DistributedDataParallel adds to the names: ``module.``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _main_lincls_load(model: nn.Module, pretrained: Path, linear_keyword: str):
    """main_lincls.py's ``--pretrained`` branch, line for line."""
    checkpoint = torch.load(pretrained, map_location="cpu")
    state_dict = checkpoint['state_dict']
    for k in list(state_dict.keys()):
        if k.startswith('module.base_encoder') and not k.startswith('module.base_encoder.%s' % linear_keyword):
            state_dict[k[len("module.base_encoder."):]] = state_dict[k]
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"%s.weight" % linear_keyword, "%s.bias" % linear_keyword}
    return msg


def _moco_vits(arch: str, **kwargs) -> nn.Module:
    """moco-v3 ``vits.vit_small`` / ``vit_base``: timm's VisionTransformer with these arguments at 224 px."""
    from timm.models.vision_transformer import VisionTransformer

    dim = {"vit_small": 384, "vit_base": 768}[arch]
    return VisionTransformer(patch_size=16, embed_dim=dim, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def _shuffle_bn_stats(module: nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics, so a BN buffer that is not carried over shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _run(root: Path, backbone: str, img_size: int, spec: str = "self") -> tuple[Path, nn.Module]:
    """An opera run of ``spec`` (narrow MLPs): backbone.safetensors + last.pt with its heads."""
    from opera.engine.checkpoint import export_backbone, save_state
    from opera.hierarchy import SupervisionHierarchy

    h = SupervisionHierarchy.from_spec(spec, backbone=backbone, img_size=img_size, num_classes=10 if "full" in spec else None,
                                       self={"dim": 16, "mlp_dim": 32})
    _shuffle_bn_stats(h)
    with torch.no_grad():  # a teacher that is not the online copy, so a swap would show
        for p in h.teacher.parameters():
            p.add_(0.01)
    export_backbone(h.backbone, root / "backbone.safetensors")
    save_state({"model": h.state_dict(), "backbone_spec": h.backbone.opera_spec.to_dict(), "epoch": 1}, root / "last.pt")
    return root, h


@pytest.fixture(scope="module")
def r50_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("r50_run"), "resnet50", 64)


@pytest.mark.slow
def test_mocov3_resnet50_export_loads_in_main_lincls_and_moco_resnet(r50_run, tmp_path):
    import torchvision

    from opera.evals.export import ExportConfig, run_export

    run, h = r50_run
    h.eval()
    res = run_export(ExportConfig(checkpoint=str(run), format="mocov3", output=str(tmp_path)))
    path = Path(res["metrics"]["file"])
    assert path.name == "backbone_mocov3.pth.tar" and res["metrics"]["architecture"] == "resnet50"
    assert res["metrics"]["usage"] == f"python main_lincls.py -a resnet50 --pretrained {path} [imagenet folder]"
    ckpt = torch.load(path, map_location="cpu")
    assert (ckpt["epoch"], ckpt["arch"]) == (0, "resnet50")

    model = torchvision.models.resnet50()
    msg = _main_lincls_load(model, path, "fc")
    assert msg.unexpected_keys == []
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pooled_features(h.backbone, x))

    # the whole checkpoint is MoCo_ResNet(dim=16, mlp_dim=32) under DDP, strictly
    official = nn.Module()
    official.base_encoder, official.momentum_encoder = torchvision.models.resnet50(), torchvision.models.resnet50()
    official.base_encoder.fc = _build_mlp(2, 2048, 32, 16)
    official.momentum_encoder.fc = _build_mlp(2, 2048, 32, 16)
    official.predictor = _build_mlp(2, 16, 32, 16, False)
    _DDP(official).load_state_dict(ckpt["state_dict"], strict=True)
    official.eval()
    with torch.no_grad():
        q = official.predictor(official.base_encoder(x))
        k = official.momentum_encoder(x)
        reps = {"backbone": pooled_features(h.backbone, x)}
        h.spaces["self"].represent(reps)
        teacher = h.teacher.heads["self_projector"](pooled_features(h.teacher.backbone, x))
    assert torch.equal(q, reps["self/predictor"]) and torch.equal(k, teacher)


def test_mocov3_vit_small_loads_in_main_lincls_at_224(tmp_path):
    """deit_small is vits.vit_small; at 32 px its fixed sin-cos position embedding is written for
    vits.py's 14x14 grid, so main_lincls's 224 px model is opera's deit_small at 224 px."""
    small = create_backbone("deit_small", img_size=32)
    written = write_mocov3(small, tmp_path / "vit.pth.tar")
    assert written.note.startswith("position embedding: MoCo-v3's fixed 2-D sin-cos, written for 14x14 patches")
    assert torch.load(written.path)["arch"] == "vit_small"
    model = _moco_vits("vit_small")
    _main_lincls_load(model, written.path, "head")
    at224 = create_backbone("deit_small", img_size=224)
    at224.load_state_dict({k: v for k, v in small.state_dict().items() if k != "pos_embed"}, strict=False)
    model.head = nn.Identity()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), pooled_features(at224.eval(), x), atol=1e-5)


def test_mocov3_refuses_what_main_lincls_cannot_build(tmp_path):
    with pytest.raises(OperaError, match=r"^the backbone is built by none of the ResNets main_lincls.py builds "
                       r"\(resnet18, .*\), so MoCo-v3 cannot load it; export it with --format timm or --format hf$"):
        write_mocov3(create_backbone("resnet_tiny", img_size=32), tmp_path / "a.pth.tar")
    with pytest.raises(OperaError, match=r"none of the ViTs main_lincls.py builds \(moco-v3's vits.py vit_small"):
        write_mocov3(create_backbone("vit_tiny", img_size=32), tmp_path / "b.pth.tar")
    learned = create_backbone("deit_small", img_size=32)
    with torch.no_grad():
        learned.pos_embed.add_(0.01)
    with pytest.raises(OperaError, match=r"learned position embedding for 2x2 patches, but main_lincls.py builds"):
        write_mocov3(learned, tmp_path / "c.pth.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["resnet_tiny", "deit_small"])
def test_hf_folder_loads_with_timm_local_dir(name, tmp_path):
    import timm

    bb = create_backbone(name, img_size=32)
    _shuffle_bn_stats(bb)
    written = write_hf(bb.eval(), tmp_path / "hf", source={"checkpoint": "test"}, img_size=32 if name == "resnet_tiny" else None)
    assert sorted(p.name for p in written.path.iterdir()) == ["config.json", "model.safetensors"]
    assert written.usage == f"m = timm.create_model('local-dir:{tmp_path / 'hf'}', pretrained=True)"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architecture"] == bb.opera_spec.timm_name and cfg["num_classes"] == 0
    assert cfg["opera_spec"] == json.loads(json.dumps(bb.opera_spec.to_dict())) and cfg["opera_source"] == {"checkpoint": "test"}
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == [0.485, 0.456, 0.406] and "tag" not in pre
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), pooled_features(bb, x))
    write_hf(bb, tmp_path / "hf")  # its own previous export is replaced


def test_hf_refuses_a_folder_of_other_files_and_a_failed_write_is_one_line(tmp_path):
    bb = create_backbone("resnet_tiny", img_size=32)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OperaError, match=r"^\S+other is not empty \(notes.txt\); --format hf writes a new folder"):
        write_hf(bb, tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OperaError, match=r"file is a file; --format hf writes a folder"):
        write_hf(bb, tmp_path / "file")
    with file_size_limit(4096), pytest.raises(WriteFailed, match=r"\(the hf export's weights\): File too large"):
        write_hf(bb, tmp_path / "big")
    with file_size_limit(4096), pytest.raises(WriteFailed, match=r"\(the MoCo-v3 checkpoint\): File too large"):
        write_mocov3(create_backbone("resnet18"), tmp_path / "m.pth.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "file", "other"] and not any((tmp_path / "big").iterdir())


# ----------------------------------------------------------------------------- round trips
@pytest.fixture(scope="module")
def r18_run(tmp_path_factory):
    """OPERA's ``self,full``: its class head is OPERA's ``module.fully_projector`` in the MoCo-v3 layout."""
    return _run(tmp_path_factory.mktemp("r18_run"), "resnet18", 32, "self,full")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


#: format -> OUT name; ``timm`` both as safetensors and as a .pth
ROUND_TRIPS = {"opera": "backbone.safetensors", "timm": "b.safetensors", "timm-pth": "b.pth", "torchvision": "b.pth",
               "mocov3": "b.pth.tar", "hf": "hf"}


@pytest.mark.parametrize("fmt", list(ROUND_TRIPS))
def test_every_writable_format_reads_back_with_equal_tensors(fmt, r18_run, tmp_path, capsys):
    from opera.evals.export import run_convert
    from opera.weights import read_weights

    run, h = r18_run
    out = tmp_path / ROUND_TRIPS[fmt]
    written = run_convert(str(run), out, fmt.removesuffix("-pth"))
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"read {run / 'last.pt'} as an opera checkpoint")
    assert f"; wrote {out} as {fmt.removesuffix('-pth')}: {written.tensors} tensors" in line
    back = read_weights(str(out), backbone="resnet18")
    _assert_same(back.backbone.state_dict(), h.backbone.state_dict())
    if fmt == "mocov3":  # projector, predictor, momentum encoder and OPERA's class head
        assert any(k.startswith("module.fully_projector.") for k in torch.load(out)["state_dict"])
        _assert_same(back.heads, {k: v for k, v in h.state_dict().items() if not k.startswith("backbone.")})


def test_export_hf_of_a_run_is_a_timm_local_dir(r18_run, tmp_path):
    import timm

    from opera.evals.export import ExportConfig, run_export

    run, h = r18_run
    res = run_export(ExportConfig(checkpoint=str(run), format="hf", output=str(tmp_path)))
    m = res["metrics"]
    assert (m["file"], m["architecture"]) == (str(tmp_path / "backbone_hf"), "resnet18")
    assert m["usage"] == f"m = timm.create_model('local-dir:{tmp_path / 'backbone_hf'}', pretrained=True)"
    model = timm.create_model(f"local-dir:{tmp_path / 'backbone_hf'}", pretrained=True)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # the run's size, not timm's 224
    _assert_same(model.state_dict(), h.backbone.state_dict())


def test_detectron2_and_mmdet_conversions_hold_the_same_tensors(r18_run, tmp_path):
    from opera.evals.export import detectron2_to_torchvision, mmdet_to_torchvision, run_convert

    run, h = r18_run
    state = h.backbone.state_dict()
    run_convert(str(run), tmp_path / "d2.pth", "detectron2")
    run_convert(str(run), tmp_path / "mmdet.pth", "mmdet")
    d2 = detectron2_to_torchvision(torch.load(tmp_path / "d2.pth")["model"])
    _assert_same(d2, {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    _assert_same(mmdet_to_torchvision(torch.load(tmp_path / "mmdet.pth")["state_dict"]), state)


@pytest.mark.parametrize("fmt", ["hf", "timm", "opera"])
def test_a_vit_reads_back_with_equal_tensors_and_features(fmt, tmp_path):
    """deit_small (12 heads, unlike timm's vit_small's 6) at 32 px: same tensors and same function."""
    from opera.evals.export import write_format
    from opera.weights import read_weights

    bb = create_backbone("deit_small", img_size=32).eval()
    out = tmp_path / {"hf": "hf", "timm": "b.safetensors", "opera": "backbone.safetensors"}[fmt]
    write_format(bb, fmt, out, {})
    back = read_weights(str(out), backbone="deit_small").backbone.eval()
    _assert_same(back.state_dict(), bb.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pooled_features(back, x), pooled_features(bb, x))


def test_convert_between_two_formats_on_the_command_line(r18_run, tmp_path, capsys):
    """opera run -> MoCo-v3 checkpoint -> hf folder -> torchvision state dict: the tensors never change."""
    from tests.cli.test_bad_inputs import run_cli

    from opera.weights import read_weights

    run, h = r18_run
    steps = [(str(run), tmp_path / "m.pth.tar", "mocov3"), (str(tmp_path / "m.pth.tar"), tmp_path / "hf", "hf"),
             (str(tmp_path / "hf"), tmp_path / "tv.pth", "torchvision")]
    for src, out, fmt in steps:
        code, stdout, err = run_cli(["convert", src, str(out), "--format", fmt], capsys)
        assert code == 0, err
        assert len(stdout.strip().splitlines()) == 1 and f"; wrote {out} as {fmt}: " in stdout
    back = read_weights(str(tmp_path / "tv.pth"), backbone="resnet18")
    _assert_same(back.backbone.state_dict(), h.backbone.state_dict())


def test_convert_refuses_in_one_line(r18_run, tmp_path, capsys):
    from tests.cli.test_bad_inputs import assert_one_line_error, run_cli

    run, _ = r18_run
    cases = [
        (["convert", str(run), str(tmp_path / "x"), "--format", "onnx"], "valid: opera, timm, torchvision"),
        (["convert", str(run), str(tmp_path), "--format", "mocov3"], f"{tmp_path} is a folder; --format mocov3 writes a file"),
        (["convert", str(run), str(run / "last.pt"), "--format", "timm"], "holds the weights being read"),
        (["convert", str(run), str(tmp_path / "b.pth"), "--format", "opera"], "--format opera writes a safetensors file"),
        (["convert", str(run), str(run), "--format", "hf"], f"{run} holds the weights being read"),
        (["convert", str(run), str(run.parent), "--format", "hf"], f"{run.parent} is not empty ("),
    ]
    for args, needle in cases:
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, needle)
    (tmp_path / "tiny_run").mkdir()
    tiny, _ = _run(tmp_path / "tiny_run", "resnet_tiny", 32)
    write_hf(create_backbone("resnet_tiny", img_size=32), tmp_path / "hf")
    code, _, err = run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "hf"), "--format", "hf"], capsys)
    assert_one_line_error(code, err, f"{tmp_path / 'hf'} holds the weights being read")
    code, _, err = run_cli(["convert", str(tiny), str(tmp_path / "t.pth.tar"), "--format", "mocov3"], capsys)
    assert_one_line_error(code, err, "is built by none of the ResNets main_lincls.py builds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny_run"]
