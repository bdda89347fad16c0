"""Corollary 1, measured: are the representations ordered as OPERA's loss weights imply?

Eq. 11 orders the loss weights of a pair of samples so that, after training, the similarity of
two views of one image >= that of two images of one class >= that of images of different
classes. For ``num_images`` images of a dataset, two augmented views each (the pretraining
augmentation, ``PretrainTransform``), this computes the cosine similarities of every
(view 1 of image i, view 2 of image j) pair in every representation space and averages them by
pair type:

* ``view``: i = j (same image; the instance label of the self space agrees);
* ``same_class``: i != j, same class (instance labels differ, class labels agree);
* ``different_class``: different classes.

Spaces: the backbone features y, and for a run directory with ``last.pt`` the hierarchy's proxy
spaces (``self/projector``, ``self/predictor``, ``full/logits``, ... - whatever each space publishes; ``SupervisionHierarchy.representations``),
rebuilt from the run's ``config.yaml``. A ``backbone.safetensors`` alone, ``random:`` and
``timm:`` give the backbone space only. Results: per space the three means (and std, count),
whether ``view >= same_class >= different_class`` holds, and ``similarity_hist.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from opera import distributed
from opera.configs import validate
from opera.errors import OperaError
from opera.evals.common import (
    EvalRun,
    LoadedBackbone,
    load_eval_backbone,
    make_loader,
    parse_data,
    seed_everything,
)
from opera.evals.options import DiagnoseConfig  # noqa: F401  (re-exported)

PAIRS = ("view", "same_class", "different_class")
HISTOGRAM = "similarity_hist.png"


# ----------------------------------------------------------------------------- hierarchy
def _label_sets(state: dict[str, Any], cfg_dict: dict[str, Any]) -> dict[str, int]:
    """The label sets the run was trained with (its identity, config.yaml, or the class head's size)."""
    ident = state.get("identity") or {}
    if ident.get("label_sets"):
        return {k: int(v) for k, v in ident["label_sets"].items()}
    resolved = (cfg_dict or {}).get("resolved") or {}
    if resolved.get("label_sets"):
        return {k: int(v) for k, v in resolved["label_sets"].items()}
    num_classes = ident.get("num_classes") or resolved.get("num_classes")
    if not num_classes:
        heads = [v for k, v in state.get("model", {}).items() if k.startswith("spaces.full.") and k.endswith(".weight") and v.ndim == 2]
        num_classes = int(heads[-1].shape[0]) if heads else None
    return {"class": int(num_classes)} if num_classes else {}


def load_hierarchy(loaded: LoadedBackbone):
    """The run's ``SupervisionHierarchy`` with its trained weights, or None when the checkpoint
    is not a run directory / ``last.pt`` with a ``config.yaml``."""
    from opera.configs import config_from_dict
    from opera.configs.core import rename_keys
    from opera.engine.checkpoint import LAST, load_state
    from opera.hierarchy import SupervisionHierarchy

    if loaded.kind != "checkpoint" or loaded.run_dir is None or loaded.run_config is None:
        return None
    last = Path(loaded.file) if loaded.file and loaded.file.endswith(".pt") else Path(loaded.run_dir) / LAST
    if not last.is_file():
        return None
    from opera.configs.schema import SECTIONS, TOP_LEVEL
    from opera.supervisions.base import SPACES

    keep = set(TOP_LEVEL) | set(SECTIONS) | set(SPACES.names())
    cfg = config_from_dict(rename_keys({k: v for k, v in loaded.run_config.items() if k in keep}))  # old key names too
    state = load_state(last)
    h = SupervisionHierarchy.from_config(cfg, _label_sets(state, loaded.run_config))
    missing, unexpected = h.load_state_dict(state.get("model", {}), strict=False)
    if missing or unexpected:
        raise OperaError(f"{last} does not match the hierarchy of its config.yaml ({cfg.hierarchy}; missing {len(missing)}, "
                         f"unexpected {len(unexpected)} keys); the run directory mixes files of different runs")
    return h


# ----------------------------------------------------------------------------- measurement
def pair_similarities(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine similarities of (z1[i], z2[j]) grouped into view / same_class / different_class."""
    s = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool)
    same = labels[:, None].eq(labels[None, :])
    return {"view": s[eye], "same_class": s[same & ~eye], "different_class": s[~same]}


def summarize(groups: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PAIRS:
        g = groups[name]
        out[name] = float(g.mean()) if g.numel() else float("nan")
        out[f"{name}_std"] = float(g.std()) if g.numel() > 1 else 0.0
        out[f"{name}_pairs"] = int(g.numel())
    v, s, d = out["view"], out["same_class"], out["different_class"]
    out["gap_view_same"] = v - s
    out["gap_same_different"] = s - d
    out["ordering_holds"] = bool(v >= s >= d)
    return out


@torch.no_grad()
def representations(model, hierarchy, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if hierarchy is not None:
        return hierarchy.representations(x)
    from opera.backbones import pooled_features

    return {"backbone": pooled_features(model, x)}


def plot_histograms(groups: dict[str, dict[str, torch.Tensor]], path: Path, bins: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    colors = {"view": "tab:green", "same_class": "tab:blue", "different_class": "tab:red"}
    for ax, (space, g) in zip(axes[0], groups.items()):
        for name in PAIRS:
            vals = g[name].numpy()
            if vals.size:
                ax.hist(vals, bins=bins, range=(-1, 1), density=True, alpha=0.45, color=colors[name],
                        label=f"{name.replace('_', ' ')} ({vals.mean():.2f})")
                ax.axvline(vals.mean(), color=colors[name], lw=1)
        ax.set_title(space)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from opera.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="the diagnosis plot")
    plt.close(fig)
    return path


def run_diagnose(cfg: DiagnoseConfig) -> dict:
    """Measure Corollary 1 for ``cfg.checkpoint``; returns the results dict."""
    from opera.data import PretrainTransform, build_dataset

    validate(cfg)
    if cfg.data:
        parse_data(cfg.data)
    device = distributed.resolve_device(cfg.device)
    run = EvalRun("diagnose", cfg)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data or "digits", cfg.seed)
    run_data = (loaded.run_config or {}).get("data") or {}
    data = cfg.data or run_data.get("spec") or "digits"
    crop_min = cfg.crop_min if cfg.crop_min is not None else float(run_data.get("crop_min", 0.2))
    hierarchy = load_hierarchy(loaded)
    model = hierarchy if hierarchy is not None else loaded.model
    model.to(device).eval()

    gen = seed_everything(cfg.seed)
    ds = build_dataset(data, cfg.split, PretrainTransform(loaded.img_size, crop_min=crop_min,
                                                          flip=bool(run_data.get("flip", True))))
    if ds.num_classes < 2:
        raise OperaError(f"data {data!r} has one class; the same/different-class comparison needs at least two")
    idx = torch.randperm(len(ds), generator=gen)[: cfg.num_images].sort().values.tolist()
    subset = torch.utils.data.Subset(ds, idx)
    reps1: dict[str, list[torch.Tensor]] = {}
    reps2: dict[str, list[torch.Tensor]] = {}
    labels = []
    for (v1, v2), y in make_loader(subset, cfg.batch_size, device=device):
        for store, v in ((reps1, v1), (reps2, v2)):
            for k, r in representations(loaded.model, hierarchy, v.to(device)).items():
                store.setdefault(k, []).append(r.float().cpu())
        labels.append(torch.as_tensor(y))
    y = torch.cat(labels)
    groups = {k: pair_similarities(torch.cat(reps1[k]), torch.cat(reps2[k]), y) for k in reps1}
    metrics: dict[str, Any] = {space: summarize(g) for space, g in groups.items()}
    for space, m in metrics.items():
        for name in PAIRS:
            run.log(f"diagnose/{space}/{name}", m[name], 0)
    metrics["ordering_holds_all"] = all(m["ordering_holds"] for m in metrics.values() if isinstance(m, dict))
    png = plot_histograms(groups, run.path(HISTOGRAM), cfg.bins,
                          f"Corollary 1 on {data} ({cfg.split}, {len(y)} images): {loaded.source}")
    table = {space: {n: m[n] for n in PAIRS + ("ordering_holds",)} for space, m in metrics.items() if isinstance(m, dict)}
    table["ordering_holds_all"] = metrics["ordering_holds_all"]
    results = run.finish(metrics, loaded, data={"spec": data, "split": cfg.split, "images": len(y), "crop_min": crop_min},
                         extra={"histogram": str(png), "spaces": list(groups)}, print_table=False)
    from opera.evals.common import print_metrics

    print_metrics(f"diagnose (Corollary 1): {loaded.source}", table, results["wall_time_s"])
    return results
