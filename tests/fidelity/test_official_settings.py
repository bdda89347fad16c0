"""opera against the official MoCo-v3/OPERA code at the settings the paper trains with.

Each test here failed before the fix it names: DeiT-S heads, AdamW decay, the class head width,
tau by backbone family, fp16 with a GradScaler, and the momentum coefficient's timing.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from opera.backbones import create_backbone
from opera.configs import apply_overrides, load_config
from opera.engine.optim import build_optimizer, ema_momentum_at
from opera.engine.step import make_grad_scaler, train_step
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy

CPU = torch.device("cpu")


def tiny(spec: str = "self,full", backbone: str = "resnet_tiny", **options) -> SupervisionHierarchy:
    torch.manual_seed(0)
    options.setdefault("self", {"mlp_dim": 32, "dim": 16})
    return SupervisionHierarchy.from_spec(spec, backbone=backbone, num_classes=4, img_size=32, **options)


def views(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], torch.randint(0, 4, (n,), generator=g)


# ----------------------------------------------------------------------------- DeiT-S = vits.vit_small
def test_deit_small_is_moco_v3_vit_small_with_12_heads():
    """``vits.vit_small``: patch 16, embed 384, depth 12, 12 heads, mlp_ratio 4, qkv_bias, LN eps 1e-6."""
    m = create_backbone("deit_small", img_size=32)
    assert m.embed_dim == 384 and len(m.blocks) == 12 and m.patch_embed.patch_size == (16, 16)
    for block in m.blocks:
        assert block.attn.num_heads == 12 and block.attn.head_dim == 32
        assert block.attn.qkv.bias is not None
        assert block.mlp.fc1.out_features == 4 * 384
        assert block.norm1.eps == 1e-6
    assert m.opera_spec.timm_kwargs["num_heads"] == 12
    base = create_backbone("deit_base", img_size=32)
    assert base.embed_dim == 768 and base.blocks[0].attn.num_heads == 12


def test_exported_deit_small_rebuilds_with_12_heads_everywhere(tmp_path):
    """The metadata of backbone.safetensors and of the timm export carry num_heads; timm, opera's
    loader and finetuning rebuild the 12-head network (a 6-head one would load the same tensors)."""
    from safetensors import safe_open

    from opera.engine.checkpoint import export_backbone, load_backbone
    from opera.evals.export import write_export

    m = create_backbone("deit_small", img_size=32)
    path = export_backbone(m, tmp_path / "backbone.safetensors", {})
    with safe_open(str(path), "pt") as f:
        spec = json.loads(f.metadata()["spec"])
    rebuilt = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0,
                                **{k: v for k, v in spec["timm_kwargs"].items() if k != "num_classes"})
    assert rebuilt.blocks[0].attn.num_heads == 12
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    m.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), m(x))
    assert load_backbone(path).blocks[0].attn.num_heads == 12

    timm_file = write_export(m.state_dict(), "timm", tmp_path / "backbone_timm.safetensors", m.opera_spec.to_dict(), {})
    with safe_open(str(timm_file), "pt") as f:
        assert json.loads(f.metadata()["opera_spec"])["timm_kwargs"]["num_heads"] == 12

    from opera.evals.common import LoadedBackbone
    from opera.evals.finetune import build_classifier

    loaded = LoadedBackbone(m, "test", "checkpoint", spec=m.opera_spec.to_dict(), img_size=32)
    assert build_classifier(loaded, num_classes=3).blocks[0].attn.num_heads == 12


def test_vit_fed_another_image_size_is_a_one_line_error_naming_both_sizes():
    m = create_backbone("vit_tiny", img_size=32)
    with pytest.raises(OperaError) as info:
        m(torch.randn(1, 3, 64, 64))
    msg = str(info.value)
    assert "32x32" in msg and "64x64" in msg and "--img-size 64" in msg and "\n" not in msg
    m(torch.randn(1, 3, 32, 32))  # the size it was built for still runs


# ----------------------------------------------------------------------------- AdamW decays everything
def test_adamw_decays_every_parameter_as_main_moco_does():
    """``torch.optim.AdamW(model.parameters(), lr, weight_decay=wd)``: biases and norm affines decay too."""
    h = tiny()
    opt = build_optimizer(h, "adamw", lr=1e-3, weight_decay=0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in h.parameters() if p.requires_grad]
    assert len(decays) == len(trainable) and set(decays.values()) == {0.1}
    bias = h.spaces["self"].projector[1].bias  # a BatchNorm bias (1-D)
    bias.data.fill_(1.0)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(bias.detach(), torch.full_like(bias, 1.0 - 1e-3 * 0.1))  # decoupled decay applied


def test_excluding_1d_parameters_from_adamw_decay_is_a_named_option():
    h = tiny()
    opt = build_optimizer(h, "adamw", lr=1e-3, weight_decay=0.1, exclude_1d=True)
    for g in opt.param_groups:
        assert all((p.ndim > 1) == (g["weight_decay"] == 0.1) for p in g["params"])
    assert load_config("deits_300ep_b1024").optim.exclude_1d_decay is False
    assert apply_overrides(load_config("deits_300ep_b1024"), ["optim.exclude_1d_decay=true"]).optim.exclude_1d_decay


def test_lars_still_exempts_1d_parameters():
    h = tiny()
    opt = build_optimizer(h, "lars", lr=0.1, weight_decay=1e-6)
    for g in opt.param_groups:
        assert all((p.ndim > 1) == g["lars"] for p in g["params"])
        assert g["weight_decay"] == (1e-6 if g["lars"] else 0.0)


# ----------------------------------------------------------------------------- class head width, tau
@pytest.mark.parametrize("dim", [16, 64])
def test_class_head_hidden_width_follows_the_instance_dim(dim):
    """Official: ``_build_mlp(2, dim, dim, num_classes)``."""
    h = tiny(self={"mlp_dim": 32, "dim": dim})
    head = h.spaces["full"].class_head
    assert head[0].out_features == dim and head[-1].in_features == dim and head[-1].out_features == 4


def test_explicit_class_head_width_overrides_the_instance_dim():
    h = tiny(self={"mlp_dim": 32, "dim": 16}, full={"hidden": 48})
    assert h.spaces["full"].class_head[0].out_features == 48


@pytest.mark.parametrize("backbone,tau", [("resnet_tiny", 1.0), ("vit_tiny", 0.2)])
def test_temperature_defaults_by_backbone_family(backbone, tau):
    """MoCo-v3: ``--moco-t`` 1.0 (its default) for ResNets, 0.2 for ViTs."""
    h = tiny("self", backbone, self={"mlp_dim": 32, "dim": 16})
    assert h.spaces["self"].resolved_temperature == tau
    assert h.describe()["derived"]["self"]["temperature"] == tau
    explicit = tiny("self", backbone, self={"mlp_dim": 32, "dim": 16, "temperature": 0.5})
    assert explicit.spaces["self"].resolved_temperature == 0.5


# ----------------------------------------------------------------------------- the momentum coefficient
def test_momentum_update_runs_before_the_forward_with_this_steps_m():
    """MoCo-v3's ``builder.forward``: EMA with m_t first, then the keys of step t. With m = 0 the
    momentum encoder after the step equals the online encoder *before* the optimizer step."""
    h = tiny()
    opt = build_optimizer(h, "sgd", lr=0.5, weight_decay=0.0)
    before = {k: v.clone() for k, v in h.backbone.state_dict().items()}
    x, y = views()
    train_step(h, h, opt, x, y, lr=0.5, ema_momentum=0.0, device=CPU)
    target = h.teacher.backbone.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], h.backbone.state_dict()[k])]
    assert moved, "the optimizer step changed nothing"
    for k in moved:
        if "running" not in k:
            torch.testing.assert_close(target[k], before[k])


@pytest.mark.slow
def test_each_steps_keys_come_after_the_ema_with_that_steps_m(tmp_path, monkeypatch):
    """At the start of step i's forward, the last EMA used ema_momentum_at(epoch + i / steps), the m
    of step i itself (before: the previous step's m, and no EMA at all before the first step)."""
    from opera.engine import pretrain

    last_m: list[float | None] = [None]
    seen_at_forward: list[float | None] = []
    update, forward = SupervisionHierarchy.momentum_update, SupervisionHierarchy.forward

    def record_update(self, m):
        last_m[0] = m
        return update(self, m)

    def record_forward(self, *args, state=None, **kwargs):
        if state is None:  # a new step starts (the second view continues it)
            seen_at_forward.append(last_m[0])
        return forward(self, *args, state=state, **kwargs)

    monkeypatch.setattr(SupervisionHierarchy, "momentum_update", record_update)
    monkeypatch.setattr(SupervisionHierarchy, "forward", record_forward)
    cfg = apply_overrides(load_config("cpu_digits"), [
        "train.epochs=2", "train.batch_size=256", "train.knn_every=0", "self.mlp_dim=32", "self.dim=16",
        "optim.ema_momentum=0.9", "optim.ema_cosine=true", "train.save_every_epochs=0",
    ])
    pretrain.run_pretrain(cfg, tmp_path / "run")
    n = 1437 // 256  # steps per epoch of the digits training split at batch 256
    want = [ema_momentum_at(e + i / n, 2, 0.9, True) for e in range(2) for i in range(n)]
    assert seen_at_forward == pytest.approx(want, abs=0, rel=1e-15)
    assert seen_at_forward[0] == 0.9 and seen_at_forward[-1] > seen_at_forward[0]


# ----------------------------------------------------------------------------- fp16 + GradScaler
def test_fp16_overflow_skips_the_step_and_lowers_the_scale_instead_of_stopping():
    h = tiny()
    opt = build_optimizer(h, "sgd", lr=0.1, weight_decay=0.0)
    scaler = make_grad_scaler(CPU, "fp16")
    x, y = views()
    x[0][0, 0, 0, 0] = float("inf")  # overflows the forward: a NaN loss
    params = [p.detach().clone() for p in h.parameters() if p.requires_grad]
    scale = scaler.get_scale()
    train_step(h, h, opt, x, y, lr=0.1, ema_momentum=0.99, device=CPU, amp="fp16", scaler=scaler)
    assert scaler.get_scale() == scale / 2
    for p, q in zip((p for p in h.parameters() if p.requires_grad), params):
        assert torch.equal(p.detach(), q)
    x, y = views(seed=1)
    train_step(h, h, opt, x, y, lr=0.1, ema_momentum=0.99, device=CPU, amp="fp16", scaler=scaler)
    assert any(not torch.equal(p.detach(), q) for p, q in zip((p for p in h.parameters() if p.requires_grad), params))


@pytest.mark.slow
def test_fp16_scaler_state_goes_into_the_checkpoint_and_comes_back_on_resume(tmp_path):
    from opera.engine import pretrain
    from opera.engine.checkpoint import load_state

    overrides = ["train.amp=fp16", "train.batch_size=256", "train.knn_every=0", "self.mlp_dim=32", "self.dim=16",
                 "train.save_every_epochs=0"]
    out = tmp_path / "run"
    pretrain.run_pretrain(apply_overrides(load_config("cpu_digits"), overrides + ["train.epochs=1"]), out)
    state = load_state(out / "last.pt")
    assert "scale" in state["scaler"] and state["scaler"]["_growth_tracker"] >= 1
    # poke a recognisable scale into the checkpoint: the resumed run must continue from it
    state["scaler"]["scale"] = 512.0
    torch.save(state, out / "last.pt")
    seen: list[float] = []
    orig = torch.amp.GradScaler.load_state_dict
    torch.amp.GradScaler.load_state_dict = lambda self, sd: (seen.append(sd["scale"]), orig(self, sd))[1]
    try:
        pretrain.run_pretrain(apply_overrides(load_config("cpu_digits"), overrides + ["train.epochs=2"]), out)
    finally:
        torch.amp.GradScaler.load_state_dict = orig
    assert seen == [512.0]
    assert load_state(out / "last.pt")["scaler"]["scale"] >= 512.0
