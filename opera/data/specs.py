"""Data specs: one string names a dataset, where it lives and which classes to use.

Grammar (``parse_data_spec``)::

    digits                  scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)
    digits:0-4              ... only classes 0..4 (also ``digits:0,2,7`` or ``digits:0-2,7``)
    /data/imagenet          an ImageNet-style folder (``train/`` and ``val/`` of class folders)
                            or a flat folder of class folders (a fixed held-out split is made)
    /data/in100@0-49        ... only classes 0..49 of the sorted class-folder list
    cifar10=/root           a torchvision dataset already on disk (never downloaded); also
                            cifar100, stl10, flowers102, pets; optionally ``cifar10=/root@0-4``

Parsing is purely syntactic plus range checks where the class count is known up front; the files
are checked when the dataset is built (``opera.data.build_dataset``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from opera.errors import OperaError, suggest

#: Built-in datasets (no root) and their class counts.
BUILTIN_DATASETS: dict[str, int] = {"digits": 10}

#: torchvision datasets read from a local root (``NAME=/root``) and their class counts.
TORCHVISION_DATASETS: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "stl10": 10,
    "flowers102": 102,
    "pets": 37,
}

FOLDER = "folder"

_SELECTION_RE = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")
_SELECTION_CHARS = set("0123456789,- ")
_USAGE = (
    "use digits[:0-4], a folder path (optionally PATH@0-49), or NAME=/root[@0-4] with NAME in "
    + ", ".join(TORCHVISION_DATASETS)
)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    ``name`` is ``"digits"``, ``"folder"`` or a torchvision name (``"cifar10"``, ...); ``root`` is
    the absolute folder (``None`` for digits); ``classes`` are the selected original class indices,
    sorted, or ``None`` for all; ``raw`` is the string the user wrote.
    """

    name: str
    root: str | None
    classes: tuple[int, ...] | None
    raw: str

    def __str__(self) -> str:
        return self.raw

    @property
    def known_num_classes(self) -> int | None:
        """Class count of the full dataset when known without reading files (else ``None``)."""
        return BUILTIN_DATASETS.get(self.name) or TORCHVISION_DATASETS.get(self.name)


def format_classes(classes: tuple[int, ...]) -> str:
    """``(0, 1, 2, 7)`` -> ``"0-2,7"``."""
    parts: list[str] = []
    start = prev = None
    for c in classes:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = c
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def parse_class_selection(text: str, spec: str) -> tuple[int, ...]:
    """Parse ``"0-4"``, ``"0,2,7"`` or ``"0-2,7"`` into a sorted tuple of class indices."""
    hint = "write e.g. 0-4, 0,2,7 or 0-2,7 (class indices, ranges inclusive)"
    if not text.strip():
        raise OperaError(f"empty class selection in data spec {spec!r}; {hint}")
    if not _SELECTION_RE.match(text):
        raise OperaError(f"bad class selection {text!r} in data spec {spec!r}; {hint}")
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo_s, hi_s = part.split("-")
            lo, hi = int(lo_s), int(hi_s)
            if lo > hi:
                raise OperaError(
                    f"bad class range {part.strip()!r} in data spec {spec!r} (start > end); "
                    f"write it as {hi}-{lo}"
                )
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise OperaError(
            f"class {dup[0]} is selected twice in data spec {spec!r}; list each class once"
        )
    return tuple(sorted(out))


def check_classes_in_range(
    classes: tuple[int, ...] | None, num_classes: int, spec: str, what: str
) -> None:
    """Raise if a selected class index is not in ``0..num_classes-1``."""
    if classes is None:
        return
    bad = tuple(c for c in classes if c >= num_classes)
    if bad:
        raise OperaError(
            f"classes {format_classes(bad)} are outside {what}'s {num_classes} classes "
            f"(0-{num_classes - 1}) in data spec {spec!r}; select classes within 0-{num_classes - 1}"
        )


def _split_selection(body: str, spec: str) -> tuple[str, tuple[int, ...] | None]:
    """Split ``PATH@SEL`` into ``(PATH, classes)``; a path may itself contain ``@``."""
    if "@" not in body:
        return body, None
    base, sel = body.rsplit("@", 1)
    if sel and set(sel) <= _SELECTION_CHARS:
        return base, parse_class_selection(sel, spec)
    if not sel:
        raise OperaError(
            f"empty class selection after '@' in data spec {spec!r}; write e.g. {base}@0-4 "
            f"or drop the '@'"
        )
    # ``@`` followed by something that is not a selection: a path containing '@', unless the
    # part before it is the real folder (then the selection is just malformed).
    if not os.path.exists(os.path.expanduser(body)) and os.path.exists(os.path.expanduser(base)):
        parse_class_selection(sel, spec)  # raises with the grammar hint
    return body, None


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or "/" in text
        or text.startswith((".", "~"))
        or os.path.exists(os.path.expanduser(text))
    )


def parse_data_spec(spec: str) -> DataSpec:
    """Parse a data spec string (see the module docstring for the grammar)."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise OperaError(f"empty data spec; {_USAGE}")
    raw = spec
    s = spec.strip()

    # digits, digits:SEL, digits@SEL
    m = re.match(r"^([A-Za-z0-9_\-]+)(?:[:@](.*))?$", s)
    if m and m.group(1).lower() in BUILTIN_DATASETS and not os.path.exists(s):
        name = m.group(1).lower()
        classes = None
        if m.group(2) is not None:
            classes = parse_class_selection(m.group(2), raw)
        check_classes_in_range(classes, BUILTIN_DATASETS[name], raw, name)
        return DataSpec(name=name, root=None, classes=classes, raw=raw)

    # NAME=/root[@SEL]
    if "=" in s and "/" not in s.split("=", 1)[0] and os.sep not in s.split("=", 1)[0]:
        name, body = s.split("=", 1)
        key = name.strip().lower()
        if key not in TORCHVISION_DATASETS:
            choices = list(TORCHVISION_DATASETS)
            raise OperaError(
                f"unknown dataset {name.strip()!r} in data spec {raw!r}"
                f"{suggest(key, choices)}; valid NAME=/root datasets: {', '.join(choices)} "
                f"(or use digits or a folder path)"
            )
        body = body.strip()
        if not body or body.startswith("@"):
            raise OperaError(
                f"{key}= needs a local root folder in data spec {raw!r}; "
                f"write {key}=/path/to/root (nothing is downloaded)"
            )
        root, classes = _split_selection(body, raw)
        check_classes_in_range(classes, TORCHVISION_DATASETS[key], raw, key)
        return DataSpec(
            name=key, root=os.path.abspath(os.path.expanduser(root)), classes=classes, raw=raw
        )

    # A bare known torchvision name without a root.
    bare = s.split("@", 1)[0].split(":", 1)[0].lower()
    if bare in TORCHVISION_DATASETS and not os.path.exists(s):
        raise OperaError(
            f"{bare} needs a local root in data spec {raw!r}; write {bare}=/path/to/root "
            f"(nothing is downloaded)"
        )

    # A folder path, optionally PATH@SEL.
    if _looks_like_path(s.split("@", 1)[0]) or _looks_like_path(s):
        root, classes = _split_selection(s, raw)
        return DataSpec(
            name=FOLDER, root=os.path.abspath(os.path.expanduser(root)), classes=classes, raw=raw
        )

    names = list(BUILTIN_DATASETS) + list(TORCHVISION_DATASETS)
    raise OperaError(
        f"unknown dataset {s!r}{suggest(bare, names)} (not a known name, and no such folder); "
        f"{_USAGE}"
    )
