"""One config mechanism for every protocol: recipes, ``key=value`` overrides, validation.

A config is a dataclass. Its *leaves* are its fields; a field whose value is itself a config is
a *section* (``PretrainConfig.train``), addressed with a dot (``train.epochs``); a config may name
further sections with a ``config_sections()`` method (the pretraining config's task spaces:
``self.dim``). The flat evaluation configs (``LinearConfig``, ...) have no sections: their keys
are their field names (``epochs``).

* :func:`load_recipe` - defaults <- a YAML recipe (``base:`` inheritance, :func:`load_yaml`)
  <- keyword values <- ``key=value`` overrides, validated;
* :func:`apply_overrides` - ``key=value`` items (``--set``) on any config, then :func:`validate`;
* :func:`validate` - every leaf's type and the range or choices its field metadata states
  (:func:`opera.fields.option`), then the config's own ``config_check()`` (cross-field rules).

Every problem is one :class:`~opera.errors.OperaError` line naming the key, the value, what is
valid and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from opera.errors import OperaError, suggest
from opera.fields import check_value

T = TypeVar("T")

#: top-level keys of a recipe that are not config values: prose, and what a run derived (config.yaml)
IGNORED_KEYS = ("description", "resolved")

#: keys that were renamed: ``{old: new}``. Given in a recipe or ``--set``, an old key is refused in
#: one line naming the new one; in a configuration a run stored (a checkpoint's, a study's) it is
#: read as the new key (:func:`rename_keys`).
RENAMED: dict[str, str] = {
    "data.unlabeled": "data.unlabelled",
    "data.labeled_per_batch": "data.labelled_per_batch",
}


# ----------------------------------------------------------------------------- structure
def sections(cfg: Any) -> dict[str, Any]:
    """``{name: sub-config}`` of ``cfg``: its ``config_sections()`` if it has one, else its fields
    holding dataclass instances."""
    hook = getattr(cfg, "config_sections", None)
    if callable(hook):
        return dict(hook())
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name)) and not isinstance(getattr(cfg, f.name), type)}


def leaf_fields(cfg: Any) -> dict[str, dataclasses.Field]:
    """The fields of ``cfg`` that hold values (not sections, nor a field marked ``sections``)."""
    secs = sections(cfg)
    return {f.name: f for f in dataclasses.fields(cfg) if f.name not in secs and not f.metadata.get("sections")}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg``: ``hierarchy``, ``train.epochs``, ``self.dim`` ..."""
    keys = [prefix + name for name in leaf_fields(cfg)]
    for name, sub in sections(cfg).items():
        keys += valid_keys(sub, f"{prefix}{name}.")
    return keys


