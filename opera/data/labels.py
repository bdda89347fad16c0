"""Partly labelled data (omni-supervision): which images keep their labels, and unlabelled images.

``--labels`` (``data.labels``) keeps the labels of a class-balanced, seeded subset of the training
images and sets every other image's entry of every label set to ``-1`` (``NO_LABEL``): ``self``
still sees all images, the spaces that need labels (``full``, ``coarse``) mask the rest out of
their loss (``labelled_mean_cross_entropy``).

Specs of ``--labels``:

* ``10%`` - ``round(10% x n_c)`` images of every class ``c`` (at least one), as the SimCLR /
  BYOL 1% and 10% ImageNet splits are class-balanced;
* ``13/class`` - 13 images of every class (a class with fewer images is an error);
* ``FILE`` - the labelled images, one per line (blank lines and ``#`` comments are skipped), as
  the SimCLR split files ``1percent.txt`` / ``10percent.txt``: an image's path relative to the
  data folder, or just its file name (``n01440764_10026.JPEG``); for datasets held in memory the
  name :func:`item_name` gives (``digits[123]``: index 123 of scikit-learn's 1,797 digits).

The selection depends only on the spec, the dataset and ``train.seed``. The exact list is
written to ``<run>/labelled.txt`` (in the ``FILE`` format, with the spec in a ``#`` header), so
a resumed run, ``opera run finetune --labels`` and any later run given that file use the same
images. ``all`` / ``100%`` / empty keeps every label (nothing changes).

``--unlabelled SPEC`` (``data.unlabelled``) appends images whose label sets are all ``-1``:
:class:`UnlabelledImages` (a folder of images without class folders; ``auto`` =
``<data folder>/unlabelled``; every image under the folder) or any data spec whose labels are dropped. :class:`WithUnlabelled`
puts them after the labelled data (the labelled images keep their indices).
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterator
from typing import Callable

import torch

from opera.errors import OperaError
from opera.supervisions.base import NO_LABEL

LABELLED_FILE = "labelled.txt"
_HEADER = "# opera labelled subset:"
ALL = ("", "all", "100%", "none")


# ----------------------------------------------------------------------------- naming images
def item_name(dataset, index: int) -> str:
    """The name of image ``index`` in a labels FILE: its path relative to the data folder, or
    ``describe_item`` (``digits[123]``) for datasets held in memory."""
    from opera.data.datasets import _unwrap

    base = _unwrap(dataset)
    name = base.describe_item(index)
    root = getattr(getattr(base, "spec", None), "root", None)
    if root:
        rel = os.path.relpath(name, root)
        name = name if rel.startswith("..") else rel
    return name.replace(os.sep, "/")


# ----------------------------------------------------------------------------- selection
def is_all(spec: str | None) -> bool:
    return spec is None or str(spec).strip().lower() in ALL


def _class_indices(targets: list[int]) -> dict[int, list[int]]:
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    return dict(sorted(by_class.items()))


def _seeded_order(indices: list[int], seed: int, c: int) -> list[int]:
    from opera.data.loader import sample_seed

    g = torch.Generator()
    g.manual_seed(sample_seed(seed, -7, c))  # epoch -7: never a training epoch's stream
    return [indices[j] for j in torch.randperm(len(indices), generator=g).tolist()]


def parse_labels(spec: str) -> tuple[str, float]:
    """``"10%"`` -> ``("fraction", 0.1)``, ``"13/class"`` -> ``("per_class", 13)``, else ``("file", 0)``."""
    s = str(spec).strip()
    if s.endswith("%"):
        try:
            p = float(s[:-1])
        except ValueError:
            p = -1.0
        if not 0 < p <= 100:
            raise OperaError(f"--labels {spec!r} is not a percentage in (0, 100]; write e.g. --labels 10%")
        return "fraction", p / 100
    if s.endswith("/class"):
        head = s[: -len("/class")].strip()
        if not head.isdigit() or int(head) < 1:
            raise OperaError(f"--labels {spec!r} needs a positive count per class; write e.g. --labels 13/class")
        return "per_class", int(head)
    if not os.path.isfile(s):
        raise OperaError(f"--labels {spec!r} is neither a percentage (10%), a count (13/class) nor a file; "
                         "give one of those (a file lists the labelled images, one per line)")
    return "file", 0


def read_labels_file(path: str | Path) -> tuple[list[str], str | None]:
    """(names, spec from the header or None) of a labels FILE."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OperaError(f"cannot read the labels file {path} ({exc}); give a text file, one image per line") from None
    spec = None
    names = []
    for line in lines:
        t = line.strip()
        if t.startswith(_HEADER) and spec is None:
            spec = t[len(_HEADER):].strip().split(" | ")[0]
        if t and not t.startswith("#"):
            names.append(t)
    return names, spec


