"""Datasets: every dataset yields ``(image, label)`` with ``image`` a uint8 ``3xHxW`` tensor.

``build_dataset(spec, split, transform)`` turns a data spec (see :mod:`opera.data.specs`) into an
:class:`OperaDataset`. Labels are remapped to ``0..K-1`` over the selected classes. ``val`` is
always a fixed held-out split that never depends on the run seed:

* digits: a stratified 20% of every class, drawn with a fixed seed;
* an ImageNet-style folder: its ``val/`` folder; a flat folder of class folders: a stratified 20%
  of every class chosen by a stable hash of the file name (adding files never moves others);
* torchvision datasets: their official test split (flowers102: train = train+val, val = test;
  pets: train = trainval, val = test).

Files are checked eagerly (paths, class folders, that there are images) and decoded lazily;
:func:`verify_images` decodes everything up front.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from opera.data.specs import (
    FOLDER,
    DataSpec,
    check_classes_in_range,
    format_classes,
    parse_data_spec,
)
from opera.data.strings import StringArray
from opera.errors import OperaError

SPLITS = ("train", "val")
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"

#: Extensions decoded by torchvision.io (the fast path).
TV_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: Extensions decoded through PIL.
PIL_IMAGE_EXTS = (".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGE_EXTS = TV_IMAGE_EXTS + PIL_IMAGE_EXTS

#: Fraction of every class held out as ``val`` (digits and flat folders).
VAL_FRACTION = 0.2
#: Seed of the digits held-out split: fixed, independent of any run seed.
DIGITS_SPLIT_SEED = 20240101


# --------------------------------------------------------------------------------------------
# decoding


def _to_rgb_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.ndim == 4:  # animated GIF: first frame
        img = img[0]
    if img.dtype != torch.uint8:  # e.g. 16-bit PNG
        from torchvision.transforms.v2 import functional as F

        img = F.to_dtype(img, torch.uint8, scale=True)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] == 4:
        img = img[:3]
    # No .contiguous(): decoders return a channels-last view, which the uint8 resize of
    # RandomResizedCrop processes about 2x faster than planar memory.
    return img


def _decode_pil(data: bytes) -> torch.Tensor:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        arr = np.asarray(im).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_image_file(path: str) -> torch.Tensor:
    """Decode ``path`` into a uint8 ``3xHxW`` tensor; raise :class:`OperaError` naming the file."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OperaError(
            f"cannot read image {path}: {e.strerror or e}; check the file exists and is readable"
        ) from None
    if not data:
        raise OperaError(f"cannot decode image {path}: the file is empty; remove or replace it")
    first_err: Exception | None = None
    if path.lower().endswith(TV_IMAGE_EXTS):
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            # torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a
            # dependency); they still work, so keep that warning from repeating per image.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
                img = decode_image(buf, mode=ImageReadMode.RGB)
            return _to_rgb_uint8(img)
        except Exception as e:  # noqa: BLE001 - fall back to PIL (e.g. odd JPEG variants)
            first_err = e
    try:
        return _to_rgb_uint8(_decode_pil(data))
    except Exception as e:  # noqa: BLE001
        raise OperaError(f"cannot decode image {path}: {_decode_reason(first_err or e)}; remove or replace it") from None


def _decode_reason(err: Exception) -> str:
    """A decoder's error in a few words: without torchvision's source location
    (``decode_jpeg, /.../decode_jpeg.cpp:171, ``) or its advice to call other functions."""
    text = str(err).strip()
    msg = text.splitlines()[0] if text else type(err).__name__
    msg = re.sub(r"^\w+, \S+:\d+, ", "", msg)
    if msg.startswith("Unsupported image file"):
        return "not a JPEG, PNG, WebP or GIF image, nor another format PIL reads"
    return msg.rstrip(".")


# --------------------------------------------------------------------------------------------
# base class


