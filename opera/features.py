"""Features of a frozen backbone and what is computed on them: top-k counts, weighted k-NN.

A leaf of the package (it imports no engine and no evaluation module), shared by the offline
evaluations (``opera.evals``) and the monitors that run during pretraining
(``opera.engine.monitors``), so neither side imports the other for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opera.errors import OperaError


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets.view(-1, 1))
    return {k: int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks}


def accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": %, "top5": %}``; with fewer than 5 classes top-5 counts every class (100%)."""
    n = max(1, targets.numel())
    return {f"top{k}": 100.0 * c / n for k, c in topk_correct(logits, targets, ks).items()}


def make_loader(dataset, batch_size: int, shuffle: bool = False, workers: int = 0, drop_last: bool = False,
                generator: torch.Generator | None = None, device: torch.device | None = None):
    from opera.data.loader import Loader

    return Loader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
        generator=generator, pin_memory=bool(device is not None and device.type == "cuda"),
        persistent_workers=False,
    )


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, batch_size: int = 256, device: torch.device | str = "cpu",
                     workers: int = 0, dtype: torch.dtype = torch.float32,
                     on_batch: Callable[[torch.Tensor, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features N x D, labels N)`` of a frozen backbone over ``dataset``, on the CPU.

    Runs in eval mode without gradients, one batch at a time into a preallocated tensor, so peak
    memory is the output plus one batch (``dtype=torch.float16`` halves an ImageNet-sized bank).
    ``on_batch(features, start)`` sees every batch's float32 features on ``device`` (rows
    ``start..start+len-1`` of ``dataset``) before they are stored: what else the same pass computes
    (the collapse monitor of :mod:`opera.engine.monitors`).
    """
    from opera.backbones import pooled_features

    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    n = len(dataset)
    feats: torch.Tensor | None = None
    labels = torch.empty(n, dtype=torch.long)
    i = 0
    try:
        for x, y in make_loader(dataset, batch_size, workers=workers, device=device):
            f = pooled_features(backbone, x.to(device, non_blocking=True)).float()
            if on_batch is not None:
                on_batch(f, i)
            if feats is None:
                feats = torch.empty(n, f.shape[1], dtype=dtype)
            feats[i: i + len(f)] = f.to("cpu", dtype)
            labels[i: i + len(f)] = torch.as_tensor(y)
            i += len(f)
    finally:
        backbone.train(was_training)
    if feats is None:
        raise OperaError("the dataset is empty; select classes or a split that has images")
    return feats, labels


def shard_of(dataset, rank: int, world: int):
    """Rank ``rank``'s contiguous, unpadded share of ``dataset`` (a ``Subset``; itself alone)."""
    if world == 1:
        return dataset
    from opera.distributed import shard_bounds

    lo, hi = shard_bounds(len(dataset), rank, world)
    return torch.utils.data.Subset(dataset, range(lo, hi))


def gathered_accuracy(counts: dict[int, int], n: int, device: torch.device | None = None) -> dict[str, float]:
    """top-k accuracies from this rank's correct ``counts`` over its ``n`` samples, summed over
    ranks first: with unpadded shards every validation image counts exactly once."""
    from opera.distributed import all_reduce_sum

    ks = sorted(counts)
    t = all_reduce_sum(torch.tensor([n, *(counts[k] for k in ks)], dtype=torch.float64))
    total = max(1.0, float(t[0]))
    return {f"top{k}": 100.0 * float(c) / total for k, c in zip(ks, t[1:].tolist())}


