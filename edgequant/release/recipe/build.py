"""Validation: raw recipe data (a parsed file, flags applied) to a ``Recipe``, every problem at once.

Each key is read by its type annotation (``Table.str``/``int``/...) with the choices or minimum of
its ``Key``, then by its named check (``CHECKS``). The ``[release]`` keys that depend on each other
(``source`` -> ``name`` -> ``output``), the GGUF list and the gates have their own readers here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Callable

import gguf

from edgequant.errors import EdgequantError
from edgequant.mix.target import parse_target
from edgequant.quantize import types as qtypes
from edgequant.release.recipe.check import Checker, Table, find_line, show, toml_type
from edgequant.release.recipe.schema import (
    ARRAY_TABLES, ARTIFACT_NAME, DEFAULT_GGUF, DEVICES, HUB_ID, METRICS, SECTIONS, SPEED_METRICS, TABLES, TARGET_KEYS,
    TARGET_OPTIONS, TYPE_OPTIONS, GGUFVariant, Gate, Recipe, _Origin, base_names, key_fields, kind, spec,
)
from edgequant.text import BUILTIN_ALIASES, DATASETS
from edgequant.units import parse_size


def build(raw: dict, *, base_dir: str, text: str | None, file: str | None, flags: dict | None = None) -> Recipe:
    """Check ``raw`` and make the recipe; raise one ``EdgequantError`` listing every problem.

    ``text``/``file``: the TOML source, for ``file:line`` locations; ``flags``: ``{(table, key): flag name}``
    for values that came from the command line."""
    chk = Checker(text, file, flags or {}, Path(base_dir))
    _check_top_level(chk, raw)
    rel = Table(chk, _table(raw, "release"), "release")
    release = _release(rel)
    # problems without a line (flags, data) are listed in reading order: the tables the artifacts depend on,
    # the artifacts, their gates, then the card
    tables = {name: _settings(Table(chk, _table(raw, name), name), SECTIONS[name]) for name in ("imatrix", "calibration", "bench")}
    gguf_variants = _gguf_variants(chk, rel, _entries(raw, "gguf"), tables["imatrix"].default, "gguf" in raw)
    if release["split_max_size"] and any(v.target is not None for v in gguf_variants):
        rel.err("split_max_size", "split_max_size with a target entry (target_size/target_bpw/target_kld): choosing a "
                                  "per-tensor mix reads one unsplit base file; remove one of them")
    gptq_variants = [_settings(Table(chk, e, "gptq", i), SECTIONS["gptq"]) for i, e in enumerate(_entries(raw, "gptq"))]
    names = _unique_names(chk, release["base_type"], gguf_variants, gptq_variants)
    gates = [_gate(chk, e, i, names, release["devices"], tables["bench"].speed) for i, e in enumerate(_entries(raw, "gates"))]
    tables["card"] = _settings(Table(chk, _table(raw, "card"), "card"), SECTIONS["card"])
    chk.raise_if_any()
    return Recipe(**release, gguf=tuple(gguf_variants), gptq=tuple(gptq_variants), gates=tuple(g for g in gates if g),
                  **tables, base_dir=base_dir, _origin=_Origin(raw=raw, text=text, file=file, flags=dict(flags or {})))


def _table(raw: dict, name: str) -> dict:
    v = raw.get(name)
    return v if isinstance(v, dict) else {}


def _entries(raw: dict, name: str) -> list[dict]:
    """The entries of ``[[name]]`` (one ``[name]`` table is one entry)."""
    v = raw.get(name)
    if isinstance(v, dict):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, dict)]
    return []


def _check_top_level(chk: Checker, raw: dict) -> None:
    """Unknown tables, keys outside any table, and tables of the wrong shape."""
    for section, value in raw.items():
        if section not in TABLES:
            close = difflib.get_close_matches(section, list(TABLES), n=1, cutoff=0.6)
            in_release = section in TABLES["release"]
            hint = (f" (did you mean [{close[0]}]?)" if close else
                    " (put it under [release])" if in_release else f"; tables: {', '.join(f'[{t}]' for t in TABLES)}")
            is_table = isinstance(value, (dict, list)) and not in_release
            what = "table" if is_table else "key"
            chk.error(f"unknown {what} {section!r} at the top level{hint}", section if is_table else None, None if is_table else section)
            continue
        if section in ARRAY_TABLES:
            if not isinstance(value, (dict, list)) or (isinstance(value, list) and not all(isinstance(x, dict) for x in value)):
                if section == "gguf":
                    chk.error("gguf = [...] belongs under [release] (at the top level, gguf must be [[gguf]] tables)", None, section)
                else:
                    chk.error(f"{section} must be tables: write [[{section}]] sections", None, section)
        elif not isinstance(value, dict):
            chk.error(f"{section} must be a table: write [{section}] and its keys below it", None, section)


# -- reading keys by their declaration -------------------------------------------------------------------

_OWN_READERS = ("source", "name", "output", "gguf", "gguf_type", "gguf_imatrix")  # read by the functions below


def read_key(t: Table, cls: type, f: Field) -> Any:
    """One key of ``t``: its declared type, choices and minimum, then its named check; the default when absent."""
    k, s, default = kind(cls, f.name), spec(f), f.default
    if s.check == "size":
        return _size(t, f.name, t.data.get(f.name))
    if k == "str":
        value = t.str(f.name, default, choices=s.choices or None, lower=s.lower)
    elif k == "bool":
        value = t.bool(f.name, default)
    elif k == "int":
        value = t.int(f.name, default, minimum=s.minimum, choices=s.choices or None, hint=s.hint)
    elif k == "float":
        value = t.float(f.name, default)
    elif k == "list":
        value = t.str_list(f.name, default)
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no reader for its type")
    check = CHECKS.get(s.check or "")
    return check(t, f.name, value, default) if check else value


def read(t: Table, cls: type, name: str) -> Any:
    """``read_key`` by the key's name."""
    return read_key(t, cls, next(f for f in fields(cls) if f.name == name))


