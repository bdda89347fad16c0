"""One registry per kind of component (task spaces, backbones), in the spirit of timm's registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from opera.errors import OperaError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map whose lookup errors name the valid choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` (for a component registered only for a while, e.g. in a test)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise OperaError(
                f"unknown {self.kind} {name!r}{suggest(name, self._items)}; "
                f"valid: {', '.join(self._items)}"
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)
