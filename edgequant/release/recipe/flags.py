"""Command-line flags: every recipe key has one, named and typed by the schema.

The keyword of ``recipe_from_options`` / ``Recipe.with_overrides`` is the key for ``[release]`` keys
and ``<table>_<key>`` for the others (``bench_ctx``); the option is the same with dashes
(``--bench-ctx``) unless the key's ``Key.flag`` says otherwise (``--device``, ``--gate``). Array
keys take shorthands: ``--gguf Q8_0,Q2_K:imatrix``, ``--gptq 4:64``, ``--gate 'Q4_K_M:kld_mean<=0.1'``,
or a TOML inline table.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from edgequant.errors import EdgequantError
from edgequant.release.recipe.check import toml_error
from edgequant.release.recipe.schema import ARRAY_TABLES, SECTIONS, Key, Recipe, key_fields, kind, spec


@dataclass(frozen=True)
class _Flag:
    section: str
    key: str | None  # None: the whole array of tables ([[gptq]], [[gates]])
    spec: Key
    kind: str  # the key's type: "bool", "list", "int", ...
    cli: str  # the option's name without the dashes


def _flag_table() -> dict[str, _Flag]:
    """Keyword -> flag for every key but the positional source, then one per array of tables."""
    out: dict[str, _Flag] = {}
    for section, cls in SECTIONS.items():
        if section in ARRAY_TABLES:
            continue
        for f in key_fields(cls):
            if spec(f).positional:
                continue
            keyword = f.name if section == "release" else f"{section}_{f.name}"
            out[keyword] = _Flag(section, f.name, spec(f), kind(cls, f.name), spec(f).flag or keyword.replace("_", "-"))
    for f in fields(Recipe):
        if "table" in f.metadata and f.name in ARRAY_TABLES:
            out[f.name] = _Flag(f.name, None, spec(f), "list", spec(f).flag or f.name)
    return out


_FLAGS = _flag_table()
# flag keyword (the CLI option is --flag-name with dashes) -> (table, key); key None: the whole array
FLAGS: dict[str, tuple[str, str | None]] = {k: (f.section, f.key) for k, f in _FLAGS.items()}
# other spellings on the command line (--device, --gate, --card-tag) -> keyword
_SPELLINGS = {s.replace("-", "_"): k for k, f in _FLAGS.items() for s in (f.spec.flag, f.spec.alias) if s}


def apply_flags(raw: dict, flags: Mapping[str, Any]) -> dict:
    """Write flag values into the raw recipe dict; return {(section, key): option name} for error locations."""
    given: dict = {}
    for keyword, value in flags.items():
        flag = _FLAGS.get(keyword)
        if flag is None:
            close = difflib.get_close_matches(keyword, list(FLAGS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgequantError(f"unknown release option {keyword!r}{hint}")
        if value is None:
            continue
        if flag.kind == "list":
            value = _flag_list(keyword, value)
        if flag.key in ARRAY_TABLES:  # [release] gguf: the flag replaces the [[gguf]] tables too
            raw.pop(flag.key, None)
        if flag.key is None:
            raw[flag.section] = value
        else:
            raw.setdefault(flag.section, {})[flag.key] = value
        given[(flag.section, flag.key)] = flag.cli
    return given


def parse_flag_args(args: list[str]) -> dict[str, Any]:
    """``--bench-ctx 256 --gguf Q8_0 --gguf Q2_K:imatrix --no-keep-base`` -> recipe flag keywords.

    Booleans take ``--x``, ``--no-x``, ``--x=false`` or ``--x false``; list flags repeat; other values
    are read as TOML scalars would be (true/false, integers, decimals, else the text)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise EdgequantError(f"unexpected argument {arg!r}; recipe options are --name VALUE (see docs/recipe.md)")
        name, eq, value = arg[2:].partition("=")
        keyword = name.replace("-", "_")
        keyword = _SPELLINGS.get(keyword, keyword)
        negated = keyword.startswith("no_") and _is_bool(keyword[3:])
        if negated or (_is_bool(keyword) and not eq and (i + 1 >= len(args) or args[i + 1].startswith("--"))):
            out[keyword[3:] if negated else keyword] = not negated
            i += 1
            continue
        flag = _known(keyword, name)
        if not eq:
            if i + 1 >= len(args):
                raise EdgequantError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if flag.kind == "list":
            out.setdefault(keyword, []).append(value)
        else:
            out[keyword] = value if flag.spec.verbatim else _flag_value(value)
    return out


