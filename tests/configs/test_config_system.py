"""One config mechanism for every protocol: field metadata, validate, load_recipe, apply_overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from tests.configs.ranges import outside
from opera.configs import PretrainConfig, apply_overrides, list_recipes, load_config, load_recipe, validate
from opera.configs.core import RENAMED, leaf_fields, rename_keys, rename_override, sections, valid_keys
from opera.configs.schema import RECIPES, SECTIONS
from opera.errors import OperaError
from opera.fields import has_range, option
from opera.supervisions import SPACES


def ranged_keys() -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every pretraining leaf whose metadata states a range or choices."""
    out = []

    def walk(cfg, prefix):
        for name, f in leaf_fields(cfg).items():
            if has_range(f) or "choices" in f.metadata:
                out.append((prefix + name, f))
        for name, sub in sections(cfg).items():
            walk(sub, f"{prefix}{name}.")

    walk(PretrainConfig(), "")
    return out




RANGED = ranged_keys()


def test_every_section_and_space_states_help_on_every_field():
    classes = list(SECTIONS.values()) + [SPACES.get(n).Options for n in SPACES.names()]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    keys = {k for k, _ in RANGED}  # the ranges the math needs
    assert {"optim.base_lr", "optim.ema_momentum", "optim.momentum", "train.epochs", "train.batch_size",
            "self.dim", "self.mlp_dim", "self.temperature", "full.layers", "full.label_smoothing", "mask.ratio",
            "supcon.temperature", "train.amp", "data.augment_on"} <= keys


def test_defaults_and_every_shipped_recipe_are_valid():
    validate(PretrainConfig())
    for name in list_recipes():
        load_config(name)


@pytest.mark.parametrize("key,f", RANGED, ids=[k for k, _ in RANGED])
def test_a_value_outside_a_fields_range_is_refused_naming_key_and_range(key, f):
    """Generic over every field with a range or choices: each value just outside it is refused at
    load (``--set``), in one line naming the key and the fix; the default is inside it."""
    import typing

    owner = PretrainConfig()
    for part in key.split(".")[:-1]:
        owner = sections(owner)[part]
    tp = typing.get_type_hints(type(owner))[f.name]
    default = getattr(owner, f.name)
    for bad in outside(f, tp):
        value = [bad, bad] if isinstance(default, tuple) else bad
        text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(bad)
        with pytest.raises(OperaError) as err:
            apply_overrides(PretrainConfig(), [f"{key}={text}"])
        msg = str(err.value)
        assert key in msg and "\n" not in msg and f"--set {key}=" in msg, msg


def test_boundaries_that_are_inside_the_range_are_accepted():
    cfg = apply_overrides(PretrainConfig(), ["optim.ema_momentum=1", "optim.ema_momentum=0", "train.epochs=1",
                                             "full.label_smoothing=0", "self.temperature=null", "train.amp=off"])
    assert (cfg.optim.ema_momentum, cfg.train.epochs, cfg.spaces["self"].temperature, cfg.train.amp) == (0.0, 1, None, "off")


def test_message_names_key_value_range_and_fix():
    with pytest.raises(OperaError) as err:
        apply_overrides(PretrainConfig(), ["optim.base_lr=-1"])
    assert str(err.value) == ("config key optim.base_lr=-1.0 is out of range: must be > 0; "
                              "set --set optim.base_lr=<positive number>")


def test_validate_catches_a_value_set_in_code_and_cross_field_rules():
    cfg = PretrainConfig()
    cfg.spaces["full"].layers = 0
    with pytest.raises(OperaError, match="full.layers=0"):
        validate(cfg)
    cfg = PretrainConfig(hierarchy="self,fulll")
    with pytest.raises(OperaError, match="fulll"):
        validate(cfg)
    cfg = PretrainConfig()
    cfg.train.epochs = "many"
    with pytest.raises(OperaError, match="train.epochs expects an integer"):
        validate(cfg)


def test_range_is_checked_after_all_overrides_not_between_them():
    cfg = apply_overrides(PretrainConfig(), ["hierarchy=full", "arrangement=A"])
    assert (cfg.hierarchy, cfg.arrangement) == ("full", "A")


# ----------------------------------------------------------------------------- flat configs
@dataclass
class Flat:
    epochs: int = option(90, help="epochs", min=1)
    lr: float | None = option(None, help="lr", min=0, min_exclusive=True)
    mode: str = option("a", help="mode", choices=("a", "b"))
    scales: tuple[float, ...] = option((0.1, 1.0), help="scales", min=0, min_exclusive=True)
    plain: str = "x"


@dataclass
class Nested:
    name: str = option("n", help="name")
    inner: Flat = field(default_factory=Flat)


def test_apply_overrides_on_flat_and_nested_configs():
    flat = apply_overrides(Flat(), ["epochs=5", "lr=0.5", "mode=b", "scales=[1, 2, 3]", "plain=y"])
    assert (flat.epochs, flat.lr, flat.mode, flat.scales, flat.plain) == (5, 0.5, "b", (1.0, 2.0, 3.0), "y")
    nested = apply_overrides(Nested(), ["inner.epochs=7", "name=m"])
    assert (nested.inner.epochs, nested.name) == (7, "m")
    assert valid_keys(Nested()) == ["name", "inner.epochs", "inner.lr", "inner.mode", "inner.scales", "inner.plain"]
    cfg = apply_overrides(PretrainConfig(), ["train.epochs=5", "self.dim=64", "hierarchy=self"])
    assert (cfg.train.epochs, cfg.spaces["self"].dim, cfg.hierarchy) == (5, 64, "self")


