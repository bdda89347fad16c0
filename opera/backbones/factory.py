"""The backbone registry: opera's named backbones and a fall-through to any timm model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sys

import torch
from torch import nn

from opera.backbones.vit import mocov3_vit_init
from opera.errors import OperaError, suggest
from opera.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """How a backbone was built: enough to rebuild it in timm without opera."""

    name: str  # opera's name (``resnet50``, ``vit_tiny``, or a timm name)
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timm_name": self.timm_name, "timm_kwargs": dict(self.timm_kwargs)}


Builder = Callable[..., tuple[str, dict[str, Any], Callable[[nn.Module], None] | None]]
BACKBONES: Registry[Builder] = Registry("backbone")


@BACKBONES.register("resnet50")
def _resnet50(img_size: int = 224, **kw: Any):
    """ResNet-50 with the last BN of every residual block zero-initialised (MoCo-v3)."""
    return "resnet50", {"zero_init_last": True, **kw}, None


@BACKBONES.register("resnet18")
def _resnet18(img_size: int = 224, **kw: Any):
    return "resnet18", {"zero_init_last": True, **kw}, None


@BACKBONES.register("resnet_tiny")
def _resnet_tiny(img_size: int = 32, **kw: Any):
    """A narrow ResNet (one BasicBlock per stage, widths 32-256) that trains on 2 CPU cores."""
    return "resnet18", {"layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256), "zero_init_last": True, **kw}, None


def _vit(timm_name: str, default_patch: int, default_stop_grad: bool, **arch: Any):
    """A MoCo-v3 ViT on timm's ``timm_name``; ``arch`` overrides timm's architecture (and is kept in
    the spec's ``timm_kwargs``, so the exported weights rebuild the same network)."""

    def build(img_size: int = 224, patch_size: int | None = None, stop_grad_patch_embed: bool | None = None, **kw: Any):
        patch = patch_size or default_patch
        if img_size % patch:
            raise OperaError(f"image size {img_size} is not a multiple of the patch size {patch}; choose --patch-size dividing {img_size}")
        stop_grad = default_stop_grad if stop_grad_patch_embed is None else stop_grad_patch_embed
        kwargs = {"img_size": img_size, "patch_size": patch, **arch, **kw}
        return timm_name, kwargs, lambda m: mocov3_vit_init(m, stop_grad_patch_embed=stop_grad)

    return build


BACKBONES.register("vit_tiny")(_vit("vit_tiny_patch16_224", default_patch=0, default_stop_grad=False))
# MoCo-v3's ``vits.vit_small`` (the paper's DeiT-S): embed 384, depth 12, **12 heads** (head dim 32),
# mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6. timm's vit_small_patch16_224 has the same parameter
# shapes but 6 heads (head dim 64), so the head count is set explicitly: same tensors, other attention.
BACKBONES.register("deit_small")(_vit("vit_small_patch16_224", default_patch=16, default_stop_grad=True, num_heads=12))
BACKBONES.register("deit_base")(_vit("vit_base_patch16_224", default_patch=16, default_stop_grad=True))


def backbone_names() -> list[str]:
    return BACKBONES.names()


def _resolve(name: str, img_size: int, options: dict[str, Any]) -> tuple[str, dict[str, Any], Callable | None]:
    if name in BACKBONES:
        if name == "vit_tiny" and not options.get("patch_size"):
            options = {**options, "patch_size": max(2, img_size // 8)}
        return BACKBONES.get(name)(img_size=img_size, **options)
    import timm  # where a model is built: importing opera (and forking its DataLoader workers) needs none

    timm_name = name[len("timm:"):] if name.startswith("timm:") else name
    if timm_name in timm.list_models():
        kwargs = dict(options)
        if "vit" in timm_name or "deit" in timm_name:
            kwargs.setdefault("img_size", img_size)
        return timm_name, kwargs, None
    raise OperaError(
        f"unknown backbone {name!r}{suggest(name, BACKBONES.names() + timm.list_models())}; "
        f"use one of {', '.join(BACKBONES.names())} or any name from timm.list_models()"
    )


def create_backbone(name: str, img_size: int = 224, **options: Any) -> nn.Module:
    """Build backbone ``name`` without a classifier; its spec is kept in ``model.opera_spec``.

    ``options`` go to timm (e.g. ``patch_size``, ``drop_path_rate``) except
    ``stop_grad_patch_embed`` for the MoCo-v3 ViTs.
    """
    options = {k: v for k, v in options.items() if v is not None}
    timm_name, kwargs, post_init = _resolve(name, img_size, options)
    kwargs = {**kwargs, "num_classes": 0}
    try:
        import timm

        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except TypeError as exc:  # an option this architecture does not take
        raise OperaError(f"backbone {name!r} does not accept these options {sorted(options)}: {exc}") from None
    if post_init is not None:
        post_init(model)
    guard_image_size(model, name)
    model.opera_spec = BackboneSpec(name, timm_name, {k: v for k, v in kwargs.items()})
    return model


def guard_image_size(model: nn.Module, name: str) -> None:
    """A one-line error, instead of timm's AssertionError, when a fixed-size ViT gets another size
    (a no-op for other models)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not _is_vit(model):
        return
    if not getattr(embed, "strict_img_size", True) or getattr(embed, "dynamic_img_size", False) or embed.img_size is None:
        return
    want = tuple(embed.img_size)

    def check(_module: nn.Module, args: tuple) -> None:
        got = tuple(args[0].shape[-2:])
        if got != want:
            raise OperaError(
                f"backbone {name!r} was built for {want[0]}x{want[1]} images but got {got[0]}x{got[1]}; "
                f"build it for {got[0]} (--img-size {got[0]}, or backbone.img_size={got[0]} in a config) "
                f"or feed {want[0]}x{want[1]} images"
            )

    embed.register_forward_pre_hook(check)


def get_spec(backbone: nn.Module) -> BackboneSpec | None:
    return getattr(backbone, "opera_spec", None)


def feature_dim(backbone: nn.Module) -> int:
    """Width of y = ``forward_head(..., pre_logits=True)``: timm's ``head_hidden_size`` where the head
    has its own hidden layer (MobileNetV3: 288 channels -> 1024), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _is_vit(model: nn.Module) -> bool:
    """``isinstance(model, timm's VisionTransformer)``, importing nothing: until timm's module is
    imported, no such model exists."""
    vit = sys.modules.get("timm.models.vision_transformer")
    return vit is not None and isinstance(model, vit.VisionTransformer)


def is_token_backbone(backbone: nn.Module) -> bool:
    """True for ViT-style backbones whose patch tokens can be masked (the ``mask`` space)."""
    return _is_vit(backbone)


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image representation y (Eq. 8): timm's pre-logits output (pooled map or class token)."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)
