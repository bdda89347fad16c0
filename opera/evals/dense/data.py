"""Dense datasets from a data spec, and their train-time augmentation.

* ``digit_scenes`` / ``digit_scenes:7-9``: the embedded scenes (:mod:`opera.data.digit_scenes`);
* ``coco=ROOT``: COCO instances, ``ROOT/annotations/instances_{train,val}2017.json`` with the
  images in ``ROOT/train2017/`` and ``ROOT/val2017/`` (read with pycocotools; never downloaded);
* ``ade20k=ROOT``: ADE20K's SceneParsing release, ``ROOT/ADEChallengeData2016/`` (or ROOT itself)
  with ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``;
  labels 1..150 become 0..149 and 0 ("other") is ignored (mmseg's ``reduce_zero_label``).

Every item is ``(image uint8 3xHxW, target)``. Detection targets hold ``boxes`` (x1y1x2y2),
``labels`` (1..K), ``masks`` (N x H x W uint8), ``image_id`` and ``size``; segmentation targets hold
``semantic`` (H x W int64, ``IGNORE`` = 255 for unlabelled pixels) and ``size``.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from opera.errors import OperaError

IGNORE = 255
COCO_WHERE = ("put COCO 2017 under ROOT as annotations/instances_train2017.json, annotations/instances_val2017.json, "
              "train2017/ and val2017/ (from cocodataset.org; nothing is downloaded)")
ADE_WHERE = ("put ADE20K's ADEChallengeData2016/ (images/{training,validation}/*.jpg, annotations/{training,validation}/*.png; "
             "from groups.csail.mit.edu/vision/datasets/ADE20K) under ROOT; nothing is downloaded")


@dataclass(frozen=True)
class DenseSpec:
    kind: str  # digit_scenes | coco | ade20k
    raw: str
    root: str | None = None


def parse_dense_spec(spec: str) -> DenseSpec:
    from opera.data.digit_scenes import NAME, parse_scenes_spec

    text = (spec or "").strip()
    if text == NAME or text.startswith(NAME + ":"):
        parse_scenes_spec(text)
        return DenseSpec("digit_scenes", text)
    for kind in ("coco", "ade20k"):
        if text.startswith(kind + "="):
            root = text[len(kind) + 1:].strip()
            if not root:
                raise OperaError(f"data spec {spec!r} names no folder; write {kind}=ROOT")
            return DenseSpec(kind, text, os.path.expanduser(root))
    raise OperaError(f"unknown dense data spec {spec!r}; write digit_scenes, digit_scenes:7-9, coco=ROOT or ade20k=ROOT")


# ----------------------------------------------------------------------------- COCO
class CocoInstances(Dataset):
    """COCO instances of one split; training keeps the images with at least one non-crowd object
    (as torchvision's detection reference does). Category ids map to labels 1..80 in id order."""

    def __init__(self, root: str, split: str):
        from pycocotools.coco import COCO

        year_split = {"train": "train2017", "val": "val2017"}[split]
        ann = Path(root) / "annotations" / f"instances_{year_split}.json"
        images = Path(root) / year_split
        if not ann.is_file() or not images.is_dir():
            missing = ann if not ann.is_file() else images
            raise OperaError(f"COCO not found: {missing} is missing; {COCO_WHERE}")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        self.images = images
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self._label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if split == "train":
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from opera.data.datasets import decode_image_file

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        img = decode_image_file(str(self.images / info["file_name"]))
        h, w = img.shape[-2:]
        boxes, labels, masks = [], [], []
        for a in self.coco.imgToAnns.get(image_id, []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self._label[a["category_id"]])
            masks.append(self.coco.annToMask(a))
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
                  "image_id": image_id, "size": (h, w)}
        return img, target


# ----------------------------------------------------------------------------- ADE20K
def ade20k_folder(root: str) -> Path:
    p = Path(root)
    base = p if (p / "images").is_dir() else p / "ADEChallengeData2016"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        if not (base / sub).is_dir():
            raise OperaError(f"ADE20K not found: {base / sub} is missing; {ADE_WHERE}")
    return base


