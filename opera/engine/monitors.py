"""Online monitors of a pretraining run: how good the representation is *while* it trains.

Three monitors, all labelled ``online`` in ``metrics.jsonl`` (``"eval": "online"``, keys under
``online/``), because they are not the paper's protocols: the offline evaluations (``opera run
linear|knn|finetune``, results.json ``"evaluation": "offline"``) train on frozen final weights,
these run beside pretraining and see a moving backbone. Mixing the two up is the most common
reproduction complaint; the labels are there so that nobody reports an online number as Table 1.

* :class:`OnlineLinearMonitor` (solo-learn's and lightly's online linear classifier): a linear
  layer on the *detached* backbone representation y (Eq. 8) of the training batches, with its own
  SGD optimizer, so no gradient reaches the backbone and pretraining is unchanged. It logs every
  epoch the accuracy of its predictions on the training batches (made before each update) and,
  given the held-out split, its accuracy there. Under DDP each rank trains on its share and the
  gradients are averaged over ranks (equal shares), so all ranks hold the same classifier.
* :func:`knn_monitor`: weighted k-NN top-1 on the held-out split with the train bank sharded
  across ranks (:func:`opera.features.knn_scores_sharded`): every rank extracts a share; no rank
  holds the whole bank or computes alone while the others wait.
* the collapse monitor (:class:`CollapseProbe`, :mod:`opera.engine.collapse`): label-free RankMe,
  alpha-ReQ and the std of the normalised embeddings of every representation the hierarchy
  publishes (``backbone``, ``self/projector``, ``full/logits``, ...), over a fixed subset of the kNN
  bank, from the backbone features of the kNN monitor's own pass when both run (the spaces' heads
  are applied to those pooled features), else from a pass over that subset alone. Keys
  ``online/rankme/<rep>``, ``online/areq/<rep>``, ``online/std/<rep>``.

:class:`FeatureTap` takes y from the pretraining forward itself (no second forward, which would
also move the BatchNorm statistics): it records what the online backbone's ``forward_head(...,
pre_logits=True)`` returns during a step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opera import distributed
from opera.features import extract_features, gathered_accuracy, knn_accuracy_sharded, shard_of, topk_correct


class FeatureTap:
    """Record the pooled representation y that ``backbone.forward_head(x, pre_logits=True)``
    returns (detached), for a monitor; :meth:`take` gives the first one of the step and clears.

    It wraps the one backbone object's ``forward_head`` (an instance attribute; the momentum
    encoder is another module and is not tapped). :meth:`close` restores it.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.seen: list[torch.Tensor] = []
        original = backbone.forward_head

        def forward_head(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            if kwargs.get("pre_logits", args[0] if args else False) and torch.is_grad_enabled():
                self.seen.append(out.detach())
            return out

        backbone.forward_head = forward_head  # type: ignore[method-assign]

    def take(self, n: int) -> torch.Tensor | None:
        """The first ``n`` rows recorded this step (the first view's, also when views are fused)."""
        first = self.seen[0][:n] if self.seen else None
        self.seen.clear()
        return first

    def close(self) -> None:
        self.backbone.__dict__.pop("forward_head", None)
        self.seen.clear()


class OnlineLinearMonitor:
    """A linear classifier trained online on detached features (see the module docstring).

    >>> monitor = OnlineLinearMonitor(feat_dim=2048, num_classes=1000)
    >>> monitor.update(features.detach(), labels)   # every step, after the pretraining step
    >>> row = monitor.epoch_metrics()                # every epoch: {"online/linear_top1": ...}
    >>> state = monitor.state_dict()                 # into last.pt; load_state_dict on resume

    SGD with momentum 0.9, no weight decay, a constant ``lr`` (solo-learn: 0.1, its own
    optimizer). ``bn`` puts a ``BatchNorm1d(affine=False)`` before the layer (a moving backbone's
    feature scale drifts; off by default, like solo-learn).
    """

    def __init__(self, feat_dim: int, num_classes: int, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, bn: bool = False, device: torch.device | str = "cpu"):
        layers: list[nn.Module] = [nn.BatchNorm1d(feat_dim, affine=False)] if bn else []
        fc = nn.Linear(feat_dim, num_classes)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        self.classifier = nn.Sequential(*layers, fc).to(device)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)  # samples, top-1 hits, top-5 hits, loss sum

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One SGD step on ``features`` (detached here too) and ``labels`` of this rank's batch
        (images without a label, -1, are left out)."""
        x = features.detach().float().to(self.device)
        y = labels.to(self.device)
        self.classifier.train()
        with torch.enable_grad():
            logits = self.classifier(x)
            keep = y >= 0
            per_sample = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
            loss = (per_sample * keep).sum() / keep.sum().clamp_min(1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        world = distributed.get_world_size()
        if world > 1:  # the same classifier on every rank: average the gradients of equal shares
            for p in self.classifier.parameters():
                p.grad.copy_(distributed.all_reduce_sum(p.grad) / world)
        self.optimizer.step()
        n = int(keep.sum())
        hits = topk_correct(logits.detach()[keep], y[keep]) if n else {1: 0.0, 5: 0.0}
        self._sums += torch.tensor([n, hits[1], hits[5], float(loss.detach()) * n], dtype=torch.float64)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, dataset, batch_size: int = 256) -> dict[str, float]:
        """top-1/top-5 of the classifier on ``dataset`` (the held-out split) through ``backbone``
        in eval mode, sharded over ranks without padding; the backbone's mode is restored."""
        share = shard_of(dataset, distributed.get_rank(), distributed.get_world_size())
        feats, labels = extract_features(backbone, share, batch_size, self.device)
        self.classifier.eval()
        hits = topk_correct(self.classifier(feats.to(self.device)).cpu(), labels)
        return gathered_accuracy(hits, len(labels))

    def epoch_metrics(self, backbone: nn.Module | None = None, val=None) -> dict[str, Any]:
        """The epoch's row (summed over ranks; every rank must call it), then a fresh count."""
        s = distributed.all_reduce_sum(self._sums)
        n = max(1.0, float(s[0]))
        row: dict[str, Any] = {"eval": "online", "online/linear_top1": 100.0 * float(s[1]) / n,
                               "online/linear_top5": 100.0 * float(s[2]) / n, "online/linear_loss": float(s[3]) / n}
        if backbone is not None and val is not None:
            acc = self.evaluate(backbone, val)
            row["online/linear_val_top1"], row["online/linear_val_top5"] = acc["top1"], acc["top5"]
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sums": self._sums.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._sums = state["sums"].clone().to(torch.float64)


