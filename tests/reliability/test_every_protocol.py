"""Every training protocol - pretraining, the linear probe, fine-tuning and dense transfer - owns
its output folder through the one training loop in the same way, checked through each one's own
command line in real child processes:

* a run killed with SIGKILL and rerun with the same command ends with the weights of a run never
  interrupted, bit for bit (every tensor of ``last.pt["model"]``, ``torch.equal``);
* a run into a folder whose lock another process holds is refused in one line naming the holder,
  and writes nothing there;
* a rerun into a folder with another option that shapes training is refused in one line naming
  that option (exit code 2), leaving ``last.pt`` untouched.

Each child runs on the CPU with one thread and in-process data loading, so that two runs of the
same command do the same float operations.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from opera.engine.lock import LOCK

pytestmark = pytest.mark.slow

DEADLINE_S = 120  # the longest wait for one child (a run to its end, or to the step it is killed after)

#: the dense recipe of these tests: the digit scenes segmentation recipe on 24 tiny scenes,
#: last.pt written every iteration and a stdout line at each
DENSE_RECIPE = """base: digits_segmentation
scene_train: 24
scene_val: 8
eval_batch_size: 8
save_every: 1
log_every: 1
lr: {lr}
"""


@dataclass
class Protocol:
    """One protocol's command line, how far into it a kill lands, and an option that shapes its training."""

    name: str
    args: list[str]  # after ``opera``, without --output
    kill_after: int  # SIGKILL once last.pt holds at least this step
    changed: list[str]  # extra arguments that change the training
    refusal: str  # what the refusal says (a regex): the changed option alone, with its old and new value
    recipe_lr: float | None = None  # dense: the lr of its recipe file (the transfer command takes no lr)

    def argv(self, output: Path, *more: str) -> list[str]:
        return [sys.executable, "-m", "opera", *self.args, *more, "--output", str(output)]


PRETRAIN = ["run", "pretrain", "--hierarchy", "self,full", "--data", "digits:0-1", "--epochs", "2", "--batch-size", "32",
            "--seed", "3", "--device", "cpu", "--workers", "0", "--set", "train.knn_every=0", "--set", "self.mlp_dim=64",
            "--set", "self.dim=32", "--set", "full.hidden=64", "--set", "train.log_every=1",
            "--set", "train.save_every_steps=1", "--set", "train.deterministic=true"]
LINEAR = ["run", "linear", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-3", "--epochs", "4", "--batch-size", "64",
          "--augment", "--device", "cpu", "--workers", "0", "--set", "log_every=1"]
FINETUNE = ["run", "finetune", "--checkpoint", "random:resnet_tiny", "--data", "digits:0-3", "--recipe", "digits",
            "--epochs", "2", "--batch-size", "64", "--save-every-steps", "1", "--device", "cpu", "--workers", "0",
            "--set", "log_every=1"]
