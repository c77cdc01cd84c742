"""Walks over ml_collections configs by dotted path ("optimizer.lr"), shared by the run
directory (a saved config read back, compared with a new one), sweeps (overrides, the fields
that vary) and the command line.

ml_collections facts these rely on: list fields cannot be overridden from flags, so configs use
tuples, and JSON turns them into lists, which `from_dict` turns back; a locked ConfigDict
refuses new fields but not changes.
"""
from __future__ import annotations

import ast
from typing import Any, Mapping

import ml_collections

from seg.errors import ConfigError


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}, for dicts and ConfigDicts alike."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def diff(a: Mapping, b: Mapping) -> list[str]:
    """The dotted keys whose values differ between two nested dicts (or are in one only)."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, _MISSING) != fb.get(k, _MISSING))


_MISSING = object()


def from_dict(saved: Mapping, defaults: ml_collections.ConfigDict | None = None
              ) -> ml_collections.ConfigDict:
    """A config saved as JSON back as a ConfigDict: lists become tuples again, and fields the
    saved one lacks (added to the defaults after it was written) take the defaults' values."""
    flat = flatten(defaults.to_dict()) if defaults is not None else {}
    flat.update(flatten(saved))
    return ml_collections.ConfigDict(unflatten({k: _tuples(v) for k, v in flat.items()}))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_field(cfg: ml_collections.ConfigDict, key: str, value) -> None:
    """cfg.<key> = value for a dotted key; an unknown key or a value of the wrong type is a
    ConfigError naming the key."""
    *path, leaf = key.split(".")
    node = cfg
    try:
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(leaf)
        node[leaf] = _tuples(value)
    except (KeyError, AttributeError, TypeError) as e:
        detail = "no such field" if isinstance(e, (KeyError, AttributeError)) else e
        raise ConfigError(f"{key}={value!r}: {detail}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ("a.b", value): a Python literal where it parses as one (true / false
    included), else the string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--override={item!r} is not key=value")
    text = {"true": "True", "false": "False"}.get(text, text)
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text
