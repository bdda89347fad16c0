"""Transfer learning (paper Table 3).

* ``--suite classification``: the fine-tuning protocol (recipe ``transfer``: 100 epochs, 224 px)
  on CIFAR-10, CIFAR-100, Flowers-102 and Oxford-IIIT Pets read from ``--root`` by torchvision
  (``download=False``). Every dataset is checked before any training; a missing one is a one-line
  error saying which files to put where. ``--datasets cifar10,pets`` picks a subset.
* ``--suite digits``: the same protocols on the embedded digits, so the whole pipeline runs on a
  CPU in seconds: a backbone pretrained on some classes (its ``config.yaml``'s ``data.spec``, e.g.
  ``digits:0-4``) is evaluated by linear probe, k-NN and fine-tuning on the held-out classes
  (``--target``, default: the digits classes absent from pretraining, else ``digits:5-9``).

* ``--suite segmentation`` / ``--suite detection``: dense transfer (§4.3, Tables 4-5; see
  :mod:`opera.evals.dense`): UperNet/FCN mIoU on ADE20K (``--root`` holding
  ``ADEChallengeData2016/``) or Mask R-CNN R50-FPN box/mask AP on COCO (``--root`` holding
  ``annotations/instances_*2017.json``, ``train2017/``, ``val2017/``); without ``--root`` the
  embedded digit scenes (``--target digit_scenes:5-9``; default: the digits classes absent from
  pretraining, else all ten). ``--recipe`` picks a dense recipe (default: the paper's for real
  data, ``digits_segmentation`` / ``digits_detection`` for the scenes).

Each dataset / protocol writes its own ``results.json`` under ``OUTPUT/<name>/``; the suite's
``OUTPUT/results.json`` collects their top-1 accuracies (mIoU / AP for the dense suites). The
digits and dense suites record in its ``data`` what the run was pretrained on (``pretraining``)
and whether the target's classes were absent from it (``held_out``, :func:`held_out`); a target
that is not held out (a run pretrained on all ten digits) is also said in one console line.
"""

from __future__ import annotations

from typing import Any

from opera.configs import validate
from opera.errors import OperaError
from opera.evals.common import EvalRun, choose, load_eval_backbone, parse_data
from opera.evals.options import SUITES, TransferConfig  # noqa: F401  (re-exported)

DENSE_SUITES = ("segmentation", "detection")
CLASSIFICATION_DATASETS = ("cifar10", "cifar100", "flowers102", "pets")
DIGITS_PROTOCOLS = ("linear", "knn", "finetune")


def _split_list(text: str | None, valid: tuple[str, ...], what: str) -> list[str]:
    if not text:
        return list(valid)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OperaError(f"empty {what} list; choose from {', '.join(valid)}")
    for t in items:
        choose(what, t, valid)
    return items


def pretraining_spec(run_config: dict | None) -> str | None:
    """The data spec the run was pretrained on (its config.yaml's ``data.spec``); None without a
    run (``random:`` / ``timm:`` baselines, a bare backbone file)."""
    return ((run_config or {}).get("data") or {}).get("spec")


def _digit_classes(spec: str) -> set[int] | None:
    """The digits classes of a ``digits[:classes]`` or ``digit_scenes[:classes]`` spec; None for
    any other data."""
    from opera.data.digit_scenes import NAME as SCENES, parse_scenes_spec

    if spec.strip().split(":", 1)[0] == SCENES:
        return set(parse_scenes_spec(spec))
    try:
        parsed = parse_data(spec)
    except OperaError:  # a real dataset's spec (coco=ROOT, ade20k=ROOT, a folder gone since pretraining)
        return None
    return set(parsed.classes or range(10)) if parsed.name == "digits" else None


def held_out(run_config: dict | None, target: str) -> dict[str, Any]:
    """``{"pretraining": spec or None, "target": target, "held_out": ...}``: whether ``target``'s
    classes are absent from the data the run was pretrained on. True for a baseline without
    pretraining data (``random:`` / ``timm:``), for digits classes (``digits`` / ``digit_scenes``
    specs) that the pretraining's digits classes do not include, and for digits after another
    dataset or another dataset after digits; False when some target class was in pretraining;
    None for two real datasets, whose classes opera cannot compare. The digits and dense suites
    both record it, and :func:`held_out_note` words a False one."""
    pre = pretraining_spec(run_config)
    seen, wanted = (_digit_classes(pre) if pre else None), _digit_classes(target)
    if not pre:
        held: bool | None = True
    elif seen is None and wanted is None:
        held = None
    elif seen is None or wanted is None:
        held = True
    else:
        held = not (seen & wanted)
    return {"pretraining": pre, "target": target, "held_out": held}