class OperaDataset(Dataset):
    """A labelled image dataset yielding ``(image, label)``.

    ``image`` is a uint8 ``3xHxW`` tensor before ``transform`` (and whatever ``transform`` returns
    after). Attributes: ``spec`` (:class:`DataSpec`), ``split``, ``num_classes``, ``class_names``
    (``list[str]``), ``targets`` (``list[int]`` in ``0..num_classes-1``), ``transform``.

    Named label sets (what the task spaces ask for): ``label_sets()`` -> ``{name: number of
    classes}`` and ``target_sets()`` -> ``{name: per-image labels}``. Every dataset has
    ``"class"`` (= ``targets``); a dataset with a coarser grouping of its classes adds
    ``"coarse"`` (``coarse_of``: class index -> coarse index, ``coarse_names``).
    """

    coarse_of: list[int] | None = None
    coarse_names: list[str] | None = None

    def set_coarse(self, coarse_of_name: dict[str, str]) -> None:
        """Group the classes: ``{class name: coarse name}`` for every class of the dataset."""
        missing = [c for c in self.class_names if c not in coarse_of_name]
        if missing:
            raise OperaError(f"the coarse grouping of {self.spec.raw!r} lacks class {missing[0]!r} ({len(missing)} such); "
                             "map every class to a coarse class")
        names = sorted({coarse_of_name[c] for c in self.class_names})
        self.coarse_names = names
        self.coarse_of = [names.index(coarse_of_name[c]) for c in self.class_names]

    def label_sets(self) -> dict[str, int]:
        sets = {"class": self.num_classes}
        if self.coarse_of is not None:
            sets["coarse"] = len(self.coarse_names or [])
        return sets

    def target_sets(self) -> dict[str, list[int]]:
        sets = {"class": list(self.targets)}
        if self.coarse_of is not None:
            sets["coarse"] = [self.coarse_of[t] for t in self.targets]
        return sets

    def __init__(
        self,
        spec: DataSpec,
        split: str,
        class_names: Sequence[str],
        targets: Sequence[int],
        transform: Callable | None = None,
    ):
        self.spec = spec
        self.split = split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> torch.Tensor:
        """The raw uint8 ``3xHxW`` image at ``index`` (no transform)."""
        raise NotImplementedError

    def describe_item(self, index: int) -> str:
        """Where item ``index`` comes from (a file path or ``name[index]``)."""
        return f"{self.spec.name}[{index}]"

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spec={self.spec.raw!r}, split={self.split!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )


def _select_classes(
    labels: Sequence[int],
    all_names: Sequence[str],
    classes: tuple[int, ...] | None,
    spec: DataSpec,
    what: str,
) -> tuple[list[int], list[int], list[str]]:
    """Keep items of the selected classes; return (kept indices, remapped labels, class names)."""
    check_classes_in_range(classes, len(all_names), spec.raw, what)
    if classes is None:
        return list(range(len(labels))), [int(x) for x in labels], list(all_names)
    remap = {c: k for k, c in enumerate(classes)}
    keep = [i for i, y in enumerate(labels) if int(y) in remap]
    return keep, [remap[int(labels[i])] for i in keep], [all_names[c] for c in classes]


# --------------------------------------------------------------------------------------------
# digits


