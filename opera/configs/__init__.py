"""Configuration of every protocol: dataclasses, shipped YAML recipes, ``--set key=value`` overrides.

Precedence, lowest first: the dataclass defaults, the recipe (``--config NAME|PATH``), the CLI's
named options (``--epochs`` ...), then ``--set`` overrides. One mechanism (:mod:`opera.configs.core`)
serves the nested pretraining config (``train.epochs``, ``self.dim``) and the flat evaluation
configs (``epochs``): :func:`load_recipe`, :func:`apply_overrides` and :func:`validate`, which
checks every value against the range or choices its field states (:func:`opera.fields.option`).
The fully resolved pretraining configuration is written to ``config.yaml`` in every run's output
directory, so the value in force is always one file away.
"""

from opera.configs.core import apply_dict, load_recipe, load_yaml, parse_override, set_value, valid_keys, validate
from opera.configs.schema import (
    BackboneConfig,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    list_recipes,
    load_config,
    recipe_path,
)
from opera.fields import option

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "OptimConfig",
    "PretrainConfig",
    "TrainConfig",
    "apply_dict",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "list_recipes",
    "load_config",
    "load_recipe",
    "load_yaml",
    "option",
    "parse_override",
    "recipe_path",
    "set_value",
    "valid_keys",
    "validate",
]
