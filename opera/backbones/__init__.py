"""Backbones by name, all speaking timm's interface.

Every backbone is a timm model with ``num_classes=0`` (``num_features``, ``forward_features``,
``forward_head(x, pre_logits=True)``), so any timm model plugs in by name and the trained weights
load straight back into ``timm.create_model(spec.timm_name, **spec.timm_kwargs)``.
"""

from opera.backbones.factory import (
    BACKBONES,
    BackboneSpec,
    backbone_names,
    create_backbone,
    feature_dim,
    get_spec,
    guard_image_size,
    is_token_backbone,
    pooled_features,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "backbone_names",
    "create_backbone",
    "feature_dim",
    "get_spec",
    "guard_image_size",
    "is_token_backbone",
    "pooled_features",
]
