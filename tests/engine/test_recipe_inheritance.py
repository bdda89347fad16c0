"""Recipes inherit: ``base: NAME`` + the lines that differ (one mechanism for every recipe kind)."""

from __future__ import annotations

import pytest

from opera.configs import config_to_dict, load_config
from opera.configs.schema import RECIPES, load_yaml, merge_dicts
from opera.errors import OperaError


def test_shipped_recipes_state_only_what_differs_from_their_base():
    data = load_yaml(RECIPES / "r50_300ep_b1024.yaml", RECIPES)
    raw = (RECIPES / "r50_300ep_b1024.yaml").read_text()
    assert "base: r50_100ep_b1024" in raw and "resnet50" not in raw  # the backbone comes from the base
    assert data["backbone"]["name"] == "resnet50" and data["optim"]["base_lr"] == 0.3 and data["train"]["epochs"] == 300
    child, parent = config_to_dict(load_config("r50_300ep_b1024")), config_to_dict(load_config("r50_100ep_b1024"))
    changed = {(s, k) for s in child if isinstance(child[s], dict) for k in child[s] if child[s][k] != parent[s][k]}
    assert changed == {("optim", "base_lr"), ("train", "epochs")}


def test_a_base_of_a_base_and_section_merging(tmp_path):
    (tmp_path / "a.yaml").write_text("hierarchy: self,full\ntrain: {epochs: 7, batch_size: 64}\nself: {dim: 32}\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain: {epochs: 9}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nself: {mlp_dim: 64}\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 64)
    assert (cfg.spaces["self"].dim, cfg.spaces["self"].mlp_dim) == (32, 64)
    assert merge_dicts({"x": {"a": 1, "b": 2}}, {"x": {"b": 3}, "y": 1}) == {"x": {"a": 1, "b": 3}, "y": 1}


@pytest.mark.parametrize("files,needle", [
    ({"a.yaml": "base: a\n"}, "loop"),
    ({"a.yaml": "base: b\n", "b.yaml": "base: a\n"}, "a -> b -> a"),
    ({"a.yaml": "base: r50_100ep_b124\n"}, "not found"),
    ({"a.yaml": "base: [1, 2]\n"}, "must name a recipe"),
    ({"a.yaml": "- 1\n- 2\n"}, "not a YAML mapping"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(OperaError) as err:
        load_config(str(tmp_path / "a.yaml"))
    assert needle in str(err.value) and "\n" not in str(err.value)