# ----------------------------------------------------------------------------- weighted k-NN (Wu et al. 2018)
def _vote(sims: torch.Tensor, idx: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    weights = (sims / temperature).exp()
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return votes.scatter_add_(1, bank_labels[idx], weights)


def _check_args(k: int, temperature: float, bank: torch.Tensor, queries: torch.Tensor) -> None:
    if k < 1:
        raise OperaError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise OperaError(f"temperature must be positive, got {temperature}")
    if bank.shape[0] == 0:
        raise OperaError("the k-NN training bank is empty; select a split/classes with images")
    if bank.shape[1] != queries.shape[1]:
        raise OperaError(f"feature sizes differ: bank {bank.shape[1]}, queries {queries.shape[1]}")


@torch.no_grad()
def knn_topk(bank: torch.Tensor, queries: torch.Tensor, k: int = 20, query_chunk: int = 1024, bank_chunk: int = 65536,
             device: torch.device | str | None = None, normalized: bool = False,
             bank_on_device: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank indices), both ``Q x min(k, N)`` on ``device``: each query's ``k``
    most cosine-similar bank rows, best first, computed block by block (never ``Q x N``)."""
    device = torch.device(device) if device is not None else queries.device
    k = min(k, bank.shape[0])
    if bank_on_device:  # one transfer (in the bank's dtype); blocks are views on the device
        bank = bank.to(device)
    out_s = torch.empty(queries.shape[0], k, device=device)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long, device=device)
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs: qs + query_chunk].to(device, torch.float32)
        if not normalized:
            q = F.normalize(q, dim=1)
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for start in range(0, bank.shape[0], bank_chunk):
            b = bank[start: start + bank_chunk].to(device, torch.float32)
            if not normalized:
                b = F.normalize(b, dim=1)
            s = q @ b.T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top_s], 1)
            cand_i = torch.cat([best_i, top_i + start], 1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        out_s[qs: qs + q.shape[0]], out_i[qs: qs + q.shape[0]] = best_s, best_i
    return out_s, out_i


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, query_chunk: int = 1024, bank_chunk: int = 65536,
               device: torch.device | str | None = None, normalized: bool = False,
               bank_on_device: bool = True) -> torch.Tensor:
    """Class scores (``Q x C``, on the CPU) of weighted k-NN, computed block by block.

    ``bank`` (N x D) and ``queries`` (Q x D) may live on the CPU; the bank is moved to ``device``
    once (``bank_on_device``, in its own dtype: float16 halves it) or block by block. ``k`` is
    capped at N. ``normalized=True`` skips the L2 normalisation (done per block otherwise).
    """
    _check_args(k, temperature, bank, queries)
    device = torch.device(device) if device is not None else queries.device
    sims, idx = knn_topk(bank, queries, k, query_chunk, bank_chunk, device, normalized, bank_on_device)
    return _vote(sims, idx, bank_labels.to(device), num_classes, temperature).cpu()


@torch.no_grad()
def knn_scores_sharded(bank_shard: torch.Tensor, bank_labels_shard: torch.Tensor, queries: torch.Tensor,
                       num_classes: int, k: int = 20, temperature: float = 0.07, query_chunk: int = 1024,
                       bank_chunk: int = 65536, device: torch.device | str | None = None,
                       bank_on_device: bool = True) -> torch.Tensor:
    """:func:`knn_scores` with the bank split across ranks: each rank holds one shard of the bank
    and every query; it finds each query's top-k in its shard, the ``Q x k`` candidates of all
    ranks are gathered (similarities and labels, not features) and merged into the global top-k,
    then vote. Memory per rank: its shard plus ``world x Q x k``. One process: :func:`knn_scores`.
    """
    from opera import distributed

    if distributed.get_world_size() == 1:
        return knn_scores(bank_shard, bank_labels_shard, queries, num_classes, k, temperature, query_chunk,
                          bank_chunk, device, bank_on_device=bank_on_device)
    device = torch.device(device) if device is not None else queries.device
    total = int(distributed.all_reduce_sum(torch.tensor([bank_shard.shape[0]]))[0])
    if total == 0:
        raise OperaError("the k-NN training bank is empty; select a split/classes with images")
    if k < 1 or temperature <= 0:
        _check_args(k, temperature, torch.zeros(1, 1), torch.zeros(1, 1))
    kk = min(k, total)
    sims = torch.full((queries.shape[0], kk), float("-inf"), device=device)
    labels = torch.zeros((queries.shape[0], kk), dtype=torch.long, device=device)
    if bank_shard.shape[0]:
        s, i = knn_topk(bank_shard, queries, kk, query_chunk, bank_chunk, device, bank_on_device=bank_on_device)
        sims[:, : s.shape[1]], labels[:, : s.shape[1]] = s, bank_labels_shard.to(device)[i]
    # every rank's candidates side by side: (world*Q) x kk -> Q x (world*kk)
    world = distributed.get_world_size()
    all_s = distributed.all_gather_no_grad(sims).view(world, -1, kk).permute(1, 0, 2).reshape(queries.shape[0], -1)
    all_y = distributed.all_gather_no_grad(labels).view(world, -1, kk).permute(1, 0, 2).reshape(queries.shape[0], -1)
    best_s, pos = all_s.topk(kk, dim=1)
    best_y = all_y.gather(1, pos)
    weights = (best_s / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=device, dtype=weights.dtype)
    return votes.scatter_add_(1, best_y, weights).cpu()


@torch.no_grad()
def knn_scores_bruteforce(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                          k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """The same scores from the full ``Q x N`` similarity matrix (reference for tests)."""
    _check_args(k, temperature, bank, queries)
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top_s, top_i = sims.topk(min(k, bank.shape[0]), dim=1)
    return _vote(top_s, top_i, bank_labels, num_classes, temperature)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, **kw) -> dict[str, float]:
    return accuracy(knn_scores(bank, bank_labels, queries, num_classes, **kw), query_labels)


def knn_accuracy_sharded(bank_shard, bank_labels_shard, queries, query_labels, num_classes, **kw) -> dict[str, float]:
    """:func:`knn_accuracy` with this rank's shard of the bank and every query (one process: the
    plain one); every rank gets the same result."""
    from opera import distributed

    if distributed.get_world_size() == 1:
        return knn_accuracy(bank_shard, bank_labels_shard, queries, query_labels, num_classes, **kw)
    return accuracy(knn_scores_sharded(bank_shard, bank_labels_shard, queries, num_classes, **kw), query_labels.cpu())
