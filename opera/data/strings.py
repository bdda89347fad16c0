"""Many strings in two numpy arrays, shared by DataLoader workers.

A dataset that holds its 1.28M image paths as a Python ``list`` of ``str`` ends up copied into
every DataLoader worker: each access writes the reference count of the string it reads, so the
forked worker's copy-on-write pages are all copied in one epoch (PyTorch's DataLoader docs, "memory
leak" with Python lists). :class:`StringArray` keeps the strings as one ``uint8`` buffer of their
UTF-8 bytes and one ``int64`` array of offsets: two objects, whose pages a worker only reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

_CODEC = ("utf-8", "surrogateescape")  # any file name the OS gives round-trips
_CHUNK = 4096  # strings decoded per slice when iterating


class StringArray(Sequence[str]):
    """An immutable sequence of ``str`` stored as UTF-8 bytes plus offsets (``str`` out on indexing)."""

    def __init__(self, strings: Iterable[str] = ()):
        encoded = [s.encode(*_CODEC) for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for {n} strings")
        a, b = self.offsets[i:i + 2]
        return self.data[a:b].tobytes().decode(*_CODEC)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):  # a chunk's bytes at a time: fast, and no copy of them all
            bounds = self.offsets[start:start + _CHUNK + 1].tolist()
            raw = self.data[bounds[0]:bounds[-1]].tobytes()
            for a, b in zip(bounds[:-1], bounds[1:]):
                yield raw[a - bounds[0]:b - bounds[0]].decode(*_CODEC)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Sequence[str]) -> list[str]:
        return list(self) + list(other)

    def __radd__(self, other: Sequence[str]) -> list[str]:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings, {self.data.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


__all__ = ["StringArray"]
