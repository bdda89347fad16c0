"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO's ``eval_knn``).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training features
and every neighbour votes for its label with weight ``exp(sim / T)`` (k=20, T=0.07 by default).

The similarity matrix is never materialised: queries are processed ``query_chunk`` at a time and
the training bank ``bank_chunk`` at a time, keeping a running top-k per query, so memory is
``O(query_chunk x (bank_chunk + k))`` however large the bank (ImageNet's 1.28M images included).
:func:`knn_scores_bruteforce` is the reference the chunked version is tested against.

Under several processes (``--nproc``, torchrun, SLURM) the training bank is sharded: rank r
extracts and keeps only its contiguous share of the training images, the queries are extracted
in shares and gathered, each rank takes every query's top-k within its shard, and the ranks'
candidates (``Q x k`` similarities and labels) are merged into the global top-k
(:func:`knn_scores_sharded`): the same neighbours as one process, with no rank holding the whole
bank or any ``Q x N`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opera.distributed import all_gather_uneven
from opera.errors import OperaError
from opera.evals.common import (
    EvalConfig,
    EvalRun,
    accuracy,
    check_frozen,
    eval_env,
    extract_features,
    load_eval_backbone,
    parse_data,
    seed_everything,
    shard_of,
    snapshot_state,
)


@dataclass
class KNNConfig(EvalConfig):
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # feature extraction batch
    query_chunk: int = 1024  # test queries per similarity block
    bank_chunk: int = 65536  # training features per similarity block
    half_bank: bool = False  # store the training bank in float16 (halves memory on ImageNet)
    train_data: str | None = None  # the bank's data spec; None: the train split of --data


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


def run_knn(cfg: KNNConfig, loaded=None) -> dict:
    """Weighted k-NN top-1/top-5 of ``cfg.checkpoint`` on ``cfg.data`` (bank: train split, queries: val)."""
    from opera.data import EvalTransform, build_dataset

    train_spec = cfg.train_data or cfg.data
    parse_data(cfg.data)
    parse_data(train_spec)
    _check_args(cfg.k, cfg.temperature, torch.zeros(1, 1), torch.zeros(1, 1))
    env, device = eval_env(cfg.device)
    rank, world = env.rank, env.world_size
    run = EvalRun("knn", cfg, main=rank == 0)
    seed_everything(cfg.seed)
    loaded = loaded or load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    tf = EvalTransform(loaded.img_size)
    train = build_dataset(train_spec, "train", tf)
    val = build_dataset(cfg.data, "val", tf)
    if train.num_classes != val.num_classes:
        raise OperaError(f"--train-data {train_spec!r} has {train.num_classes} classes but --data {cfg.data!r} has {val.num_classes}; use the same classes")
    model = loaded.model.to(device)
    reference = snapshot_state(model)
    dtype = torch.float16 if cfg.half_bank else torch.float32
    # each rank extracts (and keeps) its share of the bank, and its share of the queries, which
    # every rank then holds in full: the bank is never gathered
    bank, bank_y = extract_features(model, shard_of(train, rank, world), cfg.batch_size, device, cfg.workers, dtype=dtype)
    queries, query_y = extract_features(model, shard_of(val, rank, world), cfg.batch_size, device, cfg.workers)
    queries, query_y = all_gather_uneven(queries.to(device)), all_gather_uneven(query_y.to(device))
    check_frozen(model, reference)
    scores = knn_scores_sharded(bank, bank_y, queries, val.num_classes, k=cfg.k, temperature=cfg.temperature,
                                query_chunk=cfg.query_chunk, bank_chunk=cfg.bank_chunk, device=device)
    metrics = accuracy(scores, query_y.cpu())
    metrics.update({"k": cfg.k, "temperature": cfg.temperature, "bank_size": len(train), "queries": int(queries.shape[0]),
                    "world_size": world, "bank_sharded_over_ranks": world > 1})
    for name in ("top1", "top5"):
        run.log(f"knn/{name}", metrics[name], 0)
    return run.finish(metrics, loaded, data={"train": train_spec, "val": cfg.data, "num_classes": val.num_classes,
                                             "train_images": len(train), "val_images": len(val)})
