"""The weights the field hands out, read into opera (and, in :mod:`opera.weights.writers`, written
for others): an opera run, MoCo-v3 / OPERA ``main_moco.py``, ``main_lincls.py`` and
``convert_to_deit.py`` checkpoints, timm and torchvision state dicts and timm's
``config.json`` + ``model.safetensors`` folders. :func:`read_weights` finds the format from the
keys and returns a :class:`Weights`; :class:`InitWeights` is ``opera run pretrain --init``.
"""

from opera.weights.init import InitWeights
from opera.weights.readers import Weights, is_opera_checkpoint, read_weights, sha256_file

__all__ = ["InitWeights", "Weights", "is_opera_checkpoint", "read_weights", "sha256_file"]
