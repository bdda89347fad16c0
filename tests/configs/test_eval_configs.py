"""The evaluation configs state every field's help, range and choices once (``opera.fields.option``):
:func:`opera.configs.validate` refuses a value outside them in one line naming the key and the fix,
whether the value comes from ``--set``, a recipe, a named CLI option or Python code."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from tests.cli.test_bad_inputs import run_cli
from tests.configs.ranges import outside
from opera.configs import apply_overrides, validate
from opera.errors import OperaError
from opera.evals.dense.run import DenseConfig, run_dense
from opera.evals.diagnose import DiagnoseConfig, run_diagnose
from opera.evals.finetune import FinetuneConfig, run_finetune
from opera.evals.knn import KNNConfig, run_knn
from opera.evals.linear import LinearConfig, run_linear
from opera.evals.transfer import TransferConfig, run_transfer
from opera.fields import has_range

CONFIGS = {"linear": LinearConfig, "finetune": FinetuneConfig, "knn": KNNConfig, "dense": DenseConfig,
           "diagnose": DiagnoseConfig, "transfer": TransferConfig}




def ranged() -> list[tuple[str, type, dataclasses.Field]]:
    """``(protocol, config class, field)`` of every eval config field with a range or choices."""
    return [(name, cls, f) for name, cls in CONFIGS.items() for f in dataclasses.fields(cls)
            if has_range(f) or "choices" in f.metadata]


RANGED = ranged()


def test_every_field_of_every_eval_config_states_its_help():
    for cls in CONFIGS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_the_ranges_the_protocols_need_are_stated():
    keys = {f"{name}.{f.name}" for name, _, f in RANGED}
    assert {"linear.epochs", "linear.batch_size", "linear.feature_batch_size", "linear.base_lr", "linear.crop_min",
            "linear.grid_lr_scales", "linear.holdout_fraction", "linear.momentum", "linear.workers", "linear.log_every",
            "finetune.epochs", "finetune.batch_size", "finetune.lr_batch_base", "finetune.eval_every",
            "finetune.base_lr", "finetune.crop_min", "finetune.layer_decay", "finetune.drop_path",
            "finetune.label_smoothing", "finetune.reprob", "finetune.mixup_prob", "finetune.mixup_switch_prob",
            "finetune.amp", "finetune.weight_decay", "knn.k", "knn.temperature", "knn.query_chunk", "knn.bank_chunk",
            "dense.task", "dense.optimizer", "dense.schedule", "dense.head", "dense.iters", "dense.batch_size",
            "dense.eval_batch_size", "dense.lr", "dense.momentum", "diagnose.split", "diagnose.num_images",
            "diagnose.crop_min", "transfer.suite", "transfer.k", "transfer.linear_epochs"} <= keys


def test_defaults_are_valid():
    for cls in CONFIGS.values():
        validate(cls())


@pytest.mark.parametrize("name,cls,f", RANGED, ids=[f"{n}.{f.name}" for n, _, f in RANGED])
def test_every_ranged_field_refuses_a_value_just_outside_it(name, cls, f):
    """Generic over every eval config field with a range or choices: each value just outside it
    is refused by ``--set`` in one line naming the key and the fix; the default is inside it."""
    tp = typing.get_type_hints(cls)[f.name]
    default = getattr(cls(), f.name)
    bads = outside(f, tp)
    assert bads, f.name
    for bad in bads:
        value = [bad, bad] if isinstance(default, tuple) else bad
        text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(bad)
        with pytest.raises(OperaError) as err:
            apply_overrides(cls(), [f"{f.name}={text}"], command=f"run {name}")
        msg = str(err.value)
        assert f.name in msg and "\n" not in msg and f"--set {f.name}=" in msg, msg


def test_boundaries_inside_the_range_are_accepted():
    cfg = apply_overrides(FinetuneConfig(), ["crop_min=1", "layer_decay=1", "drop_path=0", "reprob=1", "amp=off",
                                             "workers=0", "log_every=0", "randaug_magnitude=30"])
    assert (cfg.crop_min, cfg.layer_decay, cfg.amp, cfg.randaug_magnitude) == (1.0, 1.0, "off", 30)
    cfg = apply_overrides(LinearConfig(), ["base_lr=null", "momentum=1", "holdout_fraction=0.5"])
    assert (cfg.base_lr, cfg.momentum, cfg.holdout_fraction) == (None, 1.0, 0.5)
    cfg = apply_overrides(DenseConfig(), ["output_stride=8", "frozen_stages=4", "head=linear"])
    assert (cfg.output_stride, cfg.frozen_stages, cfg.head) == (8, 4, "linear")


def test_message_names_key_value_range_and_fix():
    with pytest.raises(OperaError) as err:
        apply_overrides(LinearConfig(), ["crop_min=2"], command="run linear")
    assert str(err.value) == ("config key crop_min=2.0 is out of range: must be in (0, 1]; "
                              "set --set crop_min=<number in (0, 1]>")


@pytest.mark.parametrize("call", [
    lambda out: run_linear(LinearConfig(checkpoint="random:resnet_tiny", output=out, crop_min=2.0)),
    lambda out: run_linear(LinearConfig(checkpoint="random:resnet_tiny", output=out, workers=-1)),
    lambda out: run_knn(KNNConfig(checkpoint="random:resnet_tiny", output=out, temperature=0.0)),
    lambda out: run_finetune(FinetuneConfig(checkpoint="random:resnet_tiny", data="digits", output=out, reprob=1.5)),
    lambda out: run_dense(DenseConfig(checkpoint="random:resnet_tiny", output=out, optimizer="adam")),
    lambda out: run_diagnose(DiagnoseConfig(checkpoint="random:resnet_tiny", output=out, num_images=3)),
    lambda out: run_transfer(TransferConfig(checkpoint="random:resnet_tiny", output=out, linear_epochs=0)),
], ids=["linear", "linear-workers", "knn", "finetune", "dense", "diagnose", "transfer"])
def test_a_config_built_in_python_is_validated_by_its_protocol(call, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(OperaError, match=r"^config key \w+") as err:
        call(str(out))
    assert "\n" not in str(err.value) and "--set " in str(err.value)
    assert not out.exists()


def test_cross_field_rules_stay_in_the_protocols(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(OperaError, match="even --batch-size"):
        run_finetune(FinetuneConfig(checkpoint="random:resnet_tiny", data="digits", output=out, batch_size=63))
    with pytest.raises(OperaError, match="needs batch_size >= 2"):
        run_dense(DenseConfig(checkpoint="random:resnet_tiny", output=out, batch_size=1))
    with pytest.raises(OperaError, match="at least one BatchNorm setting"):
        run_linear(LinearConfig(checkpoint="random:resnet_tiny", output=out, grid=True, grid_bn=()))


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code, _, err = run_cli(args, capsys)
    return code, err


@pytest.mark.parametrize("args,key", [
    (["linear", "--epochs", "0"], "epochs"),
    (["finetune", "--crop-min", "2"], "crop_min"),
    (["knn", "--set", "temperature=0"], "temperature"),
    (["diagnose", "--split", "test"], "split"),
])
def test_the_cli_refuses_an_out_of_range_option_in_one_line_with_exit_2(args, key, capsys, tmp_path):
    out = tmp_path / "o"
    code, err = _cli(["run", args[0], "--checkpoint", "random:resnet_tiny", "--output", str(out), *args[1:]], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"config key {key}" in lines[0] and f"--set {key}=" in lines[0], lines[0]
    assert not out.exists()