def _read_keys(t: Table, cls: type) -> dict[str, Any]:
    return {f.name: read_key(t, cls, f) for f in key_fields(cls) if spec(f).check not in _OWN_READERS}


def _settings(t: Table, cls: type) -> Any:
    """A table whose keys need nothing but their declarations (``[bench]``, ``[[gptq]]``, ``[card]``...)."""
    t.unknown_keys()
    return cls(**_read_keys(t, cls))


def _local(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _size(t: Table, key: str, v: Any) -> int:
    """``split_max_size``: ``"50G"``, ``"500M"``, a byte count, or 0 (no split); decimal units like llama.cpp."""
    if v is None:
        return 0
    if isinstance(v, bool):
        t.err(key, f"{key} must be a size like \"50G\" or a byte count, not a boolean", value=v)
        return 0
    if isinstance(v, int):
        if v < 0:
            t.err(key, f"{key} = {v}: must be 0 (no split) or a positive size", value=v)
            return 0
        return v
    if isinstance(v, str):
        try:
            n = parse_size(v)
            if n >= 0:
                return n
        except ValueError:
            pass
    t.err(key, f"{key} = {show(v)}: use a size like \"50G\", \"500M\" or a byte count", value=v)
    return 0


def _text(t: Table, key: str, v: str | None, default: Any) -> str | None:
    if v is None or v in BUILTIN_ALIASES or v in DATASETS:
        return v
    if not _local(t.chk.base, v).is_file():
        t.err(key, f"{key} = {show(v)} in {t.label}: no such file (paths are relative to the recipe's folder); "
                   f"use \"pydoc\" (built in), {', '.join(repr(d) for d in DATASETS)} or a text file", value=v)
    return v


def _file(t: Table, key: str, v: str | None, default: Any) -> str | None:
    if v is not None and not _local(t.chk.base, v).is_file():
        t.err(key, f"{key} {v!r}: no such file (a .jinja, or a .json with chat_template)", value=v)
    return v


def _artifact_name(t: Table, key: str, v: str | None, default: Any) -> str | None:
    if v is not None and not ARTIFACT_NAME.match(v):
        t.err(key, f"{key} = {show(v)} in {t.label}: use letters, digits and . _ + - only (it becomes a file name)", value=v)
        return None
    return v


def _hub_id(t: Table, key: str, v: str | None, default: Any) -> str | None:
    if v is not None and not HUB_ID.match(v):
        t.err(key, f"{key} = {show(v)} in {t.label}: use a Hugging Face hub id like \"org/name\"", value=v)
    return v


def _fraction(t: Table, key: str, v: float | None, default: float) -> float:
    if v is not None and not 0 < v < 1:
        t.err(key, f"{key} = {v:g} in {t.label}: use a fraction between 0 and 1 ({default:g} is GPTQModel's default)", value=v)
        return default
    return v


def _devices(t: Table, key: str, v: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    devices = tuple(d.lower() for d in v)
    for d in devices:
        if d not in DEVICES:
            t.err(key, f"devices: unknown device {d!r}; use {' and/or '.join(map(repr, DEVICES))}", value=d)
    if not devices:
        t.err(key, "devices = []: list at least one of \"cpu\", \"cuda\"")
        devices = default
    if len(set(devices)) != len(devices):
        t.err(key, f"devices lists a device twice: {list(devices)}")
        devices = tuple(dict.fromkeys(devices))
    return devices


def _ggml_type(t: Table, key: str, value: str | None, default: Any = None) -> str | None:
    if not value:
        return None
    try:
        return gguf.GGMLQuantizationType[value.upper()].name
    except KeyError:
        names = [q.name for q in gguf.GGMLQuantizationType]
        close = difflib.get_close_matches(value.upper(), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.err(key, f"{key} = {show(value)} in {t.label}: not a ggml tensor type{hint}", value=value)
        return None


def _tensor_types(t: Table, key: str, v: tuple[str, ...], default: Any) -> tuple[str, ...]:
    for tt in v:
        pattern, sep, type_name = tt.rpartition("=")
        if not sep or not pattern:
            t.err(key, f"tensor_types entry {tt!r} in {t.label}: write PATTERN=TYPE, e.g. \"ffn_down=q6_k\"", value=tt)
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            t.err(key, f"tensor_types entry {tt!r} in {t.label}: bad regular expression ({e})", value=tt)
        _ggml_type(t, key, type_name)
    return v


def _ggml_types(t: Table, key: str, v: tuple[str, ...], default: Any) -> tuple[str, ...]:
    return tuple(n.lower() for n in (_ggml_type(t, key, x) for x in v) if n)


def _target(t: Table, key: str, v: Any, default: Any) -> Any:
    """``target_size``/``target_bpw``/``target_kld``: what ``edgequant quantize --target-*`` accepts."""
    if v is None:
        return v
    try:
        parse_target(**{key.removeprefix("target_"): v})
    except EdgequantError as e:
        example = {"target_size": "\"4.2G\"", "target_bpw": "4.5", "target_kld": "0.01"}[key]
        t.err(key, f"{key} = {show(v)} in {t.label}: {str(e).split(': ', 1)[-1]} (e.g. {key} = {example})", value=v)
        return None
    return v


# Key.check -> check(table, key, value read by its type, default) -> the value to keep
CHECKS: dict[str, Callable[[Table, str, Any, Any], Any]] = {
    "text": _text, "file": _file, "artifact_name": _artifact_name, "hub_id": _hub_id, "fraction": _fraction,
    "devices": _devices, "ggml_type": _ggml_type, "tensor_types": _tensor_types, "ggml_types": _ggml_types,
    "target": _target,
}


# -- [release] ------------------------------------------------------------------------------------------


def _release(rel: Table) -> dict[str, Any]:
    """The ``[release]`` keys but ``gguf``: source, then the name from it, then the output from the name."""
    rel.unknown_keys()
    source = rel.str("source", None)
    source_ok = False
    if source is None and "source" not in rel.data:
        rel.chk.error("no source: add source = \"org/name\" (hub id) or a model folder under [release]", "release")
    elif source is not None:
        source_ok = _check_source(rel, source)
    name = rel.str("name", None)
    if name is None and source_ok and source:
        name = Path(source.rstrip("/\\")).name
    if name is not None and not ARTIFACT_NAME.match(name):
        rel.err("name", f"name {name!r}: use letters, digits and . _ + - only (it becomes file names)", value=name)
    output = rel.str("output", None)
    if output is None and name:
        output = f"dist/{name}"
    if output is not None:
        out_path = _local(rel.chk.base, output)
        if out_path.exists() and not out_path.is_dir():
            rel.err("output", f"output {output!r} is an existing file; name a folder", value=output)
    return {"source": source or "", "name": name or "", "output": output or "", **_read_keys(rel, Recipe)}


def _check_source(rel: Table, source: str) -> bool:
    base = rel.chk.base
    local = _local(base, source)
    if local.exists():
        if not local.is_dir():
            rel.err("source", f"source {source!r} is a file; pass the model folder (with config.json) or a hub id org/name", value=source)
            return False
        if not (local / "config.json").is_file():
            rel.err("source", f"source {source!r} has no config.json; pass a Hugging Face model folder or a hub id org/name", value=source)
            return False
        return True
    if HUB_ID.match(source) and not source.startswith("."):
        return True
    rel.err("source", f"source {source!r}: no such folder (paths are relative to the recipe's folder, {base}) and not a hub id org/name", value=source)
    return False


# -- GGUF types: [release] gguf = [...] and [[gguf]] tables -------------------------------------------------


class _EntryTable(Table):
    """An entry of ``[release] gguf``: a problem is at its key's line inside an inline table, else at the entry."""

    def __init__(self, chk: Checker, data: dict, label: str, type_value: str | None, inline: bool):
        super().__init__(chk, data, "gguf", label=label, flag_key=("release", "gguf"), line_section="release", value_hint=type_value)
        self.type_value, self.inline = type_value, inline

    def err(self, key: str | None, message: str, value: Any = None) -> None:
        chk = self.chk
        if self.inline and key is not None and key != "type" and key in self.data and chk.text and ("release", "gguf") not in chk.flags:
            # the key's own line, searched from the line of the entry's type onwards
            entry_line = find_line(chk.text, "release", "gguf", value=self.type_value) if self.type_value else None
            line = find_line(chk.text, "release", key, after=entry_line)
            where = f"{chk.file}:{line}" if line else str(chk.file)
        else:
            where = chk.where("release", "gguf", value=self.type_value, flag_key=("release", "gguf"))
        chk.errors.append(f"{where}: {message}")


def _gguf_tables(chk: Checker, rel: Table, tables: list[dict], has_tables: bool) -> list[Table]:
    """One ``Table`` per GGUF entry: the list's (or the default types), then the ``[[gguf]]`` tables."""
    listed = rel.data.get("gguf")
    if listed is None:
        listed = [] if has_tables else list(DEFAULT_GGUF)
    elif not isinstance(listed, list):
        rel.err("gguf", "gguf in [release] must be a list, e.g. gguf = [\"Q8_0\", \"Q4_K_M\", {type = \"Q2_K\", imatrix = true}]")
        listed = []
    out: list[Table] = []
    for i, entry in enumerate(listed):
        if isinstance(entry, str):
            out.append(_EntryTable(chk, {"type": entry}, "[release] gguf", entry, inline=False))
        elif isinstance(entry, dict):
            hint = entry.get("type") if isinstance(entry.get("type"), str) else None
            out.append(_EntryTable(chk, entry, f"[release] gguf entry {i + 1}", hint, inline=True))
        else:
            rel.err("gguf", f"gguf entry {i + 1} in [release] must be a type name or an inline table {{type = \"...\"}}, "
                            f"not {toml_type(entry)} ({show(entry)})")
    return out + [Table(chk, e, "gguf", i) for i, e in enumerate(tables)]


def _gguf_variants(chk: Checker, rel: Table, tables: list[dict], imatrix_default: bool, has_tables: bool) -> list[GGUFVariant]:
    variants = (_gguf_variant(t, imatrix_default) for t in _gguf_tables(chk, rel, tables, has_tables))
    return [v for v in variants if v is not None]


def _gguf_variant(t: Table, imatrix_default: bool) -> GGUFVariant | None:
    """One GGUF entry; types that need an importance matrix get one (``imatrix = false`` for them is an error)."""
    t.unknown_keys()
    targets = [k for k in TARGET_KEYS if t.data.get(k) is not None]
    if targets or "type" not in t.data:
        return _target_variant(t, targets, imatrix_default)
    for k in TARGET_OPTIONS:
        if k in t.data:
            t.err(k, f"{k} in {t.label} applies to target entries (target_size, target_bpw, target_kld), not to "
                     f"type = {show(t.data['type'])}", value=t.data[k])
    qt = _quant_type(t, "type", t.data["type"])
    if qt is None:
        return None
    use = t.bool("imatrix", imatrix_default)
    if qt.needs_imatrix:
        if t.data.get("imatrix") is False:
            t.err("imatrix", f"{qt.name} needs an importance matrix; remove imatrix = false (or choose another type)", value=False)
        use = True
    return GGUFVariant(type=qt.name, imatrix=use, **_read_keys(t, GGUFVariant))


def _target_variant(t: Table, targets: list[str], imatrix_default: bool) -> GGUFVariant | None:
    """A target entry (``{target_size = "4.2G"}``): exactly one target, no type and none of a type's options."""
    if not targets:
        t.err("type", f"{t.label} has no type: add type = \"Q4_K_M\" (or another catalogue type), or a target: "
                      f"target_size = \"4.2G\", target_bpw = 4.5 or target_kld = 0.01")
        return None
    ok = True
    if "type" in t.data:
        t.err(targets[0], f"{t.label} has both type and {targets[0]}: a target entry chooses per-tensor types "
                          f"itself; keep one", value=t.data[targets[0]])
        ok = False
    if len(targets) > 1:
        t.err(targets[1], f"{t.label} has {' and '.join(targets)}: give one target per entry", value=t.data[targets[1]])
        ok = False
    for k in TYPE_OPTIONS:
        if k in t.data:
            t.err(k, f"{k} in {t.label} applies to type entries: a target entry chooses every tensor's type itself",
                  value=t.data[k])
            ok = False
    if isinstance(t.data.get("target_size"), int) and not isinstance(t.data["target_size"], bool):
        t.data = {**t.data, "target_size": str(t.data["target_size"])}  # a byte count
    slowdown = t.data.get("max_slowdown")
    if isinstance(slowdown, (int, float)) and not isinstance(slowdown, bool) and slowdown < 0:
        t.err("max_slowdown", f"max_slowdown = {slowdown} in {t.label}: use a percent >= 0 (or speed_check = false)",
              value=slowdown)
        ok = False
    keys = _read_keys(t, GGUFVariant)
    if not ok or keys[targets[0]] is None:
        return None
    return GGUFVariant(**{**keys, "imatrix": t.bool("imatrix", imatrix_default)})


def _quant_type(t: Table, key: str, value: Any) -> qtypes.QuantType | None:
    if not isinstance(value, str):
        t.err(key, f"GGUF type in {t.label} must be a type name like \"Q4_K_M\", not {toml_type(value)} ({show(value)})", value=value)
        return None
    try:
        qt = qtypes.get(value)
    except EdgequantError:
        names = [q.name for q in qtypes.CATALOGUE]
        close = difflib.get_close_matches(value.upper(), names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.err(key, f"unknown GGUF type {value!r} in {t.label}{hint}; see edgequant quantize --list", value=value)
        return None
    if qt.family == "float":
        t.err(key, f"{qt.name} in {t.label} is a 16/32-bit type, not a quantization: the base file is set by "
                   f"base_type and shipped when keep_base = true", value=value)
        return None
    return qt


def _unique_names(chk: Checker, base_type: str, gguf_variants: list, gptq_variants: list) -> dict[str, str]:
    """Every artifact name once, none the base file's; returns folded name -> name, the base's included."""
    seen: dict[str, str] = {}
    base = base_names(base_type)
    folded_base = {n.casefold() for n in base}
    for kind_, variants in (("gguf", gguf_variants), ("gptq", gptq_variants)):
        for i, v in enumerate(variants):
            name = v.artifact.casefold()
            if name in folded_base:
                chk.error(f"{v.artifact} is the base file's name; the base is always made (keep_base decides whether it ships)",
                          "release" if kind_ == "gguf" else "gptq", "gguf" if kind_ == "gguf" else None, index=0 if kind_ == "gguf" else i,
                          value=v.type if kind_ == "gguf" else None)
            elif name in seen:
                chk.error(f"two artifacts are named {v.artifact!r}; give one a name = \"...\"", kind_ if kind_ == "gptq" else "release",
                          None if kind_ == "gptq" else "gguf", index=i if kind_ == "gptq" else 0)
            seen[name] = v.artifact
    return {n.casefold(): n for n in [*seen.values(), *base]}


# -- [[gates]] ------------------------------------------------------------------------------------------


def _gate(chk: Checker, e: dict, i: int, names: dict[str, str], devices: tuple[str, ...], speed: bool) -> Gate | None:
    """One gate, or None when it has a problem (reported)."""
    t = Table(chk, e, "gates", i)
    t.unknown_keys()
    artifact = _gate_artifact(t, names)
    metric = _gate_metric(t)
    bounds = _gate_bounds(t, metric) if metric else None
    if bounds is None:
        return None
    device = read(t, Gate, "device")
    if not _gate_device_ok(t, metric, device, devices, speed) or artifact is None:
        return None
    hi, lo = bounds
    return Gate(artifact=artifact, metric=metric, max=hi, min=lo, device=(device or devices[0]) if metric in SPEED_METRICS else None)


def _gate_artifact(t: Table, names: dict[str, str]) -> str | None:
    """The gated artifact's canonical spelling, or ``*``."""
    artifact = t.str("artifact", None)
    if artifact is None:
        t.err(None, f"{t.label} has no artifact: add artifact = \"Q4_K_M\" (or \"*\" for every quantized artifact)")
        return None
    if artifact == "*" or artifact.casefold() in names:
        return names.get(artifact.casefold(), artifact)
    close = difflib.get_close_matches(artifact, list(names.values()), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    t.err("artifact", f"gate artifact {artifact!r} is not in this recipe{hint}; artifacts: {', '.join(names.values())}, or \"*\"",
          value=artifact)
    return None


def _gate_metric(t: Table) -> str | None:
    metric = t.str("metric", None)
    if metric is None:
        t.err(None, f"{t.label} has no metric: add metric = one of {', '.join(map(repr, METRICS))}")
        return None
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, list(METRICS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.err("metric", f"unknown metric {metric!r} in {t.label}{hint}; use one of {', '.join(METRICS)}", value=metric)
        return None
    return metric


def _gate_bounds(t: Table, metric: str) -> tuple[float | None, float | None] | None:
    """(max, min): exactly one, on the side that makes sense for the metric."""
    hi, lo = read(t, Gate, "max"), read(t, Gate, "min")
    if (t.data.get("max") is not None and hi is None) or (t.data.get("min") is not None and lo is None):
        return None  # type error already reported
    right = METRICS[metric]
    if hi is None and lo is None:
        t.err("metric", f"{t.label} ({metric}) has no threshold: add {right} = <number>", value=metric)
        return None
    if hi is not None and lo is not None:
        t.err("min", f"{t.label} has both min and max; a gate takes one ({right} for {metric})")
        return None
    if (hi is not None and right == "min") or (lo is not None and right == "max"):
        wrong = "max" if hi is not None else "min"
        better = "higher" if right == "min" else "lower"
        t.err(wrong, f"{metric} is {better}-is-better: use {right} = ..., not {wrong} (in {t.label})")
        return None
    return hi, lo


def _gate_device_ok(t: Table, metric: str, device: str | None, devices: tuple[str, ...], speed: bool) -> bool:
    """Speed gates need speed measurements and a benchmarked device; other gates take no device."""
    ok = True
    if metric in SPEED_METRICS:
        if not speed:
            t.err("metric", f"{metric} gate in {t.label} needs speed measurements: set speed = true in [bench]", value=metric)
            ok = False
        if device is not None and device not in devices:
            t.err("device", f"gate device {device!r} is not in [release] devices {list(devices)}", value=device)
            ok = False
    elif device is not None:
        t.err("device", f"device in {t.label} applies to pp_tps/tg_tps only; {metric} is measured once per artifact", value=device)
        ok = False
    return ok
