"""``opera ablate`` with ``train.loggers=mlflow``: one tracker run per cell, grouped by study, holding
the cell's pretraining and its evaluation metrics (opera.ablate.study, docs/trackers.md)."""

from __future__ import annotations

import json
import os

import pytest

from tests.ablate.conftest import TINY


@pytest.mark.slow
def test_each_cell_is_one_mlflow_run_in_the_study_group(tmp_path, one_thread, monkeypatch):
    from opera.ablate.study import arrangement_variants, create_study, run_cell
    from opera.engine.trackers import read_ids

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "mystudy"
    create_study("arrangements", arrangement_variants("A,C"), output=out, command="opera ablate arrangements (test)",
                 seeds=1, overrides=[*TINY, "train.loggers=mlflow"], data="digits:0-2", transfer=None, evals="knn")
    records = {v: run_cell(out, v, 0) for v in ("A", "C")}

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("opera").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["A/seed0", "C/seed0"]
    for run in runs:
        variant = run.info.run_name.split("/")[0]
        assert run.data.tags["opera.group"] == "mystudy"
        assert read_ids(out / "cells" / variant / "seed0" / "pretrain")["mlflow"]["run_id"] == run.info.run_id
        assert run.data.metrics["eval.knn.top1"] == pytest.approx(records[variant]["metrics"]["knn/top1"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        rows = [json.loads(line) for line in (out / "cells" / variant / "seed0" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [r["step"] for r in rows if "loss" in r]
        assert run.data.params["train.tracker_group"] == "mystudy"
