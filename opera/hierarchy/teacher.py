"""The momentum teacher: one EMA copy of the backbone and of the heads the spaces ask for.

MoCo-v3's momentum encoder is ``momentum_encoder = copy(base_encoder)`` (backbone + projector),
updated as ``theta_k <- m theta_k + (1 - m) theta_q`` and never by gradients. Here the hierarchy,
not a space, owns that copy: a space asks for the teacher's version of a representation it
reads (``BuildContext.want_teacher("self/projector")``), and the teacher copies the backbone once
and each module on the way from it to that representation once, however many spaces ask. The
instance space's keys are ``teacher.rep(stage, "self/projector")``; a second teacher-based space
(``supcon``) shares the same backbone copy instead of making another.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from opera.backbones import pooled_features
from opera.supervisions.base import Published, Stage


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad = False
    return twin


def head_key(rep: str) -> str:
    """The ModuleDict key of the teacher's copy of the module that makes ``rep``."""
    return rep.replace("/", "_")


class MomentumTeacher(nn.Module):
    """EMA copies: ``backbone`` and ``heads[head_key(rep)]`` for every representation on the way
    up to the ones asked for. ``momentum_pairs()`` names the (online, target) pairs."""

    def __init__(self, backbone: nn.Module, reps: dict[str, Published], wanted: list[str], drop_path: bool = True):
        super().__init__()
        self.backbone = _frozen_copy(backbone)
        drop = sys.modules.get("timm.layers.drop")  # timm's DropPath, if timm built the backbone
        if not drop_path and drop is not None:  # no stochastic depth in the teacher (DINO builds it without drop_path_rate)
            for m in self.backbone.modules():
                if isinstance(m, drop.DropPath):
                    m.drop_prob = 0.0
        self.heads = nn.ModuleDict()
        # rep -> (source rep, online module); a plain dict, so the online modules are not
        # registered twice (they belong to their spaces)
        self._chain: dict[str, tuple[str, nn.Module]] = {}
        self._online_backbone = [backbone]
        for name in wanted:
            while name != "backbone" and name not in self._chain:
                pub = reps[name]
                if pub.module is None or pub.source is None:
                    raise ValueError(f"representation {name!r} has no module to copy into the teacher")
                self._chain[name] = (pub.source, pub.module)
                self.heads[head_key(name)] = _frozen_copy(pub.module)
                name = pub.source
        self.wanted = list(wanted)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self._online_backbone[0], self.backbone)]
        pairs += [(online, self.heads[head_key(rep)]) for rep, (_, online) in self._chain.items()]
        return pairs

    @torch.no_grad()
    def rep(self, stage: Stage, name: str) -> list[torch.Tensor]:
        """The teacher's ``name`` for every (unmasked) global view, once per step (``stage.extras``);
        local crops (multi-crop) never reach the teacher, as in DINO."""
        cache: dict[str, list[torch.Tensor]] = stage.extras.setdefault("teacher", {})
        if name in cache:
            return cache[name]
        if name == "backbone":
            views = stage.views[:stage.n_global]
            if stage.extras.get("fuse_backbone") and len(views) > 1:
                out = list(pooled_features(self.backbone, torch.cat(views, 0)).chunk(len(views), 0))
            else:
                out = [pooled_features(self.backbone, x) for x in views]
        else:
            source, _ = self._chain[name]
            out = stage.apply(self.heads[head_key(name)], self.rep(stage, source))
        cache[name] = out
        return out
