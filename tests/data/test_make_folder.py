"""``opera data make-folder``: realistic JPEG class folders from scikit-learn's photographs."""

from __future__ import annotations

import pytest
import subprocess
import sys
from pathlib import Path

from PIL import Image

from opera.data import build_dataset
from opera.data.photos import make_photo_folder

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)


def test_make_folder_command_writes_jpeg_class_folders(tmp_path):
    out = tmp_path / "jpegs"
    proc = subprocess.run([sys.executable, "-m", "opera", "data", "make-folder", str(out), "--n", "30", "--classes", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("class*/*.jpg"))
    assert len(files) == 30 and sorted(p.name for p in out.iterdir()) == ["class000", "class001", "class002"]
    sides = []
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sides.append(min(im.size))
    assert 300 <= min(sides) and max(sides) <= 500 and len(set(sides)) > 10  # ImageNet-typical, varied
    assert not list(out.rglob("*.tmp"))
    ds = build_dataset(str(out), "train")
    assert ds.num_classes == 3 and ds.load_image(0).shape[0] == 3


def test_make_folder_is_deterministic_and_bad_counts_are_one_line(tmp_path):
    a = Path(make_photo_folder(str(tmp_path / "a"), n=4, classes=2, seed=3))
    b = Path(make_photo_folder(str(tmp_path / "b"), n=4, classes=2, seed=3))
    assert [p.read_bytes() for p in sorted(a.rglob("*.jpg"))] == [p.read_bytes() for p in sorted(b.rglob("*.jpg"))]
    proc = subprocess.run([sys.executable, "-m", "opera", "data", "make-folder", str(tmp_path / "c"), "--n", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--n >= 1" in proc.stderr