@torch.no_grad()
def knn_monitor(backbone: nn.Module, bank_set, query_set, num_classes: int, device: torch.device, k: int = 20,
                temperature: float = 0.07, workers: int = 0, bank_dtype: torch.dtype = torch.float16,
                on_bank_batch=None) -> float:
    """Weighted k-NN top-1 (%) of ``query_set`` against ``bank_set`` from ``backbone`` features,
    the bank sharded across ranks (every rank calls it; one process: the plain k-NN). Features are
    extracted with ``workers`` DataLoader workers; the bank is kept in ``bank_dtype`` (float16:
    half the memory; each block is compared in float32). ``on_bank_batch``: sees the bank's
    features batch by batch (:func:`opera.features.extract_features`; a :class:`CollapseProbe`)."""
    from opera.distributed import all_gather_uneven

    rank, world = distributed.get_rank(), distributed.get_world_size()
    was_training = backbone.training
    bank, bank_y = extract_features(backbone, shard_of(bank_set, rank, world), device=device, workers=workers,
                                    dtype=bank_dtype, on_batch=on_bank_batch)
    queries, query_y = extract_features(backbone, shard_of(query_set, rank, world), device=device, workers=workers)
    queries, query_y = all_gather_uneven(queries.to(device)), all_gather_uneven(query_y.to(device))
    top1 = knn_accuracy_sharded(bank, bank_y, queries, query_y.cpu(), num_classes, k=k, temperature=temperature,
                                    device=device)["top1"]
    backbone.train(was_training)
    return top1


#: the seed of the kNN monitor's bank subset: fixed, so the monitor's numbers compare across runs
KNN_SUBSET_SEED = 20240102


def balanced_subset(targets, per_class: int, seed: int = KNN_SUBSET_SEED) -> np.ndarray | None:
    """Sorted indices of at most ``per_class`` images of every class of ``targets`` (each class's
    first ones in a fixed seeded order); None when no class has more (the whole set). O(N log N)."""
    y = np.asarray(targets, dtype=np.int64)
    if per_class <= 0 or not len(y) or np.bincount(y).max() <= per_class:
        return None
    order = np.lexsort((np.random.default_rng(seed).permutation(len(y)), y))  # by class, seeded within
    ranked = y[order]
    starts = np.searchsorted(ranked, ranked, side="left")
    rank_in_class = np.arange(len(y)) - starts
    return np.sort(order[rank_in_class < per_class])


#: the seed of the collapse monitor's subset of the kNN bank
COLLAPSE_SUBSET_SEED = 20240517


def collapse_rows(bank_size: int, images: int, seed: int = COLLAPSE_SUBSET_SEED) -> torch.Tensor:
    """A boolean mask over the kNN bank: the fixed seeded ``images`` rows the collapse monitor
    measures (all of them when the bank is not larger)."""
    mask = torch.zeros(bank_size, dtype=torch.bool)
    if images <= 0 or bank_size <= images:
        mask[:] = True
    else:
        mask[torch.from_numpy(np.random.default_rng(seed).permutation(bank_size)[:images])] = True
    return mask