def _match_file(dataset, names: list[str], path: str) -> list[int]:
    """Sorted indices of the images that ``names`` (a labels FILE's lines) name: a path relative to
    the data folder, or a file name that only one image has. One pass over the dataset's names,
    holding only the wanted ones (memory O(len(names)), time O(N))."""
    keys = [n.replace("\\", "/") for n in names]
    wanted = set(keys)
    exact: dict[str, int] = {}
    by_base: dict[str, list[int]] = {}
    first = None
    for i, name in enumerate(_iter_relative_names(dataset)):
        first = name if first is None else first
        if name in wanted:
            exact.setdefault(name, i)
        base = name.rsplit("/", 1)[-1]
        if base in wanted:
            by_base.setdefault(base, []).append(i)
    chosen: set[int] = set()
    for n, key in zip(names, keys):
        if key in exact:
            chosen.add(exact[key])
        elif len(by_base.get(key, [])) == 1:
            chosen.add(by_base[key][0])
        elif key in by_base:
            raise OperaError(f"the labels file {path} names {n!r}, which matches {len(by_base[key])} images; "
                             "write its path relative to the data folder")
        else:
            raise OperaError(f"the labels file {path} names {n!r}, which is not a training image of the data "
                             f"(e.g. {first!r}); list training images of --data")
    return sorted(chosen)


def select_labelled(dataset, spec: str, seed: int) -> list[int]:
    """Sorted indices of the images that keep their labels under ``spec`` (class-balanced, seeded)."""
    from opera.data.datasets import dataset_target_sets

    if is_all(spec):
        return list(range(len(dataset)))
    kind, value = parse_labels(spec)
    if kind == "file":
        names, _ = read_labels_file(spec)
        if not names:
            raise OperaError(f"the labels file {spec} lists no image; put one image per line")
        return _match_file(dataset, names, spec)
    by_class = _class_indices(dataset_target_sets(dataset)["class"])
    chosen: list[int] = []
    for c, idx in by_class.items():
        n = max(1, round(value * len(idx))) if kind == "fraction" else int(value)
        if n > len(idx):
            raise OperaError(f"--labels {spec} asks for {n} images of class {c}, which has {len(idx)}; "
                             f"use --labels {len(idx)}/class or fewer")
        chosen.extend(_seeded_order(idx, seed, c)[:n])
    return sorted(chosen)


def write_labelled(path: Path, dataset, indices: list[int], spec: str, data: str, seed: int) -> None:
    """``labelled.txt``: the header (spec, data, seed, count) and one image name per line (atomic)."""
    lines = [f"{_HEADER} {spec} | data {data} | seed {seed} | {len(indices)} of {len(dataset)} images"]
    lines += [item_name(dataset, i) for i in indices]
    from opera.files import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n", "the list of labelled images")


def mask_targets(target_sets: dict[str, list[int]], keep: list[int]) -> dict[str, list[int]]:
    """Every label set with the entries of the images not in ``keep`` set to -1."""
    kept = set(keep)
    return {name: [int(v) if i in kept else NO_LABEL for i, v in enumerate(values)] for name, values in target_sets.items()}


