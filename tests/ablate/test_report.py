"""The report: mean ± 95% CI per variant and metric, best marked, rebuilt from partial results."""

from __future__ import annotations

import csv
import json
import math

import pytest

from opera.ablate.records import CELL_FILE
from opera.ablate.report import build_report
from opera.ablate.study import arrangement_variants, create_study

T2 = 4.302652729749464  # t_{0.975, 2}: (2p-1)/sqrt(2p(1-p)), p = 0.975


@pytest.fixture
def study3(tmp_path, fake_cell):
    out = tmp_path / "s"
    create_study("arrangements", arrangement_variants("A,B,C"), output=out, seeds=3,
                 command="opera ablate arrangements --seeds 3 --set train.epochs=1",
                 overrides=["train.epochs=1"])
    values = {"A": [90.0, 91.0, 92.0], "B": [80.0, 84.0, 88.0], "C": [93.0, 93.0, 96.0]}
    for v, vals in values.items():
        for seed, x in enumerate(vals):
            fake_cell(out, v, seed, {"linear/top1": x, "knn/top1": 100 - x, "transfer_linear/top1": 70.0 + seed})
    return out, values


def _csv(out):
    with open(out / "report.csv") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_report_statistics_and_best(study3):
    out, values = study3
    rep = build_report(out, quiet=True)
    assert rep["finished"] == rep["expected"] == 9
    rows = _csv(out)
    for v, vals in values.items():
        m = sum(vals) / 3
        s = math.sqrt(sum((x - m) ** 2 for x in vals) / 2)
        assert int(rows[v]["seeds"]) == 3
        assert float(rows[v]["linear/top1_mean"]) == pytest.approx(m, abs=1e-4)
        assert float(rows[v]["linear/top1_ci95"]) == pytest.approx(T2 * s / math.sqrt(3), abs=1e-4)
    assert [v for v, r in rows.items() if r["linear/top1_best"] == "1"] == ["C"]  # highest mean
    assert [v for v, r in rows.items() if r["knn/top1_best"] == "1"] == ["B"]
    assert sorted(v for v, r in rows.items() if r["transfer_linear/top1_best"] == "1") == ["A", "B", "C"]  # a tie
    assert float(rows["A"]["transfer_linear/top1_ci95"]) == pytest.approx(T2 / math.sqrt(3), abs=1e-4)

    md = (out / "report.md").read_text()
    assert "opera ablate arrangements --seeds 3 --set train.epochs=1" in md  # the exact command
    assert "**94.00 ± " in md  # C's linear mean (93+93+96)/3 in bold
    for p in ("plots/linear_top1.png", "plots/knn_top1.png", "plots/loss_curves.png"):
        assert (out / p).stat().st_size > 1000 and f"]({p})" in md
    js = json.loads((out / "report.json").read_text())
    assert js["best"]["linear/top1"] == ["C"] and js["metrics"][:2] == ["linear/top1", "knn/top1"]
    row_c = next(r for r in js["rows"] if r["variant"] == "C")
    assert row_c["stats"]["linear/top1"]["values"] == [93.0, 93.0, 96.0]


def test_report_from_partial_results(study3):
    out, _ = study3
    (out / "cells" / "B" / "seed1" / CELL_FILE).unlink()  # B seed 1 unfinished
    for seed in range(3):  # C not started at all
        (out / "cells" / "C" / f"seed{seed}" / CELL_FILE).unlink()
    rep = build_report(out, quiet=True)
    assert (rep["finished"], rep["expected"]) == (5, 9)
    assert "B/seed1" in rep["pending"] and "C/seed0" in rep["pending"]
    rows = _csv(out)
    assert (rows["A"]["seeds"], rows["B"]["seeds"], rows["C"]["seeds"]) == ("3", "2", "0")
    assert float(rows["B"]["linear/top1_mean"]) == pytest.approx(84.0)  # seeds 0 and 2: 80, 88
    assert float(rows["B"]["linear/top1_ci95"]) == pytest.approx(12.706204736174676 * math.sqrt(32) / math.sqrt(2), rel=1e-6)
    assert rows["C"]["linear/top1_mean"] == "" and rows["C"]["linear/top1_best"] == ""
    assert rows["A"]["linear/top1_best"] == "1"
    md = (out / "report.md").read_text()
    assert "cells finished: 5 of 9" in md and "C/seed0" in md


def test_one_seed_has_no_interval(tmp_path, fake_cell):
    out = tmp_path / "one"
    create_study("arrangements", arrangement_variants("A,C"), output=out, seeds=1, command="opera ablate arrangements --seeds 1")
    fake_cell(out, "A", 0, {"linear/top1": 91.25})
    build_report(out, quiet=True)
    rows = _csv(out)
    assert rows["A"]["linear/top1_mean"] == "91.2500" and rows["A"]["linear/top1_ci95"] == ""
    assert "| 1 | **91.25** |" in (out / "report.md").read_text()


def test_loss_curves_average_seeds(study3, fake_cell):
    from opera.ablate.report import collect, loss_curves

    out, _ = study3
    fake_cell(out, "A", 1, {"linear/top1": 91.0}, losses=(5.0, 4.0, 3.0))  # seed 0, 2: (3, 2, 1.5)
    data = collect(out)
    curves = loss_curves(out, data["rows"])
    epochs, mean = curves["A"]["loss"]
    assert epochs == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert mean == pytest.approx([11 / 3, 8 / 3, 2.0])
    assert set(curves["A"]) == {"loss", "loss/self", "loss/full"}
