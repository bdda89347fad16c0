"""Digit scenes: an embedded dense-prediction dataset built from scikit-learn's real digits.

Every scene is a ``canvas x canvas`` RGB image on a textured background (low-frequency colour
gratings plus smoothed noise) holding ``min_digits..max_digits`` handwritten digits, each an 8x8
scikit-learn digit resized to a random side in ``scale`` (pixels) at a random position, tinted and
alpha-composited by its stroke intensity. Later digits occlude earlier ones. Each scene gives

* ``boxes``: tight ``x1, y1, x2, y2`` boxes (pixel edges) of the visible strokes,
* ``labels``: ``1..K`` (0 is the background, torchvision's detection convention),
* ``masks``: ``N x H x W`` instance masks, the visible stroke pixels (intensity above
  ``stroke_threshold`` of the full scale),
* ``semantic``: ``H x W`` with 0 for background and ``1..K`` for the stroke pixels of class k.

Splits are fixed: ``train`` scenes draw digits only from the digits ``train`` split and ``val``
scenes only from its held-out ``val`` split (the same fixed 20% as :class:`~opera.data.datasets.DigitsDataset`),
and scene ``i`` of a split depends only on ``(seed, split, i)``. The spec ``digit_scenes:7-9``
keeps the classes 7, 8, 9 (relabelled 1..3), so the classes held out from pretraining can be the
classes to detect and segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from opera.errors import OperaError

NAME = "digit_scenes"
SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SceneConfig:
    """How the scenes are drawn (recipes set it; defaults sized for CPU tests)."""

    canvas: int = 64
    min_digits: int = 2
    max_digits: int = 4
    scale: tuple[int, int] = (16, 32)  # side of a digit in pixels
    train_scenes: int = 600
    val_scenes: int = 200
    seed: int = 0
    max_overlap: float = 0.3  # IoU above which a new digit's box is redrawn (up to 20 tries)
    stroke_threshold: float = 0.35  # fraction of full intensity that counts as a stroke
    min_visible: float = 0.3  # drop an occluded digit keeping less than this fraction of its strokes
    texture: float = 1.0  # background contrast: 1 gives backgrounds in 0..~0.5, 0 a black one

    def check(self) -> None:
        lo, hi = self.scale
        if not (4 <= lo <= hi <= self.canvas):
            raise OperaError(f"digit scenes scale {self.scale} must satisfy 4 <= min <= max <= canvas {self.canvas}; fix dense.scale")
        if not (1 <= self.min_digits <= self.max_digits):
            raise OperaError(f"digit scenes need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if self.train_scenes < 1 or self.val_scenes < 1:
            raise OperaError("digit scenes need at least one train and one val scene; raise train_scenes/val_scenes")


def parse_scenes_spec(spec: str) -> tuple[int, ...]:
    """``digit_scenes`` -> all ten classes; ``digit_scenes:7-9`` -> (7, 8, 9)."""
    from opera.data.specs import check_classes_in_range, parse_class_selection

    text = spec.strip()
    if text == NAME:
        return tuple(range(10))
    if not text.startswith(NAME + ":"):
        raise OperaError(f"{spec!r} is not a digit scenes spec; write digit_scenes or digit_scenes:7-9")
    classes = parse_class_selection(text[len(NAME) + 1:], spec)
    check_classes_in_range(classes, 10, spec, "digits")
    return classes


def _digit_pool(split: str, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits (float 0..1) of one split of the fixed digits split, and their classes."""
    from sklearn.datasets import load_digits

    from opera.data.datasets import _digits_split

    d = load_digits()
    labels = d.target.astype(np.int64)
    is_val = _digits_split(labels)
    keep = (is_val if split == "val" else ~is_val) & np.isin(labels, classes)
    return (d.images[keep] / 16.0).astype(np.float32), labels[keep]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``3 x size x size`` background in 0..~0.45: two colour gratings plus smoothed noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((3, size, size), np.float32)
    for _ in range(2):
        freq, angle, phase = rng.uniform(1, 6), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        out += rng.uniform(0.05, 0.2, size=(3, 1, 1)).astype(np.float32) * wave
    noise = torch.from_numpy(rng.uniform(0, 1, size=(1, 3, size // 4, size // 4)).astype(np.float32))
    out += 0.12 * F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
    return out


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def render_scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, cfg: SceneConfig) -> dict:
    """One scene (see the module docstring); ``labels`` are already 1..K."""
    size = cfg.canvas
    img = _texture(rng, size) * cfg.texture
    owner = np.full((size, size), -1, np.int64)  # which instance owns each stroke pixel
    placed: list[tuple[int, int, int, int]] = []
    full_area: list[int] = []
    inst_labels: list[int] = []
    for _ in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
        side = int(rng.integers(cfg.scale[0], cfg.scale[1] + 1))
        for _try in range(20):
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, p) <= cfg.max_overlap for p in placed):
                break
        else:
            continue
        k = int(rng.integers(len(digits)))
        alpha = F.interpolate(torch.from_numpy(digits[k])[None, None], size=(side, side), mode="bilinear",
                              align_corners=False)[0, 0].clamp(0, 1).numpy()
        colour = rng.uniform(0.7, 1.0, size=(3, 1, 1)).astype(np.float32)
        region = img[:, y0:y0 + side, x0:x0 + side]
        img[:, y0:y0 + side, x0:x0 + side] = region * (1 - alpha) + colour * alpha
        stroke = alpha > cfg.stroke_threshold
        owner[y0:y0 + side, x0:x0 + side][stroke] = len(placed)
        placed.append(box)
        full_area.append(int(stroke.sum()))
        inst_labels.append(int(labels[k]))
    masks, boxes, kept = [], [], []
    for i, area in enumerate(full_area):
        m = owner == i
        if area == 0 or m.sum() < max(4, cfg.min_visible * area):
            continue
        ys, xs = np.nonzero(m)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        kept.append(inst_labels[i])
    semantic = np.zeros((size, size), np.uint8)
    for m, lab in zip(masks, kept):
        semantic[m] = lab
    return {
        "image": torch.from_numpy(np.rint(img.clip(0, 1) * 255).astype(np.uint8)),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(kept, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, size, size), bool)).to(torch.uint8),
        "semantic": torch.from_numpy(semantic).long(),
    }