def resolve_labelled(dataset, spec: str | None, data: str, seed: int, run_dir: Path | None,
                     main: bool = True, barrier: Callable[[], None] | None = None) -> list[int] | None:
    """The labelled indices of a run (``None``: every image keeps its labels).

    A run directory that already holds ``labelled.txt`` (a resumed run) reuses its list; a
    different ``spec`` there is an error. Otherwise the subset is selected and rank 0 writes it.
    """
    path = run_dir / LABELLED_FILE if run_dir is not None else None
    existing = path is not None and path.is_file()
    if existing:
        names, old = read_labels_file(path)
        if (old or "") != ("" if is_all(spec) else str(spec).strip()):
            raise OperaError(f"{run_dir} was started with --labels {old or 'all'} ({LABELLED_FILE}), not "
                             f"{spec or 'all'}; resume with --labels {old or 'all'} or choose a new --output")
        keep = _match_file(dataset, names, str(path))
    elif is_all(spec):
        keep = None
    else:
        keep = select_labelled(dataset, str(spec), seed)
    if barrier is not None:
        barrier()  # every rank has read the old list before rank 0 writes the new one
    if main and path is not None and not existing and keep is not None:
        write_labelled(path, dataset, keep, str(spec).strip(), data, seed)
    return keep


# ----------------------------------------------------------------------------- unlabelled images
class UnlabelledImages(torch.utils.data.Dataset):
    """Every image under ``root`` (any folder depth, class folders or not), without labels."""

    def __init__(self, root: str, transform=None):
        from opera.data.datasets import _scan_images

        if not os.path.isdir(root):
            raise OperaError(f"--unlabelled {root} is not a folder; give a folder of images or a data spec")
        from opera.data.strings import StringArray

        self.samples = StringArray(_scan_images(root))  # shared by the workers, not copied into each
        if not self.samples:
            raise OperaError(f"--unlabelled {root} holds no images; give a folder of images or a data spec")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        from opera.data.datasets import decode_image_file

        return decode_image_file(self.samples[index])

    def describe_item(self, index: int) -> str:
        return self.samples[index]

    def describe_items(self) -> Iterator[str]:
        """``describe_item`` of every image, in order (at once, not one index at a time)."""
        return iter(self.samples)

    def __getitem__(self, index: int):
        img = self.load_image(index)
        return (self.transform(img) if self.transform is not None else img), NO_LABEL


def build_unlabelled(spec: str, data: str):
    """The dataset of ``--unlabelled SPEC``: ``auto`` (``<data folder>/unlabelled``), a folder (every
    image under it, at any depth), or any other data spec (an ImageNet-style folder with
    ``train/``, ``cifar10=ROOT``, ``digits:5-9``: its train split); the labels are dropped."""
    from opera.data import build_dataset, parse_data_spec

    s = str(spec).strip()
    if s == "auto":
        root = parse_data_spec(data).root
        if not root or not os.path.isdir(os.path.join(root, "unlabelled")):
            if root and os.path.isdir(os.path.join(root, "unlabeled")):  # the folder's name before the rename
                raise OperaError(f"--unlabelled auto needs an unlabelled/ folder beside train/ in --data {data}, and "
                                 f"finds unlabeled/: rename it unlabelled/ (mv {os.path.join(root, 'unlabeled')} "
                                 f"{os.path.join(root, 'unlabelled')}) or give the folder")
            raise OperaError(f"--unlabelled auto needs an unlabelled/ folder beside train/ in --data {data}; "
                             "add it or give the folder")
        s = os.path.join(root, "unlabelled")
    if os.path.isdir(s) and not os.path.isdir(os.path.join(s, "train")):
        return UnlabelledImages(s)  # every image under it, class folders or not: the labels are dropped
    return build_dataset(s, "train")


