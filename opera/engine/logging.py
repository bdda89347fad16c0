"""Run outputs on rank 0: ``metrics.jsonl``, TensorBoard events, the experiment trackers of
``train.loggers`` (:mod:`opera.engine.trackers`) and a rich progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from opera.files import atomic_write_text, write_failed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

METRICS = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (a killed run may have logged past its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if row.get("step", 0) <= after_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep), "the metrics log")


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes its events in a thread: a failed write there is kept and raised again in
    the training thread at the next ``add_scalar``/``flush`` (where it becomes one line), but the
    thread also ends with the exception, and Python prints its traceback. Keep that print for
    every other thread."""
    import threading

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "opera_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return  # raised again in the thread that writes, as one line
        previous(args)

    hook.opera_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class RunLogger:
    """Writes metrics rows to ``metrics.jsonl``, TensorBoard and the trackers of ``trackers``
    (W&B, MLflow: :mod:`opera.engine.trackers`); does nothing off rank 0.

    ``metrics.jsonl`` and TensorBoard are append-only logs: a row cut by a kill is dropped on
    resume (:func:`truncate_metrics`). A tracker run continues the one of the run directory and
    sends each metric only past the last step it holds, so a replayed step is not logged twice.
    A write that fails (a full disk, ``ulimit -f``, a read-only or vanished folder) is one line
    naming the file (:func:`~opera.engine.checkpoint.write_failed`), never a traceback; the
    checkpoints are untouched, so the same command resumes once the cause is fixed."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool = True, trackers: Any = None,
                 config: dict[str, Any] | None = None):
        """``trackers``: a :class:`~opera.engine.trackers.TrackerOptions` (its optional loggers are
        started here, on rank 0); ``config``: the run's resolved config, the tracker runs' config."""
        self.enabled = enabled
        self.output = output
        self._tb = None
        self._file = None
        self._trackers: list = []
        if enabled and trackers is not None and trackers.trackers:
            from opera.engine.trackers import describe, open_trackers

            self._trackers = open_trackers(output, trackers, config or {})
            for line in describe(self._trackers, output):
                print(line, flush=True)
            self._backfill(output / METRICS)
        if enabled:
            with self._writing(output / METRICS, "the metrics log"):
                self._file = open(output / METRICS, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                quiet_tensorboard_thread_errors()
                with self._writing(output / "tb", "the TensorBoard events"):
                    self._tb = SummaryWriter(log_dir=str(output / "tb"))

    def _backfill(self, path: Path) -> None:
        """Send the trackers the rows of ``metrics.jsonl`` (a resumed run's, cut at its checkpoint)
        that they do not hold: W&B's service buffers its offline log and a SIGKILL loses what it
        had not written, so a resumed run holds every step up to its checkpoint again."""
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.pop("step", None)
            if isinstance(step, int):
                for tracker in self._trackers:
                    tracker.log(row, step)

    @staticmethod
    @contextlib.contextmanager
    def _writing(path: Path, what: str):
        try:
            yield
        except OSError as exc:
            raise write_failed(path, exc, what, kept="the checkpoints are intact",
                               then="rerun the same command to resume") from None

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in row.items()}
        with self._writing(self.output / METRICS, "the metrics log"):
            self._file.write(json.dumps({"step": step, **row}) + "\n")
        if self._tb is not None:
            with self._writing(self.output / "tb", "the TensorBoard events"):
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(k, v, step)
                self._tb.flush()
        for tracker in self._trackers:
            tracker.log(row, step)

    def close(self) -> None:
        from opera.engine.trackers import close_all

        trackers, self._trackers = self._trackers, []
        close_all(trackers)
        file, tb, self._file, self._tb = self._file, self._tb, None, None
        if file:
            with self._writing(self.output / METRICS, "the metrics log"):
                file.close()
        if tb:
            with self._writing(self.output / "tb", "the TensorBoard events"):
                tb.flush()
                tb.close()


#: epoch-row keys left out of the printed epoch line (they are in metrics.jsonl and TensorBoard):
#: the collapse monitor's statistics of every representation (a collapse prints its own warning
#: line) and the monitors' wall times
NOT_ON_THE_EPOCH_LINE = ("online/rankme/", "online/areq/", "online/std/", "knn_s", "rank_s")


class ProgressDisplay:
    """Rank 0's progress on stdout: a line every ``log_every`` steps and one per epoch, on a
    terminal or not (a SLURM or nohup log follows the run); on a terminal also a progress bar with
    the epoch, the step, the ETA and the live losses."""

    def __init__(self, enabled: bool, total_steps: int, done_steps: int, what: str = "pretraining"):
        self.enabled = enabled
        self.console = Console(stderr=False)
        self.interactive = enabled and sys.stdout.isatty()
        self._progress = None
        self._t0 = time.time()
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), console=self.console,
            )
            self._task = self._progress.add_task(what, total=total_steps, completed=done_steps, epoch="-", losses="")
            self._progress.start()

    def update(self, step: int, epoch: int, losses: dict[str, float]) -> None:
        if self._progress is not None:
            text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
            self._progress.update(self._task, completed=step, epoch=epoch, losses=text)

    def step_line(self, step: int, total: int, epoch: int, epochs: int, row: dict[str, float]) -> None:
        """``step S/T (epoch E/N) loss=... [Xs]`` at the log cadence, and the bar moved on."""
        if not self.enabled:
            return
        self.update(step, epoch, {k: v for k, v in row.items() if k.startswith("loss")})
        text = " ".join(f"{k}={_plain(v):.4g}" for k, v in row.items() if isinstance(_plain(v), (int, float)))
        self._print(f"step {step}/{total} (epoch {epoch}/{epochs}) {text} [{time.time() - self._t0:.0f}s]")

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def epoch_end(self, epoch: int, epochs: int, step: int, total: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_plain(v):.4g}" for k, v in row.items()
                        if isinstance(_plain(v), (int, float)) and not k.startswith(NOT_ON_THE_EPOCH_LINE))
        elapsed = time.time() - self._t0
        self._print(f"epoch {epoch + 1}/{epochs} step {step}/{total} {text} [{elapsed:.0f}s]")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
