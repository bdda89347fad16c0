"""The ``opera`` command line (Typer + rich).

    opera run pretrain --hierarchy self,full          # OPERA on the embedded digits, CPU
    opera run pretrain --hierarchy mask,self,full --backbone vit_tiny
    opera configs list | opera configs show NAME

Every ``OperaError`` is printed as one line (``error: ...``) with exit code 2, no traceback; a run
stopped by SIGINT/SIGTERM prints ``stopped at step N ...; rerun the same command to resume`` and
exits with 128 + the signal number.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from opera.errors import OperaError
from opera.launch.options import LaunchOptions, dispatch, with_launch_options

app = typer.Typer(
    help="opera: omni-supervised representation learning with hierarchical supervisions (OPERA).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
run_app = typer.Typer(help="Run a job: pretraining or an evaluation protocol.", no_args_is_help=True)
configs_app = typer.Typer(help="List and show the shipped recipes.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(configs_app, name="configs")
data_app = typer.Typer(help="Data utilities: a realistic JPEG folder for benchmarks and tests.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)


DEFAULT_RECIPE = "cpu_digits"
DEFAULT_VIT_RECIPE = "cpu_digits_vit"


def default_output(hierarchy: str, backbone: str, data: str) -> Path:
    """A deterministic default, so rerunning the same command resumes the same run."""
    safe = lambda s: "".join(c if c.isalnum() or c in "-_" else "-" for c in s).strip("-")  # noqa: E731
    return Path("runs") / f"{safe(hierarchy.replace(',', '+'))}_{safe(backbone)}_{safe(data)}"


def build_pretrain_config(config: Optional[str], hierarchy: Optional[str], arrangement: Optional[str],
                          backbone: Optional[str], data: Optional[str], epochs: Optional[int],
                          batch_size: Optional[int], seed: Optional[int], device: Optional[str],
                          workers: Optional[int], img_size: Optional[int], overrides: list[str],
                          labels: Optional[str] = None, unlabelled: Optional[str] = None, init: Optional[str] = None):
    """Defaults <- recipe <- named options <- ``--set`` overrides, validated once all are applied
    (every value against its field's range or choices, then the rules over several keys), so a
    bad value is a one-line error before anything is launched.

    Without ``--config``, the CPU recipe is ``cpu_digits`` (ResNet), or ``cpu_digits_vit`` when the
    hierarchy has ``mask`` (masked image modeling needs a token backbone) and no ``--backbone``
    is named; a CNN named with ``mask`` keeps its one-line error.
    """
    from opera.configs import apply_overrides, load_config, set_value

    if config is None:
        config = DEFAULT_RECIPE
        from opera.hierarchy import parse_spec

        if hierarchy is not None and backbone is None and "mask" in parse_spec(hierarchy):
            config = DEFAULT_VIT_RECIPE
            console.print(f"--hierarchy {hierarchy} has 'mask', which needs a ViT: using the ViT CPU recipe "
                          f"{DEFAULT_VIT_RECIPE} (pass --config or --backbone to choose another)", markup=False, highlight=False)
    cfg = load_config(config)
    named = {"hierarchy": hierarchy, "arrangement": arrangement, "backbone.name": backbone, "data.spec": data,
             "train.epochs": epochs, "train.batch_size": batch_size, "train.seed": seed, "train.device": device,
             "data.workers": workers, "backbone.img_size": img_size, "data.labels": labels, "data.unlabelled": unlabelled,
             "train.init": init}
    for key, value in named.items():
        if value is not None:
            set_value(cfg, key, value)
    return apply_overrides(cfg, overrides)  # validates: hierarchy, --labels, ranges, before any launch


@run_app.command("pretrain")
@with_launch_options
def pretrain(
    hierarchy: Optional[str] = typer.Option(None, "--hierarchy", "-H", help="Task spaces from the base up: self | full | self,full | mask,self | mask,self,full. Default: self,full (or the recipe's)."),
    arrangement: Optional[str] = typer.Option(None, "--arrangement", help="Where 'full' attaches (Fig. 4): C after the predictor (OPERA), B on the projector, A on the backbone, naive on the instance representation itself (Eq. 4)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="resnet_tiny, vit_tiny, resnet18, resnet50, deit_small, deit_base, or any timm model name."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data spec: digits, digits:0-4, an ImageNet-style folder, cifar10=ROOT ... (see README)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Pretraining epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size over all processes."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Crop size of the two views."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="A recipe name (opera configs list) or a YAML path; the named options below override it. Default: cpu_digits (cpu_digits_vit for a hierarchy with mask)."),
    overrides: list[str] = typer.Option([], "--set", help="Override any config key, repeatable: --set full.layers=3 --set optim.base_lr=0.3"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory. Rerunning into it resumes from its last.pt. Default: runs/<hierarchy>_<backbone>_<data>."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from this last.pt (or run directory) instead of OUTPUT/last.pt."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (data order, augmentations, masks)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers per process."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Images that keep their labels (the rest get -1, seen by self only): all, 10%, 13/class, or a FILE listing them one per line (SimCLR's 1%/10% split files). Class-balanced, seeded; the list goes to OUTPUT/labelled.txt."),
    unlabelled: Optional[str] = typer.Option(None, "--unlabelled", help="Extra images without labels, seen by self every epoch: a folder of images, auto (the unlabelled/ folder beside train/ in --data), or any data spec (its labels ignored)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights instead of random: an opera run or file, a MoCo-v3/OPERA main_moco.py checkpoint (also its projector, predictor, momentum encoder and class head), main_lincls.py, convert_to_deit.py, a timm/torchvision state dict or a config.json + model.safetensors folder (DINOv2). The optimizer and schedule start fresh; never downloads."),
    launch: LaunchOptions = None,  # --nproc, --slurm, --nodes, ... (opera.launch.options)
) -> None:
    """Pretrain a backbone with a supervision hierarchy (OPERA: --hierarchy self,full)."""
    cfg = build_pretrain_config(config, hierarchy, arrangement, backbone, data, epochs, batch_size, seed, device,
                                workers, img_size, overrides, labels=labels, unlabelled=unlabelled, init=init)
    from opera.data.labels import is_all

    where = cfg.data.spec + ("" if is_all(cfg.data.labels) else f"_labels-{Path(cfg.data.labels).name}") \
        + (f"_unlabelled-{Path(cfg.data.unlabelled).name}" if cfg.data.unlabelled else "")
    out = output or default_output(cfg.hierarchy, cfg.backbone.name, where)
    before = default_output(cfg.hierarchy, cfg.backbone.name, where.replace("_unlabelled-", "_unlabeled-"))
    if output is None and not out.exists() and before != out and before.exists():
        out = before  # the default name of a run begun before --unlabeled was renamed --unlabelled: resume it there
    world = launch.world_size
    if world > 1 and cfg.train.batch_size % world:  # before any process is started
        where = "tasks of the job" if launch.slurm else f"processes of --nproc {launch.nproc}"
        raise OperaError(f"--batch-size {cfg.train.batch_size} is not divisible by the {world} {where}; it is the "
                         f"global batch, split evenly over them: use a multiple of {world}")
    from opera.engine.pretrain import run_pretrain
    from opera.weights import InitWeights

    source = InitWeights.locate(cfg.train.init) if cfg.train.init else None  # a missing file: one line, before launching
    result = dispatch(run_pretrain, (cfg, out, str(resume.absolute()) if resume else None, source), launch, out)
    if isinstance(result, dict) and result.get("trained") is False:
        return  # a finished run (--resume of one): the loop said so in one line
    if not launch.slurm or launch.wait:
        console.print(f"[bold green]done[/] outputs in {out}: config.yaml metrics.jsonl last.pt backbone.safetensors tb/")


def _mount_subcommands() -> None:
    """``opera run linear|finetune|knn|transfer|diagnose``, ``opera export``, ``opera convert`` (opera.evals),
    ``opera ablate arrangements|hierarchy|sweep``, ``opera report`` (opera.ablate)."""
    from opera.ablate.cli import ablate_app, report
    from opera.evals import cli as evals_cli

    for name, fn in evals_cli.COMMANDS.items():
        run_app.command(name)(fn)
    app.command("export")(evals_cli.export)
    app.command("convert")(evals_cli.convert)
    app.add_typer(ablate_app, name="ablate")
    app.command("report")(report)
    from opera.bench import bench

    app.command("bench")(bench)


_mount_subcommands()


@data_app.command("make-folder")
def data_make_folder(
    dir: Path = typer.Argument(..., help="Folder to write class folders of JPEGs into."),
    n: int = typer.Option(2000, "--n", help="Number of images."),
    classes: int = typer.Option(10, "--classes", help="Number of class folders (image i goes to class i mod classes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crops, sizes and qualities."),
) -> None:
    """JPEGs cut from scikit-learn's sample photographs: shorter side 300-500 px, quality 75-95."""
    from opera.data.photos import make_photo_folder

    make_photo_folder(str(dir), n=n, classes=classes, seed=seed)
    console.print(f"wrote {n} JPEGs in {classes} class folders under {dir}", markup=False, highlight=False)


@configs_app.command("list")
def configs_list() -> None:
    """List the shipped recipes (paper rows and the CPU default)."""
    from rich.table import Table

    from opera.configs import list_recipes, load_yaml, recipe_path
    from opera.configs.schema import RECIPES

    table = Table("recipe", "description")
    for name in list_recipes():
        data = load_yaml(recipe_path(name), RECIPES)
        table.add_row(name, str(data.get("description", "")) if isinstance(data, dict) else "")
    console.print(table)


@configs_app.command("show")
def configs_show(name: str = typer.Argument(..., help="Recipe name or YAML path.")) -> None:
    """Print the fully resolved configuration of a recipe."""
    from opera.configs import config_to_dict, load_config

    console.print(yaml.safe_dump(config_to_dict(load_config(name)), sort_keys=False), end="", markup=False, highlight=False)


def _click_exception_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from typer._click.exceptions import ClickException as Bundled  # typer >= 0.26 bundles click

        types.append(Bundled)
    except ImportError:
        pass
    try:
        import click

        types.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(types)


def _abort_now(code: int) -> None:
    """Exit at once after a second SIGINT/SIGTERM: the run has already unwound (its lock released,
    any temporary file of an interrupted write removed, last.pt untouched), so the interpreter's
    shutdown is skipped - under load a library thread that wrote to stderr while it closed aborted
    the process (SIGABRT) instead of exiting with 128 + the signal."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    """Console entry point: one line per user error, exit code 2."""
    from opera.engine.stop import Aborted, Stopped

    try:
        code = app(standalone_mode=False)  # typer turns a KeyboardInterrupt into exit code 130, returned here
        if code == 130 and Aborted.last is not None:  # a second SIGINT/SIGTERM: 128 + that signal
            _abort_now(Aborted.last.exit_code)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Stopped as exc:  # SIGINT/SIGTERM: last.pt holds the step named; not an error of the user's
        Console(stderr=True, soft_wrap=True).print(escape(str(exc)), markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except OperaError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except KeyboardInterrupt as exc:  # a second SIGINT/SIGTERM (Aborted: 128 + its signal) or Ctrl-C outside a loop
        Console(stderr=True).print("interrupted; rerun the same command to resume from the last checkpoint")
        if isinstance(exc, Aborted):
            _abort_now(exc.exit_code)
        sys.exit(getattr(exc, "exit_code", 130))
    except Exception as exc:  # usage errors of typer's (bundled) click
        if isinstance(exc, _click_exception_types()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
