"""Ablation studies (paper §4.3, Fig. 4-8) and their reports.

A *study* is a list of variants (config overrides) x seeds. Every cell (variant x seed) pretrains
into ``OUT/cells/<variant>/seed<k>/pretrain`` and runs the chosen evaluations into
``OUT/cells/<variant>/seed<k>/eval_<name>/results.json``; ``cell.json`` is written (atomically)
when the cell is done. Rerunning the same command skips finished cells and resumes a half-finished
one from its ``last.pt``. :func:`build_report` turns whatever has finished into ``report.md``,
``report.csv``, ``report.json`` and PNG plots (mean and Student-t 95% interval over seeds).

    opera ablate arrangements --seeds 3          # Fig. 4: arrangements A, B, C of self + full
    opera ablate hierarchy                       # self (MoCo-v3), full (supervised), self+full (OPERA), naive
    opera ablate sweep --set full.layers=1,2,3,4 # Fig. 5-8: any config key(s), a grid
    opera ablate labels --fractions 1%,10%,100%  # self, full, self+full as labels get scarce (--labels)
    opera report runs/ablate/arrangements        # rebuild the report from finished cells
"""

from opera.ablate.report import build_report, mean_ci, t_quantile
from opera.ablate.study import (
    Study,
    Variant,
    arrangement_variants,
    cell_config,
    create_study,
    hierarchy_variants,
    load_study,
    run_cell,
    run_study,
    sweep_variants,
)

__all__ = [
    "Study",
    "Variant",
    "arrangement_variants",
    "build_report",
    "cell_config",
    "create_study",
    "hierarchy_variants",
    "load_study",
    "mean_ci",
    "run_cell",
    "run_study",
    "sweep_variants",
    "t_quantile",
]
