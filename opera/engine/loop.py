"""The one resumable training loop of every protocol: pretraining, the linear probe, fine-tuning
and dense transfer.

The loop owns what every protocol must do the same way (the shape of MAE's ``train_one_epoch`` and
of Lightning's split between the loop and its hooks); a protocol supplies its steps and its state.

* **The run directory** (:func:`run_directory`): rank 0 holds ``OUTPUT/.opera.lock`` for the whole
  run (:class:`~opera.engine.lock.RunLock`), from the protocol's setup to its last write, and
  SIGINT / SIGTERM become a request to stop at the next step boundary
  (:class:`~opera.engine.stop.GracefulStop`). A loop can only be made inside one.
* **Resume**: the newest intact checkpoint of the directory (or ``--resume``), refused in one line
  when its identity - the protocol, the backbone, the options that shape training, the training
  data - is not this run's (:func:`~opera.engine.resume.check_identity`).
* **Per-step seeding** from (seed, rank, global step) before each batch is fetched: augmentations
  drawn in the process and model randomness (masks, drop path) are a function of the step, so a
  resumed run replays the uninterrupted one.
* **The finite check**: a non-finite loss ends the run in one line, unless the protocol skips such
  steps itself (a GradScaler under fp16), in which case they stay out of the epoch means.
* **Stop**: a requested stop writes ``last.pt`` at that step and raises
  :class:`~opera.engine.stop.Stopped` (all ranks agree on the step).
* **The save cadence**: ``last.pt`` every ``save_every_steps`` steps inside an epoch and at every
  epoch end, ``epoch_NNNN.pt`` every ``save_every_epochs`` epochs (rank 0, atomically): a hard
  link to that ``last.pt``, the older ones pruned to ``keep_epoch_checkpoints``.
  ``save_every_steps="auto"`` measures first: after :data:`AUTO_PROBE_STEPS` steps of this
  process it writes ``last.pt``, times the write and the median step, and from then on saves
  every :func:`~opera.engine.checkpoint.auto_save_every` steps (writes under 2% of the time, at
  most 30 minutes of steps lost), the same on every rank (rank 0's times), said in one line.
* **The log cadence**: every ``log_every`` steps a row to ``metrics.jsonl`` / TensorBoard / the
  trackers (W&B, MLflow: :mod:`opera.engine.trackers`) and one
  line on stdout, on a terminal or not (rank 0), so a SLURM log shows a run's progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from opera import distributed
from opera.engine.checkpoint import (
    LAST,
    KeepEpochs,
    auto_save_every,
    auto_save_line,
    keeps_epoch,
    load_state,
    remove_partial_writes,
    save_state,
    write_epoch_checkpoint,
)
from opera.engine.lock import NoLock, RunLock, own_run_dir
from opera.engine.logging import METRICS, ProgressDisplay, RunLogger, truncate_metrics
from opera.engine.resume import check_identity, find_checkpoint
from opera.engine.stop import GracefulStop, Stopped
from opera.errors import OperaError


def seed_step(seed: int, rank: int, global_step: int) -> None:
    """Reseed Python, NumPy and torch (CPU and CUDA) from (seed, rank, step): what a step draws
    (crops, masks, drop path) is then a function of the step alone, so a resumed run replays the
    uninterrupted one exactly."""
    s = (seed * 1_000_003 + rank * 7_919 + global_step) % (2**31 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def check_output_dir(output: Path) -> None:
    """Create ``output`` or fail in one line if it cannot be written."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OperaError(f"output directory {output} is not writable ({exc.strerror}); choose another --output") from None


# ------------------------------------------------------------------------------- the run directory
@dataclass
class RunDirectory:
    """A run directory owned by this job: its lock (rank 0) and its stop request."""

    output: Path
    main: bool
    owner: RunLock | NoLock
    stop: GracefulStop


