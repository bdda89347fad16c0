"""Correctness under DDP: 2 gloo processes with B/2 each == 1 process with B (losses and gradients).

The 2-process side is set up exactly as ``run_pretrain`` does (SyncBatchNorm over the whole
hierarchy, momentum encoder included, then DDP). A control run without SyncBatchNorm in the same
children must *differ*, so the comparison is sensitive to the batch statistics.

Also: a real 2-process ``run_pretrain`` writes its files from rank 0 only, and a second launch of
both ranks resumes from ``last.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.launch import launch_local

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

TIMEOUT_S = 150
BATCH = 8  # global batch; 4 per rank
STEPS = 2  # a second step checks the optimizer step and the momentum update stay in step too
SPEC = "self,full"
NUM_CLASSES = 4


def build(seed: int = 0):
    from opera.hierarchy import SupervisionHierarchy

    torch.manual_seed(seed)
    return SupervisionHierarchy.from_spec(
        SPEC, backbone="resnet_tiny", num_classes=NUM_CLASSES, img_size=16,
        self={"dim": 16, "mlp_dim": 32}, full={"hidden": 16},
    )


def make_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(2)]
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return views, labels


def train(hierarchy, model, rank: int, world: int) -> list[dict]:
    """STEPS SGD steps on this rank's slice of each global batch; losses (mean over ranks) and grads."""
    from opera.engine.step import train_step

    optimizer = torch.optim.SGD([p for p in hierarchy.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    per = BATCH // world
    record = []
    for step in range(STEPS):
        views, labels = make_batch(step)
        views = [v[rank * per:(rank + 1) * per] for v in views]
        labels = labels[rank * per:(rank + 1) * per]
        out = train_step(model, hierarchy, optimizer, views, labels, lr=0.1, ema_momentum=0.9,
                         device=torch.device("cpu"), amp="off", step=step)
        record.append({
            "loss": float(distributed.all_reduce_mean(out.loss.detach())),
            "losses": {k: float(distributed.all_reduce_mean(v.detach())) for k, v in out.losses.items()},
            "grads": {n: p.grad.detach().clone() for n, p in hierarchy.named_parameters() if p.grad is not None},
        })
    return record


def in_dtype(dtype: torch.dtype, fn, *args):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return fn(*args)
    finally:
        torch.set_default_dtype(saved)


def single_process() -> list[dict]:
    hierarchy = build()
    return train(hierarchy, hierarchy, 0, 1)


def ddp_run(sync_bn: bool, rank: int, world: int) -> list[dict]:
    hierarchy = build()
    if sync_bn:  # as run_pretrain does
        hierarchy = distributed.convert_sync_batchnorm(hierarchy)
    model = torch.nn.parallel.DistributedDataParallel(hierarchy)
    return train(hierarchy, model, rank, world)


def ddp_worker(modes: tuple[tuple[str, bool], ...]) -> dict:
    env = distributed.init("cpu", timeout_min=2)
    try:
        results = {(dtype, sync_bn): in_dtype(getattr(torch, dtype), ddp_run, sync_bn, env.rank, env.world_size)
                   for dtype, sync_bn in modes}
        converted = distributed.convert_sync_batchnorm(build())
        counts = {
            "sync": sum(isinstance(m, distributed.GlooSyncBatchNorm) for m in converted.modules()),
            "momentum": sum(isinstance(m, distributed.GlooSyncBatchNorm)
                            for m in converted.teacher.backbone.modules()),
            "plain": sum(type(m).__name__.startswith("BatchNorm") for m in converted.modules()),
        }
        return {"rank": env.rank, "world": env.world_size, "results": results, "counts": counts}
    finally:
        distributed.shutdown()


def max_grad_diff(got: dict, ref: dict) -> tuple[float, float]:
    """(max absolute difference, the same relative to the largest gradient of that tensor)."""
    worst = max(((got[n] - g).abs().max().item(), (got[n] - g).abs().max().item() / g.abs().max().clamp_min(1e-12).item())
                for n, g in ref.items())
    return worst


def test_two_processes_with_half_batch_match_one_process():
    reference = {dtype: in_dtype(getattr(torch, dtype), single_process) for dtype in ("float64", "float32")}

    modes = (("float64", True), ("float32", True), ("float64", False))
    ranks = launch_local(ddp_worker, (modes,), nproc=2, timeout=TIMEOUT_S)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    counts = ranks[0]["counts"]
    assert counts["momentum"] > 0 and counts["sync"] > counts["momentum"] and counts["plain"] == 0

    measured = {}
    for r in ranks:
        for dtype, tol in (("float64", 1e-5), ("float32", 1e-4)):
            # float64: the same numbers up to rounding (measured ~1e-13); float32: the order of the
            # reductions differs (global vs two half batches), ~1e-5 absolute on O(1) gradients
            for step, (ref, got) in enumerate(zip(reference[dtype], r["results"][(dtype, True)])):
                assert set(got["losses"]) == {"self", "full"}
                assert got["loss"] == pytest.approx(ref["loss"], abs=tol), (dtype, r["rank"], step)
                for k in ref["losses"]:
                    assert got["losses"][k] == pytest.approx(ref["losses"][k], abs=tol), (dtype, k, step)
                assert set(got["grads"]) == set(ref["grads"])
                absolute, relative = max_grad_diff(got["grads"], ref["grads"])
                measured[(dtype, r["rank"], step)] = absolute
                if dtype == "float64":
                    assert absolute < 1e-5, f"rank {r['rank']} step {step}: max |grad diff| {absolute:.2e}"
                else:
                    assert relative < 1e-4, f"float32 rank {r['rank']} step {step}: relative grad diff {relative:.2e}"
    print("\nmax |grad diff| vs one process:", {k: f"{v:.1e}" for k, v in measured.items()})

    # control: per-rank BatchNorm statistics give other gradients (the test sees batch statistics)
    plain = ranks[0]["results"][("float64", False)][0]["grads"]
    assert max_grad_diff(plain, reference["float64"][0]["grads"])[0] > 1e-3
    # DDP kept both ranks' gradients identical
    for n, g in ranks[0]["results"][("float64", True)][-1]["grads"].items():
        assert torch.equal(g, ranks[1]["results"][("float64", True)][-1]["grads"][n]), n


# ------------------------------------------------------------------- real run_pretrain, 2 processes
RUN_SETTINGS = ["train.knn_every=0", "self.mlp_dim=32", "self.dim=16", "full.hidden=16", "train.log_every=1",
                "train.save_every_steps=2", "train.save_every_epochs=0", "backbone.img_size=16"]


def pretrain_cfg(max_steps: int):
    from opera.configs import apply_overrides, load_config

    cfg = load_config("cpu_digits")
    return apply_overrides(cfg, RUN_SETTINGS + ["data.spec=digits:0-1", "train.epochs=1", "train.batch_size=32",
                                                "train.device=cpu", f"train.max_steps={max_steps}"])


def pretrain_recording_writes(cfg, output: str, record_dir: str) -> dict:
    """run_pretrain, recording every file write of this rank under ``output`` (Python-level opens for
    writing, renames, mkdirs, and opera's checkpoint/backbone writers) to ``record_dir/rankN.json``."""
    import opera.engine.loop as loop
    import opera.engine.pretrain as pretrain

    rank = int(os.environ["RANK"])
    out = os.path.realpath(output)
    writes: list[str] = []

    def under(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(out)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 2 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            if under(args[0]):
                writes.append(f"open {args[0]} {args[1]}")
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree") and args and under(args[0]):
            writes.append(f"{event} {args[0]}")
        elif event == "open" and len(args) >= 3 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            if under(args[0]):
                writes.append(f"os.open {args[0]}")

    sys.addaudithook(hook)
    real_save, real_export = loop.save_state, pretrain.export_backbone
    loop.save_state = lambda state, path, **kw: (writes.append(f"save_state {path}"), real_save(state, path, **kw))[1]
    pretrain.export_backbone = lambda *a, **k: (writes.append(f"export_backbone {a[1]}"), real_export(*a, **k))[1]
    try:
        result = pretrain.run_pretrain(cfg, output)
    finally:
        loop.save_state, pretrain.export_backbone = real_save, real_export
        distributed.shutdown()
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(writes))
    return result


@pytest.mark.slow
def test_run_pretrain_two_processes_rank0_writes_and_both_resume(tmp_path):
    out, rec1, rec2 = tmp_path / "run", tmp_path / "rec1", tmp_path / "rec2"
    rec1.mkdir()
    rec2.mkdir()
    # digits:0-1 has 288 training images: 9 steps of 32; stop the first launch after 4 steps
    first = launch_local(pretrain_recording_writes, (pretrain_cfg(4), str(out), str(rec1)), nproc=2, timeout=TIMEOUT_S)
    assert [r["global_step"] for r in first] == [4, 4] and not first[0]["finished"]
    writes = [json.loads((rec1 / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == [], f"rank 1 wrote: {writes[1][:5]}"
    assert any("save_state" in w and w.endswith("last.pt") for w in writes[0])  # the hook does see rank 0
    assert any("metrics.jsonl" in w for w in writes[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one row per step: written once, not per rank
    cfg = (out / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "per_rank_batch: 16" in cfg
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 4

    second = launch_local(pretrain_recording_writes, (pretrain_cfg(0), str(out), str(rec2)), nproc=2, timeout=TIMEOUT_S)
    assert [r["global_step"] for r in second] == [9, 9] and all(r["finished"] for r in second)
    assert json.loads((rec2 / "rank1.json").read_text()) == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rank_s" not in r]
    assert [r["step"] for r in steps] == list(range(1, 10))  # continued at step 5, not from scratch
    # the collapse monitor's epoch row, once (rank 0 writes), after the all-reduce of both ranks' sums
    epoch_rows = [r for r in rows if "rank_s" in r]
    assert [r["step"] for r in epoch_rows] == [9] and epoch_rows[0]["online/rankme/backbone"] > 1.5
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["global_step"] == 9 and state["epoch"] == 1
    assert (out / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_with_labels_share_one_list_and_exact_labelled_counts(tmp_path):
    """--labels 10% with data.labelled_per_batch=8 under 2 processes: rank 0 alone writes labelled.txt
    (rank 1 writes nothing), both ranks train on the same subset, and every global batch holds 8
    labelled images (the class loss's global count), 4 per rank."""
    from opera.configs import apply_overrides
    from opera.data import build_dataset
    from opera.data.labels import LABELLED_FILE, read_labels_file, select_labelled

    out, rec = tmp_path / "run", tmp_path / "rec"
    rec.mkdir()
    cfg = apply_overrides(pretrain_cfg(3), ["data.labels=10%", "data.labelled_per_batch=8"])
    ranks = launch_local(pretrain_recording_writes, (cfg, str(out), str(rec)), nproc=2, timeout=TIMEOUT_S)
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert json.loads((rec / "rank1.json").read_text()) == []
    assert any(LABELLED_FILE in w for w in json.loads((rec / "rank0.json").read_text()))
    names, spec = read_labels_file(out / LABELLED_FILE)
    assert spec == "10%" and len(names) == len(select_labelled(build_dataset("digits:0-1", "train"), "10%", cfg.train.seed))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["full/labelled"] for r in rows] == [8.0, 8.0, 8.0]


# ------------------------------------------------------------------- a NaN on one rank stops every rank
def nan_on_rank1_worker() -> dict:
    """Two DDP ranks; at step 1 rank 1's class loss is NaN (its class head's last weight is poisoned
    on that rank only; rank 0's losses stay finite). Every rank must stop with NonFiniteLoss naming
    rank 1, and none may take the step (whose all-reduced gradients are NaN everywhere): before,
    rank 0 stepped with them, could checkpoint NaN weights, then hung in the next collective."""
    from opera.engine.step import NonFiniteLoss, train_step

    env = distributed.init("cpu", timeout_min=2)
    try:
        hierarchy = distributed.convert_sync_batchnorm(build())
        model = torch.nn.parallel.DistributedDataParallel(hierarchy)
        optimizer = torch.optim.SGD([p for p in hierarchy.parameters() if p.requires_grad], lr=0.1)
        per = BATCH // env.world_size
        for step in range(2):
            views, labels = make_batch(step)
            views = [v[env.rank * per:(env.rank + 1) * per] for v in views]
            labels = labels[env.rank * per:(env.rank + 1) * per]
            if step == 1 and env.rank == 1:  # after DDP's broadcast: this rank's logits only
                with torch.no_grad():
                    hierarchy.spaces["full"].class_head[-1].weight.fill_(float("nan"))
            # the trainable parameters (the momentum encoder's EMA runs first, with finite weights, as in MoCo-v3)
            before = {n: p.detach().clone() for n, p in hierarchy.named_parameters()
                      if p.requires_grad and ("class_head" not in n or env.rank == 0)}
            try:
                train_step(model, hierarchy, optimizer, views, labels, lr=0.1, ema_momentum=0.9,
                           device=torch.device("cpu"), amp="off", step=step)
            except NonFiniteLoss as exc:
                unchanged = all(torch.equal(before[n], p.detach()) for n, p in hierarchy.named_parameters() if n in before)
                return {"rank": env.rank, "stopped_at": step, "message": str(exc), "unchanged": unchanged}
        return {"rank": env.rank, "stopped_at": None}
    finally:
        distributed.shutdown()


def test_non_finite_loss_on_one_rank_stops_every_rank_before_the_step():
    ranks = launch_local(nan_on_rank1_worker, (), nproc=2, timeout=TIMEOUT_S)
    for r in ranks:
        assert r["stopped_at"] == 1, r
        assert "step 1 on rank 1" in r["message"] and "\n" not in r["message"], r["message"]
        assert r["unchanged"], f"rank {r['rank']} changed its parameters with NaN gradients"
    assert "=nan" in ranks[1]["message"]  # the failing rank names its bad terms
