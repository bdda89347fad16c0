"""The report of an ablation study, rebuilt from whatever cells have finished.

For every variant and metric: the mean over seeds and the half-width of its 95% confidence
interval, ``t_{0.975, n-1} * s / sqrt(n)`` (Student t with n-1 degrees of freedom, ``s`` the
sample standard deviation; with one seed there is no interval). The t quantile is computed here
(no scipy): the t CDF from the regularised incomplete beta function (Lentz's continued
fraction), inverted by bisection to machine precision.

Outputs in the study directory: ``report.md`` (the command, the table with the best mean per
column in bold, per-cell values, the plots), ``report.csv`` (one row per variant: seeds, and per
metric ``<m>_mean``, ``<m>_ci95``, ``<m>_best``), ``report.json``, ``plots/<metric>.png`` (bars
with 95% error bars) and ``plots/loss_curves.png`` (training losses from metrics.jsonl, mean over
seeds); the same table is printed with rich.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from pathlib import Path
from typing import Any

from opera.files import atomic_write
from opera.ablate.records import CELLS, cell_dir, load_study, read_cell

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PLOTS = "plots"

#: metric labels of the evaluations (``<eval>/<top-k>``); unknown metrics keep their key
LABELS = {
    "linear/top1": "linear top-1",
    "knn/top1": "kNN top-1",
    "transfer_linear/top1": "transfer linear top-1",
    "transfer_knn/top1": "transfer kNN top-1",
    "segmentation/miou": "segmentation mIoU",
    "detection/box_ap": "detection box AP",
    "detection/mask_ap": "detection mask AP",
}


# ----------------------------------------------------------------------------- statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_central(t: float, df: int) -> float:
    """P(|T| < t), t >= 0, for integer ``df`` (Abramowitz & Stegun 26.7.3-4: exact finite sums)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    # 2/pi [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))]
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (exact sums for integer df <= 2000,
    the incomplete beta function otherwise)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if float(df).is_integer() and df <= 2000:
        central = _t_central(abs(t), int(df))
        return 0.5 + 0.5 * central if t >= 0 else 0.5 - 0.5 * central
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. ``t_quantile(0.975, 2)``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, half-width of the confidence interval, sample std)`` of ``values``.

    The interval is ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``; with ``n = 1`` the half-width and
    the std are ``None`` (no interval from one seed).
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(vals) / n
    if n == 1:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n), std


# ----------------------------------------------------------------------------- collecting
def _metric_order(keys: set[str]) -> list[str]:
    known = [k for k in LABELS if k in keys]
    return known + sorted(k for k in keys if k not in LABELS and k.endswith("/top1"))


def collect(study_dir: str | Path) -> dict[str, Any]:
    """Every finished cell of the study, grouped by variant, and the per-variant statistics."""
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    expected = {(v.name, s) for v, s in study.cells()}
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    keys: set[str] = set()
    pending: list[str] = []
    for v in study.variants:
        vdir = study_dir / CELLS / v.dirname
        seeds_found = sorted({int(p.name[4:]) for p in vdir.glob("seed*") if p.name[4:].isdigit()} |
                             {s for (n, s) in expected if n == v.name})
        done = []
        for s in seeds_found:
            rec = read_cell(cell_dir(study_dir, v, s))
            if rec is None:
                if (v.name, s) in expected:
                    pending.append(f"{v.name}/seed{s}")
                continue
            rec = {**rec, "dir": str(cell_dir(study_dir, v, s).relative_to(study_dir))}
            done.append(rec)
            keys |= set(rec.get("metrics", {}))
        cells += done
        rows.append({"variant": v.name, "note": v.note, "overrides": v.overrides, "cells": done})
    metrics = _metric_order(keys)
    for row in rows:
        row["seeds"] = len(row["cells"])
        row["seed_list"] = [c["seed"] for c in row["cells"]]
        stats = {}
        for m in metrics:
            vals = [c["metrics"][m] for c in row["cells"] if isinstance(c.get("metrics", {}).get(m), (int, float))]
            if vals:
                mean, ci, std = mean_ci(vals)
                stats[m] = {"mean": mean, "ci95": ci, "std": std, "n": len(vals), "values": vals}
        row["stats"] = stats
        row["cell_minutes"] = sum(float(c.get("cell_s", 0.0)) for c in row["cells"]) / 60.0
    best: dict[str, list[str]] = {}
    for m in metrics:
        means = [(r["stats"][m]["mean"], r["variant"]) for r in rows if m in r["stats"]]
        if means:
            top = max(x for x, _ in means)
            best[m] = [name for x, name in means if x >= top - 1e-9]
    return {"study": study, "rows": rows, "metrics": metrics, "best": best, "pending": pending,
            "finished": len(cells), "expected": len(expected)}