class ADE20K(Dataset):
    """ADE20K SceneParsing (150 classes): ``images/<split>/X.jpg`` with ``annotations/<split>/X.png``."""

    NUM_CLASSES = 150

    def __init__(self, root: str, split: str):
        base = ade20k_folder(root)
        sub = {"train": "training", "val": "validation"}[split]
        self.images = sorted((base / "images" / sub).glob("*.jpg"))
        if not self.images:
            raise OperaError(f"ADE20K: no .jpg images in {base / 'images' / sub}; {ADE_WHERE}")
        self.labels = [base / "annotations" / sub / (p.stem + ".png") for p in self.images]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise OperaError(f"ADE20K: {len(missing)} annotations are missing (first: {missing[0]}); {ADE_WHERE}")
        self.class_names = [f"class_{i}" for i in range(self.NUM_CLASSES)]

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from opera.data.datasets import decode_image_file
        from PIL import Image

        img = decode_image_file(str(self.images[index]))
        with Image.open(self.labels[index]) as im:
            lab = torch.from_numpy(np.asarray(im, dtype=np.int64).copy())
        semantic = torch.where(lab == 0, torch.full_like(lab, IGNORE), lab - 1)  # reduce_zero_label
        return img, {"semantic": semantic, "size": tuple(lab.shape), "image_id": index}


# ----------------------------------------------------------------------------- digit scenes
class SceneSegmentation(Dataset):
    """The digit scenes as semantic segmentation: 0 = background, 1..K = digit classes."""

    def __init__(self, scenes):
        self.scenes = scenes
        self.class_names = ["background"] + list(scenes.class_names)

    @property
    def num_classes(self) -> int:
        return self.scenes.num_classes + 1

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        img, t = self.scenes[index]
        return img, {"semantic": t["semantic"], "size": tuple(img.shape[-2:]), "image_id": index}


class SceneDetection(Dataset):
    """The digit scenes as instance detection (labels 1..K)."""

    def __init__(self, scenes):
        self.scenes = scenes
        self.class_names = list(scenes.class_names)

    @property
    def num_classes(self) -> int:
        return self.scenes.num_classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        img, t = self.scenes[index]
        return img, {**{k: t[k] for k in ("boxes", "labels", "masks")}, "image_id": index, "size": tuple(img.shape[-2:])}


def build_dense_dataset(spec: str, split: str, task: str, scene_cfg=None) -> Dataset:
    """The ``split`` of ``spec`` for ``task`` (segmentation | detection); a missing dataset is a
    one-line error saying where to put it."""
    from opera.data.digit_scenes import DigitScenes

    s = parse_dense_spec(spec)
    if s.kind == "digit_scenes":
        scenes = DigitScenes(s.raw, split, scene_cfg)
        return SceneSegmentation(scenes) if task == "segmentation" else SceneDetection(scenes)
    if task == "segmentation" and s.kind != "ade20k":
        raise OperaError(f"segmentation takes digit_scenes or ade20k=ROOT, got {spec!r}")
    if task == "detection" and s.kind != "coco":
        raise OperaError(f"detection takes digit_scenes or coco=ROOT, got {spec!r}")
    return ADE20K(s.root, split) if s.kind == "ade20k" else CocoInstances(s.root, split)


# ----------------------------------------------------------------------------- augmentation
def hflip_detection(img: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    w = img.shape[-1]
    t = dict(target)
    if len(t["boxes"]):
        b = t["boxes"].clone()
        b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
        t["boxes"] = b
    t["masks"] = t["masks"].flip(-1)
    return img.flip(-1), t


def seg_train_augment(img: torch.Tensor, semantic: torch.Tensor, gen: torch.Generator, crop: int | None,
                      scale: tuple[int, int] | None, ratio: tuple[float, float], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's ADE20K pipeline without photometric distortion: resize to ``scale`` x a random
    ratio (keeping the aspect), random ``crop`` (padded with 0 / ``IGNORE``), random flip."""
    if scale is not None:
        r = float(torch.empty(1).uniform_(*ratio, generator=gen))
        h, w = img.shape[-2:]
        f = min(max(scale) * r / max(h, w), min(scale) * r / min(h, w))
        size = (max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5)))
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        semantic = F.interpolate(semantic[None, None].float(), size=size, mode="nearest")[0, 0].long()
    if crop is not None:
        h, w = img.shape[-2:]
        ph, pw = max(0, crop - h), max(0, crop - w)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0)
            semantic = F.pad(semantic, (0, pw, 0, ph), value=IGNORE)
        h, w = img.shape[-2:]
        y = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
        img, semantic = img[:, y:y + crop, x:x + crop], semantic[y:y + crop, x:x + crop]
    if flip and bool(torch.rand(1, generator=gen) < 0.5):
        img, semantic = img.flip(-1), semantic.flip(-1)
    return img, semantic


def seg_eval_resize(img: torch.Tensor, scale: tuple[int, int] | None) -> torch.Tensor:
    """mmseg's test ``Resize(scale, keep_ratio=True)``; the logits go back to the label's size."""
    if scale is None:
        return img
    h, w = img.shape[-2:]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5)))
    return F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)


def collate(batch):
    return tuple(zip(*batch))