class WithUnlabelled(torch.utils.data.Dataset):
    """The labelled training set followed by unlabelled images (indices ``len(labelled)..``).

    The label sets are the labelled set's; the unlabelled images' entries are -1 in every one.
    ``images`` (when both parts hold uint8 images of one size in memory) lets the feed index
    them on the device; ``transform`` reaches both parts.
    """

    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.n = len(labelled)
        from opera.data.loader import in_memory_images

        a, b = in_memory_images(labelled), in_memory_images(unlabelled)
        self.images = torch.cat([a, b]) if a is not None and b is not None and a.shape[1:] == b.shape[1:] else None
        self.num_classes = labelled.num_classes

    @property
    def transform(self):
        return self.labelled.transform

    @transform.setter
    def transform(self, tf) -> None:
        self.labelled.transform = tf
        self.unlabelled.transform = tf

    def __len__(self) -> int:
        return self.n + len(self.unlabelled)

    def label_sets(self) -> dict[str, int]:
        from opera.data.datasets import dataset_label_sets

        return dataset_label_sets(self.labelled)

    def target_sets(self) -> dict[str, list[int]]:
        from opera.data.datasets import dataset_target_sets

        extra = [NO_LABEL] * len(self.unlabelled)
        return {k: list(v) + extra for k, v in dataset_target_sets(self.labelled).items()}

    def describe_item(self, index: int) -> str:
        return self.labelled.describe_item(index) if index < self.n else self.unlabelled.describe_item(index - self.n)

    def __getitem__(self, index: int):
        if index < self.n:
            return self.labelled[index]
        img, _ = self.unlabelled[index - self.n]
        return img, NO_LABEL


# ----------------------------------------------------------------------------- the run's data
def pretrain_data(data_cfg, seed: int, run_dir: Path | None, main: bool = True,
                  barrier: Callable[[], None] | None = None) -> tuple[object, dict[str, list[int]] | None, dict]:
    """(training dataset, label tables for ``PretrainFeed(target_sets=)`` or None, summary) of
    ``data.spec`` + ``data.labels`` + ``data.unlabelled``. With neither set: the plain dataset and
    None, so the run is exactly the fully labelled one."""
    from opera.data import build_dataset, dataset_target_sets

    dataset = build_dataset(data_cfg.spec, "train")
    keep = resolve_labelled(dataset, data_cfg.labels, data_cfg.spec, seed, run_dir, main, barrier)
    unlabelled = str(data_cfg.unlabelled or "").strip()
    if keep is None and not unlabelled:
        return dataset, None, {}
    sets = dataset_target_sets(dataset)
    if keep is not None:
        sets = mask_targets(sets, keep)
    summary = {"labelled_images": len(keep) if keep is not None else len(dataset), "labelled_set_images": len(dataset)}
    if unlabelled:
        extra = build_unlabelled(unlabelled, data_cfg.spec)
        dataset = WithUnlabelled(dataset, extra)
        sets = {k: v + [NO_LABEL] * len(extra) for k, v in sets.items()}
        summary["unlabelled_images"] = len(extra)
    return dataset, sets, summary


# ----------------------------------------------------------------------------- resuming on the same data
def _relative_names(dataset) -> list[str]:
    """The names of every image of ``dataset`` in order, as :func:`item_name` gives them (paths
    relative to their data folder; ``digits[123]`` for data in memory), through the wrappers a
    run builds (:class:`WithUnlabelled`, ``Subset``)."""
    return list(_iter_relative_names(dataset))


def _iter_relative_names(dataset) -> Iterator[str]:
    """:func:`_relative_names` one at a time (no list of N names)."""
    if isinstance(dataset, WithUnlabelled):
        yield from _iter_relative_names(dataset.labelled)
        yield from _iter_relative_names(dataset.unlabelled)
        return
    if isinstance(dataset, torch.utils.data.Subset):
        names = _relative_names(dataset.dataset)
        yield from (names[int(i)] for i in dataset.indices)
        return
    from opera.data.datasets import _unwrap

    base = _unwrap(dataset)
    root = getattr(base, "root", None) if isinstance(base, UnlabelledImages) else getattr(getattr(base, "spec", None), "root", None)
    prefix = os.path.join(root, "") if root else None
    items = base.describe_items() if hasattr(base, "describe_items") else map(base.describe_item, range(len(dataset)))
    for i, name in enumerate(items):
        if prefix is not None:
            name = name[len(prefix):] if name.startswith(prefix) else item_name(dataset, i)
        yield name.replace(os.sep, "/")


