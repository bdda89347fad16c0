"""Interleaved micro-benchmark of the parameter updates alone: LARS / AdamW step and the momentum
(EMA) update, on the real parameter set of a configuration with random gradients.

    python benchmarks/micro_update.py --backbone resnet50 --threads 2 --rounds 15

Variants: LARS - MoCo-v3 per-parameter loop (official, ``official_step.LARS``), opera's LARS
(``opera.engine.optim``); AdamW (ViTs) - library default
(per-parameter loop on a CPU, official), foreach (opera before), fused (opera now); EMA - MoCo-v3
loop with fresh tensors (official) vs ``torch._foreach_lerp_`` (opera).

The "opera before" LARS of BENCHMARKS.md was the committed ``opera/engine/optim.py`` of
d6eca17; it is not kept here (one opera LARS, one official one): time it with
``git show d6eca17:opera/engine/optim.py``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from official_step import LARS as OfficialLARS  # noqa: E402
from opera.bench import make_step  # noqa: E402
from opera.engine.optim import LARS, param_groups  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    _, model, meta = make_step(a.backbone, a.img_size, 4, threads=a.threads, patch_size=a.patch_size, mlp_dim=a.mlp_dim,
                               channels_last=False)
    torch.set_num_threads(a.threads)
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    vit = meta["optimizer"] == "adamw"

    def with_grads():
        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        for q in m.parameters():
            if q.requires_grad:
                q.grad = torch.randn(q.shape, generator=g)
        return m

    variants = {}
    if vit:
        for name, kw in (("adamw default (official)", {}), ("adamw foreach (opera before)", {"foreach": True}),
                         ("adamw fused (opera now)", {"fused": True})):
            m = with_grads()
            groups = param_groups(m, 0.1)
            for gr in groups:
                gr.pop("lars")
            variants[name] = torch.optim.AdamW(groups if kw else m.parameters(), lr=1e-4, weight_decay=0.1, **kw).step
    else:
        m = with_grads()
        variants["lars loop (official)"] = OfficialLARS(m.parameters(), lr=0.1, weight_decay=1e-6).step
        m = with_grads()
        variants["lars foreach (opera)"] = LARS(param_groups(m, 1e-6), lr=0.1).step

    def ema_loop(m):
        online = list(m.backbone.parameters()) + list(m.spaces["self"].projector.parameters())
        target = list(m.teacher.backbone.parameters()) + list(m.teacher.heads["self_projector"].parameters())

        def run():
            with torch.no_grad():
                for pb, pm in zip(online, target):
                    pm.data = pm.data * 0.99 + pb.data * (1.0 - 0.99)
        return run

    m = with_grads()
    variants["ema loop (official)"] = ema_loop(m)
    m = with_grads()
    variants["ema foreach lerp (opera)"] = lambda m=m: m.momentum_update(0.99)
    times = {k: [] for k in variants}
    for r in range(a.rounds + 2):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    print(f"{a.backbone} ({n_params / 1e6:.1f}M trainable parameters), threads {torch.get_num_threads()}, median of {a.rounds} interleaved rounds")
    for k, v in times.items():
        print(f"  {k:<32} {statistics.median(v) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