@contextlib.contextmanager
def run_directory(output: str | Path, main: bool | None = None) -> Iterator[RunDirectory]:
    """Own ``output`` for the whole run: rank 0 checks it can write there and holds its lock;
    SIGINT/SIGTERM become a stop request that the loop honours at its next step boundary.
    A folder made only for the lock is removed again if the run wrote nothing (it failed on its
    inputs). Once the lock is held, the temporary files of writers killed mid-write (a SIGKILL
    inside a checkpoint write) are removed, in one line (:func:`~opera.engine.checkpoint.remove_partial_writes`)."""
    output = Path(output)
    main = distributed.detect_env()[0] == 0 if main is None else main
    made = main and not output.exists()
    if main:
        check_output_dir(output)
    try:
        with own_run_dir(output, main) as owner, GracefulStop() as stop:
            if main:  # the lock is ours: a temporary file here is a dead writer's
                said = remove_partial_writes(output)
                if said:
                    print(f"{output}: {said}", flush=True)
            yield RunDirectory(output, main, owner, stop)
    finally:
        if made and output.is_dir() and not any(output.iterdir()):
            output.rmdir()


# ------------------------------------------------------------------------------------ the protocol
@dataclass
class Position:
    """Where a run is: the epoch being trained, the steps done in it, the steps done in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class Cadence:
    """How long a run trains and how often it saves and logs (in optimizer steps and epochs)."""

    epochs: int
    steps_per_epoch: int
    max_steps: int = 0  # stop after this many steps in all (0: no limit)
    save_every_steps: int | str = 0  # last.pt inside an epoch (0: at epoch ends only; "auto": measured)
    save_every_epochs: int = 0  # epoch_NNNN.pt (0: never)
    log_every: int = 10  # a metrics row and a stdout line (0: at epoch ends only)
    keep_epoch_checkpoints: KeepEpochs = -1  # the newest N epoch_NNNN.pt (-1: all), or these epochs
    keep_last_prev: bool = True  # last.prev.pt beside last.pt (False: removed once last.pt reads back)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class TrainingProtocol(Protocol):
    """What a protocol supplies to :class:`TrainingLoop`.

    ``step`` returns the step's named values as 0-d tensors: ``loss`` (checked finite) and
    anything else to log; values the loop averages over ranks at a log step. ``end_epoch`` runs on
    every rank after each epoch (evaluations, monitors) and returns values for the epoch line."""

    name: str  # what the one-line messages call the run ("pretraining", "linear evaluation", ...)
    skips_nonfinite: bool  # a non-finite loss is a step the protocol skipped (GradScaler), not a divergence

    def identity(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None: ...

    def batches(self, at: Position) -> Iterator[Any]: ...

    def step(self, batch: Any, at: Position) -> dict[str, torch.Tensor]: ...

    def log_row(self, at: Position) -> dict[str, float]: ...

    def end_epoch(self, at: Position, finished_epoch: bool) -> dict[str, float]: ...


#: ``save_every_steps="auto"``: the steps of a process timed before its cadence is chosen (the
#: first, which waits for the workers to start, is not counted)
AUTO_PROBE_STEPS = 6


# ---------------------------------------------------------------------------------------- the loop
@dataclass
class TrainingLoop:
    """Runs a :class:`TrainingProtocol` in a :class:`RunDirectory` to the end of its
    :class:`Cadence`, resumably (see the module docstring for what it owns)."""

    run: RunDirectory
    protocol: TrainingProtocol
    cadence: Cadence
    seed: int
    rank: int = 0
    world: int = 1
    metrics: bool = True  # metrics.jsonl + TensorBoard rows at the log cadence
    tensorboard: bool = True
    trackers: Any = None  # opera.engine.trackers.TrackerOptions: W&B / MLflow beside TensorBoard
    tracker_config: dict[str, Any] | None = None  # the tracker runs' config (the resolved config.yaml)
    at: Position = field(default_factory=Position)
    source: Path | None = None  # the checkpoint resumed from

    def __post_init__(self) -> None:
        self._step_times: list[float] = []  # save_every_steps="auto": this process's step times
        self._save_every: int | None = None  # and the cadence chosen from them
        self.identity = self.protocol.identity()
        self._logger: RunLogger | None = None
        self.progress: ProgressDisplay | None = None

    @property
    def logger(self) -> RunLogger:
        """metrics.jsonl and TensorBoard, opened at the first row: a finished run rerun writes nothing."""
        if self._logger is None:
            self._logger = RunLogger(self.run.output, enabled=self.run.main and self.metrics, tensorboard=self.tensorboard,
                                     trackers=self.trackers, config=self.tracker_config)
        return self._logger

    # -------------------------------------------------------------------------------- resume
    def resume(self, resume: str | Path | None = None) -> Position:
        """Continue from ``resume`` (a checkpoint file, or a run directory searched like the output)
        or the output's newest intact checkpoint, if any; returns where the run now is."""
        main = self.run.main
        if resume:
            source = Path(resume)
            if not source.exists():
                raise OperaError(f"--resume {source} does not exist; pass the last.pt of an opera run or its directory")
            if source.is_file():
                path, state, note = source, load_state(source), None
            else:
                path, state, note = find_checkpoint(source, rename_unreadable=main)
                if path is None:
                    raise OperaError(f"--resume {source} holds no checkpoint ({LAST}, epoch_NNNN.pt); pass a run "
                                     "directory or a .pt file")
        else:
            path, state, note = find_checkpoint(self.run.output, rename_unreadable=main)
        if note and main:
            print(note, flush=True)
        if state is None:
            return self.at
        check_identity(state, self.identity, path, what=self.protocol.name, newer=("label_sets", "data"),
                       data_flags=getattr(self.protocol, "data_flags", "--data"))
        at = Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))
        self._refuse_past_end(at, path)
        self.protocol.load_state_dict(state, path)
        self.at = at
        self.source = path
        if self.done:  # nothing left to train: the run's outputs stand, nothing is written
            if main:
                print(self._finished_line(), flush=True)
            return self.at
        if main:
            print(f"resuming from {path} at epoch {self.at.epoch + 1}, step {self.at.global_step}", flush=True)
            truncate_metrics(self.run.output / METRICS, self.at.global_step)
        return self.at

    def _length(self) -> tuple[str, int, int]:
        """How this run's length is set: (option, its value, steps per unit): ``--epochs`` and the
        epochs, or ``--iters`` for a protocol of one epoch of ``cfg.iters`` steps (dense transfer)."""
        c = self.cadence
        iters = getattr(getattr(self.protocol, "cfg", None), "iters", None)
        if c.epochs == 1 and isinstance(iters, int) and iters == c.steps_per_epoch:
            return "--iters", iters, 1
        return "--epochs", c.epochs, c.steps_per_epoch

    def _finished_line(self) -> str:
        """What a rerun of a finished run says instead of resuming it (one line)."""
        flag, value, _ = self._length()
        return finished_line(self.run.output, self.at, self.cadence, flag, value)

    def _refuse_past_end(self, at: Position, path: Path) -> None:
        """A resume whose length (``--epochs``, ``max_steps``) ends before the checkpoint's step
        cannot go back: one line instead of "done"."""
        c = self.cadence
        if at.epoch > c.epochs or (at.epoch == c.epochs and at.step_in_epoch > 0):
            flag, value, per = self._length()
            need = at.epoch + (1 if at.step_in_epoch else 0) if flag == "--epochs" else at.global_step
            raise OperaError(f"{flag} {value} ends at step {value * per}, before step {at.global_step} where {path} "
                             f"already is; pass {flag} {need} or more to resume it, or choose a new --output to "
                             f"train {value} {flag[2:] if value != 1 else flag[2:-1]} from the start")
        if c.max_steps and at.global_step > c.max_steps:
            raise OperaError(f"max_steps={c.max_steps} ends before step {at.global_step} where {path} already is; "
                             f"pass max_steps={at.global_step} or more (0: no limit) to resume it, or choose a new "
                             "--output")

    # ----------------------------------------------------------------------------- saving
    def checkpoint(self, name: str = LAST) -> None:
        """Write the protocol's state and the position to ``OUTPUT/name`` (rank 0, atomically);
        every rank waits for it."""
        self.run.owner.check_owner()
        if self.run.main:
            save_state({**self.protocol.state_dict(), "epoch": self.at.epoch, "step_in_epoch": self.at.step_in_epoch,
                        "global_step": self.at.global_step, "identity": self.identity}, self.run.output / name,
                       keep_previous=self.cadence.keep_last_prev)
        distributed.barrier()

    def epoch_checkpoint(self) -> None:
        """``epoch_NNNN.pt`` of the epoch just ended: a link to the ``last.pt`` just written, then
        the epoch files that ``keep_epoch_checkpoints`` does not keep removed (rank 0)."""
        if self.run.main:
            write_epoch_checkpoint(self.run.output, self.at.epoch, self.cadence.keep_epoch_checkpoints)
        distributed.barrier()

    def _stop_if_requested(self) -> None:
        signum = self.run.stop.requested(self.world)
        if signum:
            self.checkpoint()
            raise Stopped(self.at.global_step, signum)

    def _stop_requested_without_saving(self) -> None:
        signum = self.run.stop.requested(self.world)
        if signum:
            raise Stopped(self.at.global_step, signum)

    # ------------------------------------------------------------------------------- steps
    @property
    def done(self) -> bool:
        c = self.cadence
        return self.at.epoch >= c.epochs or bool(c.max_steps and self.at.global_step >= c.max_steps)

    def _train_epoch(self) -> dict[str, float]:
        """The steps of the current epoch from ``at.step_in_epoch`` (to its end, ``max_steps`` or
        a stop); the epoch's mean of every finite logged value."""
        c, at, p = self.cadence, self.at, self.protocol
        sums: dict[str, float] = {}
        count = 0
        batches = iter(p.batches(at))
        ended = None  # when the previous step of this epoch ended (``auto``'s step times)
        while at.step_in_epoch < c.steps_per_epoch:
            seed_step(self.seed, self.rank, at.global_step)  # before the fetch: a batch's draws are its step's
            try:
                batch = next(batches)
            except StopIteration:
                break
            values = p.step(batch, at)
            at.global_step += 1
            at.step_in_epoch += 1
            floats = {k: float(v) for k, v in values.items()}
            if all(math.isfinite(v) for v in floats.values()):
                for k, v in floats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            elif not p.skips_nonfinite:
                bad = ", ".join(f"{k}={v:.3g}" for k, v in floats.items() if not math.isfinite(v))
                raise OperaError(f"{p.name} diverged at step {at.global_step} (epoch {at.epoch + 1}): {bad}; lower the "
                                 "learning rate, add warmup or gradient clipping, and rerun with a new --output")
            if c.log_every and (at.global_step % c.log_every == 0 or at.step_in_epoch == c.steps_per_epoch):
                self._log(values, line=at.global_step % c.log_every == 0 and at.step_in_epoch < c.steps_per_epoch)
            self._stop_if_requested()
            now = time.perf_counter()
            if ended is not None and self._save_every is None:
                self._step_times.append(now - ended)
            ended = now
            every = self._save_every_steps()
            if every and at.global_step % every == 0 and at.step_in_epoch < c.steps_per_epoch:
                self.checkpoint()
                ended = time.perf_counter()
            if c.max_steps and at.global_step >= c.max_steps:
                break
        if at.step_in_epoch >= c.steps_per_epoch:
            at.epoch += 1
            at.step_in_epoch = 0
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _save_every_steps(self) -> int:
        """The steps between ``last.pt`` writes inside an epoch (0: none). With ``"auto"``: 0 until
        :data:`AUTO_PROBE_STEPS` step times are in, then one timed write of ``last.pt`` and the
        cadence :func:`auto_save_every` chooses from rank 0's write and median step (every rank
        uses the same). A resumed run measures again."""
        c = self.cadence
        if c.save_every_steps != "auto":
            return int(c.save_every_steps)
        if self._save_every is None and len(self._step_times) >= AUTO_PROBE_STEPS - 1:
            started = time.perf_counter()
            self.checkpoint()
            write_s = time.perf_counter() - started
            step_s = float(np.median(self._step_times))
            if self.world > 1:  # rank 0's times on every rank: one cadence
                mine = [write_s, step_s] if self.rank == 0 else [0.0, 0.0]
                times = torch.tensor(mine, dtype=torch.float64, device=getattr(self.protocol, "device", "cpu"))
                write_s, step_s = (float(v) for v in distributed.all_reduce_sum_no_grad(times))
            self._save_every = auto_save_every(write_s, step_s)
            if self.run.main:
                print(auto_save_line(self._save_every, write_s, step_s), flush=True)
        return self._save_every or 0

    def _log(self, values: dict[str, torch.Tensor], line: bool = True) -> None:
        """A metrics row (values averaged over ranks) and a stdout line (``line``: not at an
        epoch's last step, which the epoch line reports), at the log cadence."""
        now = time.time()
        images_per_s = getattr(self.protocol, "global_batch", 0) * (self.at.global_step - self._logged_at) / max(now - self._t_last, 1e-9)
        self._t_last, self._logged_at = now, self.at.global_step
        row = {k: float(distributed.all_reduce_mean(torch.as_tensor(v).detach().float())) for k, v in values.items()}
        at = self.at
        ran_at = at.epoch + (at.step_in_epoch - 1) / self.cadence.steps_per_epoch  # the epoch at which the logged step ran
        full = {"epoch": ran_at, **self.protocol.log_row(at), **row}
        if images_per_s:
            full["img_per_s"] = images_per_s
        self.logger.log(full, at.global_step)
        if line and self.progress is not None:
            self.progress.step_line(at.global_step, self.cadence.total_steps, at.epoch + 1 if at.step_in_epoch else at.epoch,
                                    self.cadence.epochs, row)

    # -------------------------------------------------------------------------------- run
    def run_to_end(self) -> dict[str, Any]:
        """Train from :attr:`at` to the end of the cadence; returns the last epoch's values
        (``trained: False`` and the position when the run was already at its end)."""
        c = self.cadence
        if self.done:  # a finished run rerun (resume said so): nothing to train, nothing written
            return {"epoch": self.at.epoch, "global_step": self.at.global_step, "trained": False}
        self.progress = ProgressDisplay(self.run.main, c.total_steps, self.at.global_step, self.protocol.name)
        self._t_last, self._logged_at = time.time(), self.at.global_step
        result: dict[str, Any] = {}
        try:
            while not self.done:
                row = self._train_epoch()
                finished_epoch = self.at.step_in_epoch == 0
                extra = self.protocol.end_epoch(self.at, finished_epoch)
                if extra:
                    self.logger.log({"epoch": self.at.epoch + self.at.step_in_epoch / c.steps_per_epoch, **extra},
                                    self.at.global_step)
                row.update(extra)
                self.checkpoint()
                if c.save_every_epochs and finished_epoch and self.at.epoch % c.save_every_epochs == 0 \
                        and keeps_epoch(c.keep_epoch_checkpoints, self.at.epoch):
                    self.epoch_checkpoint()
                self.protocol_after_save()
                self.progress.epoch_end(self.at.epoch - 1 if finished_epoch else self.at.epoch, c.epochs,
                                        self.at.global_step, c.total_steps, row)
                result = {"epoch": self.at.epoch, "global_step": self.at.global_step, **row}
                # a stop requested during the epoch's end (an evaluation can take minutes) stops here,
                # last.pt just written, rather than one step into the next epoch
                if not self.done:
                    self._stop_requested_without_saving()
        finally:
            self.progress.close()
            if self._logger is not None:
                self._logger.close()
        return result

    def protocol_after_save(self) -> None:
        hook = getattr(self.protocol, "after_save", None)
        if hook is not None:
            hook(self.at)


def finished_line(output: Path, at: Position, cadence: Cadence, flag: str = "--epochs", value: int | None = None) -> str:
    """The one line of a rerun of a finished run (``at`` is where its checkpoint is, at the end of
    ``cadence``): it is finished, and how to train again or extend it. ``flag``/``value``: the
    option that sets the run's length (``--epochs``, or ``--iters`` for dense transfer)."""
    if at.epoch < cadence.epochs:  # ended by max_steps
        return (f"{output} is a finished run: it stopped at max_steps={cadence.max_steps} (step {at.global_step}); "
                "to train again choose a new --output, or raise max_steps (0: no limit) to go on")
    value = cadence.epochs if value is None else value
    size = f"{value}-iteration" if flag == "--iters" else f"{value}-epoch"
    return (f"{output} is a finished {size} run (step {at.global_step}); to train again choose a new --output, "
            f"or pass {flag} N > {value} to extend it")


__all__ = ["Cadence", "Position", "RunDirectory", "TrainingLoop", "TrainingProtocol", "check_output_dir",
           "finished_line", "run_directory", "seed_step"]
