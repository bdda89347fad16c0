"""Dense models around a pretrained backbone: the multi-scale features, the segmentation heads,
and torchvision's Mask R-CNN / Faster R-CNN with an FPN.

The pretrained backbone always sits, unchanged, at ``model.backbone.body``: it is rebuilt from its
timm spec and loaded with ``strict=True`` (:func:`load_body`), so a missing or unexpected key is
an error and the detector or segmenter starts from exactly the pretrained weights.

* CNNs (ResNets, any timm CNN with ``forward_intermediates``): the last four stages (strides 4,
  8, 16, 32 for a ResNet; ``output_stride=8`` gives the dilated R50-D8 of mmseg's FCN).
* ViTs: ViTDet's *simple feature pyramid* (Li et al. 2022): the last block's patch map alone,
  turned into strides 4/8/16/32 by stride-2 transposed convolutions (finer) and max pooling
  (coarser), each followed by a 1x1 and a 3x3 convolution with LayerNorm.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opera.errors import OperaError

STRIDES = (4, 8, 16, 32)


def load_body(spec: dict[str, Any], state: dict[str, torch.Tensor], source: str, **extra: Any) -> nn.Module:
    """``timm.create_model(spec)`` (plus ``extra`` options such as ``output_stride``) with the
    pretrained ``state`` loaded strictly."""
    import timm

    if not spec.get("timm_name"):
        raise OperaError(f"checkpoint {source} carries no timm spec; dense transfer needs an opera or timm backbone")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("timm_kwargs", {}).items()}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    kwargs["num_classes"] = 0
    try:
        body = timm.create_model(spec["timm_name"], pretrained=False, **kwargs)
    except TypeError as exc:
        raise OperaError(f"backbone {spec.get('name')!r} does not take {sorted(extra)} ({exc}); drop that dense option") from None
    result = body.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise OperaError(f"checkpoint {source} does not fit {spec['timm_name']} (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); pass the backbone it was trained with")
    return body


def _is_vit(body: nn.Module) -> bool:
    from opera.backbones import is_token_backbone

    return is_token_backbone(body)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``N x C x H x W`` map (ViTDet's norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the last block (patch stride ``p``) to ``strides``."""

    def __init__(self, dim: int, patch: int, channels: int, strides: tuple[int, ...] = STRIDES):
        super().__init__()
        self.stages = nn.ModuleList()
        for s in strides:
            layers: list[nn.Module] = []
            c = dim
            if s < patch:
                steps = int(round(math.log2(patch / s)))
                if 2 ** steps * s != patch:
                    raise OperaError(f"patch size {patch} is not a power-of-two multiple of stride {s}; use a patch size of 4, 8, 16 or 32")
                for i in range(steps):
                    layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                    c //= 2
                    if i < steps - 1:
                        layers += [LayerNorm2d(c), nn.GELU()]
            elif s > patch:
                layers.append(nn.MaxPool2d(s // patch, stride=s // patch))
            layers += [nn.Conv2d(c, channels, 1, bias=False), LayerNorm2d(channels),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]


class DenseBackbone(nn.Module):
    """``body`` (the pretrained timm backbone) -> feature maps at strides 4, 8, 16, 32."""

    def __init__(self, body: nn.Module, vit_channels: int = 256):
        super().__init__()
        self.body = body
        self.pyramid: SimpleFeaturePyramid | None = None
        if _is_vit(body):
            patch = body.patch_embed.patch_size[0]
            self.pyramid = SimpleFeaturePyramid(body.embed_dim, patch, vit_channels)
            self.channels = [vit_channels] * len(STRIDES)
        else:
            if not hasattr(body, "forward_intermediates") or not getattr(body, "feature_info", None):
                raise OperaError(f"backbone {type(body).__name__} has no timm forward_intermediates/feature_info; use a ResNet, ConvNeXt or ViT")
            self.channels = [int(f["num_chs"]) for f in body.feature_info[-4:]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.pyramid is not None:
            last = self.body.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
            return self.pyramid(last)
        return list(self.body.forward_intermediates(x, indices=4, intermediates_only=True))


def prepare_vit(body: nn.Module, img_size: int) -> None:
    """Resize a ViT's position embedding to ``img_size`` (dense inputs are larger than the
    pretraining crops); the other weights are untouched."""
    if _is_vit(body) and tuple(body.patch_embed.img_size) != (img_size, img_size):
        body.set_input_size(img_size=(img_size, img_size))


# ----------------------------------------------------------------------------- segmentation
def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's ``UPerHead``: a pyramid pooling module on the
    coarsest map, FPN laterals with a top-down path, 3x3 FPN convs, every level upsampled to
    stride 4 and concatenated, a 3x3 fusion conv, dropout 0.1 and a 1x1 classifier."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1)) for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(lv) for conv, lv in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.fuse(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    """FCN (Shelhamer et al. 2017) as mmseg's ``FCNHead``: ``num_convs`` 3x3 convs on one map,
    the input concatenated back (``concat_input``), dropout 0.1 and a 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 2, concat_input: bool = True):
        super().__init__()
        convs = [conv_bn_relu(in_channels if i == 0 else channels, channels) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.concat = conv_bn_relu(in_channels + channels, channels) if concat_input else None
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.concat is not None:
            y = self.concat(torch.cat([x, y], 1))
        return self.classifier(y)


class LinearHead(nn.Module):
    """A dense linear probe (DINOv2's linear segmentation head, all levels): every map upsampled
    to stride 4, concatenated, BatchNorm, one 1x1 convolution. With ``freeze_backbone`` it
    measures the frozen features, not what a deep head can learn on top of them."""

    def __init__(self, in_channels: list[int], num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(in_channels))
        self.classifier = nn.Conv2d(sum(in_channels), num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]], 1)
        return self.classifier(self.bn(x))


class Segmenter(nn.Module):
    """Backbone + decode head (+ an auxiliary FCN head on the stride-16 map, as mmseg's
    UperNet configs use with weight 0.4). ``forward`` gives logits at the input size."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, head: str = "upernet", channels: int = 128,
                 aux_channels: int = 0):
        super().__init__()
        self.backbone = backbone
        ch = backbone.channels
        if head == "upernet":
            self.decode_head: nn.Module = UperNetHead(ch, channels, num_classes)
        elif head == "fcn":
            self.decode_head = FCNHead(ch[-1], channels, num_classes)
        elif head == "linear":
            self.decode_head = LinearHead(ch, num_classes)
        else:
            raise OperaError(f"unknown segmentation head {head!r}; valid: upernet, fcn, linear")
        self.head = head
        self.aux_head = FCNHead(ch[2], aux_channels, num_classes, num_convs=1, concat_input=False) if aux_channels else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone(x)
        logits = self.decode_head(feats[-1] if self.head == "fcn" else feats)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(feats[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux


# ----------------------------------------------------------------------------- detection
class FPNBackbone(DenseBackbone):
    """:class:`DenseBackbone` + torchvision's ``FeaturePyramidNetwork`` with the extra max-pool
    level (P2-P6): the backbone torchvision's R-CNNs expect (``out_channels``)."""

    def __init__(self, body: nn.Module, out_channels: int = 256, vit_channels: int = 256):
        super().__init__(body, vit_channels)
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.fpn = FeaturePyramidNetwork(self.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":  # type: ignore[override]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(super().forward(x))))


def build_detector(body: nn.Module, num_classes: int, *, masks: bool = True, fpn_channels: int = 256, vit_channels: int = 256,
                   anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512), min_size: int = 800, max_size: int = 1333,
                   box_representation: int = 1024, mask_channels: int = 256, mask_convs: int = 4,
                   rpn_batch: int = 256, roi_batch: int = 512, rpn_pre_nms: tuple[int, int] = (2000, 1000),
                   rpn_post_nms: tuple[int, int] = (2000, 1000), image_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                   image_std: tuple[float, ...] = (0.229, 0.224, 0.225), detections: int = 100) -> nn.Module:
    """torchvision's Mask R-CNN (``masks``) or Faster R-CNN on :class:`FPNBackbone` of ``body``.

    The defaults are torchvision's ``maskrcnn_resnet50_fpn`` (= Detectron's R50-FPN: 256-channel
    FPN, anchors 32-512 over P2-P6 at ratios 0.5/1/2, a 2x1024 MLP box head, four 256-channel mask
    convs); ``num_classes`` counts the object classes (the background is added)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    if len(anchor_sizes) != 5:
        raise OperaError(f"anchor_sizes needs one size per FPN level P2-P6 (5), got {list(anchor_sizes)}")
    backbone = FPNBackbone(body, fpn_channels, vit_channels)
    common: dict[str, Any] = dict(
        min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
        rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=roi_batch,
        rpn_pre_nms_top_n_train=rpn_pre_nms[0], rpn_pre_nms_top_n_test=rpn_pre_nms[1],
        rpn_post_nms_top_n_train=rpn_post_nms[0], rpn_post_nms_top_n_test=rpn_post_nms[1],
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_representation),
        box_predictor=FastRCNNPredictor(box_representation, num_classes + 1), box_detections_per_img=detections,
    )
    if not masks:
        return FasterRCNN(backbone, num_classes=None, **common)
    return MaskRCNN(backbone, num_classes=None, mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * mask_convs, 1),
                    mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1), **common)