class DigitScenes(Dataset):
    """The scenes of one split, rendered once at construction (600 scenes of 64 px: ~1 s).

    ``dataset[i]`` is ``(image uint8 3xHxW, target)`` with ``target`` holding ``boxes``,
    ``labels``, ``masks``, ``semantic`` and ``image_id`` (= i).
    """

    def __init__(self, spec: str = NAME, split: str = "train", cfg: SceneConfig | None = None):
        if split not in SPLIT_IDS:
            raise OperaError(f"unknown split {split!r}; valid: train, val")
        self.cfg = cfg or SceneConfig()
        self.cfg.check()
        self.spec, self.split = spec, split
        self.classes = parse_scenes_spec(spec)
        self.class_names = [str(c) for c in self.classes]
        digits, raw = _digit_pool(split, self.classes)
        remap = {c: k + 1 for k, c in enumerate(self.classes)}
        labels = np.array([remap[int(c)] for c in raw], np.int64)
        n = self.cfg.train_scenes if split == "train" else self.cfg.val_scenes
        self.scenes = [render_scene(np.random.default_rng([self.cfg.seed, SPLIT_IDS[split], i]), digits, labels, self.cfg)
                       for i in range(n)]

    @property
    def num_classes(self) -> int:
        """Object classes, without the background."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        s = self.scenes[index]
        target = {k: s[k] for k in ("boxes", "labels", "masks", "semantic")}
        target["image_id"] = index
        return s["image"], target

    def __repr__(self) -> str:
        return f"DigitScenes(spec={self.spec!r}, split={self.split!r}, scenes={len(self)}, classes={self.num_classes})"


__all__ = ["DigitScenes", "NAME", "SceneConfig", "parse_scenes_spec", "render_scene"]
