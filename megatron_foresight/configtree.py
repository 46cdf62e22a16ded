"""Mapping YAML recipes onto a tree of typed dataclasses, with errors that say where and what.

This module is the machinery; `config.py` holds the schema. A recipe is loaded in three steps:

1. `load_yaml` reads a file (following its `base:` chain) into plain dicts and remembers, for every
   dotted key, the file and line it came from;
   String values may name environment variables, `${DATA_DIR}` or `${DATA_DIR:-data}` (with a
   default), so one recipe serves every user's data paths;
2. `apply_overrides` folds `key=value` strings from the command line into that tree;
3. `build` turns the tree into dataclasses: it checks each key exists (suggesting the nearest valid
   one), checks and coerces each value against the field's annotation, then runs the dataclass's
   own `__post_init__` checks.

Every problem surfaces as one `ConfigError` naming the dotted key, the file and line when the key
came from a file, and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem: which key, where it was set, and what is allowed."""

    def __init__(self, key: str, message: str, where: str | None = None):
        self.key, self.message, self.where = key, message, where
        super().__init__(self._render())

    def _render(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.key}: {self.message}" if self.key else f"{prefix}{self.message}"

    def located(self, where: str | None, parent: str = "") -> "ConfigError":
        key = f"{parent}.{self.key}" if parent and self.key else (self.key or parent)
        return type(self)(key, self.message, self.where or where)


class _NotAllowed(ConfigError):
    """A value of the right type outside what every field allows (inf, nan): a union field
    reports it as is instead of trying its other types."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError for `key` unless `condition` holds. Used in `__post_init__` checks."""
    if not condition:
        raise ConfigError(key, message)


def check_at_least(obj: Any, minimum: int, *names: str) -> None:
    """Each named field of `obj`, a count or a size, is at least `minimum` (None, where a field
    may be left unset, passes). Used in `__post_init__` checks."""
    for name in names:
        value = getattr(obj, name)
        check(value is None or value >= minimum, name, f"must be at least {minimum}, got {value}")


class Variant:
    """Base of a config section whose `type` key picks one of several dataclasses: a recipe
    writes `algorithm: {type: ppo, gamma: 0.99}` (or just `algorithm: ppo`) and gets that
    variant's own typed fields. The base is a dataclass with a `type: str` field; each variant
    subclasses it and registers with `@Base.variant("name")`, from any module imported before
    the recipe is read."""

    _variants: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if Variant in cls.__bases__:
            cls._variants = {}

    @classmethod
    def variant(cls, name: str):
        """Register a variant: a dataclass subclass whose `type` field defaults to `name`."""
        def register(variant_cls: type) -> type:
            default = next(f.default for f in dataclasses.fields(variant_cls) if f.name == "type")
            if default != name:
                raise ValueError(f"{variant_cls.__name__}.type must default to {name!r}")
            if cls._variants.get(name, variant_cls) is not variant_cls:
                raise ValueError(f"{cls.__name__} {name!r} is already registered")
            cls._variants[name] = variant_cls
            return variant_cls
        return register

    @classmethod
    def variants(cls) -> dict[str, type]:
        return dict(cls._variants)