def _is_bool(keyword: str) -> bool:
    return keyword in _FLAGS and _FLAGS[keyword].kind == "bool"


def _known(keyword: str, name: str) -> _Flag:
    """The flag of ``keyword``; an unknown one is an error with the nearest option."""
    if keyword in _FLAGS:
        return _FLAGS[keyword]
    close = difflib.get_close_matches(keyword, list(FLAGS), n=1)
    hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
    raise EdgequantError(f"unknown option --{name}{hint}; every recipe key has a flag, see docs/recipe.md")


def _flag_value(text: str) -> Any:
    """Flag text to the TOML value it stands for: true/false, integers, decimals, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _flag_list(keyword: str, value: Any) -> list:
    """A list flag's values: inline tables, shorthands, comma-separated lists."""
    items = [value] if isinstance(value, (str, dict)) else list(value)
    out: list = []
    for item in items:
        if isinstance(item, str) and item.strip().startswith("{"):
            out.append(_inline_table(keyword, item))
        elif isinstance(item, str) and keyword == "gates":
            out.append(_gate_shorthand(item))  # one gate per value: no comma lists
        elif isinstance(item, str):
            parse = _SHORTHANDS.get(keyword, str)
            out.extend(parse(p) for p in (p.strip() for p in item.split(",")) if p)
        else:
            out.append(item)
    return out


def _inline_table(keyword: str, text: str) -> dict:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise EdgequantError(f"--{_FLAGS[keyword].cli} {text}: not a TOML inline table ({toml_error('', e).split(': ', 1)[-1]})") from None


def _gguf_shorthand(text: str) -> str | dict:
    """``Q4_K_M``, ``Q2_K:imatrix`` or ``Q4_K_M:noimatrix``."""
    type_name, _, suffix = text.partition(":")
    if not suffix:
        return type_name
    if suffix.lower() in ("imatrix", "noimatrix"):
        return {"type": type_name, "imatrix": suffix.lower() == "imatrix"}
    raise EdgequantError(f"--gguf {text}: write TYPE, TYPE:imatrix, TYPE:noimatrix or a TOML inline table {{type=\"...\", ...}}")


def _gptq_shorthand(text: str) -> dict:
    """``4`` or ``4:64`` (bits[:group_size])."""
    bits, _, group = text.partition(":")
    try:
        d: dict = {"bits": int(bits)}
        if group:
            d["group_size"] = int(group)
        return d
    except ValueError:
        raise EdgequantError(f"--gptq {text}: write BITS, BITS:GROUP_SIZE (e.g. 4:128) or a TOML inline table {{bits=4, ...}}") from None


_GATE = re.compile(r"^\s*(?P<artifact>[^:]+?)\s*:\s*(?P<metric>[A-Za-z_0-9]+)(?:@(?P<device>[a-z]+))?\s*(?P<op><=|>=)\s*(?P<value>\S+)\s*$")


def _gate_shorthand(text: str) -> dict:
    """``Q4_K_M:kld_mean<=0.1``, ``*:same_top>=0.9``, ``Q4_K_M:tg_tps@cpu>=50``."""
    m = _GATE.match(text)
    if not m:
        raise EdgequantError(f"--gate {text}: write ARTIFACT:METRIC<=VALUE or >=VALUE (e.g. Q4_K_M:kld_mean<=0.1), "
                             f"or a TOML inline table {{artifact=\"...\", metric=\"...\", max=...}}")
    try:
        value = float(m["value"])
    except ValueError:
        raise EdgequantError(f"--gate {text}: {m['value']!r} is not a number") from None
    d = {"artifact": m["artifact"], "metric": m["metric"], ("max" if m["op"] == "<=" else "min"): value}
    if m["device"]:
        d["device"] = m["device"]
    return d


# list flags whose comma-separated parts have a shorthand (the others are plain strings)
_SHORTHANDS: dict[str, Callable[[str], Any]] = {"gguf": _gguf_shorthand, "gptq": _gptq_shorthand}
