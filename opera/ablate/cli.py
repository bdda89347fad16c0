"""Typer commands of the ablation studies, for ``opera.cli`` to mount:

    app.add_typer(ablate_app, name="ablate")   # opera ablate arrangements | hierarchy | sweep | labels
    app.command("report")(report)              # opera report DIR

Every study runs its cells (variant x seed: pretraining, then linear probe and kNN in-domain and
on held-out classes) here in sequence or ``--jobs`` at a time, or as a SLURM array (``--slurm``),
skips finished cells when rerun, and writes ``OUT/report.{md,csv,json}`` and ``OUT/plots/``.

Defaults (``opera/ablate/recipes/ablate_digits.yaml``): ``cpu_digits`` (narrow ResNet, LARS,
batch 128, self.mlp_dim 1024) for 15 epochs on ``digits:0-6`` (105 steps), evaluated on
``digits:0-6`` (in-domain) and ``digits:7-9`` (transfer: classes never seen in pretraining);
3 seeds; 2 cells at a time with one torch thread each on a 2-core machine.

Measured on the 2 shared cores of the development machine (other jobs running beside it):
``opera ablate arrangements --seeds 3`` (9 cells, 2 at a time) finished in 9 min 17 s at a load
of 3-4 (~62 CPU-s per cell: ~4 CPU-s per epoch + ~10 s of start-up and the four evaluations;
~2.0 min of wall time per cell beside another). At a load of ~5 two cells side by side took
3.0 min, i.e. ~14 min for the 9 cells; on idle cores ~5-6 min; ``--jobs 1 --threads 1`` (in
sequence) ~24 min at load ~5. Two torch threads per process on a loaded 2-core machine are 5-8x
*slower* than one (spinning OpenMP threads), hence one thread per cell by default.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from opera.errors import OperaError
from opera.launch.options import LaunchOptions, with_launch_options

ablate_app = typer.Typer(
    help="Ablation studies (paper §4.3, Fig. 4-8): variants x seeds of pretraining + evaluation, resumable, with a report.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True, highlight=False)

SEEDS_HELP = "Seeds per variant (train.seed, train.seed+1, ...); the report shows mean ± 95% CI over them."
DATA_HELP = "Pretraining data spec (default: the recipe's digits:0-6). In-domain evaluations use its train/val splits."
TRANSFER_HELP = ("Held-out data spec for the transfer evaluations: auto (the digits classes not in --data, "
                 "e.g. digits:7-9), none, or a spec.")
CONFIG_HELP = "Base recipe: ablate_digits (default, opera/ablate/recipes), ablate_digits_vit, any 'opera configs list' name, or a YAML path."
SET_HELP = "Override any config key of every variant, repeatable: --set train.epochs=5."
OUTPUT_HELP = "Study directory (rerunning into it resumes: finished cells are not rerun). Default: runs/ablate/<study>."
EVALS_HELP = ("Evaluations of every cell: linear (frozen linear probe) and/or knn, in-domain and on --transfer; "
              "segmentation and/or detection: fine-tuned on the digit scenes of the --transfer classes (mIoU, box/mask AP).")
EVAL_SET_HELP = "Evaluation option, repeatable: --eval-set linear.epochs=30 --eval-set knn.k=10."
JOBS_HELP = "Cells run at once on this machine (spawned processes, logs in <cell>/log.txt). Default: 2 on >= 2 cores."
THREADS_HELP = "torch threads per cell. Default: cores / jobs (1 with 2 jobs on 2 cores: no spinning threads on a shared CPU)."
DEVICE_HELP = "auto | cpu | cuda | cuda:N for pretraining and evaluations."
DRY_HELP = "Print the variants and cells and exit (nothing is written)."


def _default_jobs() -> int:
    import os

    return max(1, min(2, os.cpu_count() or 1))


def command_line(ctx: Optional[typer.Context] = None) -> str:
    """The command as typed (``opera ablate ...``), for study.json and report.md: ``sys.argv``
    when it holds this command, else rebuilt from the command's context (tests, ``python -c``)."""
    argv = list(sys.argv[1:])
    if ctx is None:
        return shlex.join(["opera"] + argv)
    sub, c = [], ctx  # the subcommand names, e.g. ['ablate', 'sweep'] (also under 'python -m opera')
    while c.parent is not None:
        sub.insert(0, c.info_name)
        c = c.parent
    if sub and any(argv[i: i + len(sub)] == sub for i in range(len(argv))):
        return shlex.join(["opera"] + argv[next(i for i in range(len(argv)) if argv[i: i + len(sub)] == sub):])
    parts = ["opera"] + sub
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or value == p.default or (isinstance(value, (list, tuple)) and not value):
            continue
        flag = max(p.opts, key=len) if getattr(p, "opts", None) else p.name
        if getattr(p, "param_type_name", "") == "argument":
            parts.append(str(value))
        elif isinstance(value, bool):
            if value:
                parts.append(flag)
            elif getattr(p, "secondary_opts", None):
                parts.append(p.secondary_opts[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in s).strip("-")


def _run(kind: str, variants: list, *, output: Optional[Path], default_name: str, seeds: int, config: Optional[str],
         overrides: list[str], data: Optional[str], transfer: str, evals: str, eval_set: list[str],
         device: Optional[str], jobs: int, threads: Optional[int], dry_run: bool,
         launch: Optional[LaunchOptions] = None, ctx: Optional[typer.Context] = None) -> dict:
    from opera.ablate.study import check_run_options, create_study, plan_study, run_study

    out = output or Path("runs") / "ablate" / default_name
    check_run_options(jobs, threads)  # before anything is written; run_study checks them again
    if dry_run:  # every check of the real run (plan_study is create_study's), nothing written
        study = plan_study(kind, variants, command=command_line(ctx), seeds=seeds, config=config, overrides=overrides,
                           data=data, transfer=transfer, evals=evals, eval_options=eval_set, device=device)
        base = study.base
        console.print(f"[bold]{kind}[/] into {out}: {len(variants)} variants x {seeds} seeds = {len(variants) * seeds} cells "
                      f"({base['backbone']['name']}, {base['train']['epochs']} epochs, data {study.data}"
                      + (f", transfer {study.transfer}" if study.transfer else "") + ")")
        for v in variants:
            console.print(f"  {v.name}: {' '.join('--set ' + o for o in v.overrides)}" + (f"  ({v.note})" if v.note else ""),
                          markup=False, highlight=False)
        return {}
    study = create_study(kind, variants, output=out, command=command_line(ctx), seeds=seeds, config=config,
                         overrides=overrides, data=data, transfer=transfer, evals=evals, eval_options=eval_set, device=device)
    console.print(f"[bold]{kind}[/] study in {out}: {len(study.variants)} variants x {len(study.seeds)} seeds, "
                  f"data {study.data}" + (f", transfer {study.transfer}" if study.transfer else ""))
    return run_study(out, launch=launch, console=console, jobs=jobs, threads=threads)


@ablate_app.command("arrangements")
@with_launch_options
def arrangements(
    ctx: typer.Context,
    arrangements: str = typer.Option("A,B,C", "--arrangements", "-a", help="Fig. 4: A (full on the backbone), B (on the projector), C (after the predictor: OPERA), naive (Eq. 4); comma-separated."),
    seeds: int = typer.Option(3, "--seeds", help=SEEDS_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    transfer: str = typer.Option("auto", "--transfer", help=TRANSFER_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help=OUTPUT_HELP),
    evals: str = typer.Option("linear,knn", "--evals", help=EVALS_HELP),
    eval_set: list[str] = typer.Option([], "--eval-set", help=EVAL_SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    jobs: int = typer.Option(_default_jobs(), "--jobs", "-j", help=JOBS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    launch: LaunchOptions = None,
) -> None:
    """Arrangements of the supervisions (Fig. 4): self,full with the class space at A, B or C."""
    from opera.ablate.study import arrangement_variants

    variants = arrangement_variants(arrangements)
    _run("arrangements", variants, output=output, default_name="arrangements", seeds=seeds, config=config,
         overrides=overrides, data=data, transfer=transfer, evals=evals, eval_set=eval_set, device=device, jobs=jobs,
         threads=threads, dry_run=dry_run, launch=launch, ctx=ctx)


@ablate_app.command("hierarchy")
@with_launch_options
def hierarchy(
    ctx: typer.Context,
    variants: Optional[str] = typer.Option(None, "--variants", "-v", help="Comma-separated: self (MoCo-v3), full (supervised), self+full (OPERA), naive (Eq. 4 sum), mask+self+full (MIM; ViT only). Default: all of them with a ViT backbone, all but mask+self+full with a CNN."),
    seeds: int = typer.Option(3, "--seeds", help=SEEDS_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    transfer: str = typer.Option("auto", "--transfer", help=TRANSFER_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help=OUTPUT_HELP),
    evals: str = typer.Option("linear,knn", "--evals", help=EVALS_HELP),
    eval_set: list[str] = typer.Option([], "--eval-set", help=EVAL_SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    jobs: int = typer.Option(_default_jobs(), "--jobs", "-j", help=JOBS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    launch: LaunchOptions = None,
) -> None:
    """Single-level baselines vs OPERA: self, full, self+full, naive (Eq. 4), mask+self+full.

    mask+self+full needs a ViT (masked image modeling on patch tokens): with the default CNN recipe
    it is left out of the default list (with a note), and naming it explicitly is an error; run
    the whole study on a ViT with --config ablate_digits_vit to include it, so that every variant
    shares one backbone.
    """
    from opera.ablate.study import DEFAULT_HIERARCHY_VARIANTS, _is_vit_name, base_config, hierarchy_variants

    names = variants
    if names is None:
        cfg = base_config(config, overrides)
        if _is_vit_name(cfg.backbone.name):
            names = ",".join(DEFAULT_HIERARCHY_VARIANTS)
        else:
            names = ",".join(v for v in DEFAULT_HIERARCHY_VARIANTS if "mask" not in v)
            console.print(f"[yellow]note:[/] mask+self+full left out: the backbone {cfg.backbone.name!r} is a CNN "
                          "(no patch tokens to mask); use --config ablate_digits_vit to include it")
    _run("hierarchy", hierarchy_variants(names), output=output, default_name="hierarchy", seeds=seeds, config=config,
         overrides=overrides, data=data, transfer=transfer, evals=evals, eval_set=eval_set, device=device, jobs=jobs,
         threads=threads, dry_run=dry_run, launch=launch, ctx=ctx)


@ablate_app.command("labels")
@with_launch_options
def labels(
    ctx: typer.Context,
    fractions: str = typer.Option("1%,10%,100%", "--fractions", "-f", help="Comma-separated --labels values (10%, 13/class, all): the images that keep their labels; the rest are seen by self only."),
    variants: str = typer.Option("self,full,self+full", "--variants", "-v", help="Hierarchy variants as in 'opera ablate hierarchy'; one without a labelled space (self) runs once, not per fraction."),
    seeds: int = typer.Option(3, "--seeds", help=SEEDS_HELP + " The labelled subset is drawn from the seed too."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    transfer: str = typer.Option("auto", "--transfer", help=TRANSFER_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help=OUTPUT_HELP),
    evals: str = typer.Option("linear,knn", "--evals", help=EVALS_HELP),
    eval_set: list[str] = typer.Option([], "--eval-set", help=EVAL_SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    jobs: int = typer.Option(_default_jobs(), "--jobs", "-j", help=JOBS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    launch: LaunchOptions = None,
) -> None:
    """Label scarcity (omni-supervision): self, full, self+full pretrained with 1%, 10%, 100% of the labels.

    The linear probe and kNN of every cell use all labels of their train split (they measure the
    representation); the held-out classes are never labelled in pretraining at any fraction.
    """
    from opera.ablate.study import label_variants

    _run("labels", label_variants(fractions, variants), output=output, default_name="labels", seeds=seeds,
         config=config, overrides=overrides, data=data, transfer=transfer, evals=evals, eval_set=eval_set,
         device=device, jobs=jobs, threads=threads, dry_run=dry_run, launch=launch, ctx=ctx)


@ablate_app.command("sweep")
@with_launch_options
def sweep(
    ctx: typer.Context,
    sets: list[str] = typer.Option(..., "--set", help="KEY=V1,V2,... is an axis (several axes: a grid); KEY=V is fixed for every variant. Fig. 5: train.epochs, Fig. 6: full.layers, Fig. 7: self.dim, Fig. 8: full.hidden. Write hierarchies with '+': hierarchy=self,self+full."),
    seeds: int = typer.Option(3, "--seeds", help=SEEDS_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    transfer: str = typer.Option("auto", "--transfer", help=TRANSFER_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Study directory. Default: runs/ablate/sweep_<keys>."),
    evals: str = typer.Option("linear,knn", "--evals", help=EVALS_HELP),
    eval_set: list[str] = typer.Option([], "--eval-set", help=EVAL_SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    jobs: int = typer.Option(_default_jobs(), "--jobs", "-j", help=JOBS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    launch: LaunchOptions = None,
) -> None:
    """Sweep config keys (Fig. 5-8): --set full.layers=1,2,3,4 [--set self.dim=128,256 ...] (a grid)."""
    from opera.ablate.study import sweep_variants

    variants, fixed = sweep_variants(sets)
    keys = [v.split("=", 1)[0] for v in variants[0].overrides]
    _run("sweep", variants, output=output, default_name="sweep_" + "_".join(_safe(k) for k in keys), seeds=seeds,
         config=config, overrides=fixed, data=data, transfer=transfer, evals=evals, eval_set=eval_set, device=device,
         jobs=jobs, threads=threads, dry_run=dry_run, launch=launch, ctx=ctx)


def report(
    directory: Path = typer.Argument(..., help="The --output directory of an 'opera ablate' study."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
) -> None:
    """Rebuild an ablation's report (report.md/.csv/.json, plots) from the cells finished so far."""
    from opera.ablate.report import build_report

    if not directory.is_dir():
        raise OperaError(f"{directory} is not a directory; pass the --output of an 'opera ablate' study")
    build_report(directory, console=console, plots=plots)
