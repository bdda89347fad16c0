"""The class loss with images that have no label (-1): a mean over the labelled samples of the
*global* batch (``labelled_mean_cross_entropy``), exact on one process and across ranks, also on a
rank whose batch holds no labelled sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opera import distributed
from opera.hierarchy import SupervisionHierarchy
from opera.launch import launch_local
from opera.supervisions.losses import labelled_mean_cross_entropy

NUM_CLASSES = 4
BATCH = 8


def build(seed: int = 0) -> SupervisionHierarchy:
    torch.manual_seed(seed)
    return SupervisionHierarchy.from_spec("self,full", backbone="resnet_tiny", num_classes=NUM_CLASSES, img_size=16,
                                          self={"dim": 16, "mlp_dim": 32}, full={"hidden": 16})


def make_batch():
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(2)]
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    labels[[1, 4, 5, 6, 7]] = -1  # rows 4..7 (rank 1's half under 2 processes) have no label at all
    return views, labels


def test_masked_class_loss_is_the_mean_over_labelled_rows_by_hand():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, -1, 0, 4, -1, 1])
    got = labelled_mean_cross_entropy(logits, labels, torch.tensor(4))
    keep = labels >= 0
    by_hand = -(logits[keep].log_softmax(1).gather(1, labels[keep, None])).sum() / 4
    torch.testing.assert_close(got, by_hand)
    # the unlabelled rows get no gradient, the labelled ones that of their own term
    got.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(1) > 0)
    # every row labelled: exactly F.cross_entropy's mean (the official loss, same arithmetic)
    full = torch.tensor([2, 3, 0, 4, 1, 1])
    assert torch.equal(labelled_mean_cross_entropy(logits, full, torch.tensor(6)), F.cross_entropy(logits, full))
    # ... and so are its gradients (the masked branch, not taken, adds exact zeros)
    a, b = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    labelled_mean_cross_entropy(a, full, torch.tensor(6)).backward()
    F.cross_entropy(b, full).backward()
    assert torch.equal(a.grad, b.grad)


def test_full_space_ignores_unlabelled_images_and_logs_the_count():
    h = build()
    views, labels = make_batch()
    out = h(views=views, targets={"class": labels})
    keep = labels >= 0
    with torch.no_grad():
        reps = [h.spaces["self"].predictor(h.spaces["self"].projector(h.backbone(v))) for v in views]
        ce = sum(F.cross_entropy(h.spaces["full"].class_head(r)[keep], labels[keep]) for r in reps)
    torch.testing.assert_close(out.losses["full"], 0.5 * ce)
    assert float(out.logs["full/labelled"]) == int(keep.sum()) == 3


def test_a_batch_without_labels_gives_a_zero_class_loss_with_a_graph():
    h = build()
    views, _ = make_batch()
    out = h(views=views, targets={"class": torch.full((BATCH,), -1)})
    assert float(out.losses["full"]) == 0.0
    out.losses["full"].backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in h.spaces["full"].parameters())


def _train(hierarchy, model, rank: int, world: int) -> dict:
    from opera.engine.step import train_step

    opt = torch.optim.SGD([p for p in hierarchy.parameters() if p.requires_grad], lr=0.1)
    views, labels = make_batch()
    per = BATCH // world
    views = [v[rank * per:(rank + 1) * per] for v in views]
    out = train_step(model, hierarchy, opt, views, {"class": labels[rank * per:(rank + 1) * per]}, 0.1, 0.9,
                     torch.device("cpu"), amp="off")
    return {"full": float(distributed.all_reduce_mean(out.losses["full"].detach())),
            "grads": {n: p.detach().clone() for n, p in hierarchy.named_parameters() if p.requires_grad}}


def _worker() -> dict:
    env = distributed.init("cpu", timeout_min=2)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        h = distributed.convert_sync_batchnorm(build())
        return _train(h, torch.nn.parallel.DistributedDataParallel(h), env.rank, env.world_size)
    finally:
        torch.set_default_dtype(saved)
        distributed.shutdown()


@pytest.mark.slow
def test_rank_without_labelled_samples_matches_one_process():
    """2 gloo processes, rank 1's half of the batch fully unlabelled: the same class loss and the
    same parameters after one step as one process over the whole batch (float64)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        h = build()
        ref = _train(h, h, 0, 1)
    finally:
        torch.set_default_dtype(saved)
    ranks = launch_local(_worker, (), nproc=2, timeout=150)
    for r in ranks:
        # the mean over ranks of world * (local sum / global count) is the global labelled mean
        assert r["full"] == pytest.approx(ref["full"], abs=1e-9)
        for n, p in ref["grads"].items():
            torch.testing.assert_close(r["grads"][n], p, rtol=1e-7, atol=1e-9, msg=n)
