"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (``train.loggers``).

A run names its loggers in one option, ``train.loggers=tensorboard,wandb,mlflow`` (evaluations:
``--set loggers=...``); ``tensorboard`` alone is the default. W&B and MLflow are optional extras
(``pip install -e ".[wandb]"``, ``".[mlflow]"``): a logger whose package is missing is one line
naming that command, before anything is built (:func:`require`); with none installed everything
else works.

What a tracker run holds and how it lives with a resumable run (docs/trackers.md):

* **One tracker run per run directory.** Its id is kept in ``OUTPUT/trackers.json`` (written
  atomically, rank 0). A resumed run - the same command after a kill, a requeued SLURM job - finds
  the id there and continues that tracker run, never a new one; another ``--output`` is another
  tracker run.
* **Every step once.** A resumed run replays the steps between its checkpoint and the kill
  (``metrics.jsonl`` drops their rows and writes them again, :func:`~opera.engine.logging.truncate_metrics`).
  A tracker cannot drop a point it already holds, so on resume opera reads back, per metric, the
  last step the tracker run holds and sends only later steps: each (metric, step) is in the tracker
  once, with the value first logged (which equals the replayed one wherever the resume is bit-exact,
  see docs/reliability.md). Points the tracker never wrote before the kill are sent again.
* **The resolved config** (``config.yaml``'s content) is the run's config: W&B's run config, MLflow
  params (flattened ``section.key``; values cut to MLflow's length limit) plus the whole config as
  the artifact ``config.yaml``.
* **Rank 0 only**: the other ranks import nothing and create nothing.

W&B runs with ``mode="offline"`` by default (``train.wandb_mode``): nothing touches the network,
the run lives under ``OUTPUT/wandb/offline-run-*-<id>`` and ``wandb sync`` uploads it later. MLflow
writes to the file store ``file:OUTPUT/mlruns`` unless ``train.mlflow_uri`` or ``MLFLOW_TRACKING_URI``
names another; opera turns MLflow's telemetry off (``MLFLOW_DISABLE_TELEMETRY``) unless set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opera.errors import OperaError
from opera.loggers import EXTRAS, LOGGERS, parse_loggers

#: where a run directory keeps its tracker runs' ids
IDS = "trackers.json"
#: MLflow's limit on a parameter's value (characters)
MLFLOW_PARAM_MAX = 6000


def require(loggers: str | tuple[str, ...], key: str = "train.loggers") -> tuple[str, ...]:
    """The loggers of ``loggers``, each optional one importable, or one line naming the install
    command. Imports the package: call it on rank 0 only, before anything is built."""
    names = parse_loggers(loggers, key) if isinstance(loggers, str) else loggers
    for name in names:
        module = EXTRAS.get(name)
        if not module:
            continue
        why = "is not installed"
        if importlib.util.find_spec(module) is not None:
            try:
                importlib.import_module(module)
                continue
            except ImportError as exc:
                why = f"cannot be imported ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        raise OperaError(f"{key} names {name} but the {module} package {why}; "
                         f"pip install -e \".[{name}]\" (or pip install {'mlflow-skinny' if name == 'mlflow' else module}), "
                         f"or drop {name} from {key}")
    return names


@dataclass
class TrackerOptions:
    """Where and how a run's tracker runs are made (the ``train.*`` keys of docs/trackers.md)."""

    loggers: tuple[str, ...] = ("tensorboard",)
    project: str = "opera"  # W&B project, MLflow experiment
    group: str = ""  # W&B group, MLflow tag opera.group ('opera ablate': the study)
    name: str = ""  # the run's display name ('': the run directory's name)
    wandb_mode: str = "auto"  # auto: $WANDB_MODE, else offline | offline | online
    wandb_entity: str = ""
    mlflow_uri: str = ""  # '': $MLFLOW_TRACKING_URI, else file:OUTPUT/mlruns

    @classmethod
    def of(cls, cfg: Any, key: str = "train.loggers") -> TrackerOptions:
        """From a config section that has ``loggers`` (and, optionally, the other fields)."""
        kw = {f: getattr(cfg, f"tracker_{f}" if f in ("project", "group", "name") else f)
              for f in ("project", "group", "name", "wandb_mode", "wandb_entity", "mlflow_uri")
              if hasattr(cfg, f"tracker_{f}" if f in ("project", "group", "name") else f)}
        return cls(loggers=parse_loggers(cfg.loggers, key), **kw)

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(n for n in self.loggers if n in EXTRAS)


# ----------------------------------------------------------------------------- the id file
def read_ids(output: Path) -> dict[str, Any]:
    path = Path(output) / IDS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OperaError(f"{path} is unreadable ({exc}); it holds the ids of this run's tracker runs: repair it, or "
                         "remove it to start new tracker runs") from None
    return data if isinstance(data, dict) else {}


def write_ids(output: Path, ids: dict[str, Any]) -> None:
    from opera.files import atomic_write_text

    atomic_write_text(Path(output) / IDS, json.dumps(ids, indent=2, sort_keys=True) + "\n", "the tracker ids")


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite-or-not numbers (bools and strings stay out)."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (``sep`` between the levels)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- the trackers
class Tracker:
    """A tracker run: ``log`` sends each metric only past the last step the run already holds
    (:attr:`held`, read back on resume), so a replayed step is never a second point."""

    name = ""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def log(self, row: dict[str, Any], step: int) -> None:
        fresh = {k: v for k, v in numeric(row).items() if step > self.held.get(k, -1)}
        if fresh:
            self._send(fresh, step)
            for k in fresh:
                self.held[k] = step

    def _send(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """A W&B run under ``OUTPUT/wandb`` (``wandb.init(dir=OUTPUT, id=<kept id>, resume="allow")``)."""

    name = "wandb"

    def __init__(self, output: Path, opts: TrackerOptions, config: dict[str, Any], run_id: str | None):
        super().__init__()
        mode = opts.wandb_mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE", "offline") or "offline"
        if mode in ("offline", "dryrun"):
            os.environ["WANDB_MODE"] = "offline"  # the service process reads it too: no network
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.resumed = run_id is not None
        self.id = run_id or secrets.token_hex(4)  # W&B ids: letters and digits
        if self.resumed:
            self.held = wandb_held_steps(output, self.id)
        self.mode = mode
        self.run = wandb.init(
            project=opts.project, entity=opts.wandb_entity or None, group=opts.group or None,
            name=opts.name or output.name, id=self.id, resume="allow", dir=str(output), mode=mode, config=config,
            settings=wandb.Settings(silent=True, console="off", save_code=False))

    def _send(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish()


class MlflowTracker(Tracker):
    """An MLflow run (``MlflowClient``, no global active run): metrics keyed with ``.`` for ``/``
    (the file store keeps ``loss`` and ``loss/self`` as a file and a folder of the same name)."""

    name = "mlflow"

    def __init__(self, output: Path, opts: TrackerOptions, config: dict[str, Any], run_id: str | None,
                 kept_uri: str | None = None):
        """``run_id`` and ``kept_uri``: the run to continue and the store it lives in (trackers.json)."""
        super().__init__()
        uri = (kept_uri if run_id else None) or opts.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") \
            or (Path(output).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.resumed = run_id is not None
        if self.resumed:
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.held = {key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                         for key in self.client.get_run(run_id).data.metrics}  # keyed as sent (see log)
        else:
            exp = self.client.get_experiment_by_name(opts.project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(opts.project)
            tags = {"opera.run_dir": str(output.resolve()), **({"opera.group": opts.group} if opts.group else {})}
            run = self.client.create_run(exp_id, run_name=opts.name or output.name, tags=tags)
            self.id = run.info.run_id
            self._log_config(config)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", ".")

    def _log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit on params
            self.client.log_batch(self.id, params=params[i:i + 100])
        self.client.log_dict(self.id, config, "config.yaml")

    def log(self, row: dict[str, Any], step: int) -> None:
        super().log({self._key(k): v for k, v in row.items()}, step)

    def _send(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.set_terminated(self.id)


def open_trackers(output: Path, opts: TrackerOptions, config: dict[str, Any]) -> list[Tracker]:
    """Start (or, with an id in ``OUTPUT/trackers.json``, resume) a tracker run per optional logger
    of ``opts``; the ids are written back before any metric is sent. Rank 0 only."""
    output = Path(output)
    names = require(opts.loggers)
    config = json.loads(json.dumps(config, default=str))  # as config.yaml reads back: tuples are lists
    ids = read_ids(output)
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "wandb":
                trackers.append(WandbTracker(output, opts, config, ids.get("wandb", {}).get("id")))
                ids["wandb"] = {"id": trackers[-1].id, "project": opts.project}
            elif name == "mlflow":
                kept = ids.get("mlflow", {})
                t = MlflowTracker(output, opts, config, kept.get("run_id"), kept.get("tracking_uri"))
                trackers.append(t)
                ids["mlflow"] = {"run_id": t.id, "tracking_uri": t.uri, "experiment": opts.project}
    except BaseException:
        close_all(trackers)
        raise
    if trackers:
        write_ids(output, ids)
    return trackers


def describe(trackers: list[Tracker], output: Path) -> list[str]:
    """One line per tracker run: which run, new or continued, and where it is."""
    lines = []
    for t in trackers:
        how = "continues" if t.resumed else "new"
        if isinstance(t, WandbTracker):
            where = f"{output}/wandb ({t.mode}" + ("; upload with: wandb sync " + f"{output}/wandb/offline-run-*-{t.id})"
                                                  if t.mode == "offline" else ")")
            lines.append(f"W&B run {t.id} ({how}) in {where}")
        elif isinstance(t, MlflowTracker):
            lines.append(f"MLflow run {t.id} ({how}) at {t.uri}")
    return lines


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker; the first failure is raised after all were tried."""
    first: BaseException | None = None
    for t in trackers:
        try:
            t.close()
        except Exception as exc:  # noqa: BLE001  (close the others first)
            first = first or exc
    if first is not None:
        raise first


# ----------------------------------------------------------------------------- W&B's local files
def wandb_files(output: Path, run_id: str) -> list[Path]:
    """The transaction logs (``run-<id>.wandb``) of W&B run ``run_id`` under ``OUTPUT/wandb``, oldest first."""
    root = Path(output) / "wandb"
    return sorted(root.glob(f"*run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.parent.name.split("-", 2)[-1])


def wandb_records(path: Path) -> list[Any]:
    """The records of a ``.wandb`` file, parsed with wandb's own protobuf (``wandb_internal_pb2.Record``).

    The file is W&B's 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by LevelDB's log
    format: 32 KiB blocks of chunks, each ``crc32 (4) | length (2, little endian) | type (1)``
    (1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk header is padding. A
    chunk cut by a kill ends the read (what was written before it stands)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < 7 or data[:4] != b":W&B":
        return []
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            break
        pos += 7 + length
        if kind == 1:
            parts = chunk
        elif kind == 2:
            parts = chunk
            continue
        elif kind == 3:
            parts += chunk
            continue
        else:
            parts += chunk
        rec = pb.Record()
        try:
            rec.ParseFromString(parts)
        except Exception:  # noqa: BLE001  (a torn record: stop here)
            break
        records.append(rec)
        parts = b""
    return records


def wandb_history(output: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row W&B wrote for ``run_id`` under ``OUTPUT/wandb``, in order: ``{key: value,
    "_step": step}``."""
    rows = []
    for path in wandb_files(output, run_id):
        for rec in wandb_records(path):
            if rec.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                rows.append(row)
    return rows


def wandb_held_steps(output: Path, run_id: str) -> dict[str, int]:
    """Per metric, the last step W&B wrote for ``run_id`` (what a resumed run does not send again)."""
    held: dict[str, int] = {}
    for row in wandb_history(output, run_id):
        step = int(row.get("_step", -1))
        for k in row:
            if not k.startswith("_"):
                held[k] = max(held.get(k, -1), step)
    return held


__all__ = ["EXTRAS", "IDS", "LOGGERS", "MlflowTracker", "Tracker", "TrackerOptions", "WandbTracker", "close_all",
           "describe", "open_trackers", "parse_loggers", "read_ids", "require", "wandb_history", "wandb_records"]
