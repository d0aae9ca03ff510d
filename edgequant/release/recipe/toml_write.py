"""A small TOML writer for the recipe's own data (``Recipe.to_dict()``): ``load_recipe`` reads it back."""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, fields
from typing import Any, Mapping

from edgequant.release.recipe.schema import ARRAY_TABLES, GGUFVariant, Recipe, key_fields, plain

# the tables in the order a recipe file shows them: [release], then Recipe's fields holding one table
_TABLE_ORDER = ("release", *(f.name for f in fields(Recipe) if "table" in f.metadata and f.name not in ARRAY_TABLES))
# a GGUF entry's defaults: an entry that only has them is written as its type name
_GGUF_DEFAULTS = {f.name: plain(f.default) for f in key_fields(GGUFVariant) if f.default is not MISSING}


def to_toml(recipe: Mapping[str, Any]) -> str:
    """Write a ``Recipe.to_dict()`` as a recipe file (``None`` values and defaults of GGUF entries left out).

    ``load_recipe`` of the text gives the same recipe back."""
    lines: list[str] = []
    scalar_tables = [k for k, v in recipe.items() if isinstance(v, dict)]
    order = [t for t in _TABLE_ORDER if t in scalar_tables]
    order += [t for t in scalar_tables if t not in order]
    for name in order:
        body = _table_body(recipe[name], compact_gguf=(name == "release"))
        if body:
            lines += ["" if lines else None, f"[{name}]", *body]
    for name, value in recipe.items():
        if isinstance(value, list) and all(isinstance(x, dict) for x in value):
            for entry in value:
                lines += ["", f"[[{name}]]", *_table_body(entry)]
    return "\n".join(x for x in lines if x is not None).strip("\n") + "\n"


def _table_body(table: Mapping[str, Any], compact_gguf: bool = False) -> list[str]:
    out = []
    for key, value in table.items():
        if value is None:
            continue
        if compact_gguf and key == "gguf" and isinstance(value, list):
            out.append(f"{key} = [{', '.join(_gguf_entry(e) for e in value)}]")
            continue
        out.append(f"{_key(key)} = {_value(value)}")
    return out


def _gguf_entry(e: Any) -> str:
    """A ``[release] gguf`` entry: its type name, or an inline table of what is not a default."""
    if not isinstance(e, dict):
        return _value(e)
    e = {k: v for k, v in e.items() if v is not None and not (k in _GGUF_DEFAULTS and _GGUF_DEFAULTS[k] == v)}
    return _value(e["type"]) if list(e) == ["type"] else _value(e)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
