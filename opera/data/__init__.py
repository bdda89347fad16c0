"""Data: specs, datasets, augmentations and deterministic loaders.

``build_dataset("digits:0-4", "train", transform)`` -> :class:`OperaDataset` of uint8 images;
``PretrainTransform`` / ``EvalTransform`` -> augmentations; ``build_loader`` -> a resumable,
seeded, rank-sharded ``DataLoader``; ``PretrainFeed`` -> the pretraining loop's batches of two-crop
views on the device (``data.augment_on``).
"""

from opera.data.datasets import (
    DigitsDataset,
    FolderDataset,
    OperaDataset,
    TorchvisionDataset,
    build_dataset,
    dataset_label_sets,
    dataset_target_sets,
    decode_image_file,
    verify_images,
)
from opera.data.loader import (
    PretrainFeed,
    SeededDataset,
    ShardedBatchSampler,
    build_loader,
    sample_seed,
    steps_per_epoch,
)
from opera.data.specs import DataSpec, parse_data_spec
from opera.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    PretrainTransform,
)

__all__ = [
    "dataset_label_sets",
    "dataset_target_sets",
    "DataSpec",
    "DigitsDataset",
    "EvalTransform",
    "FolderDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OperaDataset",
    "PretrainFeed",
    "PretrainTransform",
    "SeededDataset",
    "ShardedBatchSampler",
    "TorchvisionDataset",
    "build_dataset",
    "build_loader",
    "decode_image_file",
    "parse_data_spec",
    "sample_seed",
    "steps_per_epoch",
    "verify_images",
]