def _variant_class(base: type, value: Any, key: str, origins: "Origins") -> tuple[type, dict]:
    """The variant `value` (a mapping with `type`, or the type's name) asks for, and its fields."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a type name or a mapping with a 'type', got {value!r}",
                          origins.get(key))
    default = next(f.default for f in dataclasses.fields(base) if f.name == "type")
    name = value.get("type", default)
    choices = base.variants()
    if name not in choices:
        close = difflib.get_close_matches(str(name), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}.type", f"{name!r} is not a registered type{hint}; choose one "
                                         f"of {', '.join(sorted(choices))}",
                          origins.get(f"{key}.type") or origins.get(key))
    return choices[name], {**value, "type": name}


# --------------------------------------------------------------------------------------------
# YAML with line numbers


Origins = dict[str, str]  # dotted key -> "file:line"


def _node_to_python(node: yaml.Node, path: str, origins: Origins, source: str) -> Any:
    where = f"{source}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, str) or not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(path, "mapping keys must be plain names", where)
            dotted = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError(dotted, "key given twice in the same mapping",
                                  f"{source}:{key_node.start_mark.line + 1}")
            origins[dotted] = f"{source}:{key_node.start_mark.line + 1}"
            out[key] = _node_to_python(value_node, dotted, origins, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, f"{path}[{i}]", origins, source) for i, v in enumerate(node.value)]
    value = yaml.safe_load(yaml.serialize(node))
    return _expand_variables(value, path, where) if isinstance(value, str) else value


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _expand_variables(text: str, key: str, where: str) -> str:
    """`${NAME}` and `${NAME:-default}` in a recipe's string value, from the environment."""
    def value(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(key, f"environment variable {name} is not set; set it (export "
                                   f"{name}=...) or give a default: ${{{name}:-...}}", where)
        return default
    return _VARIABLE.sub(value, text)


def _merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_text(path: Path) -> str:
    """A recipe file's text; a byte that is not UTF-8 is an error at its offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}; save the file as UTF-8", str(path)) from None
    except OSError as e:
        raise ConfigError("", f"cannot read the recipe file: {e.strerror}", str(path)) from None


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """Read a recipe file, resolving `base: other.yaml` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"recipe file not found: {path}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError("base", f"recipes include each other in a cycle: {cycle}", str(path))
    try:
        node = yaml.compose(_read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError("", f"not valid YAML: {getattr(e, 'problem', e)}", where) from None
    if node is None:
        return {}, {}
    origins: Origins = {}
    tree = _node_to_python(node, "", origins, str(path))
    if not isinstance(tree, dict):
        raise ConfigError("", "a recipe must be a mapping of sections", f"{path}:1")
    base = tree.pop("base", None)
    if base is None:
        return tree, origins
    if not isinstance(base, str):
        raise ConfigError("base", "must be a path to another recipe file", origins.get("base"))
    base_tree, base_origins = load_yaml(path.parent / base, (*_chain, resolved))
    return _merge(base_tree, tree), {**base_origins, **origins}


def apply_overrides(tree: dict, origins: Origins, overrides: list[str]) -> dict:
    """Fold `section.key=value` strings into the tree; values are parsed as YAML scalars/lists."""
    tree = _merge({}, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("", f"override {item!r} is not of the form section.key=value",
                              "command line")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"{part!r} is a value, not a section", "command line")
            node = child
        node[parts[-1]] = value
        origins[dotted] = "command line"
    return tree


# --------------------------------------------------------------------------------------------
# dataclass tree


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        return f"a mapping of {_type_name(key_type)} to {_type_name(value_type)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, origins: Origins | None = None) -> Any:
    """Check `value` against annotation `tp`, converting int->float; raise ConfigError if wrong.
    Dataclasses inside lists and mappings are built here; a field that is itself a dataclass is
    built by `build`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, origins)
            except _NotAllowed:
                raise
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"{value!r} is not allowed; choose one of "
                                   f"{', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_element(v, inner, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, key): _element(v, value_type, f"{key}.{k}", origins)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and issubclass(tp, Variant):
            return value  # a type name or a mapping: built by the caller
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return value  # built by the caller
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # YAML reads 1e6 as a float
    elif tp is float:
        number = _float(value)
        if number is not None:
            # inf passes the `> 0` checks fields write and nan fails them with a puzzling
            # message; either becomes a NaN loss later. No field has a use for them.
            if not math.isfinite(number):
                raise _NotAllowed(key, f"must be a finite number, got {number}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _float(value: Any) -> float | None:
    """`value` as a float, or None when it is not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _element(value: Any, tp: Any, key: str, origins: Origins | None) -> Any:
    """One item of a list or mapping: a dataclass is built (its errors located at `key`)."""
    if dataclasses.is_dataclass(tp):
        return _build_field(tp, value, origins or {}, key)
    try:
        return _coerce(value, tp, key, origins)
    except ConfigError as e:
        raise e.located((origins or {}).get(key)) from None


def build(cls: type, data: dict, origins: Origins | None = None, prefix: str = "",
          extra_sections: dict[str, type] | None = None):
    """Build dataclass `cls` from `data`; nested dataclass fields recurse. `extra_sections` adds
    sections whose schema is known only at run time (a stage plugin's own config)."""
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    sections = dict(extra_sections or {})
    kwargs: dict[str, Any] = {}

    def dotted(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of {cls.__name__} fields, got {data!r}",
                          origins.get(prefix))
    for name, value in data.items():
        key = dotted(name)
        if name in sections:
            kwargs[name] = build(sections[name], value, origins, key)
            continue
        if name not in fields:
            valid = sorted(list(fields) + list(sections))
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            scope = f"section {prefix!r}" if prefix else "the recipe"
            raise ConfigError(key, f"unknown key in {scope}; {hint}valid keys: {', '.join(valid)}",
                              origins.get(key))
        tp = hints[name]
        try:
            value = _coerce(value, tp, key, origins)
        except ConfigError as e:
            raise e.located(origins.get(key)) from None
        if dataclasses.is_dataclass(tp):
            value = _build_field(tp, value, origins, key)
        kwargs[name] = value
    for name, section in sections.items():
        kwargs.setdefault(name, build(section, {}, origins, dotted(name)))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        full = dotted(e.key) if e.key else prefix
        raise ConfigError(full, e.message, e.where or nearest_origin(origins, full)) from None


def _build_field(tp: type, value: Any, origins: Origins, key: str):
    """A section: the dataclass `tp`, or for a `Variant` the registered type `value` names."""
    if isinstance(tp, type) and issubclass(tp, Variant):
        tp, value = _variant_class(tp, value, key, origins)
    return build(tp, value, origins, key)


def nearest_origin(origins: Origins, key: str) -> str | None:
    """Where `key` was set, or else the nearest enclosing key that was (a check of a value the
    recipe left at its default points at the section that holds it)."""
    while key:
        if key in origins:
            return origins[key]
        parent = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", key)
        key = "" if parent == key else parent
    return None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for config.yaml in the run directory)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# documentation of the keys, generated from field docstrings


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal written under each field in the class body
    (or in a base class's body, for inherited fields; a subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", extra_sections: dict[str, type] | None = None) -> list[str]:
    """One block per key: `section.key (type, default X)` and its docstring."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Variant):
            names = ", ".join(repr(n) for n in sorted(tp.variants()))
            lines.append(f"[{key}] {docs.get(f.name, '')} (type: one of {names})".rstrip())
            for name, variant in sorted(tp.variants().items()):
                lines.append(f"[{key} with type: {name}] "
                             f"{(inspect.getdoc(variant) or '').splitlines()[0]}".rstrip())
                lines += describe(variant, key)
            continue
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {docs.get(f.name, '')}".rstrip())
            lines += describe(tp, key)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            lines.append(f"[{key}[]] {docs.get(f.name, '')}".rstrip())
            lines += describe(item, f"{key}[]")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        lines.append(f"  {key} ({_type_name(tp)}; default {default!r})")
        if f.name in docs:
            lines += ["      " + ln for ln in textwrap.wrap(docs[f.name], 88)]
    for name, section in (extra_sections or {}).items():
        lines.append(f"[{name}] {(inspect.getdoc(section) or '').splitlines()[0]}".rstrip())
        lines += describe(section, name)
    return lines
