"""The ``supcon`` space: supervised contrastive learning against the momentum teacher's keys."""

from __future__ import annotations

import pytest
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from opera.hierarchy import SupervisionHierarchy


def build(spec="self,supcon", arrangement=None, seed=0):
    torch.manual_seed(seed)
    return SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=16, arrangement=arrangement,
                                          self={"dim": 16, "mlp_dim": 32}, supcon={"dim": 8, "hidden": 16})


def supcon_by_hand(q, k, yq, yk, tau):
    """Khosla et al.'s L^sup_out for each anchor, written with explicit loops."""
    out = []
    for i in range(len(q)):
        if yq[i] < 0:
            continue
        qi = q[i] / q[i].norm()
        sims = [float(qi @ (kj / kj.norm())) / tau for kj in k]
        log_den = math.log(sum(math.exp(s) for s in sims))
        pos = [s - log_den for s, lab in zip(sims, yk) if lab == yq[i]]
        out.append(-sum(pos) / len(pos))
    return out


def test_supcon_loss_by_hand_with_unlabelled_anchors():
    h = build()
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    y = torch.tensor([0, 1, -1, 1, 2, 0])
    out = h(views=views, targets={"class": y})
    sp, sc, t = h.spaces["self"], h.spaces["supcon"], h.teacher
    with torch.no_grad():
        q = [sc.embed(sp.predictor(sp.projector(h.backbone(v)))) for v in views]  # C: on Y^self
        k = [t.heads["supcon_embedding"](t.heads["self_predictor"](t.heads["self_projector"](t.backbone(v)))) for v in views]
    # view i's anchors against the other view's keys; the mean over the 5 labelled anchors
    total = sum(sum(supcon_by_hand(q[i], k[1 - i], y, y, 0.1)) / 5 for i in range(2))
    assert float(out.losses["supcon"]) == __import__("pytest").approx(0.5 * total, rel=1e-4)
    assert float(out.logs["supcon/labelled"]) == 5


def test_supcon_shares_the_teachers_backbone_with_self():
    """One EMA copy of the backbone for both teacher-based spaces, and the momentum update covers
    every copy: backbone, projector, predictor (on the way to arrangement C's Y^self) and embed."""
    h = build()
    assert sum(1 for name, _ in h.named_children() if name == "teacher") == 1
    assert set(h.teacher.heads) == {"self_projector", "self_predictor", "supcon_embedding"}
    assert sum(isinstance(m, type(h.backbone)) for m in h.modules()) == 2  # the online backbone and one copy
    with torch.no_grad():
        for p in h.spaces["supcon"].embed.parameters():
            p.add_(1.0)
    h.momentum_update(0.0)
    for a, b in zip(h.spaces["supcon"].embed.parameters(), h.teacher.heads["supcon_embedding"].parameters()):
        assert torch.equal(a, b)
    # arrangement A: embed reads the backbone, so the teacher copies no instance head for it
    assert set(build(arrangement="A").teacher.heads) == {"self_projector", "supcon_embedding"}


def test_same_class_pairs_attract():
    """A step on the supcon loss raises the similarity of same-class embeddings more than of others."""
    h = build()
    views = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    y = torch.arange(16) % 2
    opt = torch.optim.SGD([p for _, p in h.trainable_parameters()], lr=0.1)

    def gap():
        h.eval()
        with torch.no_grad():
            z = F.normalize(h.representations(views[0])["supcon/embedding"], dim=1)
        h.train()
        s = z @ z.T
        same = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
        return float(s[same].mean() - s[y[:, None] != y[None, :]].mean())

    before = gap()
    for _ in range(15):
        h.momentum_update(0.9)
        out = h(views=views, targets={"class": y})
        opt.zero_grad()
        out.losses["supcon"].backward()
        opt.step()
    assert gap() > before + 0.1


@pytest.mark.slow
def test_cli_trains_self_supcon(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "self,supcon", "--epochs", "1",
                        "--output", str(out), "--set", "train.knn_every=0", "--set", "data.spec=digits:0-4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # step rows
    assert all(k in rows[-1] for k in ("loss/supcon", "supcon/loss", "self/ctr"))