def _digits_split(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the fixed stratified held-out 20% (independent of any run seed)."""
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(VAL_FRACTION * len(idx)))
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


#: The coarse label set of digits: the digits grouped by the shape of the handwritten glyph.
#: ``loop`` - a closed loop (0, 6, 8, 9); ``line`` - straight strokes only (1, 4, 7);
#: ``curve`` - open curves (2, 3, 5). (3 coarse classes over all 10; over a class selection such
#: as ``digits:0-4`` only the groups present remain: loop {0}, line {1, 4}, curve {2, 3}.)
DIGITS_COARSE = {"0": "loop", "6": "loop", "8": "loop", "9": "loop", "1": "line", "4": "line", "7": "line",
                 "2": "curve", "3": "curve", "5": "curve"}


#: A folder's coarse label set: ``ROOT/coarse.txt``, one ``class_folder coarse_name`` per line.
COARSE_FILE = "coarse.txt"


def read_coarse_file(path: str) -> dict[str, str]:
    """``{class name: coarse name}`` from a mapping file: one ``class coarse`` pair per line
    (whitespace or a tab between them; ``#`` starts a comment)."""
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise OperaError(f"{path}:{n}: expected 'class_name coarse_name', got {line!r}; write one pair per line")
            if parts[0] in mapping and mapping[parts[0]] != parts[1]:
                raise OperaError(f"{path}:{n}: class {parts[0]!r} is mapped twice ({mapping[parts[0]]!r}, {parts[1]!r}); keep one")
            mapping[parts[0]] = parts[1]
    return mapping


def coarse_from_pairs(fine: Sequence[int], coarse: Sequence[int], fine_names: Sequence[str],
                      coarse_names: Sequence[str]) -> dict[str, str]:
    """``{fine name: coarse name}`` from per-image fine and coarse labels (CIFAR-100's 100 classes
    in 20 superclasses), checking that every fine class lies in one superclass."""
    mapping: dict[str, str] = {}
    for f, c in zip(fine, coarse):
        name, group = fine_names[int(f)], coarse_names[int(c)]
        if mapping.setdefault(name, group) != group:
            raise OperaError(f"class {name!r} belongs to two coarse classes ({mapping[name]!r}, {group!r}); the labels are inconsistent")
    return mapping


class DigitsDataset(OperaDataset):
    """scikit-learn's bundled 8x8 digits as uint8 ``3x8x8`` images (0..16 scaled to 0..255),
    with the label sets ``class`` (the digit) and ``coarse`` (``DIGITS_COARSE``)."""

    def __init__(self, spec: DataSpec, split: str, transform: Callable | None = None):
        from sklearn.datasets import load_digits

        d = load_digits()
        labels = d.target.astype(np.int64)
        is_val = _digits_split(labels)
        split_idx = np.flatnonzero(is_val if split == "val" else ~is_val)
        names = [str(i) for i in range(10)]
        keep, targets, class_names = _select_classes(
            labels[split_idx].tolist(), names, spec.classes, spec, "digits"
        )
        self.indices = split_idx[keep]  # indices into the original 1,797 images
        imgs = np.rint(d.images[self.indices] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.images = torch.from_numpy(imgs)[:, None].expand(-1, 3, -1, -1).contiguous()
        super().__init__(spec, split, class_names, targets, transform)
        self.set_coarse(DIGITS_COARSE)

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def describe_item(self, index: int) -> str:
        return f"digits[{int(self.indices[index])}]"


# --------------------------------------------------------------------------------------------
# folders


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _scan_images(folder: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


def _class_dirs(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _loose_images(folder: str) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.is_file() and _is_image(e.name))


def _scan_class_tree(folder: str, classes: list[str], allow_missing: bool) -> tuple[list, list]:
    paths: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        d = os.path.join(folder, c)
        if not os.path.isdir(d):
            if allow_missing:
                continue
            raise OperaError(f"class folder {d} is missing; add it")  # pragma: no cover
        files = _scan_images(d)
        if not files and not allow_missing:
            raise OperaError(
                f"class folder {d} has no images ({', '.join(IMAGE_EXTS)}); "
                f"add images or remove the folder"
            )
        paths.extend(files)
        labels.extend([k] * len(files))
    return paths, labels


def _stable_key(path: str) -> tuple[int, str]:
    name = os.path.basename(path)
    return zlib.crc32(name.encode("utf-8", "surrogateescape")), name


class FolderDataset(OperaDataset):
    """Images from class folders, decoded with ``torchvision.io`` (PIL for rarer formats).

    ``root`` is either ImageNet-style (``train/`` and ``val/``, each of class folders; the class
    list is ``train/``'s) or a flat folder of class folders (``val`` = a stratified 20% of every
    class picked by a stable hash of the file name; classes with one image stay in ``train``).
    """

    def __init__(self, spec: DataSpec, split: str, transform: Callable | None = None):
        root = spec.root
        assert root is not None
        if not os.path.exists(root):
            raise OperaError(
                f"data folder {root} does not exist; check the path in data spec {spec.raw!r}"
            )
        if not os.path.isdir(root):
            raise OperaError(
                f"data path {root} is a file, not a folder; point the data spec at a folder of "
                f"class folders (or at an ImageNet-style folder with train/ and val/)"
            )
        has_train = os.path.isdir(os.path.join(root, "train"))
        has_val = os.path.isdir(os.path.join(root, "val"))
        if has_train and has_val:
            self.layout = "train/val"
            train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
            all_classes = _class_dirs(train_dir)
            if not all_classes:
                raise OperaError(
                    f"{train_dir} has no class folders; put each class's images in "
                    f"{train_dir}/<class>/"
                )
            if split == "val":
                val_classes = _class_dirs(val_dir)
                if not val_classes and _loose_images(val_dir):
                    raise OperaError(
                        f"{val_dir} holds images directly, not class folders; sort them into "
                        f"{val_dir}/<class>/ folders named like those in {train_dir}"
                    )
                extra = sorted(set(val_classes) - set(all_classes))
                if extra:
                    raise OperaError(
                        f"{val_dir} has class folder {extra[0]!r} that {train_dir} lacks "
                        f"({len(extra)} such); make val/ use the class names of train/"
                    )
                paths, labels = _scan_class_tree(val_dir, all_classes, allow_missing=True)
                where = val_dir
            else:
                paths, labels = _scan_class_tree(train_dir, all_classes, allow_missing=False)
                where = train_dir
        else:
            if has_train and not has_val and _class_dirs(root) == ["train"]:
                raise OperaError(
                    f"{root} has train/ but no val/; add {os.path.join(root, 'val')}/<class>/ "
                    f"folders or point the data spec at {os.path.join(root, 'train')} to hold "
                    f"out a fixed split"
                )
            self.layout = "flat"
            all_classes = _class_dirs(root)
            if not all_classes:
                hint = (
                    f" ({_loose_images(root)} loose images found: move them into class folders)"
                    if _loose_images(root)
                    else ""
                )
                raise OperaError(
                    f"no class folders in {root}{hint}; expected {root}/<class>/*.jpg or "
                    f"{root}/train/<class>/ and {root}/val/<class>/"
                )
            paths_all, labels_all = _scan_class_tree(root, all_classes, allow_missing=False)
            is_val = self._flat_split(paths_all, labels_all)
            want_val = split == "val"
            paths = [p for p, v in zip(paths_all, is_val) if v == want_val]
            labels = [y for y, v in zip(labels_all, is_val) if v == want_val]
            where = root
        if not paths:
            raise OperaError(
                f"no images found for split {split!r} in {where}; expected image files "
                f"({', '.join(IMAGE_EXTS)}) inside class folders"
            )
        keep, targets, class_names = _select_classes(
            labels, all_classes, spec.classes, spec, f"folder {root}"
        )
        if not keep:
            raise OperaError(
                f"no {split} images in classes {format_classes(spec.classes or ())} of {root}; "
                f"select other classes"
            )
        self.samples = StringArray(paths[i] for i in keep)  # shared by the workers, not copied into each
        super().__init__(spec, split, class_names, targets, transform)
        coarse_file = os.path.join(root, COARSE_FILE)
        if os.path.isfile(coarse_file):  # a 'coarse' label set: ROOT/coarse.txt maps class folders to superclasses
            self.set_coarse(read_coarse_file(coarse_file))

    @staticmethod
    def _flat_split(paths: list[str], labels: list[int]) -> list[bool]:
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        is_val = [False] * len(paths)
        for idx in by_class.values():
            n_val = int(round(VAL_FRACTION * len(idx))) if len(idx) >= 2 else 0
            n_val = max(n_val, 1) if len(idx) >= 2 else 0
            for i in sorted(idx, key=lambda i: _stable_key(paths[i]))[:n_val]:
                is_val[i] = True
        return is_val

    def load_image(self, index: int) -> torch.Tensor:
        return decode_image_file(self.samples[index])

    def describe_item(self, index: int) -> str:
        return self.samples[index]

    def describe_items(self):
        """``describe_item`` of every image, in order (at once, not one index at a time)."""
        return iter(self.samples)


# --------------------------------------------------------------------------------------------
# torchvision datasets on a local root (never downloaded)

_TV_INFO = {
    # name: (torchvision class, expected layout, where to get it)
    "cifar10": (
        "CIFAR10",
        "{root}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
        "extract cifar-10-python.tar.gz into {root}",
    ),
    "cifar100": (
        "CIFAR100",
        "{root}/cifar-100-python/ (train, test, meta)",
        "extract cifar-100-python.tar.gz into {root}",
    ),
    "stl10": (
        "STL10",
        "{root}/stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
        "class_names.txt)",
        "extract stl10_binary.tar.gz into {root}",
    ),
    "flowers102": (
        "Flowers102",
        "{root}/flowers-102/ (jpg/, imagelabels.mat, setid.mat; needs scipy)",
        "extract 102flowers.tgz into {root}/flowers-102/ next to the two .mat files",
    ),
    "pets": (
        "OxfordIIITPet",
        "{root}/oxford-iiit-pet/ (images/, annotations/ with trainval.txt and test.txt)",
        "extract images.tar.gz and annotations.tar.gz into {root}/oxford-iiit-pet/",
    ),
}


def _tv_split_kwargs(name: str, split: str) -> list[dict]:
    """torchvision constructor kwargs for our split (a list: concatenated in order)."""
    if name in ("cifar10", "cifar100"):
        return [{"train": split == "train"}]
    if name == "stl10":
        return [{"split": "train" if split == "train" else "test"}]
    if name == "flowers102":
        return [{"split": "train"}, {"split": "val"}] if split == "train" else [{"split": "test"}]
    if name == "pets":
        return [{"split": "trainval" if split == "train" else "test"}]
    raise AssertionError(name)  # pragma: no cover


class TorchvisionDataset(OperaDataset):
    """A torchvision dataset read from a local root with ``download=False``.

    Array-backed datasets (CIFAR, STL-10) are served from their in-memory arrays, file-backed
    ones (Flowers-102, Pets) are decoded with ``torchvision.io`` like folders.
    """

    def __init__(self, spec: DataSpec, split: str, transform: Callable | None = None):
        import torchvision.datasets as tvd

        name, root = spec.name, spec.root
        assert root is not None
        cls_name, layout, fix = _TV_INFO[name]
        missing = OperaError(
            f"{name} not found under {root}: torchvision expects {layout.format(root=root)}; "
            f"{fix.format(root=root)} (opera never downloads data)"
        )
        if not os.path.isdir(root):
            raise missing
        parts = []
        for kw in _tv_split_kwargs(name, split):
            try:
                parts.append(getattr(tvd, cls_name)(root, download=False, **kw))
            except ImportError as e:  # flowers102 reads .mat files with scipy
                raise OperaError(
                    f"{name} needs the Python package {e.name or 'scipy'}; pip install {e.name or 'scipy'}"
                ) from e
            except (RuntimeError, FileNotFoundError, OSError) as e:
                raise missing from e
        arrays: list[torch.Tensor] = []
        paths: list[str] = []
        labels: list[int] = []
        for ds in parts:
            labels.extend(self._labels_of(ds))
            data = getattr(ds, "data", None)
            files = getattr(ds, "_image_files", None) or getattr(ds, "_images", None)
            if isinstance(data, np.ndarray) and data.ndim == 4:
                t = torch.from_numpy(data)
                arrays.append(t.permute(0, 3, 1, 2) if t.shape[-1] == 3 else t)  # CIFAR is NHWC
            elif files is not None:
                paths.extend(str(p) for p in files)
            else:  # pragma: no cover - torchvision changed its internals
                raise AssertionError(f"unsupported torchvision dataset layout for {name}")
        self._paths = StringArray(paths)
        self._array = (torch.cat(arrays) if len(arrays) > 1 else arrays[0]) if arrays else None
        all_names = self._class_names_of(parts[0], name)
        keep, targets, class_names = _select_classes(labels, all_names, spec.classes, spec, name)
        self._keep = np.asarray(keep, dtype=np.int64)
        super().__init__(spec, split, class_names, targets, transform)
        if name == "cifar100":  # its 20 superclasses: the 'coarse' label set
            self.set_coarse(self._cifar100_coarse(root, all_names))

    @staticmethod
    def _cifar100_coarse(root: str, fine_names: list[str]) -> dict[str, str]:
        """CIFAR-100's class -> superclass map from its own files (``coarse_labels``; the format
        is Python pickles, read as torchvision reads them)."""
        import pickle

        folder = os.path.join(root, "cifar-100-python")
        with open(os.path.join(folder, "train"), "rb") as f:
            train = pickle.load(f, encoding="latin1")
        with open(os.path.join(folder, "meta"), "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        return coarse_from_pairs(train["fine_labels"], train["coarse_labels"], fine_names, meta["coarse_label_names"])

    @staticmethod
    def _labels_of(ds) -> list[int]:
        for attr in ("targets", "labels", "_labels"):
            v = getattr(ds, attr, None)
            if v is not None:
                return [int(y) for y in np.asarray(v).reshape(-1).tolist()]
        raise AssertionError(f"no labels on {type(ds).__name__}")  # pragma: no cover

    @staticmethod
    def _class_names_of(ds, name: str) -> list[str]:
        n = {"cifar10": 10, "cifar100": 100, "stl10": 10, "flowers102": 102, "pets": 37}[name]
        names = list(getattr(ds, "classes", None) or [])
        return [str(c) for c in names] if len(names) == n else [f"{name}_{i}" for i in range(n)]

    def load_image(self, index: int) -> torch.Tensor:
        i = self._keep[index]
        if self._array is not None:
            return self._array[i].contiguous()
        return decode_image_file(self._paths[i])

    def describe_item(self, index: int) -> str:
        i = self._keep[index]
        return f"{self.spec.name}[{i}]" if self._array is not None else self._paths[i]


# --------------------------------------------------------------------------------------------
# public entry points


def build_dataset(
    spec: str | DataSpec, split: str, transform: Callable | None = None
) -> OperaDataset:
    """Build the ``split`` (``"train"`` or ``"val"``) of the dataset named by ``spec``."""
    spec = parse_data_spec(spec)
    if split not in SPLITS:
        raise OperaError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if spec.name == "digits":
        return DigitsDataset(spec, split, transform)
    if spec.name == FOLDER:
        return FolderDataset(spec, split, transform)
    return TorchvisionDataset(spec, split, transform)


def dataset_label_sets(dataset) -> dict[str, int]:
    """``{name: classes}`` of a dataset (or of the dataset a wrapper such as SeededDataset holds)."""
    base = _unwrap(dataset)
    return base.label_sets() if hasattr(base, "label_sets") else {"class": int(base.num_classes)}


def dataset_target_sets(dataset) -> dict[str, list[int]]:
    base = _unwrap(dataset)
    return base.target_sets() if hasattr(base, "target_sets") else {"class": [int(t) for t in base.targets]}


def _unwrap(dataset):
    while not isinstance(dataset, OperaDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def verify_images(dataset, progress: Callable[[int, int], None] | None = None) -> int:
    """Decode every image of ``dataset`` (no transform); return how many were checked.

    Raises :class:`OperaError` naming the first unreadable file (and how many there are).
    ``dataset`` may be wrapped (e.g. in :class:`opera.data.loader.SeededDataset`).
    """
    ds = _unwrap(dataset)
    if not isinstance(ds, OperaDataset):
        raise TypeError(f"verify_images needs an OperaDataset, got {type(dataset).__name__}")
    bad: list[OperaError] = []
    n = len(ds)
    for i in range(n):
        try:
            img = ds.load_image(i)
            if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
                raise OperaError(
                    f"cannot decode image {ds.describe_item(i)}: got shape "
                    f"{tuple(img.shape)} {img.dtype}; remove or replace it"
                )
        except OperaError as e:
            bad.append(e)
        if progress is not None:
            progress(i + 1, n)
    if bad:
        more = f" ({len(bad)} unreadable images in total; first shown)" if len(bad) > 1 else ""
        raise OperaError(f"{bad[0]}{more}")
    return n
