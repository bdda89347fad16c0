"""Dense metrics: mIoU from an exact confusion matrix; COCO box/mask AP from pycocotools.

* :func:`confusion_matrix` counts ``(target, prediction)`` pixel pairs with one ``bincount``
  (pixels labelled ``ignore_index`` are skipped); :func:`segmentation_scores` gives mmseg's
  ``mIoU`` (mean over classes of ``TP / (TP + FP + FN)``, classes absent from both the labels and
  the predictions left out), ``mAcc`` and ``aAcc``, in %.
* :func:`coco_ap` runs pycocotools' ``COCOeval`` (``bbox`` and/or ``segm``) on detections in
  torchvision's output format against a ``COCO`` ground truth: the official AP,
  AP50, AP75, APs/m/l, not an approximation. :func:`coco_from_targets` builds that ground truth
  from torchvision-style targets (the digit scenes).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable

import numpy as np
import torch

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = ground truth, columns = prediction."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_scores(cm: torch.Tensor, class_names: list[str] | None = None) -> dict[str, Any]:
    """``{"mIoU", "mAcc", "aAcc", "IoU": {class: %}}`` from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    gt, pred = cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    names = class_names or [str(i) for i in range(len(tp))]
    return {
        "mIoU": 100.0 * float(np.nanmean(iou.numpy())) if bool(torch.isfinite(iou).any()) else float("nan"),
        "mAcc": 100.0 * float(np.nanmean(acc.numpy())) if bool(torch.isfinite(acc).any()) else float("nan"),
        "aAcc": 100.0 * float(tp.sum() / cm.sum().clamp(min=1)),
        "IoU": {n: (100.0 * float(v) if torch.isfinite(v) else None) for n, v in zip(names, iou)},
    }


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_from_targets(targets: Iterable[dict[str, Any]], class_names: list[str], with_masks: bool = True):
    """A pycocotools ``COCO`` ground truth from targets with ``image_id``, ``boxes`` (x1y1x2y2),
    ``labels`` (1..K; category ids are the labels) and optionally ``masks`` (N x H x W)."""
    from pycocotools.coco import COCO

    images, anns = [], []
    for t in targets:
        h, w = (int(s) for s in t["size"])
        images.append({"id": int(t["image_id"]), "height": h, "width": w})
        for j, (box, label) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            x1, y1, x2, y2 = box
            ann = {"id": len(anns) + 1, "image_id": int(t["image_id"]), "category_id": int(label),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": float((x2 - x1) * (y2 - y1))}
            if with_masks and "masks" in t:
                m = t["masks"][j].numpy().astype(bool)
                ann["segmentation"] = _rle(m)
                ann["area"] = float(m.sum())
            anns.append(ann)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def detections_to_coco(image_id: int, output: dict[str, torch.Tensor], category_ids: list[int] | None = None,
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision detections of one image (``boxes`` x1y1x2y2, ``labels`` 1..K, ``scores``,
    optionally ``masks`` N x 1 x H x W probabilities) -> COCO result dicts. ``category_ids[k-1]``
    maps label k to a dataset category id (default: the label itself)."""
    out = []
    boxes = output["boxes"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().cpu().tolist()
    masks = output.get("masks")
    for j, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        x1, y1, x2, y2 = box
        res = {"image_id": int(image_id), "category_id": int(category_ids[label - 1] if category_ids else label),
               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        if masks is not None:
            res["segmentation"] = _rle((masks[j, 0] > mask_threshold).cpu().numpy())
        out.append(res)
    return out


def coco_ap(gt, results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox",),
            image_ids: list[int] | None = None) -> dict[str, dict[str, float]]:
    """pycocotools COCOeval per ``iou_type`` -> ``{"bbox": {"AP": %, "AP50": %, ...}, ...}``.

    No detections at all scores 0 (pycocotools cannot load an empty result list)."""
    from pycocotools.cocoeval import COCOeval

    scores: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        # as detectron2: mask results lose their box, so pycocotools takes their area from the mask
        dets = [r if iou_type == "bbox" else {k: v for k, v in r.items() if k != "bbox"}
                for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dets:
            scores[iou_type] = {k: 0.0 for k in COCO_STATS}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # pycocotools marks "no ground truth in this area range" as -1; keep it out of the means
        scores[iou_type] = {k: (100.0 * float(v) if v >= 0 else float("nan")) for k, v in zip(COCO_STATS, ev.stats[:6])}
    return scores


__all__ = ["COCO_STATS", "coco_ap", "coco_from_targets", "confusion_matrix", "detections_to_coco", "segmentation_scores"]
