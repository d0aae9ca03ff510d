"""How local paths appear in what a release publishes (card, manifest, bench report): relative to the
release folder when inside it, else only their name; a hub id or a bare word stays as it is."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path


def public_path(value: str | None, out: Path, base: Path | None = None) -> str | None:
    """``value`` as published from the release folder ``out`` (a relative ``value`` is taken from ``base``
    when it exists there)."""
    if not value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        if base is None or not (base / p).exists():
            return value
        p = base / p
    p = p.resolve()
    try:
        return p.relative_to(out.resolve()).as_posix() or "."
    except ValueError:
        return p.name


def public_command(command: str | None, out: Path) -> str | None:
    """The command line with its local paths made public (``public_path``)."""
    if not command:
        return command
    words = []
    for w in shlex.split(command):
        if w.startswith("-") or not (os.path.isabs(w) or os.path.exists(w)):
            words.append(w)
        else:
            words.append(public_path(w, out, Path.cwd()))
    return shlex.join(words)


def public_recipe(recipe: dict, out: Path, base: Path) -> dict:
    """The recipe as published: its paths (source, output, template, texts) without local folders."""
    d = json.loads(json.dumps(recipe))
    rel = d.get("release") or {}
    for key in ("source", "output", "chat_template"):
        if isinstance(rel.get(key), str):
            rel[key] = public_path(rel[key], out, base)
    for table in d.values():
        if isinstance(table, dict) and isinstance(table.get("text"), str):
            table["text"] = public_path(table["text"], out, base)
    return d


def public_text(text: dict | None, out: Path) -> dict | None:
    """A bench report's ``text`` (name, sha256, chars) with its name made public."""
    return {**text, "name": public_path(text.get("name"), out)} if text else text