def head_representations(hierarchy: nn.Module, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every representation the hierarchy publishes, from the backbone's pooled features ``y``
    (``SupervisionHierarchy.representations`` without the backbone forward): ``backbone`` then each
    space's (``represent`` reads ``backbone`` and the spaces below; a space that publishes none,
    such as masked image modeling's, adds nothing)."""
    reps: dict[str, torch.Tensor] = {"backbone": y}
    for space in hierarchy.spaces.values():
        space.represent(reps)
    return reps


class CollapseProbe:
    """The collapse monitor's share of a feature pass (``on_batch`` of
    :func:`opera.features.extract_features`): of each batch of backbone features, the rows that
    ``wanted`` marks (a boolean mask over the rows of the pass) go through the spaces' heads
    (:func:`head_representations`) into :class:`opera.engine.collapse.RepresentationStats`.
    The hierarchy must be in eval mode (:func:`eval_mode`); ``seconds``: the time spent here."""

    def __init__(self, hierarchy: nn.Module, wanted: torch.Tensor, max_dim: int | None = None):
        from opera.engine.collapse import MAX_DIM, RepresentationStats

        self.hierarchy, self.wanted = hierarchy, wanted
        self.stats = RepresentationStats(max_dim or MAX_DIM)
        self.seconds = 0.0

    def __call__(self, y: torch.Tensor, start: int) -> None:
        import time

        t0 = time.perf_counter()
        rows = self.wanted[start: start + len(y)].to(y.device)
        if bool(rows.any()):
            self.stats.update({k: v.float() for k, v in head_representations(self.hierarchy, y[rows]).items()})
        self.seconds += time.perf_counter() - t0

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every representation's statistics over all ranks (every rank calls it; a rank whose
        share held none of the wanted rows sums zeros, so every rank reduces the same tensors)."""
        import time

        t0 = time.perf_counter()
        if not self.stats.stats and not self.stats.skipped:
            backbone = self.hierarchy.backbone
            empty = torch.zeros(0, backbone.num_features, device=next(backbone.parameters()).device)
            with torch.no_grad(), eval_mode(self.hierarchy):
                self.stats.update({k: v.float() for k, v in head_representations(self.hierarchy, empty).items()})
        out = self.stats.metrics()
        self.seconds += time.perf_counter() - t0
        return out


class eval_mode:
    """``with eval_mode(module):`` every submodule in eval mode, each one's own mode restored after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


@torch.no_grad()
def collapse_pass(hierarchy: nn.Module, dataset, wanted: torch.Tensor, device: torch.device,
                  workers: int = 0, max_dim: int | None = None) -> CollapseProbe:
    """The collapse monitor alone (an epoch without the kNN monitor): backbone features of the
    rows of ``dataset`` that ``wanted`` marks, sharded over ranks, fed to a :class:`CollapseProbe`
    (call its ``metrics`` on every rank)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rows = torch.nonzero(wanted).flatten().tolist()
    share = shard_of(torch.utils.data.Subset(dataset, rows), rank, world)
    probe = CollapseProbe(hierarchy, torch.ones(len(share), dtype=torch.bool), max_dim)
    with eval_mode(hierarchy):
        extract_features(hierarchy.backbone, share, device=device, workers=workers, dtype=torch.float16,
                         on_batch=probe)
    return probe


def collapse_row(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The metrics.jsonl keys of the collapse monitor: ``online/rankme/<rep>``, ``online/areq/<rep>``,
    ``online/std/<rep>`` (a NaN, e.g. alpha-ReQ of a collapsed representation, is left out)."""
    row = {}
    for name, m in metrics.items():
        for key in ("rankme", "areq", "std"):
            if m[key] == m[key]:
                row[f"online/{key}/{name}"] = float(m[key])
    return row


__all__ = ["CollapseProbe", "FeatureTap", "OnlineLinearMonitor", "balanced_subset", "collapse_pass", "collapse_row",
           "collapse_rows", "eval_mode", "head_representations", "knn_monitor"]


# ------------------------------------------------------------------ the hooks pretraining calls
def online_linear_setup(cfg, hierarchy: nn.Module, num_classes: int, device: torch.device,
                        checkpoint: dict[str, Any] | None = None):
    """``(monitor, tap, val_set)`` for a pretraining run with ``train.online_linear`` (resumed from
    ``checkpoint["online_linear"]`` when there), else ``(None, None, None)``."""
    if not getattr(cfg.train, "online_linear", False):
        return None, None, None
    from opera.data import EvalTransform, build_dataset

    backbone = hierarchy.backbone
    monitor = OnlineLinearMonitor(backbone.num_features, num_classes, lr=cfg.train.online_linear_lr, device=device)
    if checkpoint is not None and checkpoint.get("online_linear"):
        monitor.load_state_dict(checkpoint["online_linear"])
    val = build_dataset(cfg.data.spec, "val", EvalTransform(cfg.backbone.img_size))
    return monitor, FeatureTap(backbone), val


def online_linear_step(monitor: OnlineLinearMonitor | None, tap: FeatureTap | None, labels) -> None:
    """After a pretraining step: train the monitor on the features the step's forward produced.
    ``labels``: this rank's class labels, or a dict of named label sets holding ``"class"``."""
    if monitor is None or tap is None:
        return
    y = labels["class"] if isinstance(labels, dict) else labels
    features = tap.take(len(y))
    if features is not None:
        monitor.update(features, y)
