"""Evaluation protocols of the paper (section 4, Appendix C.1) and their tooling.

* :mod:`~opera.evals.linear`: linear probe on the frozen backbone (SGD, 90 epochs, top-1/top-5,
  frozen-weight sanity check);
* :mod:`~opera.evals.knn`: weighted k-NN (k=20, T=0.07) in bounded memory;
* :mod:`~opera.evals.finetune`: end-to-end fine-tuning (AdamW, Mixup/CutMix, RandAugment, ...);
* :mod:`~opera.evals.transfer`: CIFAR-10/100, Flowers-102, Pets (Table 3) or held-out digits;
* :mod:`~opera.evals.diagnose`: Corollary 1 (Eq. 11) measured on every representation space;
* :mod:`~opera.evals.export`: backbones for timm, torchvision, detectron2 and mmdet.

``--checkpoint`` is an opera run directory / ``backbone.safetensors`` / ``last.pt``, or
``random:<backbone>`` / ``timm:<name>`` for baselines. Every protocol writes ``results.json``.
"""

from typing import Any

__all__ = [
    "DiagnoseConfig", "EvalConfig", "ExportConfig", "FORMATS", "FinetuneConfig", "FrozenBackboneError", "KNNConfig",
    "LinearConfig", "LoadedBackbone", "TransferConfig", "check_frozen", "convert", "extract_features", "finetune_config",
    "knn_accuracy", "knn_scores", "knn_scores_bruteforce", "load_eval_backbone", "run_diagnose", "run_export",
    "run_finetune", "run_knn", "run_linear", "run_transfer",
]


def __getattr__(name: str) -> Any:
    """The names above, imported when first read: ``opera.evals.cli`` (and so ``opera --help``) loads
    without torch, which the protocols themselves need."""
    if name not in __all__:
        raise AttributeError(f"module 'opera.evals' has no attribute {name!r}")
    from opera.evals import common, diagnose, export, finetune, knn, linear, options, transfer

    for module in (options, common, diagnose, export, finetune, knn, linear, transfer):
        if hasattr(module, name):
            globals()[name] = value = getattr(module, name)
            return value
    raise AttributeError(f"module 'opera.evals' has no attribute {name!r}")  # pragma: no cover

