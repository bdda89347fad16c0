"""Which checkpoint layout a loaded object has, and its tensors in opera's names.

Pure key work, no files: :func:`parse` takes what ``torch.load`` or safetensors gave and returns a
:class:`Parsed` - the backbone's tensors under timm's names (opera's backbones are timm models),
the rest under the names of an opera hierarchy's ``state_dict`` (:data:`MOCO_TO_OPERA`), and what
was left out. The layouts follow the code that writes them:

* ``mocov3``: MoCo-v3's ``main_moco.py`` ``save_checkpoint`` dict ``{epoch, arch, state_dict,
  optimizer, scaler}``, ``state_dict`` being the DDP-wrapped ``MoCo_ResNet`` / ``MoCo_ViT`` of
  ``moco/builder.py``: ``module.base_encoder.*`` (a torchvision ResNet, or ``vits.py``'s timm
  ViT) whose ``fc`` (ResNet) or ``head`` (ViT) is the projector ``_build_mlp``,
  ``module.momentum_encoder.*`` (its EMA copy) and ``module.predictor.*``; OPERA's own
  ``main_moco.py`` (its ``moco/builder.py``) adds ``module.fully_projector.*``, the class head
  ``_build_mlp(2, dim, dim, classes, last_bn=False)`` on the predictor's output.
  ``opera.supervisions.heads.build_mlp`` builds the same ``Sequential`` as ``_build_mlp``, so the
  MLPs map index by index.
* ``mocov3-deit``: ``convert_to_deit.py``'s ``{'model': base_encoder without head}``; DeiT's own
  ``{'model': ...}`` checkpoints read the same way (their ``head`` skipped).
* ``mocov3-lincls``: ``main_lincls.py``'s ``{epoch, arch, state_dict: module.<backbone>,
  best_acc1, optimizer}`` (the trained linear ``fc`` / ``head`` skipped).
* ``torchvision``: a bare torchvision ResNet state dict (timm's ResNets use the same names).
* ``timm``: any other bare state dict of a timm model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: MoCo-v3 / OPERA module -> the opera hierarchy's module with the same layers (``self,full``, arrangement C)
MOCO_TO_OPERA = {
    "projector": "spaces.self.projector.",
    "predictor": "spaces.self.predictor.",
    "momentum_backbone": "teacher.backbone.",
    "momentum_projector": "teacher.heads.self_projector.",
    "fully_projector": "spaces.full.class_head.",
}

#: what each of those hierarchy modules is called in a report line
HEAD_NAMES = {"spaces.self.projector": "projector", "spaces.self.predictor": "predictor",
              "teacher.backbone": "momentum backbone", "teacher.heads.self_projector": "momentum projector",
              "spaces.full.class_head": "class head"}


def head_module(key: str) -> str:
    """The hierarchy module a ``state_dict`` key belongs to: ``spaces.self.projector``,
    ``teacher.backbone``, ``teacher.heads.self_projector`` ..."""
    parts = key.split(".")
    return ".".join(parts[:2] if parts[:2] == ["teacher", "backbone"] else parts[:3])


def head_name(module: str) -> str:
    return HEAD_NAMES.get(module, module)


#: the classifier of a timm / torchvision model, which opera's backbones (``num_classes=0``) lack
CLASSIFIERS = ("fc.", "head.", "head_dist.")

DESCRIPTIONS = {
    "opera": "an opera checkpoint",
    "mocov3": "a MoCo-v3 main_moco.py checkpoint",
    "opera-official": "an OPERA main_moco.py checkpoint (MoCo-v3 layout with fully_projector)",
    "mocov3-deit": "a MoCo-v3 convert_to_deit.py output ({'model': ...})",
    "mocov3-lincls": "a MoCo-v3 main_lincls.py checkpoint",
    "torchvision": "a torchvision ResNet state dict",
    "timm": "a timm state dict",
    "hf-dir": "a timm local-dir folder (config.json + model.safetensors)",
}


@dataclass
class Parsed:
    """The tensors of a checkpoint in opera's names. ``format`` is a key of :data:`DESCRIPTIONS`
    (``opera-official`` is reported as format ``mocov3``); ``arch``: the architecture the file
    names (``main_moco.py``'s ``--arch``), if any; ``left_out``: the file's other entries
    (optimizer, scaler, epoch ...), for the report."""

    format: str
    backbone: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    arch: str | None = None
    left_out: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.format]

    @property
    def public_format(self) -> str:
        return "mocov3" if self.format == "opera-official" else self.format


def _tensors(d: Any) -> dict[str, torch.Tensor] | None:
    """``d`` when it is a non-empty mapping of names to tensors, else None."""
    if isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()):
        return d
    return None


def _strip(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _rest(obj: dict[str, Any], taken: str) -> list[str]:
    return [k for k in obj if k != taken]


def _parse_main_moco(obj: dict[str, Any], sd: dict[str, torch.Tensor]) -> Parsed:
    """``module.base_encoder`` / ``momentum_encoder`` / ``predictor`` / ``fully_projector``."""
    base = _strip(sd, "module.base_encoder.")
    momentum = _strip(sd, "module.momentum_encoder.")
    proj = "fc." if any(k.startswith("fc.") for k in base) else "head."
    heads: dict[str, torch.Tensor] = {}
    for group, tensors in (("projector", _strip(base, proj)), ("momentum_projector", _strip(momentum, proj)),
                           ("momentum_backbone", {k: v for k, v in momentum.items() if not k.startswith(proj)}),
                           ("predictor", _strip(sd, "module.predictor.")),
                           ("fully_projector", _strip(sd, "module.fully_projector."))):
        heads.update({MOCO_TO_OPERA[group] + k: v for k, v in tensors.items()})
    known = ("module.base_encoder.", "module.momentum_encoder.", "module.predictor.", "module.fully_projector.")
    other = sorted({k.split(".")[1] for k in sd if k.startswith("module.") and not k.startswith(known)})
    fmt = "opera-official" if any(k.startswith("module.fully_projector.") for k in sd) else "mocov3"
    backbone = {k: v for k, v in base.items() if not k.startswith(proj)}
    left = _rest(obj, "state_dict") + [f"module.{o}" for o in other]
    return Parsed(fmt, backbone, heads, arch=obj.get("arch") if isinstance(obj.get("arch"), str) else None, left_out=left)


def parse(obj: Any) -> Parsed | None:
    """The layout of a ``torch.load`` result (see the module docstring); None when it is none of
    them (not a mapping of tensors anywhere a known writer puts them)."""
    if not isinstance(obj, dict):
        return None
    sd = _tensors(obj.get("state_dict"))
    if sd is not None:
        if any(k.startswith("module.base_encoder.") for k in sd):
            return _parse_main_moco(obj, sd)
        if all(k.startswith("module.") for k in sd):
            arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
            return Parsed("mocov3-lincls", _strip(sd, "module."), arch=arch, left_out=_rest(obj, "state_dict"))
        return Parsed("timm", dict(sd), left_out=_rest(obj, "state_dict"))
    model = _tensors(obj.get("model"))
    if model is not None:
        return Parsed("mocov3-deit", dict(model), left_out=_rest(obj, "model"))
    flat = _tensors(obj)
    if flat is None:
        return None
    if "conv1.weight" in flat and any(k.startswith("layer1.") for k in flat):
        return Parsed("torchvision", dict(flat))
    return Parsed("timm", dict(flat))


def looks_like(keys: list[str]) -> str:
    """A few words on what a mapping's keys look like, for an error about a file of none of the formats."""
    shown = ", ".join(keys[:3]) + (f" ... ({len(keys)} entries)" if len(keys) > 3 else "")
    return f"entries {shown}" if keys else "no entries"
