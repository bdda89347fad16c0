"""The dense models hold the pretrained backbone unchanged; the digit scenes are what they claim."""

import numpy as np
import pytest
import torch

from opera.errors import OperaError
from opera.evals.common import load_eval_backbone
from opera.evals.dense import dense_config
from opera.evals.dense.models import DenseBackbone, load_body
from opera.evals.dense.run import build_model


def _equal_states(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_backbone_in_the_dense_model_equals_the_pretrained_one(trained_run, task):
    loaded = load_eval_backbone(str(trained_run), data=None)
    cfg = dense_config(task, checkpoint=str(trained_run), output="unused")
    model = build_model(cfg, loaded, num_classes=5)
    _equal_states(model.backbone.body.state_dict(), loaded.model.state_dict())
    # the detector really runs on it: its first feature map is the body's layer1 output
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = DenseBackbone.forward(model.backbone, x)
        ref = loaded.model.eval().forward_intermediates(x, indices=4, intermediates_only=True)
    assert torch.equal(feats[0], ref[0]) and [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_strict_load_refuses_a_state_with_missing_or_extra_keys(trained_run):
    loaded = load_eval_backbone(str(trained_run), data=None)
    state = dict(loaded.model.state_dict())
    state.pop("layer4.0.conv1.weight")
    with pytest.raises(OperaError, match="missing.*layer4.0.conv1.weight"):
        load_body(loaded.spec, state, "ckpt")
    state = {**loaded.model.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(OperaError, match="unexpected.*extra.weight"):
        load_body(loaded.spec, state, "ckpt")


def test_dilated_body_keeps_the_weights_and_gives_stride_8(trained_run):
    loaded = load_eval_backbone(str(trained_run), data=None)
    body = load_body(loaded.spec, loaded.model.state_dict(), "ckpt", output_stride=8)
    _equal_states(body.state_dict(), loaded.model.state_dict())
    feats = DenseBackbone(body)(torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]


def test_vit_simple_feature_pyramid_gives_strides_4_to_32():
    loaded = load_eval_backbone("random:vit_tiny", img_size=32, data=None)
    cfg = dense_config("detection", checkpoint="random:vit_tiny", output="unused")
    model = build_model(cfg, loaded, num_classes=3)
    body = model.backbone.body
    state = body.state_dict()
    for k, v in loaded.model.state_dict().items():
        if k != "pos_embed":  # resized to the 64 px scenes; every other weight is the pretrained one
            assert torch.equal(state[k], v), k
    feats = DenseBackbone.forward(model.backbone, torch.rand(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and all(f.shape[1] == cfg.vit_channels for f in feats)


def test_digit_scenes_targets_agree_with_each_other():
    from opera.data.digit_scenes import DigitScenes, SceneConfig

    cfg = SceneConfig(train_scenes=20, val_scenes=10)
    ds = DigitScenes("digit_scenes:7-9", "train", cfg)
    again = DigitScenes("digit_scenes:7-9", "train", cfg)
    assert ds.num_classes == 3 and len(ds) == 20
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert torch.equal(img, again[i][0])  # fixed by (seed, split, index)
        assert len(t["labels"]) >= 1 and set(t["labels"].tolist()) <= {1, 2, 3}
        for box, mask, label in zip(t["boxes"], t["masks"].bool(), t["labels"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert (t["semantic"][mask] == label).all()
        assert (t["masks"].sum(0) <= 1).all()  # occlusion: every pixel belongs to one instance at most
        assert torch.equal(t["semantic"] > 0, t["masks"].sum(0) > 0)
    val = DigitScenes("digit_scenes:7-9", "val", cfg)
    assert not torch.equal(val[0][0], ds[0][0])


def test_digit_scenes_draw_train_and_val_from_disjoint_digits():
    from opera.data.digit_scenes import _digit_pool

    tr, ytr = _digit_pool("train", (7, 8, 9))
    va, yva = _digit_pool("val", (7, 8, 9))
    assert set(np.unique(ytr)) == set(np.unique(yva)) == {7, 8, 9}
    assert len(va) / (len(tr) + len(va)) == pytest.approx(0.2, abs=0.01)
    flat = {x.tobytes() for x in tr}
    assert sum(x.tobytes() in flat for x in va) <= 2  # sklearn's digits hold a few exact duplicates


def test_bad_scene_specs_are_one_line_errors():
    from opera.data.digit_scenes import parse_scenes_spec

    with pytest.raises(OperaError, match="digit_scenes:7-9"):
        parse_scenes_spec("scenes:1")
    with pytest.raises(OperaError, match="outside"):
        parse_scenes_spec("digit_scenes:8-12")
