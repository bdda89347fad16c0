"""The README's Python example runs as written and does what it says."""

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from opera.backbones import pooled_features

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_trains_a_step(capsys, monkeypatch):
    """The example's loss is the official one, recomputed here by hand from the weights it had
    before its optimizer step: 0.5 (ctr(q1, k2) + ctr(q2, k1)) + 0.5 CE(view1) + 0.5 CE(view2)."""
    blocks = python_blocks()
    assert blocks, "README has no python example"
    before: dict = {}
    real_step = torch.optim.AdamW.step

    def snapshot_then_step(self, *args, **kwargs):
        before.setdefault("state", copy.deepcopy(namespace["hierarchy"].state_dict()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", snapshot_then_step)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, hierarchy, views, labels = namespace["out"], namespace["hierarchy"], namespace["views"], namespace["labels"]
    assert set(out.losses) == {"self", "full"}
    assert hierarchy.spaces["full"].class_head[-1].out_features == 10

    h = copy.deepcopy(hierarchy)
    h.load_state_dict(before["state"])
    inst, cls = h.spaces["self"], h.spaces["full"]
    tau = inst.resolved_temperature  # 1.0 for this ResNet, MoCo-v3's default
    with torch.no_grad():
        q = [inst.predictor(inst.projector(pooled_features(h.backbone, v))) for v in views]
        k = [h.teacher.heads["self_projector"](pooled_features(h.teacher.backbone, v)) for v in views]

        def ctr(q, k):  # MoCo-v3: CE of normalised q k^T / tau against the diagonal, times 2 tau
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
            return F.cross_entropy(logits, torch.arange(len(q))) * 2 * tau

        self_loss = 0.5 * (ctr(q[0], k[1]) + ctr(q[1], k[0]))
        full_loss = 0.5 * (F.cross_entropy(cls.class_head(q[0]), labels) + F.cross_entropy(cls.class_head(q[1]), labels))
    torch.testing.assert_close(out.losses["self"], self_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["full"], full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, self_loss + full_loss, rtol=1e-5, atol=1e-6)
    printed = capsys.readouterr().out.strip()
    assert printed == f"{ {name: round(v.item(), 3) for name, v in out.losses.items()} } {hierarchy.backbone.num_features}"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert "opera run pretrain --hierarchy self,full" in commands[0]
    assert "pytest" in commands[1]
    assert "install_slurm.sh" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "readme_commands.py" in ci  # CI runs these very lines (tests/fidelity/test_commands_as_typed.py)