DENSE = ["run", "transfer", "--suite", "segmentation", "--checkpoint", "random:resnet_tiny", "--target", "digit_scenes:7-9",
         "--iters", "16", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--set", "tensorboard=false"]


def protocols(recipe_dir: Path) -> dict[str, Protocol]:
    recipe = recipe_dir / "dense.yaml"
    return {
        # killed in the second epoch (9 steps each), after a checkpoint inside it
        "pretrain": Protocol("pretrain", PRETRAIN, 11, ["--set", "optim.base_lr=0.123"],
                             r"was trained with other settings: optim\.base_lr \S+ -> 0\.123; "),
        # last.pt at epoch ends only (9 steps of 64 images each): killed once the second epoch's is written
        "linear": Protocol("linear", LINEAR, 18, ["--set", "momentum=0.8"],
                           r"was written by another linear evaluation: momentum 0\.9 \(this run: 0\.8\); "),
        "finetune": Protocol("finetune", FINETUNE, 11, ["--set", "weight_decay=0.01"],
                             r"was written by another fine-tuning: weight_decay 0\.05 \(this run: 0\.01\); "),
        # dense: the recipe file is rewritten with lr 0.02 (the transfer command has no --lr)
        "dense": Protocol("dense", [*DENSE, "--recipe", str(recipe)], 6, [],
                          r"was written by another dense transfer: lr 0\.05 \(this run: 0\.02\); ", recipe_lr=0.05),
    }


NAMES = ["pretrain", "linear", "finetune", "dense"]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_recipe(p: Protocol, recipe_dir: Path, lr: float | None = None) -> None:
    if p.recipe_lr is not None:
        (recipe_dir / "dense.yaml").write_text(DENSE_RECIPE.format(lr=p.recipe_lr if lr is None else lr))


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nothing blocks the child while the test waits
        return subprocess.Popen(argv, env=child_env(), stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the run did not end within {DEADLINE_S} s; its output ends:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def saved_step(output: Path) -> int:
    try:
        state = torch.load(output / "last.pt", weights_only=True, map_location="cpu", mmap=True)
        return int(state["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError, ValueError):
        return 0


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


class References:
    """The uninterrupted run of each protocol, started once per module and shared by its tests."""

    def __init__(self, root: Path):
        self.root = root
        self.running: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.done: dict[str, Path] = {}
        self.protocols = protocols(root)
        write_recipe(self.protocols["dense"], root)

    def start(self, name: str) -> None:
        if name in self.running or name in self.done:
            return
        p = self.protocols[name]
        out = self.root / name
        self.running[name] = (start(p.argv(out), self.root / f"{name}.log"), out)

    def wait(self, name: str) -> Path:
        self.start(name)
        if name not in self.done:
            proc, out = self.running.pop(name)
            finish(proc, self.root / f"{name}.log")
            self.done[name] = out
        return self.done[name]

    def close(self) -> None:
        for proc, _ in self.running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = References(tmp_path_factory.mktemp("reference"))
    yield refs
    refs.close()


# ------------------------------------------------------------------------------ SIGKILL and rerun
@pytest.mark.parametrize("name", NAMES)
def test_sigkill_and_rerun_ends_with_the_weights_of_an_uninterrupted_run(name, references, tmp_path):
    p = references.protocols[name]
    references.start(name)  # the uninterrupted run, alongside the one killed here
    cut = tmp_path / "cut"
    proc = start(p.argv(cut), tmp_path / "killed.log")
    deadline = time.monotonic() + DEADLINE_S
    while saved_step(cut) < p.kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"the {name} run exited ({proc.returncode}) before it was killed; its output ends:\n"
                    f"{(tmp_path / 'killed.log').read_text()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = saved_step(cut)
    if killed_at < p.kill_after:
        pytest.fail(f"the {name} run wrote no last.pt at step {p.kill_after} within {DEADLINE_S} s (last.pt: step {killed_at})")
    assert LOCK in {f.name for f in cut.iterdir()}  # a SIGKILL leaves its lock behind: the rerun takes it over

    text = finish(start(p.argv(cut), tmp_path / "rerun.log"), tmp_path / "rerun.log")
    whole = references.wait(name)
    total = saved_step(whole)
    print(f"\n{name}: killed with last.pt at step {killed_at} of {total}; the rerun resumed and finished")
    assert p.kill_after <= killed_at < total, f"the kill did not land inside the run (last.pt at step {killed_at} of {total})"
    assert "resuming from" in text and f"step {killed_at}" in text, text[-3000:]
    assert saved_step(cut) == total
    a = torch.load(whole / "last.pt", weights_only=True, map_location="cpu")["model"]
    b = torch.load(cut / "last.pt", weights_only=True, map_location="cpu")["model"]
    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run's, e.g. {differ[:5]}"


# ----------------------------------------------------------------------------- a folder in use
@pytest.mark.parametrize("name", NAMES)
def test_a_second_run_into_a_folder_in_use_is_refused(name, holder_process, references):
    p = references.protocols[name]
    run, holder = holder_process
    before = snapshot(run)
    res = subprocess.run(p.argv(run), env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    line = only_line(res.stderr)
    print(f"\n{name}: {line}")
    assert res.returncode == 2, res.stderr
    assert f"in use by pid {holder.pid}" in line and str(run) in line, line
    assert snapshot(run) == before  # the holder's lock alone, untouched: nothing written
    assert holder.poll() is None


# ------------------------------------------------------------------------ resume with other options
@pytest.mark.parametrize("name", NAMES)
def test_a_rerun_with_another_training_option_is_refused(name, references, tmp_path):
    whole = references.wait(name)
    out = Path(shutil.copytree(whole, tmp_path / "run"))  # copy2: bytes and times kept
    p = references.protocols[name]
    before, mtime = snapshot(out), (out / "last.pt").stat().st_mtime_ns
    write_recipe(p, references.root, lr=0.02)  # dense: the same recipe file with another lr
    try:
        res = subprocess.run(p.argv(out, *p.changed), env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    finally:
        write_recipe(p, references.root)
    line = only_line(res.stderr)
    print(f"\n{name}: {line}")
    assert res.returncode == 2, res.stderr
    assert re.search(p.refusal, line) and line.startswith(f"error: {out / 'last.pt'} "), line
    assert "resuming from" not in res.stdout
    assert snapshot(out) == before and (out / "last.pt").stat().st_mtime_ns == mtime  # last.pt untouched
