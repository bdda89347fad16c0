"""Data-spec grammar: valid specs parse, every bad spec raises a one-line OperaError."""

import os

import pytest

from opera.data.specs import DataSpec, format_classes, parse_data_spec
from opera.errors import OperaError


def _err(spec: str) -> str:
    with pytest.raises(OperaError) as ei:
        parse_data_spec(spec)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_digits_variants():
    assert parse_data_spec("digits") == DataSpec("digits", None, None, "digits")
    assert parse_data_spec("digits:0-4").classes == (0, 1, 2, 3, 4)
    assert parse_data_spec("digits:5-9").classes == (5, 6, 7, 8, 9)
    assert parse_data_spec("digits:0,2,7").classes == (0, 2, 7)
    assert parse_data_spec("digits:7,0-2").classes == (0, 1, 2, 7)
    assert parse_data_spec("digits@3").classes == (3,)
    s = parse_data_spec("digits:0-4")
    assert s.raw == "digits:0-4" and str(s) == "digits:0-4" and s.root is None


def test_folder_and_torchvision_specs(tmp_path):
    s = parse_data_spec("/data/imagenet")
    assert (s.name, s.root, s.classes) == ("folder", "/data/imagenet", None)
    s = parse_data_spec("/data/in100@0-49")
    assert s.name == "folder" and s.root == "/data/in100" and s.classes == tuple(range(50))
    s = parse_data_spec("./rel/dir")
    assert s.root == os.path.abspath("rel/dir")
    for name in ("cifar10", "cifar100", "stl10", "flowers102", "pets"):
        s = parse_data_spec(f"{name}=/root/x")
        assert (s.name, s.root, s.classes) == (name, "/root/x", None)
    s = parse_data_spec("cifar10=/root@0-4")
    assert s.root == "/root" and s.classes == (0, 1, 2, 3, 4)
    # A folder whose name contains '@' but no selection stays a path.
    d = tmp_path / "a@b"
    d.mkdir()
    assert parse_data_spec(str(d)).root == str(d)


def test_format_classes_round_trip():
    assert format_classes((0, 1, 2, 7, 9, 10)) == "0-2,7,9-10"


def test_unknown_name_suggests_close_names():
    msg = _err("digit")
    assert "digit" in msg and "did you mean digits" in msg and "cifar10" in msg
    msg = _err("cifar11=/root")
    assert "cifar11" in msg and "did you mean" in msg and "cifar10" in msg and "pets" in msg


def test_name_without_root():
    msg = _err("cifar10")
    assert "cifar10=/path/to/root" in msg
    msg = _err("pets=")
    assert "pets=/path/to/root" in msg


def test_bad_class_ranges():
    assert "0-4" in _err("digits:abc")  # names the valid syntax
    assert "write it as 2-4" in _err("digits:4-2")
    assert "selected twice" in _err("digits:1,1")
    assert "empty class selection" in _err("digits:")
    assert "empty class selection" in _err("/data/in100@")
    assert "bad class" in _err("digits:1--3")


def test_classes_outside_dataset_range():
    msg = _err("digits:8-12")
    assert "10-12" in msg and "0-9" in msg
    msg = _err("cifar10=/root@5-10")
    assert "10" in msg and "0-9" in msg
    msg = _err("pets=/r@36-37")
    assert "37" in msg and "0-36" in msg


def test_empty_spec():
    assert "digits" in _err("")
    assert "digits" in _err("   ")


def test_malformed_selection_on_existing_folder(tmp_path):
    msg = _err(f"{tmp_path}@x-y")
    assert "bad class selection" in msg
