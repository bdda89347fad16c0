"""Config values that YAML would misread, and word-valued keys."""

from __future__ import annotations

import pytest

from opera.configs import apply_overrides, load_config
from opera.errors import OperaError


@pytest.mark.parametrize("text,expected", [("off", "off"), ("bf16", "bf16"), ("fp16", "fp16"), ("auto", "auto")])
def test_amp_accepts_its_documented_words_including_bare_off(text, expected):
    """YAML 1.1 reads a bare ``off`` as false; ``--set train.amp=off`` must still mean "off"."""
    cfg = apply_overrides(load_config("cpu_digits"), [f"train.amp={text}"])
    assert cfg.train.amp == expected


@pytest.mark.parametrize("text", ["bfloat16", "float16", "on"])
def test_unknown_amp_word_is_a_one_line_error_naming_the_choices(text):
    with pytest.raises(OperaError, match=r"train.amp must be one of auto, bf16, fp16, off") as info:
        apply_overrides(load_config("cpu_digits"), [f"train.amp={text}"])
    assert "\n" not in str(info.value)


def test_per_view_is_on_by_default_and_can_be_turned_off():
    assert load_config("cpu_digits").train.per_view is True
    assert apply_overrides(load_config("cpu_digits"), ["train.per_view=false"]).train.per_view is False
