"""``opera run pretrain --init SPEC``: a hierarchy that starts from weights the field has.

:class:`InitWeights` is what the pretraining engine is handed (it names the source and its sha256,
which go into ``config.yaml`` and the run's identity) and :meth:`InitWeights.apply` loads it
into a freshly built :class:`~opera.hierarchy.SupervisionHierarchy` before the first step:

* the backbone, always;
* every other module the source has under the hierarchy's names with the same shapes: from a
  MoCo-v3 / OPERA ``main_moco.py`` checkpoint the projector, predictor, momentum encoder
  (backbone and projector) and OPERA's class head (``fully_projector``, where its number of
  classes matches the data's); from an opera ``last.pt`` its modules likewise;
* the momentum teacher's backbone (and projector) that the source lacks start as copies of the
  online ones, as MoCo-v3's ``MoCo.__init__`` (``moco/builder.py``) initialises its momentum encoder.

The rest stays at its random init, said in the one line :meth:`apply` returns. The optimizer and
schedules start fresh from the recipe. A resumed run does not read the source again: it continues
from its own ``last.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opera.weights.formats import head_module, head_name
from opera.weights.readers import locate, read_weights, sha256_file


@dataclass(frozen=True)
class InitWeights:
    """The ``--init`` source of a pretraining run: the SPEC as given, the file it names and its sha256."""

    spec: str
    file: str
    sha256: str

    @classmethod
    def locate(cls, spec: str) -> "InitWeights":
        """Find SPEC's file (a missing file or a hub name is one line) and hash it; nothing is loaded yet."""
        file = locate(spec).absolute()  # a job may run elsewhere (SLURM): the file it names, absolute
        return cls(str(spec), str(file), sha256_file(file))

    def identity(self) -> dict[str, str]:
        return {"spec": self.spec, "sha256": self.sha256}

    @torch.no_grad()
    def apply(self, hierarchy: nn.Module, backbone: str, img_size: int, backbone_options: dict[str, Any] | None = None) -> str:
        """Load the source into ``hierarchy`` (see the module docstring); the one line saying what
        was taken and what was left at random init."""
        w = read_weights(self.file, backbone=backbone, img_size=img_size, backbone_options=backbone_options)
        if w.sha256 != self.sha256:
            from opera.errors import OperaError

            raise OperaError(f"--init {self.spec} changed since the run began (sha256 {self.sha256[:12]} -> {w.sha256[:12]}); "
                             "restore it or start a new --output")
        state = hierarchy.state_dict()
        new = {k: v.clone() for k, v in state.items()}
        new.update({f"backbone.{k}": v for k, v in w.backbone.state_dict().items()})
        by_group: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in w.heads.items():
            by_group.setdefault(head_module(k), {})[k] = v
        taken, loaded, differ = ["backbone"], set(), []
        for group, tensors in by_group.items():
            want = {k: v for k, v in state.items() if head_module(k) == group}
            if not want:
                continue  # the hierarchy has no such module (a space it does not use)
            if set(want) == set(tensors) and all(tensors[k].shape == want[k].shape for k in want):
                new.update(tensors)
                loaded.add(group)
                taken.append(head_name(group))
            else:
                differ.append(head_name(group))
        copied = self._copy_missing_teacher(new, state, loaded)
        hierarchy.load_state_dict(new, strict=True)
        groups = {head_module(k) for k in state if not k.startswith("backbone.")}
        random = sorted(head_name(g) for g in groups
                        if head_name(g) not in taken and g not in copied and head_name(g) not in differ)
        parts = [f"--init took {', '.join(taken)}"]
        if copied:
            parts.append(f"the momentum teacher's {' and '.join(g.rsplit('.', 1)[-1].replace('self_', '') for g in copied)} "
                         "start as copies of the online ones")
        if differ:
            parts.append(f"left at random init where the source's shape differs: {', '.join(differ)}")
        if random:
            parts.append(f"random init: {', '.join(random)}")
        parts.append("optimizer and schedules start fresh")
        return f"{w.report}; {'; '.join(parts)}"

    @staticmethod
    def _copy_missing_teacher(new: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                              loaded: set[str]) -> list[str]:
        """The teacher's backbone and projector not ``loaded`` from the source become copies of the
        online ones (MoCo-v3's ``MoCo.__init__``: ``param_m.data.copy_(param_b.data)``); the groups copied."""
        copied = []
        for group, online in (("teacher.backbone", "backbone"), ("teacher.heads.self_projector", "spaces.self.projector")):
            keys = [k for k in state if head_module(k) == group]
            if keys and group not in loaded:
                for k in keys:
                    new[k] = new[online + k[len(group):]].clone()
                copied.append(group)
        return copied


__all__ = ["InitWeights"]
