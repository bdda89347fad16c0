"""Plant each known bug in a scratch copy of the repository and run the tests that cover it.

    python tests/planted_bugs.py [NAME ...]     # from the repository root; no NAME: every bug

Each bug is one exact text replacement in one file of a copy of the tracked files (in a
temporary folder); the line printed for it must say ``rc=1`` and name the failing tests.
Run by hand (minutes), not in CI. See docs/testing.md.
"""
import os
import shutil
import subprocess
import sys
import tempfile

SRC = os.getcwd()
BUGS = [
    ("lr-per-rank-batch", "opera/engine/pretrain.py", "lr = cfg.optim.base_lr * batch / 256", "lr = cfg.optim.base_lr * per_rank / 256", "tests/launch/test_lr_global_batch.py"),
    ("lr_at-constant", "opera/engine/optim.py", '    """MoCo-v3: linear warmup over ``warmup_epochs`` (per iteration), then half-cosine to 0."""\n', '    """MoCo-v3: linear warmup over ``warmup_epochs`` (per iteration), then half-cosine to 0."""\n    return lr\n', "tests/engine/test_schedules.py tests/engine/test_outputs.py"),
    ("ema-constant", "opera/engine/optim.py", "    if not cosine:\n        return m\n", "    return m\n", "tests/engine/test_schedules.py tests/engine/test_outputs.py"),
    ("knn-queries-train", "opera/engine/pretrain.py", 'build_dataset(cfg.data.spec, "val", transform=tf)', 'build_dataset(cfg.data.spec, "train", transform=tf)', "tests/engine/test_outputs.py"),
    ("mask-keeps-pixels", "opera/supervisions/masked.py", "tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w", "tokens = tokens + self.mask_token.to(tokens.dtype) * w", "tests/supervisions/test_masked.py"),
    ("class-head-fixed-10", "opera/supervisions/class_space.py", "space = cls(source, ctx.dims[source], num_classes, options", "space = cls(source, ctx.dims[source], 10, options", "tests/engine/test_outputs.py"),
    ("eval-no-normalize", "opera/data/transforms.py", "                v2.ToDtype(torch.float32, scale=True),\n                v2.Normalize(self.mean, self.std),\n", "                v2.ToDtype(torch.float32, scale=True),\n", "tests/data/test_transforms.py"),
    ("linear-lr-no-batch-scale", "opera/evals/linear.py", "base_lr * m * global_batch / 256, bn)", "base_lr * m, bn)", "tests/evals/test_lr_and_augment.py"),
    ("finetune-ignores-lr_scale", "opera/evals/finetune.py", 'g["lr"] = self.cur * g["lr_scale"]', 'g["lr"] = self.cur', "tests/evals/test_lr_and_augment.py"),
    ("mixup-cutmix-off", "opera/evals/finetune.py", "use_mixup = cfg.mixup > 0 or cfg.cutmix > 0", "use_mixup = False", "tests/evals/test_lr_and_augment.py"),
    ("randaugment-off", "opera/evals/finetune.py", "if randaug_magnitude > 0 and randaug_ops > 0:", "if False:", "tests/evals/test_lr_and_augment.py"),
    ("throughput-log_every", "opera/engine/loop.py", '"global_batch", 0) * (self.at.global_step - self._logged_at)', '"global_batch", 0) * self.cadence.log_every', "tests/engine/test_outputs.py"),
]
only = sys.argv[1:]
for i, (name, path, old, new, tests) in enumerate(BUGS):
    if only and name not in only:
        continue
    dst = tempfile.mkdtemp(prefix=f"opera-planted-{i}-")
    subprocess.run(f"mkdir -p {dst} && cd {SRC} && git ls-files -z | xargs -0 cp --parents -t {dst}", shell=True, check=True)
    text = open(f"{dst}/{path}").read()
    if text.count(old) != 1:
        print(f"{name}: cannot plant: the text to replace occurs {text.count(old)} times in {path} (the code changed; update BUGS)")
        shutil.rmtree(dst, ignore_errors=True)
        continue
    open(f"{dst}/{path}", "w").write(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=dst, OMP_NUM_THREADS="1")
    r = subprocess.run(f"nice {sys.executable} -m pytest -q -p no:cacheprovider {tests}", shell=True, cwd=dst, env=env, capture_output=True, text=True)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    failed = [line.split(" - ")[0] for line in r.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{name}: rc={r.returncode} {summary} | {'; '.join(failed)}", flush=True)
    shutil.rmtree(dst, ignore_errors=True)
