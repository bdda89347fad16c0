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

Every space also gets the label-free collapse statistics of the pretraining monitor
(:mod:`opera.engine.collapse`: RankMe, alpha-ReQ, std of the l2-normalised embeddings) over the
same images without augmentation (``EvalTransform``), with the collapse warning when one is low.

``plot="umap"|"tsne"`` draws every space's representation of those images in 2-D (UMAP, McInnes et
al. 2018, from ``umap-learn``; scikit-learn's t-SNE, van der Maaten & Hinton 2008, when umap-learn
is not installed or ``tsne`` is asked for), on the l2-normalised embeddings (the cosine geometry
of the histograms), coloured by class, with the classes held out of pretraining drawn as crosses
(the classes of ``data`` that the run's pretraining data spec did not select; every class when
the data is another dataset). One PNG per space, ``embedding_<space>.png``, holds the scatter
beside that space's similarity histogram; the 2-D coordinates, labels and held-out flags are in
``embedding_2d.npz`` (``<space>`` arrays, ``labels``, ``heldout``); all are listed in
``results.json`` (``plots``, ``embedding``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opera import distributed
from opera.configs import validate
from opera.engine.collapse import collapse_warnings, statistics
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
EMBEDDING_POINTS = "embedding_2d.npz"
PAIR_COLORS = {"view": "tab:green", "same_class": "tab:blue", "different_class": "tab:red"}


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
    for ax, (space, g) in zip(axes[0], groups.items()):
        draw_histogram(ax, g, bins, space)
    return save_figure(fig, path, title)


def draw_histogram(ax, g: dict[str, torch.Tensor], bins: int, title: str) -> None:
    """One space's histograms of the three pair types on ``ax``, each with its mean."""
    for name in PAIRS:
        vals = g[name].numpy()
        if vals.size:
            ax.hist(vals, bins=bins, range=(-1, 1), density=True, alpha=0.45, color=PAIR_COLORS[name],
                    label=f"{name.replace('_', ' ')} ({vals.mean():.2f})")
            ax.axvline(vals.mean(), color=PAIR_COLORS[name], lw=1)
    ax.set_title(title)
    ax.set_xlabel("cosine similarity")
    ax.legend(fontsize=7)


def save_figure(fig, path: Path, title: str) -> Path:
    """``fig`` as a PNG at ``path`` (atomically), closed."""
    import matplotlib.pyplot as plt

    from opera.files import atomic_write

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="the diagnosis plot")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- 2-D embeddings
def embedding_method(requested: str) -> str:
    """``umap`` when asked for and umap-learn imports, else ``tsne`` (scikit-learn)."""
    if requested == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            print("diagnose: umap-learn is not installed (pip install umap-learn); drawing with scikit-learn's t-SNE",
                  flush=True)
            return "tsne"
        return "umap"
    return "tsne"


def embed_2d(z: torch.Tensor, method: str, seed: int) -> np.ndarray:
    """N x 2 coordinates of the l2-normalised rows of ``z`` (Euclidean on the sphere: the cosine
    geometry), by UMAP or t-SNE, seeded."""
    x = F.normalize(z.double(), dim=1).numpy()
    n = len(x)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, init="random",
                         n_jobs=1).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(x)


def heldout_classes(data: str, run_data: str | None, num_classes: int) -> list[int] | None:
    """The labels (0..num_classes-1 of ``data``) of the classes the pretraining data ``run_data``
    did not select: those outside its class selection of the same dataset, every class of another
    dataset; None when the pretraining data is unknown (a bare backbone)."""
    from opera.data.specs import parse_data_spec

    if not run_data:
        return None
    here, there = parse_data_spec(data), parse_data_spec(run_data)
    if (here.name, here.root) != (there.name, there.root):
        return list(range(num_classes))
    if there.classes is None:
        return []
    original = here.classes if here.classes is not None else range(num_classes)
    return [label for label, c in enumerate(original) if c not in there.classes]


