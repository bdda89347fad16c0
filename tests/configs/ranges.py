"""Values just outside a config field's stated range, for the generic range tests of every config."""

from __future__ import annotations

import dataclasses


def outside(f: dataclasses.Field, tp) -> list:
    """Values just outside ``f``'s range (or not among its choices)."""
    meta = f.metadata
    if "choices" in meta:
        return ["no-such-word"]
    integer = tp is int or "int" in str(tp)
    bad = []
    if "min" in meta:
        lo = meta["min"]
        bad.append(lo if meta["min_exclusive"] else (lo - 1 if integer else lo - 0.5))
    if "max" in meta:
        hi = meta["max"]
        bad.append(hi if meta["max_exclusive"] else (hi + 1 if integer else hi + 0.5))
    return bad