@pytest.mark.parametrize("item,needle", [
    ("epochs=0", "epochs=0 is out of range: must be >= 1"),
    ("lr=0", "lr=0.0 is out of range: must be > 0"),
    ("mode=c", "mode must be one of a, b"),
    ("scales=[1, -1]", "scales=[1.0, -1.0] is out of range"),
    ("epochs=many", "epochs expects an integer"),
    ("epoch=3", "unknown option 'epoch' of 'opera run flat' (did you mean epochs?)"),
    ("noequals", "is not key=value"),
])
def test_flat_errors_are_one_line(item, needle):
    with pytest.raises(OperaError) as err:
        apply_overrides(Flat(), [item], command="run flat")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_nested_unknown_keys_suggest():
    with pytest.raises(OperaError, match=r"unknown config key 'train.epoch' \(did you mean train.epochs"):
        apply_overrides(PretrainConfig(), ["train.epoch=3"])
    with pytest.raises(OperaError, match=r"unknown config section 'trian' \(did you mean train"):
        apply_overrides(PretrainConfig(), ["trian.epochs=3"])


def test_a_renamed_key_is_refused_naming_the_new_one(tmp_path):
    for old, new in RENAMED.items():
        with pytest.raises(OperaError, match=rf"^{old} was renamed {new}; write --set {new}=") as err:
            apply_overrides(PretrainConfig(), [f"{old}=1"])
        assert "\n" not in str(err.value)
    (tmp_path / "old.yaml").write_text("base: cpu_digits\ndata: {labeled_per_batch: 8}\n")
    with pytest.raises(OperaError, match=r"old.yaml: data.labeled_per_batch was renamed data.labelled_per_batch"):
        load_config(str(tmp_path / "old.yaml"))
    assert load_config(None, ["data.unlabelled=digits:5-9", "data.labelled_per_batch=8"]).data.labelled_per_batch == 8


def test_rename_keys_reads_a_stored_config_under_the_new_names():
    stored = {"train": {"epochs": 1}, "data": {"spec": "digits", "unlabeled": "auto", "labeled_per_batch": 4}}
    assert rename_keys(stored) == {"train": {"epochs": 1},
                                   "data": {"spec": "digits", "unlabelled": "auto", "labelled_per_batch": 4}}
    assert stored["data"]["unlabeled"] == "auto"  # a copy
    assert rename_override("data.labeled_per_batch=7") == "data.labelled_per_batch=7"
    assert rename_override("train.epochs=7") == "train.epochs=7"


# ----------------------------------------------------------------------------- load_recipe
def test_load_recipe_flat_with_base_inheritance_values_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 7\nmode: b\nscales: [1, 2]\n")
    (tmp_path / "b.yaml").write_text("base: a\nepochs: 9\n")
    cfg = load_recipe("b", Flat, tmp_path)
    assert (cfg.epochs, cfg.mode, cfg.scales) == (9, "b", (1.0, 2.0))
    cfg = load_recipe(str(tmp_path / "b.yaml"), Flat, values={"epochs": 3, "lr": None}, overrides=["lr=0.1"])
    assert (cfg.epochs, cfg.lr, cfg.mode) == (3, 0.1, "b")
    (tmp_path / "bad.yaml").write_text("base: a\nepochs: 0\n")
    with pytest.raises(OperaError, match="epochs=0 is out of range"):
        load_recipe("bad", Flat, tmp_path)
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    with pytest.raises(OperaError, match=r"typo.yaml: unknown config key 'epochz'"):
        load_recipe("typo", Flat, tmp_path)
    with pytest.raises(OperaError, match=r"unknown widget recipe 'bb' \(did you mean b"):
        load_recipe("bb", Flat, tmp_path, what="widget recipe")
    assert load_recipe(None, Flat) == Flat()


def test_load_recipe_nested_is_load_config():
    assert load_recipe("r50_300ep_b1024", PretrainConfig, RECIPES) == load_config("r50_300ep_b1024")
    cfg = load_recipe("cpu_digits", PretrainConfig, RECIPES, values={"train.epochs": 3}, overrides=["self.dim=64"])
    assert (cfg.train.epochs, cfg.spaces["self"].dim, cfg.backbone.name) == (3, 64, "resnet_tiny")


def test_a_recipe_refuses_an_out_of_range_value_at_load(tmp_path):
    (tmp_path / "r.yaml").write_text("base: cpu_digits\noptim: {base_lr: -1}\n")
    with pytest.raises(OperaError, match="optim.base_lr=-1.0 is out of range"):
        load_config(str(tmp_path / "r.yaml"))


def _without(cfg, *names):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in names}


def _holds_every_value(cfg, path, recipes_dir):
    from opera.configs import load_yaml

    for key, value in load_yaml(path, recipes_dir).items():
        if key == "description":
            continue
        have = getattr(cfg, key)
        have = list(have) if isinstance(have, tuple) else have
        assert have == (pytest.approx(value) if isinstance(value, float) else value), (path.name, key)


def test_every_finetune_recipe_loads_validated_with_each_of_its_values():
    from opera.evals import finetune

    for name in finetune.list_recipes():
        cfg = finetune.finetune_config(name)
        assert cfg.recipe == name
        _holds_every_value(cfg, finetune.RECIPES / f"{name}.yaml", finetune.RECIPES)


def test_every_dense_recipe_loads_validated_with_each_of_its_values():
    from opera.configs import load_yaml
    from opera.evals.dense import run as dense

    for name in dense.list_recipes():
        task = load_yaml(dense.RECIPES / f"{name}.yaml", dense.RECIPES).get("task", "segmentation")
        cfg = dense.dense_config(task, name)
        assert (cfg.recipe, cfg.task) == (name, task)
        _holds_every_value(cfg, dense.RECIPES / f"{name}.yaml", dense.RECIPES)
