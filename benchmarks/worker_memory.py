"""The memory a DataLoader worker adds for the dataset's file names and labels, as N grows.

A forked worker starts sharing all of its parent's pages; what it then copies is its own. This
builds a ``FolderDataset`` of N synthetic ImageNet-style paths (no files: the names and labels
are what is measured, not decoding), runs one real DataLoader worker over every index (what an
epoch makes a worker touch: the path and the label of each image it loads) and reports the
worker's private memory (``Private_Clean + Private_Dirty`` of /proc/self/smaps_rollup) before and
after that pass. ``--as-list`` holds the paths as a Python list of str (how opera held them
before ``opera.data.strings.StringArray``), to compare.

    python benchmarks/worker_memory.py --images 1281167
    python benchmarks/worker_memory.py --images 1281167 --as-list
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader, Dataset

from opera.data.datasets import FolderDataset
from opera.data.specs import parse_data_spec
from opera.data.strings import StringArray


def private_mb() -> float:
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1])
    return (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024


def synthetic_folder(n: int, classes: int = 1000, as_list: bool = False) -> FolderDataset:
    """A FolderDataset of ``n`` ImageNet-style names (``/data/imagenet/train/n0XXXXXXX/n0XXXXXXX_K.JPEG``)."""
    ds = FolderDataset.__new__(FolderDataset)
    wnids = [f"n{1440764 + 7919 * c:08d}" for c in range(classes)]
    labels: list[int] = []
    for k in range(classes):  # as the folder scan makes them: one int object per class
        labels.extend([k] * (n // classes + (k < n % classes)))
    paths = [f"/data/imagenet/train/{wnids[y]}/{wnids[y]}_{i}.JPEG" for i, y in enumerate(labels)]
    ds.samples = paths if as_list else StringArray(paths)
    del paths
    ds.spec, ds.split, ds.layout = parse_data_spec("/data/imagenet"), "train", "train/val"
    ds.class_names, ds.num_classes = wnids, classes
    ds.targets = labels
    ds.transform = None
    return ds


class TouchNames(Dataset):
    """Item i: what loading image i reads besides the file (its path and its label); item -1: the
    worker's private memory now."""

    def __init__(self, ds: FolderDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        if i < 0:
            return private_mb()
        return len(self.ds.describe_item(i)) + int(self.ds.targets[i])


class Chunks:
    """Batches of consecutive indices, made as they are asked for (a list of them all, held by the
    parent, would be copied into the worker's private pages as the parent's reads touch it)."""

    def __init__(self, n: int, chunk: int):
        self.n, self.chunk = n, chunk

    def __iter__(self):
        yield [-1]
        for a in range(0, self.n, self.chunk):
            yield list(range(a, min(a + self.chunk, self.n)))
        yield [-1]

    def __len__(self) -> int:
        return 2 + -(-self.n // self.chunk)


def _collate(batch: list) -> float:
    return batch[0] if len(batch) == 1 else float(len(batch))


def worker_growth(ds: FolderDataset, chunk: int = 16384) -> tuple[float, float]:
    """(private MB of the worker before, after) one pass over every index."""
    loader = DataLoader(TouchNames(ds), batch_sampler=Chunks(len(ds), chunk), num_workers=1, collate_fn=_collate)
    out = list(loader)
    return out[0], out[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--as-list", action="store_true", help="paths as a Python list of str (the old way)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = synthetic_folder(args.images, as_list=args.as_list)
    before, after = worker_growth(ds)
    print(json.dumps({"images": args.images, "paths": "list" if args.as_list else "StringArray",
                      "worker_private_mb_before": round(before, 1), "worker_private_mb_after": round(after, 1),
                      "worker_growth_mb": round(after - before, 1)}))


if __name__ == "__main__":
    main()
