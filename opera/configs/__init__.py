"""Pretraining configuration: dataclasses, shipped YAML recipes, ``--set key=value`` overrides.

Precedence, lowest first: the dataclass defaults below, the recipe (``--config NAME|PATH``), the
CLI's named options (``--epochs`` ...), then ``--set`` overrides. The fully resolved
configuration is written to ``config.yaml`` in every run's output directory, so the value in
force is always one file away.
"""

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
    set_value,
)

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "OptimConfig",
    "PretrainConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "list_recipes",
    "load_config",
    "recipe_path",
    "set_value",
]
