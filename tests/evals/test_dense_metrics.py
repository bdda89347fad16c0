"""Dense metrics on hand-made cases: pycocotools AP of perfect, shuffled and half-found
detections; mIoU against a hand computation of the confusion matrix."""

import math

import pytest
import torch

from opera.evals.dense.metrics import coco_ap, coco_from_targets, confusion_matrix, detections_to_coco, segmentation_scores


def _square_mask(h, w, box):
    m = torch.zeros(h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = 1
    return m


def _hand_case():
    """Three 40x40 images, five objects of two classes, far apart (no box overlaps another)."""
    objects = {0: [((2, 2, 12, 14), 1), ((20, 20, 36, 34), 2)], 1: [((5, 25, 15, 38), 1)],
               2: [((1, 1, 9, 9), 2), ((25, 3, 38, 13), 1)]}
    targets = []
    for image_id, objs in objects.items():
        boxes = torch.tensor([b for b, _ in objs], dtype=torch.float32)
        targets.append({"image_id": image_id, "size": (40, 40), "boxes": boxes,
                        "labels": torch.tensor([c for _, c in objs]),
                        "masks": torch.stack([_square_mask(40, 40, b) for b, _ in objs])})
    return targets


def _as_output(t, scores=None):
    n = len(t["labels"])
    return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.tensor(scores or [0.9] * n),
            "masks": t["masks"][:, None].float()}


def test_perfect_detections_score_ap_one_for_boxes_and_masks():
    targets = _hand_case()
    gt = coco_from_targets(targets, ["a", "b"])
    results = [r for t in targets for r in detections_to_coco(t["image_id"], _as_output(t))]
    ap = coco_ap(gt, results, ("bbox", "segm"))
    assert ap["bbox"]["AP"] == pytest.approx(100.0) and ap["bbox"]["AP50"] == pytest.approx(100.0)
    assert ap["segm"]["AP"] == pytest.approx(100.0)


def test_shuffled_detections_score_near_zero():
    """Every box moved to another object's place (other image, other position): no match."""
    targets = _hand_case()
    gt = coco_from_targets(targets, ["a", "b"])
    results = []
    for i, t in enumerate(targets):
        other = targets[(i + 1) % len(targets)]
        results += detections_to_coco(t["image_id"], _as_output(other))
    ap = coco_ap(gt, results, ("bbox", "segm"))
    assert ap["bbox"]["AP"] < 5 and ap["segm"]["AP"] < 5


def test_half_found_gives_the_101_point_interpolated_ap():
    """One image, two objects of one class, one found exactly: recall reaches 0.5 at precision 1,
    so COCO's 101-point interpolated AP is 51/101 at every IoU threshold."""
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0], [20.0, 20.0, 30.0, 34.0]])
    t = {"image_id": 7, "size": (40, 40), "boxes": boxes, "labels": torch.tensor([1, 1])}
    gt = coco_from_targets([t], ["a"], with_masks=False)
    found = {"boxes": boxes[:1], "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    ap = coco_ap(gt, detections_to_coco(7, found), ("bbox",))
    assert ap["bbox"]["AP"] == pytest.approx(100 * 51 / 101, abs=1e-6)


def test_no_detections_score_zero():
    targets = _hand_case()
    ap = coco_ap(coco_from_targets(targets, ["a", "b"]), [], ("bbox", "segm"))
    assert ap["bbox"]["AP"] == 0.0 and ap["segm"]["AP"] == 0.0


def test_miou_equals_the_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    cm = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    # rows: truth, columns: prediction; the two ignored pixels are not counted
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(cm, ["bg", "a", "b", "never"])
    iou = {"bg": 1 / 3, "a": 2 / 3, "b": 1 / 2}  # TP / (TP + FP + FN) by hand
    assert s["mIoU"] == pytest.approx(100 * sum(iou.values()) / 3)
    assert s["IoU"]["never"] is None  # absent from labels and predictions: left out of the mean
    assert s["aAcc"] == pytest.approx(100 * 4 / 6)
    assert s["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)


def test_a_class_only_predicted_counts_as_zero_iou():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 1])
    s = segmentation_scores(confusion_matrix(pred, target, 2))
    assert s["IoU"]["1"] == 0.0 and s["mIoU"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    assert not math.isnan(s["mAcc"])
