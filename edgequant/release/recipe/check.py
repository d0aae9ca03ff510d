"""Where a problem is and how it is said: ``file:line`` (or ``--flag``) locations and typed reading.

tomllib gives line numbers only for syntax errors, so ``find_line`` scans the raw text for a key
inside its table. ``Checker`` collects every problem, each prefixed with its place, and raises one
``EdgequantError`` in file order; ``Table`` reads one table's values by type and reports a wrong
type at the key's line.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from edgequant.errors import EdgequantError
from edgequant.release.recipe.schema import ARRAY_TABLES, TABLES

# -- locating a key in the TOML text ------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(?:#.*)?$")


def find_line(text: str, section: str | None, key: str | None = None, *, index: int = 0, value: Any = None,
              after: int | None = None) -> int | None:
    """1-based line of ``key`` (optionally holding ``value``) inside table ``section``
    (``None``: the root; ``index``: which ``[[section]]``), or of the table header when no key is
    given. Finds bare and quoted keys, keys inside inline tables, and string values inside a
    multi-line array; ``after`` (a 1-based line) skips the lines before it. Returns None when the
    text does not show it."""
    lines = text.splitlines()
    span = _table_span(lines, section, index)
    if span is None:
        return _find_dotted(lines, section, key)
    header, start, end = span
    if key is None and value is None:
        return header + 1 if header >= 0 else None
    if after is not None:
        start = max(start, after - 1)
    at = start
    if key is not None:
        pattern = re.compile(rf"(?:^|[{{,\s])(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
        at = next((i for i in range(start, end) if pattern.search(_strip_comment(lines[i]))), None)
        if at is None:
            return _find_dotted(lines, section, key)
        if value is None:
            return at + 1
    forms = _value_forms(value)
    hit = next((i for i in range(at, end) if any(f in _strip_comment(lines[i]) for f in forms)), None)
    if hit is not None:
        return hit + 1
    return at + 1 if key is not None else None  # the key's line when its value is not shown literally


def _table_span(lines: list[str], section: str | None, index: int) -> tuple[int, int, int] | None:
    """(header line, first body line, end) of the ``index``-th ``[section]`` (0-based lines; the root's header is -1)."""
    headers: list[tuple[str | None, int, int]] = [(None, 0, -1)]  # (name, occurrence, line index)
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            name = m.group(2)
            headers.append((name, seen.get(name, 0), i))
            seen[name] = seen.get(name, 0) + 1
    for n, (name, occ, i) in enumerate(headers):
        if name == section and (occ == index or section is None):
            return i, i + 1, headers[n + 1][2] if n + 1 < len(headers) else len(lines)
    return None


def _find_dotted(lines: list[str], section: str | None, key: str | None) -> int | None:
    if section is None or key is None:
        return None
    pattern = re.compile(rf"^\s*{re.escape(section)}\s*\.\s*{re.escape(key)}\s*=")
    return next((i + 1 for i, line in enumerate(lines) if pattern.match(line)), None)


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _value_forms(value: Any) -> list[str]:
    if isinstance(value, str):
        return [f'"{value}"', f"'{value}'"]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


def toml_error(file: str, e: Exception) -> str:
    """A tomllib syntax error as ``file:line:column: invalid TOML: ...``."""
    msg = str(e)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
    if m:
        return f"{file}:{m.group(1)}:{m.group(2)}: invalid TOML: {msg[:m.start()]}"
    m = re.search(r"\s*\(at end of document\)\s*$", msg)
    if m:
        return f"{file}: invalid TOML at the end of the file: {msg[:m.start()]}"
    return f"{file}: invalid TOML: {msg}"


# -- collecting problems ------------------------------------------------------------------------------


class Checker:
    """Collects problems, each prefixed with where to fix it (file:line, or the flag)."""

    def __init__(self, text: str | None, file: str | None, flags: dict, base: Path):
        self.text, self.file, self.flags, self.base = text, file, flags, base
        self.errors: list[str] = []

    def where(self, section: str | None, key: str | None = None, *, index: int = 0, value: Any = None,
              flag_key: tuple | None = None) -> str:
        """``--flag`` when the value came from one, else ``file:line`` (or the file, or ``recipe``)."""
        for k in (flag_key, (section, key), (section, None)):
            if k is not None and k in self.flags:
                return f"--{self.flags[k]}"
        if self.file is None:
            return "recipe"
        line = find_line(self.text, section, key, index=index, value=value) if self.text else None
        return f"{self.file}:{line}" if line else self.file

    def error(self, message: str, section: str | None, key: str | None = None, **where: Any) -> None:
        self.errors.append(f"{self.where(section, key, **where)}: {message}")

    def raise_if_any(self) -> None:
        """One error, one line per problem, in file order (flag and file-level problems last)."""
        if self.errors:
            def line_of(msg: str) -> float:
                m = re.match(r"[^:]*:(\d+):", msg) if self.file and msg.startswith(self.file + ":") else None
                return int(m.group(1)) if m else math.inf

            raise EdgequantError("\n".join(sorted(self.errors, key=line_of)))


def table_label(section: str, index: int | None) -> str:
    """``[bench]``, or ``[[gptq]] #2`` for an entry of an array of tables."""
    if index is None:
        return f"[{section}]"
    return f"[[{section}]] #{index + 1}"


class Table:
    """Typed access to one table's values, reporting type errors at the key's line."""

    def __init__(self, chk: Checker, data: Mapping[str, Any], section: str, index: int | None = None,
                 label: str | None = None, flag_key: tuple | None = None, line_section: str | None = None, value_hint: Any = None):
        self.chk, self.data, self.section, self.index = chk, data, section, index
        self.label = label or table_label(section, index)
        self.flag_key = flag_key
        self.line_section = line_section or section  # where the keys live in the text
        self.value_hint = value_hint  # inline tables: a value that identifies the line (e.g. the type)

    def err(self, key: str | None, message: str, value: Any = None) -> None:
        self.chk.error(message, self.line_section, key, index=self.index or 0, value=value if value is not None else self.value_hint,
                       flag_key=self.flag_key or (self.section, key))

    def unknown_keys(self) -> None:
        """Report every key the table does not have, with the nearest known one or the table it belongs in."""
        allowed = list(TABLES[self.section])
        for key in self.data:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            else:
                elsewhere = [s for s, keys in TABLES.items() if key in keys and s != self.section]
                hint = f" (it belongs in {table_label(elsewhere[0], None if elsewhere[0] not in ARRAY_TABLES else 0).replace(' #1', '')})" if elsewhere else ""
            self.err(key, f"unknown key {key!r} in {self.label}{hint}")

    def str(self, key: str, default: str | None, *, choices: Iterable[str] | None = None, lower: bool = False) -> str | None:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            self.err(key, f"{key} in {self.label} must be a string, not {toml_type(v)} ({show(v)})", value=v)
            return default
        if lower:
            v = v.lower()
        if choices is not None and v not in choices:
            self.err(key, f"{key} = {show(self.data.get(key))} in {self.label}: use one of {', '.join(map(repr, choices))}", value=self.data.get(key))
            return default
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.err(key, f"{key} in {self.label} must be true or false, not {toml_type(v)} ({show(v)})", value=v)
            return default
        return v

    def int(self, key: str, default: int | None, *, minimum: int | None = None, choices: Iterable[int] | None = None,
            hint: str = "") -> int | None:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                self.err(key, f"{key} in {self.label} must be an integer: write {int(v)}, not {v}", value=v)
            else:
                self.err(key, f"{key} in {self.label} must be an integer, not {toml_type(v)} ({show(v)})", value=v)
            return default
        if choices is not None and v not in choices:
            self.err(key, f"{key} = {v} in {self.label}: use one of {', '.join(map(str, choices))}{hint}", value=v)
            return default
        if minimum is not None and v < minimum:
            self.err(key, f"{key} = {v} in {self.label}: must be at least {minimum}{hint}", value=v)
            return default
        return v

    def float(self, key: str, default: float | None) -> float | None:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.err(key, f"{key} in {self.label} must be a number, not {toml_type(v)} ({show(v)})", value=v)
            return default
        if isinstance(v, float) and math.isnan(v):
            self.err(key, f"{key} in {self.label} must be a number, not nan", value=v)
            return default
        return float(v)

    def str_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.err(key, f"{key} in {self.label} must be a list of strings, e.g. [\"a\", \"b\"]", value=None)
            return default
        return tuple(v)


def toml_type(v: Any) -> str:
    """``a string``, ``an integer``...: a value's TOML type for a message."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def show(v: Any) -> str:
    """A value as a message shows it: TOML spelling for strings and booleans."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)