def plot_embeddings(points: dict[str, np.ndarray], labels: np.ndarray, heldout: list[int],
                    groups: dict[str, dict[str, torch.Tensor]], run: EvalRun, bins: int, title: str,
                    names: list[str]) -> dict[str, str]:
    """One PNG per space: its 2-D scatter coloured by class (held-out classes as crosses) beside
    its similarity histogram; returns ``{space: path}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    out = {}
    for space, xy in points.items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.2))
        for c in np.unique(labels):
            at = labels == c
            held = int(c) in heldout
            left.scatter(xy[at, 0], xy[at, 1], s=9 if held else 6, marker="x" if held else "o",
                         color=cmap(int(c) % cmap.N), linewidths=0.8 if held else 0,
                         label=f"{names[int(c)]}{' (held out)' if held else ''}")
        left.set_title(f"{space}: {len(xy)} images")
        left.set_xticks([])
        left.set_yticks([])
        left.legend(fontsize=6, markerscale=1.5, ncol=2 if len(names) > 10 else 1, loc="best")
        draw_histogram(right, groups[space], bins, f"{space}: pair similarities")
        name = "embedding_" + space.replace("/", "_") + ".png"
        out[space] = str(save_figure(fig, run.path(name), title))
    return out


def save_points(path: Path, points: dict[str, np.ndarray], labels: np.ndarray, heldout: list[int]) -> Path:
    from opera.files import atomic_write

    arrays = {**points, "labels": labels, "heldout": np.isin(labels, heldout)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write, what="the 2-D embedding coordinates")


def run_diagnose(cfg: DiagnoseConfig) -> dict:
    """Measure Corollary 1 for ``cfg.checkpoint``; returns the results dict."""
    from opera.data import EvalTransform, PretrainTransform, build_dataset

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
    # the same images without augmentation: the collapse statistics (and the 2-D plots)
    plain_set = torch.utils.data.Subset(build_dataset(data, cfg.split, EvalTransform(loaded.img_size)), idx)
    plain: dict[str, list[torch.Tensor]] = {}
    for x, _ in make_loader(plain_set, cfg.batch_size, device=device):
        for k, r in representations(loaded.model, hierarchy, x.to(device)).items():
            plain.setdefault(k, []).append(r.float().cpu())
    embeddings = {k: torch.cat(v) for k, v in plain.items()}
    collapse = {k: {**statistics(z), "dim": int(z.flatten(1).shape[1]), "images": len(z)}
                for k, z in embeddings.items()}
    for space, m in collapse.items():
        metrics[space].update({key: m[key] for key in ("rankme", "areq", "std", "std_sqrt_d")})
    for line in collapse_warnings(collapse):
        print(line, flush=True)
    for space, m in metrics.items():
        for name in PAIRS:
            run.log(f"diagnose/{space}/{name}", m[name], 0)
    metrics["ordering_holds_all"] = all(m["ordering_holds"] for m in metrics.values() if isinstance(m, dict))
    png = plot_histograms(groups, run.path(HISTOGRAM), cfg.bins,
                          f"Corollary 1 on {data} ({cfg.split}, {len(y)} images): {loaded.source}")
    extra: dict[str, Any] = {"histogram": str(png), "spaces": list(groups)}
    if cfg.plot:
        method = embedding_method(cfg.plot)
        heldout = heldout_classes(data, run_data.get("spec"), ds.num_classes)
        points = {k: embed_2d(z, method, cfg.seed) for k, z in embeddings.items()}
        plain_y = np.asarray([ds.targets[i] for i in idx], dtype=np.int64)
        extra["plots"] = plot_embeddings(points, plain_y, heldout or [], groups, run, cfg.bins,
                                         f"{method.upper()} and Corollary 1 on {data} ({cfg.split}): {loaded.source}",
                                         [str(c) for c in ds.class_names])
        extra["embedding"] = {"method": method, "requested": cfg.plot, "images": len(plain_y),
                              "heldout_classes": heldout, "points": str(save_points(run.path(EMBEDDING_POINTS), points,
                                                                                    plain_y, heldout or []))}
    table = {space: {n: m[n] for n in PAIRS + ("ordering_holds", "rankme")} for space, m in metrics.items()
             if isinstance(m, dict)}
    table["ordering_holds_all"] = metrics["ordering_holds_all"]
    results = run.finish(metrics, loaded, data={"spec": data, "split": cfg.split, "images": len(y), "crop_min": crop_min},
                         extra=extra, print_table=False)
    from opera.evals.common import print_metrics

    print_metrics(f"diagnose (Corollary 1): {loaded.source}", table, results["wall_time_s"])
    return results