def data_identity(dataset) -> dict[str, object]:
    """What a resumed run must find again in its training data: how many images there are and a
    digest of their names in order. The sampler's order, the labelled subset and the steps per
    epoch all follow from them, so a folder that gained or lost images since the run began would
    silently train on other data from the resumed step on."""
    import hashlib

    h, count = hashlib.sha256(), 0
    for name in _iter_relative_names(dataset):  # the digest of the names joined by newlines, streamed
        h.update(("\n" if count else "").encode() + name.encode("utf-8", "surrogateescape"))
        count += 1
    unlabelled = len(dataset.unlabelled) if isinstance(dataset, WithUnlabelled) else 0
    return {"images": count, "unlabelled": unlabelled, "digest": h.hexdigest()[:16]}


def check_same_data(saved: dict | None, now: dict, path: Path | str, what: str = "--data / --unlabelled") -> None:
    """Refuse (one line) to resume ``path`` on training data other than the data it was saved on.
    Checkpoints written before the data was recorded (``saved`` None) are not checked."""
    if not saved or saved == now:
        return
    if saved.get("images") != now.get("images") or saved.get("unlabelled") != now.get("unlabelled"):
        change = (f"it was trained on {saved.get('images')} images ({saved.get('unlabelled')} unlabelled), this run "
                  f"finds {now.get('images')} ({now.get('unlabelled')} unlabelled)")
    else:
        change = f"it was trained on {saved.get('images')} images and this run finds as many, but other files or in another order"
    raise OperaError(f"{path}: the training data changed since the run began: {change}; restore {what} as they were "
                     "to resume, or choose a new --output to train on the new data")


# ----------------------------------------------------------------------------- evaluations
def _header_field(path: Path, field: str) -> str | None:
    first = next((line for line in path.read_text().splitlines() if line.startswith(_HEADER)), "")
    for part in first[len(_HEADER):].split(" | "):
        if part.strip().startswith(field + " "):
            return part.strip()[len(field) + 1:]
    return None


class LabelledSubset(torch.utils.data.Subset):
    """The labelled images of a dataset (``num_classes``, ``class_names`` and ``targets`` kept)."""

    def __init__(self, dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.num_classes, self.class_names = dataset.num_classes, getattr(dataset, "class_names", None)
        self.targets = [dataset.targets[i] for i in indices]


def labelled_subset(dataset, spec: str | None, data: str, seed: int, checkpoint: str | None = None):
    """The semi-supervised protocol's training set (SimCLR / BYOL: fine-tune on the 1% / 10%):
    ``dataset`` itself for ``all``; else the images listed in the checkpoint's run directory's
    ``labelled.txt`` when it was written for the same ``spec`` and data (or ``spec == "run"``),
    else a fresh class-balanced selection seeded by ``seed``."""
    if is_all(spec):
        return dataset
    ck = Path(checkpoint) if checkpoint and not str(checkpoint).startswith(("random:", "timm:")) else None
    written = (ck if ck.is_dir() else ck.parent) / LABELLED_FILE if ck is not None else None
    have = written is not None and written.is_file()
    if str(spec).strip() == "run":
        if not have:
            raise OperaError(f"--labels run needs {LABELLED_FILE} in the checkpoint's run directory, and "
                             f"{checkpoint} has none; give --labels 10% (or 13/class, or a FILE)")
        spec = str(written)
    elif have and read_labels_file(written)[1] == str(spec).strip() and _header_field(written, "data") == data:
        print(f"labels: the pretraining run's {written.name} ({spec} of {data})", flush=True)
        spec = str(written)
    idx = select_labelled(dataset, str(spec), seed)
    return LabelledSubset(dataset, idx)