# ----------------------------------------------------------------------------- values
def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (YAML and ``--set`` give ints for floats, lists for tuples), or a
    one-line error naming ``key`` and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except OperaError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise OperaError(f"config key {key} expects a list of values like [1, 2], got {value!r}")
            return tuple(coerce(v, args[0], key) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise OperaError(f"config key {key} expects a list of {len(args)} values like [0.9, 0.999], got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OperaError(f"config key {key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OperaError(f"config key {key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise OperaError(f"config key {key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise OperaError(f"config key {key} expects a string, got {value!r}")
    return value


def _word(value: Any, f: dataclasses.Field) -> Any:
    """YAML reads a bare ``off`` as false; for a field whose choices hold ``off`` it means "off"."""
    if value is False and "off" in f.metadata.get("choices", ()):
        return "off"
    return value


def split_override(item: str, flag: str = "--set") -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")`` (the raw text), or a one-line error."""
    if not isinstance(item, str) or "=" not in item:
        raise OperaError(f"{flag} {item!r} is not key=value; write e.g. {flag} train.epochs=5")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise OperaError(f"{flag} {item!r} has no key; write e.g. {flag} train.epochs=5")
    return key.strip(), raw


def parse_value(raw: str) -> Any:
    """The text of a ``key=value`` read as YAML (``none``/``null``/empty -> None)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return value


def parse_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value read as YAML (``none`` -> None)."""
    key, raw = split_override(item, flag)
    return key, parse_value(raw)


# ----------------------------------------------------------------------------- keys
def rename_keys(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested config ``tree`` (a stored ``config_to_dict``) with the old keys of
    :data:`RENAMED` under their new names (a new key already there wins)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for old, new in RENAMED.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        if isinstance(out.get(osec), dict) and oname in out[osec]:
            value = out[osec].pop(oname)
            out.setdefault(nsec, {}).setdefault(nname, value)
    return out


def rename_override(item: str) -> str:
    """A stored ``key=value`` item with an old key of :data:`RENAMED` under its new name."""
    key, sep, raw = str(item).partition("=")
    return f"{RENAMED[key.strip()]}{sep}{raw}" if sep and key.strip() in RENAMED else item


def _renamed(cfg: Any, key: str) -> OperaError | None:
    new = RENAMED.get(key)
    if new is None or new not in valid_keys(cfg):
        return None
    section, name = new.rsplit(".", 1)
    return OperaError(f"{key} was renamed {new}; write --set {new}=... (in a recipe: {name}: under {section}:)")


def _unknown(cfg: Any, key: str, command: str | None, scope: Any = None, prefix: str = "") -> OperaError:
    keys = valid_keys(cfg)
    if command is not None:
        return OperaError(f"unknown option {key!r} of 'opera {command}'{suggest(key, keys)}; valid: {', '.join(keys)}")
    if scope is not None and prefix:
        inner = [prefix + k for k in valid_keys(scope)]
        return OperaError(f"unknown config key {key!r}{suggest(key, keys)}; valid keys in {prefix[:-1]}: {', '.join(inner)}")
    return OperaError(f"unknown config key {key!r}{suggest(key, keys)}; valid keys: {', '.join(keys)}")


def resolve_key(cfg: Any, key: str, command: str | None = None) -> tuple[Any, dataclasses.Field]:
    """The config object holding dotted ``key`` and the field it names, or a one-line error
    naming the valid keys (with a suggestion), or the new name of a renamed key."""
    renamed = _renamed(cfg, key)
    if renamed is not None:
        raise renamed
    parts = key.split(".")
    obj, prefix = cfg, ""
    for part in parts[:-1]:
        secs = sections(obj)
        if part not in secs:
            if command is None and secs and obj is cfg:
                names = list(leaf_fields(cfg)) + list(secs)
                if part in leaf_fields(cfg):
                    raise OperaError(f"config key {key!r} has too many dots; keys look like section.name, e.g. train.epochs")
                raise OperaError(f"unknown config section {part!r}{suggest(part, list(secs))}; valid: {', '.join(names)}")
            raise _unknown(cfg, key, command, obj if obj is not cfg else None, prefix)
        obj, prefix = secs[part], f"{prefix}{part}."
    leaves = leaf_fields(obj)
    if parts[-1] not in leaves:
        if parts[-1] in sections(obj):
            raise OperaError(f"config key {key!r} names a section; set one of its keys, e.g. "
                             f"{key}.{next(iter(valid_keys(sections(obj)[parts[-1]])), 'name')}=...")
        raise _unknown(cfg, key, command, obj if obj is not cfg else None, prefix)
    return obj, leaves[parts[-1]]


def set_value(cfg: Any, key: str, value: Any, command: str | None = None, *, shown: str | None = None) -> None:
    """Set dotted ``key`` (``train.epochs``, ``self.dim``; ``epochs`` on a flat config) to
    ``value``, type-checked (the range is checked by :func:`validate`). ``shown``: how an error
    names the key (default: ``key``)."""
    obj, f = resolve_key(cfg, key, command)
    value = _word(value, f)
    if "choices" in f.metadata:
        check_value(shown or key, value, f)  # before the type: YAML's bare on/yes is a bool, not a word
    setattr(obj, f.name, coerce(value, _hints(type(obj))[f.name], shown or key))


def apply_overrides(cfg: T, items: Iterable[str], *, command: str | None = None, flag: str = "--set",
                    check: bool = True) -> T:
    """Apply ``key=value`` items (``--set``) to ``cfg`` in place, nested (``train.epochs=5``) or
    flat (``epochs=5``), then :func:`validate` it (``check=False``: leave that to the caller).
    ``command`` (``"run knn"``) names the command in an unknown-key error. Returns ``cfg``."""
    for item in items or ():
        key, value = parse_override(item, flag)
        set_value(cfg, key, value, command)
    if check:
        validate(cfg)
    return cfg


def apply_dict(cfg: T, data: Mapping[str, Any], *, source: str | None = None, command: str | None = None) -> T:
    """Apply a nested mapping (a YAML recipe) to ``cfg`` in place, section by section (no validation)."""
    if not isinstance(data, Mapping):
        where = f"{source} is" if source else "a config must be"
        raise OperaError(f"{where} not a YAML mapping of keys; write e.g. 'train: {{epochs: 100}}'")
    try:
        _apply(cfg, data, "", cfg, command)
    except OperaError as exc:
        if source is None:
            raise
        raise OperaError(f"{source}: {exc}") from None
    return cfg


def _apply(root: Any, data: Mapping[str, Any], prefix: str, obj: Any, command: str | None) -> None:
    secs = sections(obj)
    for key, value in data.items():
        if not prefix and key in IGNORED_KEYS:
            continue
        key = str(key)
        if key in secs:
            if not isinstance(value, Mapping):
                raise OperaError(f"config section {prefix}{key} must be a mapping of its keys, e.g. "
                                 f"'{key}: {{...}}', got {value!r}")
            _apply(root, value, f"{prefix}{key}.", secs[key], command)
        elif isinstance(value, Mapping) and key not in leaf_fields(obj) and not prefix and secs:
            raise OperaError(f"unknown config section {key!r}{suggest(key, list(secs))}; "
                             f"valid: {', '.join(list(leaf_fields(obj)) + list(secs))}")
        else:
            set_value(root, prefix + key, value, command)


# ----------------------------------------------------------------------------- validation
def validate(cfg: T, prefix: str = "") -> T:
    """Check every leaf of ``cfg`` (and of its sections): its type, and the range or choices its
    field's metadata states; then ``cfg.config_check()`` where a config has one (rules that
    involve several keys). Returns ``cfg``; raises a one-line :class:`OperaError`."""
    hints = _hints(type(cfg))
    for name, f in leaf_fields(cfg).items():
        key = prefix + name
        value = getattr(cfg, name)
        if name in hints:
            coerce(value, hints[name], key)
        check_value(key, value, f)
    for name, sub in sections(cfg).items():
        validate(sub, f"{prefix}{name}.")
    hook = getattr(cfg, "config_check", None)
    if callable(hook):
        hook()
    return cfg


# ----------------------------------------------------------------------------- recipes (YAML)
def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise OperaError(f"cannot parse {path}: {str(exc).splitlines()[0]}; fix the YAML syntax") from None
    except OSError as exc:
        raise OperaError(f"cannot read {path} ({exc.strerror}); pass a readable YAML file") from None
    if not isinstance(data, dict):
        raise OperaError(f"{path} is not a YAML mapping of sections; write e.g. 'train: {{epochs: 100}}'")
    return data


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (a nested mapping merges, a value replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: Path, recipes_dir: Path | None = None, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe as a dict, its ``base:`` resolved: ``base: r50_100ep_b1024`` (a recipe name, looked
    up beside the file, then in ``recipes_dir``) or ``base: other.yaml`` (relative to the file) is
    loaded first and this file's keys go on top, section by section; a base may have a base.

    One mechanism for every kind of recipe (pretraining, evaluation, ablation): a recipe states
    only what differs from the one it builds on."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise OperaError(f"{path}: 'base' must name a recipe (e.g. base: r50_100ep_b1024), got {base!r}")
    candidates = [path.parent / base, path.parent / f"{base}.yaml"]
    if recipes_dir is not None:
        candidates += [Path(recipes_dir) / base, Path(recipes_dir) / f"{base}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = sorted(p.stem for p in path.parent.glob("*.yaml") if p != path)
        raise OperaError(f"{path}: base recipe {base!r} not found{suggest(base, names)}; name a recipe beside it or a YAML path")
    chain = (*_chain, path.resolve())
    if found.resolve() in chain:
        loop = " -> ".join(p.stem for p in (*chain, found.resolve()))
        raise OperaError(f"{path}: recipes inherit in a loop ({loop}); remove one 'base:'")
    parent = load_yaml(found, recipes_dir, chain)
    parent.pop("description", None)  # a description speaks for its own file
    return merge_dicts(parent, data)


def recipe_names(recipes_dir: Path | None) -> list[str]:
    return sorted(p.stem for p in Path(recipes_dir).glob("*.yaml")) if recipes_dir is not None else []


def find_recipe(name_or_path: str | Path, recipes_dir: Path | None = None, what: str = "recipe") -> Path:
    """A recipe name (``recipes_dir/NAME.yaml``) or a YAML path -> the file, or a one-line error."""
    p = Path(name_or_path).expanduser()
    names = recipe_names(recipes_dir)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise OperaError(f"{what} file {p} does not exist; pass a YAML file"
                             + (f" or one of {', '.join(names)}" if names else ""))
        return p
    if recipes_dir is not None and (Path(recipes_dir) / f"{name_or_path}.yaml").is_file():
        return Path(recipes_dir) / f"{name_or_path}.yaml"
    raise OperaError(f"unknown {what} {str(name_or_path)!r}{suggest(str(name_or_path), names)}; valid: "
                     f"{', '.join(names) or 'none shipped'} or a YAML path")


def load_recipe(name_or_path: str | Path | None, cls: type[T], recipes_dir: Path | None = None, *,
                values: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                command: str | None = None, what: str = "recipe") -> T:
    """A validated ``cls``: its defaults <- the recipe ``name_or_path`` (a name in ``recipes_dir``
    or a YAML path; ``base:`` inheritance; None: no recipe) <- ``values`` (keyword values, dotted
    keys allowed; None values are skipped: an option not given) <- ``overrides`` (``key=value``).

    ``command`` (``"run finetune"``) names the command in an unknown-key error; ``what`` names
    the kind of recipe in a not-found error (``"fine-tuning recipe"``)."""
    cfg = cls()
    if name_or_path:
        path = find_recipe(name_or_path, recipes_dir, what)
        apply_dict(cfg, load_yaml(path, recipes_dir), source=str(path), command=command)
    for key, value in (values or {}).items():
        if value is not None:
            set_value(cfg, key, value, command)
    return apply_overrides(cfg, overrides, command=command)


__all__ = ["apply_dict", "apply_overrides", "coerce", "find_recipe", "leaf_fields", "load_recipe", "load_yaml",
           "merge_dicts", "parse_override", "parse_value", "read_yaml", "recipe_names", "rename_keys", "rename_override",
           "resolve_key", "sections", "set_value", "split_override", "valid_keys", "validate"]
