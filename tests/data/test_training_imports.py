"""The training path imports timm only where a backbone is built: ``PretrainFeed.start_workers``
forks the DataLoader workers before the model exists, so a worker holds no timm (nor its
thousand-odd modules), and importing the training loop takes none either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter imports torch and builds two backbones

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import json, sys
import opera.engine.pretrain, opera.hierarchy, opera.backbones, opera.data
before = sorted(m for m in sys.modules if m == "timm" or m.startswith("timm."))
from opera.backbones import create_backbone, is_token_backbone
vit = create_backbone("vit_tiny", img_size=32)
after = "timm" in sys.modules
print(json.dumps({"before": before, "after": after, "token": is_token_backbone(vit),
                  "resnet_token": is_token_backbone(create_backbone("resnet_tiny", img_size=32))}))
"""


def test_the_training_path_imports_timm_only_to_build_a_backbone():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["before"] == [] and r["after"] is True
    assert r["token"] is True and r["resnet_token"] is False  # the ViT check still sees timm's class
