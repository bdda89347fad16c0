"""Export round trips: timm, torchvision (Mask R-CNN / FCN backbones), detectron2 and mmdet names."""

from pathlib import Path

import pytest
import torch

from opera.errors import OperaError
from opera.evals.common import load_eval_backbone
from opera.evals.export import (
    ExportConfig,
    convert,
    detectron2_to_torchvision,
    mmdet_to_torchvision,
    run_export,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """A random ResNet-50 backbone exported to torchvision format."""
    out = tmp_path_factory.mktemp("r50_tv")
    res = run_export(ExportConfig(checkpoint="random:resnet50", format="torchvision", output=str(out)))
    loaded = load_eval_backbone("random:resnet50")
    return loaded, Path(res["metrics"]["file"]), res


def test_torchvision_loads_into_maskrcnn_and_fcn_backbones(r50):
    import torchvision

    loaded, path, res = r50
    state = torch.load(path, weights_only=True)
    assert res["metrics"]["tensors"] == len(state) and not any(k.startswith("fc.") for k in state)
    body = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.body
    missing, unexpected = body.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    fcn = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False).backbone
    fcn.load_state_dict(state, strict=True)
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    # same function: torchvision's ResNet-50 with the exported weights == the opera backbone
    tv.eval()
    body.eval()
    loaded.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = loaded.model.forward_features(x)
        got = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(body(x)["3"], ref, rtol=1e-4, atol=1e-4)


def test_detectron2_and_mmdet_names_match_the_published_resnet50_keys(r50):
    loaded, path, _ = r50
    tv = torch.load(path, weights_only=True)
    d2 = convert(loaded.model.state_dict(), "detectron2")
    expected = _fixture("detectron2_R50_keys.txt")
    assert set(d2) == set(expected)
    assert {k: tuple(v.shape) for k, v in d2.items()} == expected
    mm = convert(loaded.model.state_dict(), "mmdet")
    expected = _fixture("mmdet_R50_keys.txt")
    assert set(mm) == set(expected)
    assert {k: tuple(v.shape) for k, v in mm.items()} == expected
    # round trips back to torchvision names
    back = detectron2_to_torchvision(d2)
    assert set(back) == {k for k in tv if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(back[k], tv[k]) for k in back)
    back = mmdet_to_torchvision(mm)
    assert set(back) == set(tv) and all(torch.equal(back[k], tv[k]) for k in back)


def test_detectron2_and_mmdet_files(trained_run, tmp_path):
    d2 = run_export(ExportConfig(checkpoint=str(trained_run), format="detectron2", output=str(tmp_path / "d2")))
    obj = torch.load(d2["metrics"]["file"], weights_only=True)
    assert obj["__author__"] == "opera" and obj["matching_heuristics"] is True
    assert "stem.conv1.weight" in obj["model"] and "res2.0.conv1.norm.weight" in obj["model"]
    assert "res3.0.shortcut.weight" in obj["model"] and "res5.0.shortcut.norm.running_var" in obj["model"]
    mm = run_export(ExportConfig(checkpoint=str(trained_run), format="mmdet", output=str(tmp_path / "mm")))
    obj = torch.load(mm["metrics"]["file"], weights_only=True)
    assert all(k.startswith("backbone.") for k in obj["state_dict"]) and "backbone.layer1.0.bn1.weight" in obj["state_dict"]
    assert d2["checkpoint"]["sha256"] == mm["checkpoint"]["sha256"] is not None


def test_timm_round_trip(trained_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    res = run_export(ExportConfig(checkpoint=str(trained_run), format="timm", output=str(tmp_path)))
    path = res["metrics"]["file"]
    spec = res["checkpoint"]["backbone_spec"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["timm_kwargs"].items() if k != "num_classes"}
    model = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(load_file(path), strict=True)
    fresh = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **kwargs)
    timm.models.load_checkpoint(fresh, path, strict=True)
    original = load_eval_backbone(str(trained_run)).model
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(fresh.state_dict()[k], v)


def test_vit_exports_to_timm_only(tmp_path):
    res = run_export(ExportConfig(checkpoint="random:vit_tiny", format="timm", output=str(tmp_path)))
    assert res["metrics"]["file"].endswith(".safetensors")
    with pytest.raises(OperaError, match="not a torchvision-style ResNet.*--format timm"):
        run_export(ExportConfig(checkpoint="random:vit_tiny", format="detectron2", output=str(tmp_path)))


def test_wrong_format_name(trained_run, tmp_path):
    with pytest.raises(OperaError, match=r"unknown --format 'torchvison' \(did you mean torchvision\?\)") as exc:
        run_export(ExportConfig(checkpoint=str(trained_run), format="torchvison", output=str(tmp_path)))
    assert "\n" not in str(exc.value)