def loss_curves(study_dir: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{variant: {loss key: (epochs, mean over seeds)}}`` from the finished cells' metrics.jsonl."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        acc: dict[str, dict[int, list[float]]] = {}
        epoch_at: dict[int, float] = {}
        for c in row["cells"]:
            path = study_dir / c["dir"] / "pretrain" / "metrics.jsonl"
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" not in r or "step" not in r:
                    continue
                step = int(r["step"])
                epoch_at.setdefault(step, float(r.get("epoch", step)))
                for k, val in r.items():
                    if (k == "loss" or k.startswith("loss/")) and isinstance(val, (int, float)) and math.isfinite(val):
                        acc.setdefault(k, {}).setdefault(step, []).append(float(val))
        curves = {}
        for k, by_step in acc.items():
            steps = sorted(by_step)
            curves[k] = ([epoch_at[s] for s in steps], [sum(by_step[s]) / len(by_step[s]) for s in steps])
        if curves:
            out[row["variant"]] = curves
    return out


# ----------------------------------------------------------------------------- formatting
def fmt(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat:
        return "-"
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def _plot_name(metric: str) -> str:
    return metric.replace("/", "_") + ".png"


def make_plots(study_dir: Path, data: dict[str, Any]) -> list[str]:
    """Bar charts (mean, 95% error bars, every seed as a dot) per metric and the loss curves."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots_dir = study_dir / PLOTS
    written: list[str] = []
    rows = [r for r in data["rows"] if r["seeds"]]
    for m in data["metrics"]:
        have = [r for r in rows if m in r["stats"]]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(have) + 2), 3.6))
        xs = list(range(len(have)))
        means = [r["stats"][m]["mean"] for r in have]
        errs = [r["stats"][m]["ci95"] or 0.0 for r in have]
        colors = ["tab:orange" if r["variant"] in data["best"].get(m, []) else "tab:blue" for r in have]
        ax.bar(xs, means, yerr=errs, capsize=5, color=colors, alpha=0.85)
        for x, r in zip(xs, have):
            vals = r["stats"][m]["values"]
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["variant"] for r in have], rotation=20 if max(len(r["variant"]) for r in have) > 8 else 0,
                           ha="right" if max(len(r["variant"]) for r in have) > 8 else "center")
        lo = min(min(min(r["stats"][m]["values"]) for r in have), min(mu - e for mu, e in zip(means, errs)))
        hi = max(mu + e for mu, e in zip(means, errs))
        span = max(hi - lo, 1.0)
        ax.set_ylim(max(0.0, lo - 0.3 * span), hi + 0.1 * span)
        ax.set_ylabel(f"{label(m)} (%)")
        ax.set_title(f"{label(m)}: mean ± 95% CI over seeds")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        name = _plot_name(m)
        atomic_write(plots_dir / name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"), what="a report plot")
        plt.close(fig)
        written.append(f"{PLOTS}/{name}")
    curves = loss_curves(study_dir, rows)
    if curves:
        keys = ["loss"] + sorted({k for c in curves.values() for k in c if k != "loss"})
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for variant, c in curves.items():
                if k in c:
                    ax.plot(c[k][0], c[k][1], label=variant, linewidth=1.4)
            ax.set_title(f"{k} (mean over seeds)")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        atomic_write(plots_dir / "loss_curves.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="a report plot")
        plt.close(fig)
        written.append(f"{PLOTS}/loss_curves.png")
    return written


def _csv_text(data: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["variant", "seeds"]
    for m in data["metrics"]:
        header += [f"{m}_mean", f"{m}_ci95", f"{m}_best"]
    w.writerow(header)
    for r in data["rows"]:
        line: list[Any] = [r["variant"], r["seeds"]]
        for m in data["metrics"]:
            s = r["stats"].get(m)
            line += [f"{s['mean']:.4f}" if s else "", f"{s['ci95']:.4f}" if s and s["ci95"] is not None else "",
                     int(r["variant"] in data["best"].get(m, [])) if s else ""]
        w.writerow(line)
    return buf.getvalue()


def _md_text(data: dict[str, Any], plots: list[str]) -> str:
    study = data["study"]
    lines = [f"# Ablation: {study.kind}", ""]
    lines += ["Produced by:", "", "```bash", study.command, "```", ""]
    if len(study.invocations) > 1:
        lines += [f"Resumed {len(study.invocations) - 1} time(s); last: `{study.invocations[-1]['command']}`.", ""]
    lines += [
        f"- pretraining data: `{study.data}`" + (f"; transfer (held-out classes): `{study.transfer}`" if study.transfer else ""),
        f"- base config: `{study.config_source}`" + (f" with `{' '.join('--set ' + o for o in study.overrides)}`" if study.overrides else ""),
        f"- backbone `{study.base['backbone']['name']}`, {study.base['train']['epochs']} epochs, batch {study.base['train']['batch_size']}",
        f"- seeds: {', '.join(map(str, study.seeds))}; evaluations: {', '.join(n for n, _, _ in study.eval_plan())}",
        f"- cells finished: {data['finished']} of {data['expected']}" + (f" (pending: {', '.join(data['pending'])})" if data["pending"] else ""),
        "",
        "Mean ± 95% confidence interval over seeds (Student t, n-1 degrees of freedom; no interval with one seed). "
        "Best mean per column in **bold**. Accuracies in %.",
        "",
    ]
    header = ["variant", "seeds"] + [label(m) for m in data["metrics"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in data["rows"]:
        cells = [r["variant"] + (f" ({r['note']})" if r["note"] else ""), str(r["seeds"])]
        for m in data["metrics"]:
            text = fmt(r["stats"].get(m))
            cells.append(f"**{text}**" if r["variant"] in data["best"].get(m, []) and r["stats"].get(m) else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if data["finished"]:
        lines += ["## Per cell", ""]
        head = ["variant", "seed"] + [label(m) for m in data["metrics"]] + ["final loss", "minutes"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        for r in data["rows"]:
            for c in r["cells"]:
                vals = [f"{c['metrics'][m]:.2f}" if m in c.get("metrics", {}) else "-" for m in data["metrics"]]
                loss = c.get("final_losses", {}).get("loss")
                lines.append("| " + " | ".join([r["variant"], str(c["seed"])] + vals + [
                    f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", f"{float(c.get('cell_s', 0)) / 60:.1f}"]) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    lines += ["Variants:", ""]
    lines += [f"- `{v.name}`: {' '.join('--set ' + o for o in v.overrides)}" + (f" ({v.note})" if v.note else "")
              for v in study.variants]
    lines += ["", f"_Report built {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by `opera report`._", ""]
    return "\n".join(lines)


def print_table(data: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    study = data["study"]
    table = Table(title=f"ablation {study.kind}: {data['finished']}/{data['expected']} cells "
                        f"(mean ± 95% CI over seeds, best in bold)")
    table.add_column("variant", overflow="fold")
    table.add_column("seeds", justify="right")
    for m in data["metrics"]:
        table.add_column(label(m), justify="right")
    for r in data["rows"]:
        cells = [r["variant"], str(r["seeds"])]
        for m in data["metrics"]:
            text = fmt(r["stats"].get(m))
            cells.append(f"[bold green]{text}[/]" if r["variant"] in data["best"].get(m, []) and r["stats"].get(m) else text)
        table.add_row(*cells)
    console.print(table)


def build_report(study_dir: str | Path, console: Any = None, plots: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Write report.md/.csv/.json and the plots from the finished cells; print the table; return report.json's dict."""

    study_dir = Path(study_dir)
    data = collect(study_dir)
    written = make_plots(study_dir, data) if plots and data["finished"] else []
    md = _md_text(data, written)
    atomic_write(study_dir / REPORT_MD, lambda tmp: Path(tmp).write_text(md))
    text = _csv_text(data)
    atomic_write(study_dir / REPORT_CSV, lambda tmp: Path(tmp).write_text(text))
    study = data["study"]
    out = {
        "kind": study.kind, "command": study.command, "data": study.data, "transfer": study.transfer,
        "seeds": study.seeds, "evals": [n for n, _, _ in study.eval_plan()],
        "finished": data["finished"], "expected": data["expected"], "pending": data["pending"],
        "metrics": data["metrics"], "best": data["best"], "plots": written,
        "rows": [{k: v for k, v in r.items() if k != "cells"} | {"cells": [
            {k: c.get(k) for k in ("seed", "metrics", "final_losses", "cell_s", "pretrain_s", "dir")} for c in r["cells"]]}
            for r in data["rows"]],
    }
    js = json.dumps(out, indent=2) + "\n"
    atomic_write(study_dir / REPORT_JSON, lambda tmp: Path(tmp).write_text(js))
    if not quiet:
        print_table(data, console)
        from rich.console import Console

        (console or Console()).print(f"report: {study_dir / REPORT_MD} ({data['finished']}/{data['expected']} cells)")
    return out

