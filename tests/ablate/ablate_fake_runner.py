"""A stand-in cell runner for the parallel test (importable by the spawned workers)."""

import json
import os


def fake_runner(study_dir, variant, seed):
    from opera.ablate.records import CELL_FILE, cell_dir, load_study

    study = load_study(study_dir)
    cdir = cell_dir(study_dir, study.variant(variant), seed)
    cdir.mkdir(parents=True, exist_ok=True)
    rec = {"variant": variant, "seed": seed, "metrics": {"linear/top1": 10.0 + len(variant)}, "pid": os.getpid(),
           "cell_s": 1.0}
    (cdir / CELL_FILE).write_text(json.dumps(rec))
    return rec