def held_out_note(record: dict[str, Any]) -> str | None:
    """One line saying that a target is not held out (``record`` from :func:`held_out`); None otherwise."""
    from opera.data.specs import format_classes

    if record["held_out"] is not False:
        return None
    pre, target = record["pretraining"], record["target"]
    seen, wanted = _digit_classes(pre), _digit_classes(target)
    shared = format_classes(tuple(sorted(seen & wanted)))
    what = "all ten classes" if len(seen) == 10 else f"classes {format_classes(tuple(sorted(seen)))}"
    rest = [c for c in range(10) if c not in seen]
    fix = (f"--target digits:{format_classes(tuple(rest))} evaluates on the classes it did not see" if len(rest) >= 2 else
           "to measure transfer, pretrain on a subset (e.g. --data digits:0-4) and evaluate on the rest")
    return (f"{target} is not held out: the run was pretrained on {pre} ({what}, {shared} included), so these results "
            f"measure classes it saw in pretraining, not transfer to unseen classes; {fix}")


def print_note(text: str | None) -> None:
    """``note: TEXT`` as one console line (never wrapped); nothing for None."""
    if text:
        from rich.console import Console

        Console(soft_wrap=True, highlight=False).print(f"note: {text}", markup=False)


def digits_target(cfg: TransferConfig, run_config: dict | None) -> tuple[str, str | None]:
    """(target spec, pretraining spec or None)."""
    pre = pretraining_spec(run_config)
    if cfg.target:
        spec = parse_data(cfg.target)
        if spec.name != "digits":
            raise OperaError(f"--suite digits evaluates on digits classes, got --target {cfg.target!r}; use e.g. digits:5-9 or --suite classification")
        return cfg.target, pre
    if pre:
        pspec = parse_data(pre)
        if pspec.name == "digits" and pspec.classes:
            held = [c for c in range(10) if c not in pspec.classes]
            if len(held) >= 2:
                return "digits:" + ",".join(str(c) for c in held), pre
    return "digits:5-9", pre


def _finetune_cfg(cfg: TransferConfig, data: str, output: str, default_recipe: str):
    from opera.evals.finetune import finetune_config

    recipe = default_recipe if cfg.recipe == "auto" else cfg.recipe
    return finetune_config(recipe, checkpoint=cfg.checkpoint, data=data, output=output, backbone=cfg.backbone,
                           img_size=cfg.img_size, device=cfg.device, seed=cfg.seed, workers=cfg.workers,
                           tensorboard=cfg.tensorboard, epochs=cfg.epochs, batch_size=cfg.batch_size)


def dense_target(cfg: TransferConfig, run_config: dict | None) -> str:
    """The dense data spec: ``coco=ROOT`` / ``ade20k=ROOT`` with ``--root``, else the digit scenes
    of ``--target`` or of the digits classes held out from pretraining (all ten without one)."""
    if cfg.root:
        if cfg.target:
            raise OperaError(f"--target {cfg.target!r} selects digit scenes, but --root names real data; drop one of them")
        return f"{'ade20k' if cfg.suite == 'segmentation' else 'coco'}={cfg.root}"
    if cfg.target:
        spec = cfg.target.replace("digits", "digit_scenes", 1) if cfg.target.startswith("digits") and not cfg.target.startswith("digit_scenes") else cfg.target
        from opera.data.digit_scenes import parse_scenes_spec

        parse_scenes_spec(spec)
        return spec
    target, pre = digits_target(cfg, run_config)
    if not pre:
        return "digit_scenes"
    from opera.data.specs import format_classes

    return f"digit_scenes:{format_classes(parse_data(target).classes)}"


