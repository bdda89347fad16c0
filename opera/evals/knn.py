"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO's ``eval_knn``).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training features
and every neighbour votes for its label with weight ``exp(sim / T)`` (k=20, T=0.07 by default).
``k`` is capped at the bank's size: results.json's ``k`` is the number of neighbours each query
voted with, ``k_requested`` the one asked for, and a capped ``k`` is said in one console line.

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


import torch

from opera.configs import validate
from opera.distributed import all_gather_uneven
from opera.errors import OperaError
from opera.features import (  # noqa: F401  (re-exported)
    _check_args,
    _vote,
    knn_accuracy,
    knn_accuracy_sharded,
    knn_scores,
    knn_scores_bruteforce,
    knn_scores_sharded,
    knn_topk,
)
from opera.evals.common import (
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
from opera.evals.options import KNNConfig  # noqa: F401  (re-exported)


def run_knn(cfg: KNNConfig, loaded=None) -> dict:
    """Weighted k-NN top-1/top-5 of ``cfg.checkpoint`` on ``cfg.data`` (bank: train split, queries: val)."""
    from opera.data import EvalTransform, build_dataset

    validate(cfg)
    train_spec = cfg.train_data or cfg.data
    parse_data(cfg.data)
    parse_data(train_spec)
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
    k = min(cfg.k, len(train))  # the neighbours each query voted with: the top-k is capped at the bank
    metrics.update({"k": k, "k_requested": cfg.k, "temperature": cfg.temperature, "bank_size": len(train),
                    "queries": int(queries.shape[0]), "world_size": world, "bank_sharded_over_ranks": world > 1})
    for name in ("top1", "top5"):
        run.log(f"knn/{name}", metrics[name], 0)
    res = run.finish(metrics, loaded, data={"train": train_spec, "val": cfg.data, "num_classes": val.num_classes,
                                            "train_images": len(train), "val_images": len(val)})
    if k < cfg.k and run.main:
        from rich.console import Console

        Console(soft_wrap=True, highlight=False).print(
            f"note: k={cfg.k} is more than the {len(train)} images of the bank ({train_spec}, train split): each query "
            f"voted with all {k} of them, recorded as k={k} (k_requested={cfg.k}); a k below {k} votes with nearest "
            "neighbours only", markup=False)
    return res