def run_dense_transfer(cfg: TransferConfig) -> dict:
    """``--suite segmentation|detection`` (one dataset: ADE20K / COCO or the digit scenes)."""
    from opera.evals.dense import dense_config, run_dense
    from opera.evals.dense.data import build_dense_dataset

    if cfg.root:  # a missing dataset fails before any model is built
        build_dense_dataset(dense_target(cfg, None), "val", cfg.suite)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, None, cfg.seed)
    data = dense_target(cfg, loaded.run_config)
    dcfg = dense_config(cfg.suite, cfg.recipe, checkpoint=cfg.checkpoint, data=data, output=cfg.output, backbone=cfg.backbone,
                        img_size=cfg.img_size, device=cfg.device, seed=cfg.seed, workers=cfg.workers,
                        tensorboard=cfg.tensorboard, iters=cfg.iters, batch_size=cfg.batch_size)
    record = held_out(loaded.run_config, data)
    res = run_dense(dcfg, loaded=loaded, protocol=f"transfer-{cfg.suite}",
                    data={"pretraining": record["pretraining"], "held_out": record["held_out"]})
    print_note(held_out_note(record))
    return res


def run_transfer(cfg: TransferConfig) -> dict:
    from pathlib import Path

    from opera.data import build_dataset

    validate(cfg)
    if cfg.suite in DENSE_SUITES:
        return run_dense_transfer(cfg)
    if cfg.suite == "classification":
        if not cfg.root:
            raise OperaError("--suite classification needs --root, the folder holding cifar-10-batches-py/, cifar-100-python/, flowers-102/ and oxford-iiit-pet/")
        names = _split_list(cfg.datasets, CLASSIFICATION_DATASETS, "--datasets entry")
        specs = {n: f"{n}={cfg.root}" for n in names}
        for spec in specs.values():  # fail on a missing dataset before any training
            build_dataset(spec, "train")
            build_dataset(spec, "val")
    else:
        protocols = _split_list(cfg.protocols, DIGITS_PROTOCOLS, "--protocols entry")
        if cfg.target:
            parse_data(cfg.target)
    out = Path(cfg.output)
    run = EvalRun(f"transfer-{cfg.suite}", cfg)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, "digits" if cfg.suite == "digits" else None, cfg.seed)
    metrics: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if cfg.suite == "classification":
        from opera.evals.finetune import run_finetune

        for name, spec in specs.items():
            ft = _finetune_cfg(cfg, spec, str(out / name), "transfer")
            res = run_finetune(ft, loaded=_fresh(loaded), protocol=f"transfer/{name}")
            metrics[name] = {"top1": res["metrics"]["top1"], "top5": res["metrics"]["top5"]}
            data[name] = spec
            run.log(f"transfer/{name}_top1", res["metrics"]["top1"], 0)
        metrics["mean_top1"] = sum(m["top1"] for m in metrics.values()) / len(names)
    else:
        target, _ = digits_target(cfg, loaded.run_config)
        data = held_out(loaded.run_config, target)
        common = dict(checkpoint=cfg.checkpoint, data=target, backbone=cfg.backbone, img_size=cfg.img_size,
                      device=cfg.device, seed=cfg.seed, workers=cfg.workers, tensorboard=cfg.tensorboard)
        for proto in protocols:
            sub = str(out / proto)
            if proto == "linear":
                from opera.evals.linear import LinearConfig, run_linear

                res = run_linear(LinearConfig(output=sub, epochs=cfg.linear_epochs, **common), loaded=_fresh(loaded))
            elif proto == "knn":
                from opera.evals.knn import KNNConfig, run_knn

                res = run_knn(KNNConfig(output=sub, k=cfg.k, **common), loaded=_fresh(loaded))
            else:
                from opera.evals.finetune import run_finetune

                res = run_finetune(_finetune_cfg(cfg, target, sub, "digits"), loaded=_fresh(loaded),
                                   protocol="transfer/finetune")
            metrics[proto] = {"top1": res["metrics"]["top1"], "top5": res["metrics"]["top5"]}
            run.log(f"transfer/{proto}_top1", res["metrics"]["top1"], 0)
    res = run.finish(metrics, loaded, data=data, title=f"transfer ({cfg.suite}): {loaded.source}")
    if cfg.suite == "digits":
        print_note(held_out_note(data))
    return res


def _fresh(loaded):
    """A private copy of the backbone for one protocol (protocols must not share state)."""
    import copy
    import dataclasses

    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
