"""Release recipes: one TOML file that says what a release holds, checked before any work starts.

```toml
[release]
source = "HuggingFaceTB/SmolLM2-135M-Instruct"   # hub id, or a folder relative to this file
gguf = ["Q8_0", "Q4_K_M", {type = "Q2_K", imatrix = true}, "IQ2_XS"]

[[gptq]]
bits = 4
group_size = 64

[[gates]]
artifact = "Q4_K_M"
metric = "kld_mean"
max = 0.1
```

Every key, its type, default and command-line flag is in ``docs/recipe.md``; ``TABLES`` below is
the list of keys the validator accepts. The parsed ``Recipe`` is a tree of frozen dataclasses;
``to_dict()`` gives a dict that ``recipe_from_dict`` accepts again (and that ``to_toml`` writes).

Validation collects every problem, then raises one ``EdgequantError`` whose lines each name the
place to fix: ``release.toml:12: unknown key 'gguf_typs' in [release] (did you mean 'gguf'?)``,
or ``--bench-ctx: ...`` for a value that came from a flag. tomllib gives line numbers only for
syntax errors, so ``find_line`` scans the raw text for a key inside its table.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomllib

import gguf

from edgequant.text import BUILTIN_ALIASES, DATASETS
from edgequant.errors import EdgequantError
from edgequant.naming import gptq_label
from edgequant.units import parse_size
from edgequant.quantize import types as qtypes

# -- the schema: tables and their keys (the validator's and the docs' list) -------------------------

TABLES: dict[str, tuple[str, ...]] = {
    "release": ("source", "output", "name", "base_type", "keep_base", "split_max_size", "gguf", "devices", "template_gate",
                "chat_template"),
    "gguf": ("type", "imatrix", "name", "output_tensor_type", "token_embedding_type", "tensor_types", "pure", "leave_output_tensor"),
    "gptq": ("bits", "group_size", "desc_act", "sym", "damp_percent", "samples", "seq_len", "seed", "name"),
    "imatrix": ("text", "ctx", "chunks", "device", "default"),
    "calibration": ("text",),
    "bench": ("text", "ctx", "chunks", "speed", "pp_tokens", "tg_tokens", "repetitions", "threads", "flash_attn"),
    "gates": ("artifact", "metric", "max", "min", "device"),
    "card": ("license", "quantized_by", "base_model", "pipeline_tag", "tags", "description", "repo_id"),
}
ARRAY_TABLES = ("gguf", "gptq", "gates")  # [[name]] (one [name] table is taken as one entry)

BASE_TYPES = ("auto", "f16", "bf16")
DEVICES = ("cpu", "cuda")
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's accepted values
DEFAULT_GGUF = ("Q8_0", "Q4_K_M")

# metric -> the bound that makes sense for it ("max": lower is better; "min": higher is better)
METRICS: dict[str, str] = {
    "ppl": "max",        # perplexity on the evaluation text
    "ppl_ratio": "max",  # ppl / reference ppl (exp of ln_ppl_ratio), 1.0 = lossless
    "kld_mean": "max",   # mean KL divergence to the reference, nats/token
    "kld_p99": "max",    # 99th percentile of the per-token KLD
    "same_top": "min",   # share of tokens whose top-1 token equals the reference's (0..1)
    "pp_tps": "min",     # prompt processing tokens/s (needs bench.speed)
    "tg_tps": "min",     # text generation tokens/s (needs bench.speed)
}
SPEED_METRICS = ("pp_tps", "tg_tps")

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# -- the dataclass tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVariant:
    """One GGUF file type. ``imatrix`` is resolved: types that need one always have it."""

    type: str  # catalogue name (edgequant.quantize.types), upper case
    imatrix: bool = False
    name: str | None = None  # artifact name when it is not the type, e.g. "Q4_K_L" for Q4_K_M + Q8_0 output
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: tuple[str, ...] = ()  # "PATTERN=TYPE", llama-quantize's --tensor-type
    pure: bool = False
    leave_output_tensor: bool = False

    @property
    def artifact(self) -> str:
        return self.name or self.type

    def to_dict(self) -> dict:
        return {"type": self.type, "imatrix": self.imatrix, "name": self.name, "output_tensor_type": self.output_tensor_type,
                "token_embedding_type": self.token_embedding_type, "tensor_types": list(self.tensor_types),
                "pure": self.pure, "leave_output_tensor": self.leave_output_tensor}


@dataclass(frozen=True)
class GPTQVariant:
    """One GPTQ checkpoint (GPTQModel's QuantizeConfig plus calibration sampling)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per column
    desc_act: bool = False  # act-order; False keeps the fast exllama/marlin kernels usable
    sym: bool = True
    damp_percent: float = 0.05
    samples: int = 128  # calibration sequences
    seq_len: int = 512  # tokens per calibration sequence (128 x 512 fits the built-in corpus)
    seed: int = 0
    name: str | None = None

    @property
    def canonical_name(self) -> str:
        """``GPTQ-4bit-128g``; ``-perchannel`` for group_size -1; ``-act`` with desc_act; ``-asym`` without sym."""
        return gptq_label(self.bits, self.group_size, self.desc_act, self.sym)

    @property
    def artifact(self) -> str:
        return self.name or self.canonical_name

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
                "damp_percent": self.damp_percent, "samples": self.samples, "seq_len": self.seq_len,
                "seed": self.seed, "name": self.name}


@dataclass(frozen=True)
class ImatrixSettings:
    text: str | None = None  # None: the calibration text
    ctx: int = 512
    chunks: int | None = None  # None: every chunk of the text
    device: str | None = None  # None: cuda when the recipe's devices include it, else cpu
    default: bool = False  # use the imatrix for GGUF types that do not say imatrix = true/false

    def to_dict(self) -> dict:
        return {"text": self.text, "ctx": self.ctx, "chunks": self.chunks, "device": self.device, "default": self.default}


@dataclass(frozen=True)
class CalibrationSettings:
    text: str | None = None  # None: the built-in corpus (pydoc)

    def to_dict(self) -> dict:
        return {"text": self.text}


@dataclass(frozen=True)
class BenchSettings:
    text: str | None = None  # evaluation text; None: the built-in corpus (pydoc)
    ctx: int = 512
    chunks: int | None = None  # None: every chunk of the text
    speed: bool = True
    pp_tokens: int = 512  # llama-bench's pp512
    tg_tokens: int = 128  # llama-bench's tg128
    repetitions: int = 3
    threads: int | None = None  # None: llama.cpp's choice
    flash_attn: bool = True

    def to_dict(self) -> dict:
        return {"text": self.text, "ctx": self.ctx, "chunks": self.chunks, "speed": self.speed, "pp_tokens": self.pp_tokens,
                "tg_tokens": self.tg_tokens, "repetitions": self.repetitions, "threads": self.threads,
                "flash_attn": self.flash_attn}


@dataclass(frozen=True)
class Gate:
    """A quality/speed threshold on one artifact (``*``: every quantized artifact)."""

    artifact: str
    metric: str
    max: float | None = None
    min: float | None = None
    device: str | None = None  # speed metrics only; resolved to the first device when not given

    def describe(self) -> str:
        where = f"@{self.device}" if self.device else ""
        bound = f"<= {self.max:g}" if self.max is not None else f">= {self.min:g}"
        return f"{self.artifact}: {self.metric}{where} {bound}"

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The gated number from a manifest artifact's ``metrics`` dict; None when not measured."""
        if not metrics:
            return None
        if self.metric in SPEED_METRICS:
            speed = (metrics.get("speed") or {}).get(self.device or "cpu") or {}
            v = speed.get(self.metric)
        elif self.metric == "ppl_ratio":
            ln = metrics.get("ln_ppl_ratio")
            v = math.exp(ln) if isinstance(ln, (int, float)) else metrics.get("ppl_ratio")
        else:
            v = metrics.get(self.metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def passes(self, value: float | None) -> bool:
        """Unmeasured fails: a gate that cannot be checked must not pass silently."""
        if value is None or math.isnan(value):
            return False
        if self.max is not None and value > self.max:
            return False
        return not (self.min is not None and value < self.min)

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "metric": self.metric, "max": self.max, "min": self.min, "device": self.device}


@dataclass(frozen=True)
class CardSettings:
    license: str | None = None  # None: the source's license (README front matter)
    quantized_by: str | None = None
    base_model: str | None = None  # None: the source's hub id
    pipeline_tag: str = "text-generation"
    tags: tuple[str, ...] = ()
    description: str | None = None
    repo_id: str | None = None  # where the release will be uploaded: download commands in the card

    def to_dict(self) -> dict:
        return {"license": self.license, "quantized_by": self.quantized_by, "base_model": self.base_model,
                "pipeline_tag": self.pipeline_tag, "tags": list(self.tags), "description": self.description,
                "repo_id": self.repo_id}


@dataclass(frozen=True)
class _Origin:
    """Where a recipe came from: the raw dict, the TOML text (for line numbers), the file, flag keys."""

    raw: dict
    text: str | None
    file: str | None
    flags: dict = field(default_factory=dict)  # (section, key) -> flag name


@dataclass(frozen=True)
class Recipe:
    source: str  # as written: a hub id or a folder (relative to base_dir)
    name: str
    output: str  # as written (relative to base_dir); default dist/<name>
    base_type: str = "auto"
    keep_base: bool = True
    split_max_size: int = 0  # bytes; 0: no split
    gguf: tuple[GGUFVariant, ...] = tuple(GGUFVariant(t) for t in DEFAULT_GGUF)
    gptq: tuple[GPTQVariant, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    template_gate: bool = True
    chat_template: str | None = None  # embed this template file instead of the source's (convert --chat-template)
    imatrix: ImatrixSettings = ImatrixSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    bench: BenchSettings = BenchSettings()
    gates: tuple[Gate, ...] = ()
    card: CardSettings = CardSettings()
    base_dir: str = "."  # the recipe file's folder (the working folder for recipe_from_options)
    _origin: _Origin | None = field(default=None, compare=False, repr=False)
    # after select(): the whole recipe's artifacts, so a release folder keeps publishing the ones --only left out
    left_out: tuple = field(default=(), compare=False, repr=False)

    # -- resolved views for the orchestrator --

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def source_is_local(self) -> bool:
        return self.resolve(self.source).exists()

    @property
    def source_ref(self) -> str:
        """What Checkpoint/convert accept: an absolute folder, or the hub id."""
        return str(self.resolve(self.source)) if self.source_is_local else self.source

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output)

    @property
    def base_artifact_names(self) -> tuple[str, ...]:
        """Names that mean the 16-bit base file (gate targets, --only)."""
        return ("base", "F16", "BF16") if self.base_type == "auto" else ("base", self.base_type.upper())

    @property
    def artifact_names(self) -> list[str]:
        return [v.artifact for v in self.gguf] + [v.artifact for v in self.gptq]

    @property
    def needs_imatrix(self) -> bool:
        return any(v.imatrix for v in self.gguf)

    @property
    def imatrix_device(self) -> str:
        return self.imatrix.device or ("cuda" if "cuda" in self.devices else "cpu")

    def text_source(self, which: str) -> str | None:
        """``calibration``, ``imatrix`` or ``bench``: what ``edgequant.text.load_text`` accepts
        (None for the built-in corpus, a dataset name, or an absolute file path)."""
        if which == "imatrix":
            value = self.imatrix.text if self.imatrix.text is not None else self.calibration.text
        elif which == "calibration":
            value = self.calibration.text
        elif which == "bench":
            value = self.bench.text
        else:
            raise ValueError(f"unknown text {which!r}")
        if value in BUILTIN_ALIASES:
            return None
        if value in DATASETS:
            return value
        return str(self.resolve(value))

    def gate_device(self, gate: Gate) -> str | None:
        if gate.metric not in SPEED_METRICS:
            return None
        return gate.device or self.devices[0]

    # -- conversions --

    def to_dict(self) -> dict:
        """Plain JSON/TOML data; ``recipe_from_dict(r.to_dict(), base_dir=r.base_dir) == r``."""
        return {
            "release": {"source": self.source, "output": self.output, "name": self.name, "base_type": self.base_type,
                        "keep_base": self.keep_base, "split_max_size": self.split_max_size,
                        "gguf": [v.to_dict() for v in self.gguf], "devices": list(self.devices),
                        "template_gate": self.template_gate, "chat_template": self.chat_template},
            "imatrix": self.imatrix.to_dict(),
            "calibration": self.calibration.to_dict(),
            "bench": self.bench.to_dict(),
            "card": self.card.to_dict(),
            "gptq": [v.to_dict() for v in self.gptq],
            "gates": [g.to_dict() for g in self.gates],
        }

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def with_overrides(self, **flags: Any) -> Recipe:
        """The recipe with command-line flags applied as if written in the file (``None``: not given).

        Flag names are listed in ``FLAGS``; values are validated like the file's, and errors name the flag."""
        origin = self._origin or _Origin(raw=self.to_dict(), text=None, file=None)
        raw = copy.deepcopy(origin.raw)
        given = _apply_flags(raw, flags)
        return _build(raw, base_dir=self.base_dir, text=origin.text, file=origin.file, flags={**origin.flags, **given})

    def select(self, only: Iterable[str]) -> Recipe:
        """Keep only the named artifacts (``--only``); the base file always stays (it is the source and reference).

        A name is an artifact name (``Q4_K_M``, ``Q4_K_L``, ``GPTQ-4bit-128g``), case-insensitive; ``gguf`` or ``gptq``
        keeps every artifact of that kind; a GPTQ name prefix keeps every variant it starts (``gptq-4bit`` keeps
        ``GPTQ-4bit-128g`` and ``GPTQ-4bit-32g-act``); ``base``/``F16``/``BF16`` name the base file. Gates on
        artifacts that are left out are dropped."""
        names = [n.strip() for item in only for n in str(item).split(",") if n.strip()]
        keep_gguf: set[int] = set()
        keep_gptq: set[int] = set()
        unknown = []
        base = {b.casefold() for b in self.base_artifact_names}
        for requested in names:
            key = qtypes.ALIASES.get(requested.upper(), requested).casefold()
            hit = False
            if key == "gguf":
                keep_gguf.update(range(len(self.gguf)))
                hit = True
            if key == "gptq":
                keep_gptq.update(range(len(self.gptq)))
                hit = True
            for i, v in enumerate(self.gguf):
                if v.artifact.casefold() == key:
                    keep_gguf.add(i)
                    hit = True
            for i, v in enumerate(self.gptq):
                a = v.artifact.casefold()
                if a == key or (a.startswith(key + "-") and key.startswith("gptq-")):
                    keep_gptq.add(i)
                    hit = True
            if key in base:
                hit = True
            if not hit:
                unknown.append(requested)
        if unknown:
            available = [*self.artifact_names, *self.base_artifact_names[1:]]
            msgs = []
            for u in unknown:
                folded = {a.casefold(): a for a in available}
                close = difflib.get_close_matches(u.casefold(), list(folded), n=1, cutoff=0.5)
                hint = f" (did you mean {folded[close[0]]!r}?)" if close else ""
                msgs.append(f"--only {u}: not an artifact of this recipe{hint}; artifacts: {', '.join(available) or 'none'}")
            raise EdgequantError("\n".join(msgs))
        gguf_kept = tuple(v for i, v in enumerate(self.gguf) if i in keep_gguf)
        gptq_kept = tuple(v for i, v in enumerate(self.gptq) if i in keep_gptq)
        kept_names = {v.artifact for v in gguf_kept} | {v.artifact for v in gptq_kept} | set(self.base_artifact_names)
        gates = tuple(g for g in self.gates if g.artifact == "*" or g.artifact in kept_names)
        left_out = tuple(v for i, v in enumerate(self.gguf) if i not in keep_gguf) + \
            tuple(v for i, v in enumerate(self.gptq) if i not in keep_gptq)
        return replace(self, gguf=gguf_kept, gptq=gptq_kept, gates=gates, _origin=None, left_out=self.left_out + left_out)


# -- loading -----------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is reported with its line before any work."""
    path = Path(path)
    if not path.is_file():
        raise EdgequantError(f"recipe {path} does not exist; pass a TOML recipe file (see docs/recipe.md)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgequantError(_toml_error(str(path), e)) from None
    return _build(raw, base_dir=str(path.resolve().parent), text=text, file=str(path))


def recipe_from_dict(raw: Mapping[str, Any], *, base_dir: str | Path = ".") -> Recipe:
    """Validate a recipe given as data (the shape of ``Recipe.to_dict()`` or of a parsed TOML file)."""
    return _build(copy.deepcopy(dict(raw)), base_dir=str(base_dir), text=None, file=None)


def recipe_from_options(source: str | Path, base_dir: str | Path = ".", **flags: Any) -> Recipe:
    """A one-off recipe from command-line flags (``FLAGS`` lists them; ``None`` means not given)."""
    raw: dict = {"release": {"source": str(source)}}
    given = _apply_flags(raw, flags)
    given[("release", "source")] = "source"
    return _build(raw, base_dir=str(Path(base_dir).resolve()), text=None, file=None, flags=given)


def _toml_error(file: str, e: Exception) -> str:
    msg = str(e)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", msg)
    if m:
        return f"{file}:{m.group(1)}:{m.group(2)}: invalid TOML: {msg[:m.start()]}"
    m = re.search(r"\s*\(at end of document\)\s*$", msg)
    if m:
        return f"{file}: invalid TOML at the end of the file: {msg[:m.start()]}"
    return f"{file}: invalid TOML: {msg}"


# -- flags: every recipe key has one ----------------------------------------------------------------


def _flag_table() -> dict[str, tuple[str, str | None]]:
    flags: dict[str, tuple[str, str | None]] = {}
    for section, keys in TABLES.items():
        if section in ARRAY_TABLES:
            continue
        for key in keys:
            flags[key if section == "release" else f"{section}_{key}"] = (section, key)
    flags["gguf"] = ("release", "gguf")
    flags["gptq"] = ("gptq", None)
    flags["gates"] = ("gates", None)
    del flags["source"]  # the positional argument
    return flags


# flag keyword (the CLI option is --flag-name with dashes) -> (table, key); key None: the whole array
FLAGS: dict[str, tuple[str, str | None]] = _flag_table()


def _apply_flags(raw: dict, flags: Mapping[str, Any]) -> dict:
    """Write flag values into the raw recipe dict; return {(section, key): flag} for error locations."""
    given: dict = {}
    for flag, value in flags.items():
        if flag not in FLAGS:
            close = difflib.get_close_matches(flag, list(FLAGS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgequantError(f"unknown release option {flag!r}{hint}")
        if value is None:
            continue
        section, key = FLAGS[flag]
        if flag in ("gguf", "gptq", "gates", "devices", "card_tags"):
            value = _flag_list(flag, value)
        if flag == "gguf":
            raw.setdefault("release", {})["gguf"] = value
            raw.pop("gguf", None)
            given[("release", "gguf")] = flag
        elif key is None:
            raw[section] = value
            given[(section, None)] = flag
        else:
            raw.setdefault(section, {})[key] = value
            given[(section, key)] = flag
    return given


def _flag_list(flag: str, value: Any) -> list:
    items = [value] if isinstance(value, (str, dict)) else list(value)
    out: list = []
    for item in items:
        if isinstance(item, str) and item.strip().startswith("{"):
            out.append(_inline_table(flag, item))
        elif isinstance(item, str) and flag == "gates":
            out.append(_gate_shorthand(item))
        elif isinstance(item, str):
            parts = [p.strip() for p in item.split(",") if p.strip()]
            if flag == "gguf":
                out.extend(_gguf_shorthand(p) for p in parts)
            elif flag == "gptq":
                out.extend(_gptq_shorthand(p) for p in parts)
            else:
                out.extend(parts)
        else:
            out.append(item)
    return out


def _inline_table(flag: str, text: str) -> dict:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise EdgequantError(f"--{_dash(flag)} {text}: not a TOML inline table ({_toml_error('', e).split(': ', 1)[-1]})") from None


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


def _dash(flag: str) -> str:
    return "gate" if flag == "gates" else ("device" if flag == "devices" else flag.replace("_", "-"))


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
    headers: list[tuple[str | None, int, int]] = [(None, 0, -1)]  # (name, occurrence, line index)
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            name = m.group(2)
            headers.append((name, seen.get(name, 0), i))
            seen[name] = seen.get(name, 0) + 1
    start = end = None
    for n, (name, occ, i) in enumerate(headers):
        if name == section and (occ == index or section is None):
            start = i + 1
            end = headers[n + 1][2] if n + 1 < len(headers) else len(lines)
            if key is None and value is None:
                return i + 1 if i >= 0 else None
            break
    if start is None:
        return _find_dotted(lines, section, key)
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


# -- validation ---------------------------------------------------------------------------------------


class _Checker:
    """Collects problems, each prefixed with where to fix it (file:line, or the flag)."""

    def __init__(self, text: str | None, file: str | None, flags: dict):
        self.text, self.file, self.flags = text, file, flags
        self.errors: list[str] = []

    def where(self, section: str | None, key: str | None = None, *, index: int = 0, value: Any = None,
              flag_key: tuple | None = None) -> str:
        for k in (flag_key, (section, key), (section, None)):
            if k is not None and k in self.flags:
                return f"--{_dash(self.flags[k])}"
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


def _label(section: str, index: int | None) -> str:
    if index is None:
        return f"[{section}]"
    return f"[[{section}]] #{index + 1}"


class _Table:
    """Typed access to one table's values, reporting type errors at the key's line."""

    def __init__(self, chk: _Checker, data: Mapping[str, Any], section: str, index: int | None = None,
                 label: str | None = None, flag_key: tuple | None = None, line_section: str | None = None, value_hint: Any = None):
        self.chk, self.data, self.section, self.index = chk, data, section, index
        self.label = label or _label(section, index)
        self.flag_key = flag_key
        self.line_section = line_section or section  # where the keys live in the text
        self.value_hint = value_hint  # inline tables: a value that identifies the line (e.g. the type)

    def err(self, key: str | None, message: str, value: Any = None) -> None:
        self.chk.error(message, self.line_section, key, index=self.index or 0, value=value if value is not None else self.value_hint,
                       flag_key=self.flag_key or (self.section, key))

    def unknown_keys(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            else:
                elsewhere = [s for s, keys in TABLES.items() if key in keys and s != self.section]
                hint = f" (it belongs in {_label(elsewhere[0], None if elsewhere[0] not in ARRAY_TABLES else 0).replace(' #1', '')})" if elsewhere else ""
            self.err(key, f"unknown key {key!r} in {self.label}{hint}")

    def str(self, key: str, default: str | None, *, choices: Iterable[str] | None = None, lower: bool = False) -> str | None:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            self.err(key, f"{key} in {self.label} must be a string, not {_toml_type(v)} ({_show(v)})", value=v)
            return default
        if lower:
            v = v.lower()
        if choices is not None and v not in choices:
            self.err(key, f"{key} = {_show(self.data.get(key))} in {self.label}: use one of {', '.join(map(repr, choices))}", value=self.data.get(key))
            return default
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.err(key, f"{key} in {self.label} must be true or false, not {_toml_type(v)} ({_show(v)})", value=v)
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
                self.err(key, f"{key} in {self.label} must be an integer, not {_toml_type(v)} ({_show(v)})", value=v)
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
            self.err(key, f"{key} in {self.label} must be a number, not {_toml_type(v)} ({_show(v)})", value=v)
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


def _toml_type(v: Any) -> str:
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


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def _build(raw: dict, *, base_dir: str, text: str | None, file: str | None, flags: dict | None = None) -> Recipe:
    chk = _Checker(text, file, flags or {})
    base = Path(base_dir)

    for section, value in raw.items():
        if section not in TABLES:
            close = difflib.get_close_matches(section, list(TABLES), n=1, cutoff=0.6)
            in_release = section in TABLES["release"]
            hint = (f" (did you mean [{close[0]}]?)" if close else
                    f" (put it under [release])" if in_release else f"; tables: {', '.join(f'[{t}]' for t in TABLES)}")
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

    def table(name: str) -> dict:
        v = raw.get(name)
        return v if isinstance(v, dict) else {}

    def entries(name: str) -> list[dict]:
        v = raw.get(name)
        if isinstance(v, dict):
            return [v]
        if isinstance(v, list):
            return [x for x in v if isinstance(x, dict)]
        return []

    # [release]
    rel = _Table(chk, table("release"), "release")
    rel.unknown_keys(TABLES["release"])
    source = rel.str("source", None)
    source_ok = False
    if source is None and "source" not in rel.data:
        chk.error("no source: add source = \"org/name\" (hub id) or a model folder under [release]", "release")
    elif source is not None:
        source_ok = _check_source(rel, source, base)
    base_type = rel.str("base_type", "auto", choices=BASE_TYPES, lower=True)
    name = rel.str("name", None)
    if name is None and source_ok and source:
        name = Path(source.rstrip("/\\")).name
    if name is not None and not ARTIFACT_NAME.match(name):
        rel.err("name", f"name {name!r}: use letters, digits and . _ + - only (it becomes file names)", value=name)
    output = rel.str("output", None)
    if output is None and name:
        output = f"dist/{name}"
    if output is not None:
        out_path = Path(output).expanduser()
        out_path = out_path if out_path.is_absolute() else base / out_path
        if out_path.exists() and not out_path.is_dir():
            rel.err("output", f"output {output!r} is an existing file; name a folder", value=output)
    keep_base = rel.bool("keep_base", True)
    template_gate = rel.bool("template_gate", True)
    chat_template = rel.str("chat_template", None)
    if chat_template is not None and not (Path(chat_template).expanduser() if Path(chat_template).expanduser().is_absolute()
                                          else base / chat_template).is_file():
        rel.err("chat_template", f"chat_template {chat_template!r}: no such file (a .jinja, or a .json with chat_template)",
                value=chat_template)
    split = _size(rel, rel.data.get("split_max_size"))
    devices = rel.str_list("devices", ("cpu",))
    devices = tuple(d.lower() for d in devices)
    for d in devices:
        if d not in DEVICES:
            rel.err("devices", f"devices: unknown device {d!r}; use {' and/or '.join(map(repr, DEVICES))}", value=d)
    if not devices:
        rel.err("devices", "devices = []: list at least one of \"cpu\", \"cuda\"")
        devices = ("cpu",)
    if len(set(devices)) != len(devices):
        rel.err("devices", f"devices lists a device twice: {list(devices)}")
        devices = tuple(dict.fromkeys(devices))

    # [imatrix], [calibration], [bench]
    im = _Table(chk, table("imatrix"), "imatrix")
    im.unknown_keys(TABLES["imatrix"])
    imatrix = ImatrixSettings(
        text=_text(im, "text", base), ctx=im.int("ctx", 512, minimum=1), chunks=im.int("chunks", None, minimum=1),
        device=im.str("device", None, choices=DEVICES, lower=True), default=im.bool("default", False))
    cal = _Table(chk, table("calibration"), "calibration")
    cal.unknown_keys(TABLES["calibration"])
    calibration = CalibrationSettings(text=_text(cal, "text", base))
    b = _Table(chk, table("bench"), "bench")
    b.unknown_keys(TABLES["bench"])
    bench = BenchSettings(
        text=_text(b, "text", base), ctx=b.int("ctx", 512, minimum=1), chunks=b.int("chunks", None, minimum=1),
        speed=b.bool("speed", True), pp_tokens=b.int("pp_tokens", 512, minimum=1), tg_tokens=b.int("tg_tokens", 128, minimum=1),
        repetitions=b.int("repetitions", 3, minimum=1), threads=b.int("threads", None, minimum=1), flash_attn=b.bool("flash_attn", True))

    # GGUF types: [release] gguf = [...] and/or [[gguf]] tables
    gguf_variants = _gguf_variants(chk, rel, entries("gguf"), imatrix.default, "gguf" in raw)

    # [[gptq]]
    gptq_variants = []
    for i, e in enumerate(entries("gptq")):
        t = _Table(chk, e, "gptq", i)
        t.unknown_keys(TABLES["gptq"])
        damp = t.float("damp_percent", 0.05)
        if damp is not None and not 0 < damp < 1:
            t.err("damp_percent", f"damp_percent = {damp:g} in {t.label}: use a fraction between 0 and 1 (0.05 is GPTQModel's default)", value=damp)
            damp = 0.05
        v = GPTQVariant(
            bits=t.int("bits", 4, choices=GPTQ_BITS), group_size=t.int("group_size", 128, choices=GPTQ_GROUP_SIZES, hint=" (-1: per column)"),
            desc_act=t.bool("desc_act", False), sym=t.bool("sym", True), damp_percent=damp,
            samples=t.int("samples", 128, minimum=1), seq_len=t.int("seq_len", 512, minimum=16), seed=t.int("seed", 0, minimum=0),
            name=_artifact_name(t, "name"))
        gptq_variants.append(v)

    # unique artifact names
    seen: dict[str, str] = {}
    base_names = {n.casefold() for n in (("base", "F16", "BF16") if base_type == "auto" else ("base", base_type.upper()))}
    for kind, variants in (("gguf", gguf_variants), ("gptq", gptq_variants)):
        for i, v in enumerate(variants):
            key = v.artifact.casefold()
            if key in base_names:
                chk.error(f"{v.artifact} is the base file's name; the base is always made (keep_base decides whether it ships)",
                          "release" if kind == "gguf" else "gptq", "gguf" if kind == "gguf" else None, index=0 if kind == "gguf" else i,
                          value=v.type if kind == "gguf" else None)
            elif key in seen:
                chk.error(f"two artifacts are named {v.artifact!r}; give one a name = \"...\"", kind if kind == "gptq" else "release",
                          None if kind == "gptq" else "gguf", index=i if kind == "gptq" else 0)
            seen[key] = v.artifact

    # [[gates]]
    all_names = {n.casefold(): n for n in [*seen.values(), *(("base", "F16", "BF16") if base_type == "auto" else ("base", base_type.upper()))]}
    gates = []
    for i, e in enumerate(entries("gates")):
        g = _gate(chk, e, i, all_names, devices, bench.speed)
        if g is not None:
            gates.append(g)

    # [card]
    c = _Table(chk, table("card"), "card")
    c.unknown_keys(TABLES["card"])
    card = CardSettings(
        license=c.str("license", None), quantized_by=c.str("quantized_by", None), base_model=c.str("base_model", None),
        pipeline_tag=c.str("pipeline_tag", "text-generation"), tags=c.str_list("tags", ()), description=c.str("description", None),
        repo_id=c.str("repo_id", None))
    for key in ("base_model", "repo_id"):
        v = getattr(card, key)
        if v is not None and not HUB_ID.match(v):
            c.err(key, f"{key} = {_show(v)} in [card]: use a Hugging Face hub id like \"org/name\"", value=v)

    chk.raise_if_any()
    return Recipe(
        source=source or "", name=name or "", output=output or "", base_type=base_type, keep_base=keep_base,
        split_max_size=split, gguf=tuple(gguf_variants), gptq=tuple(gptq_variants), devices=devices,
        template_gate=template_gate, chat_template=chat_template, imatrix=imatrix, calibration=calibration, bench=bench, gates=tuple(gates), card=card,
        base_dir=base_dir, _origin=_Origin(raw=raw, text=text, file=file, flags=dict(flags or {})))


def _check_source(rel: _Table, source: str, base: Path) -> bool:
    p = Path(source).expanduser()
    local = p if p.is_absolute() else base / p
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


def _size(rel: _Table, v: Any) -> int:
    """``split_max_size``: ``"50G"``, ``"500M"``, a byte count, or 0 (no split); decimal units like llama.cpp."""
    if v is None:
        return 0
    if isinstance(v, bool):
        rel.err("split_max_size", "split_max_size must be a size like \"50G\" or a byte count, not a boolean", value=v)
        return 0
    if isinstance(v, int):
        if v < 0:
            rel.err("split_max_size", f"split_max_size = {v}: must be 0 (no split) or a positive size", value=v)
            return 0
        return v
    if isinstance(v, str):
        try:
            n = parse_size(v)
            if n >= 0:
                return n
        except ValueError:
            pass
    rel.err("split_max_size", f"split_max_size = {_show(v)}: use a size like \"50G\", \"500M\" or a byte count", value=v)
    return 0


def _text(t: _Table, key: str, base: Path) -> str | None:
    v = t.str(key, None)
    if v is None or v in BUILTIN_ALIASES or v in DATASETS:
        return v
    p = Path(v).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        t.err(key, f"{key} = {_show(v)} in {t.label}: no such file (paths are relative to the recipe's folder); "
                   f"use \"pydoc\" (built in), {', '.join(repr(d) for d in DATASETS)} or a text file", value=v)
    return v


def _artifact_name(t: _Table, key: str) -> str | None:
    v = t.str(key, None)
    if v is not None and not ARTIFACT_NAME.match(v):
        t.err(key, f"name = {_show(v)} in {t.label}: use letters, digits and . _ + - only (it becomes a file name)", value=v)
        return None
    return v


def _ggml_type(t: _Table, key: str, value: str) -> str | None:
    try:
        return gguf.GGMLQuantizationType[value.upper()].name
    except KeyError:
        names = [q.name for q in gguf.GGMLQuantizationType]
        close = difflib.get_close_matches(value.upper(), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.err(key, f"{key} = {_show(value)} in {t.label}: not a ggml tensor type{hint}", value=value)
        return None


def _quant_type(t: _Table, key: str, value: Any) -> qtypes.QuantType | None:
    if not isinstance(value, str):
        t.err(key, f"GGUF type in {t.label} must be a type name like \"Q4_K_M\", not {_toml_type(value)} ({_show(value)})", value=value)
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


def _gguf_variants(chk: _Checker, rel: _Table, tables: list[dict], imatrix_default: bool, has_tables: bool) -> list[GGUFVariant]:
    listed = rel.data.get("gguf")
    if listed is None:
        items: list[tuple[Any, _Table | None, int]] = [] if has_tables else [(t, None, -1) for t in DEFAULT_GGUF]
    elif not isinstance(listed, list):
        rel.err("gguf", "gguf in [release] must be a list, e.g. gguf = [\"Q8_0\", \"Q4_K_M\", {type = \"Q2_K\", imatrix = true}]")
        items = []
    else:
        items = [(x, None, i) for i, x in enumerate(listed)]
    for i, e in enumerate(tables):
        items.append((e, _Table(chk, e, "gguf", i), i))

    out = []
    for entry, tbl, i in items:
        if tbl is None:  # an entry of release.gguf (or the default)
            if isinstance(entry, str):
                tbl = _Table(chk, {"type": entry}, "gguf", label=f"[release] gguf", flag_key=("release", "gguf"),
                             line_section="release", value_hint=entry)
                tbl.err = _entry_err(chk, entry, None)  # type: ignore[method-assign]
            elif isinstance(entry, dict):
                hint = entry.get("type") if isinstance(entry.get("type"), str) else None
                tbl = _Table(chk, entry, "gguf", label=f"[release] gguf entry {i + 1}", flag_key=("release", "gguf"),
                             line_section="release", value_hint=hint)
                tbl.err = _entry_err(chk, hint, tbl)  # type: ignore[method-assign]
            else:
                rel.err("gguf", f"gguf entry {i + 1} in [release] must be a type name or an inline table {{type = \"...\"}}, "
                                f"not {_toml_type(entry)} ({_show(entry)})")
                continue
        tbl.unknown_keys(TABLES["gguf"])
        if "type" not in tbl.data:
            tbl.err("type", f"{tbl.label} has no type: add type = \"Q4_K_M\" (or another catalogue type)")
            continue
        qt = _quant_type(tbl, "type", tbl.data["type"])
        if qt is None:
            continue
        declared = tbl.data.get("imatrix")
        use = tbl.bool("imatrix", imatrix_default) if declared is not None else imatrix_default
        if qt.needs_imatrix:
            if declared is False:
                tbl.err("imatrix", f"{qt.name} needs an importance matrix; remove imatrix = false (or choose another type)", value=False)
            use = True
        ott = tbl.str("output_tensor_type", None)
        tet = tbl.str("token_embedding_type", None)
        tensor_types = tbl.str_list("tensor_types", ())
        for tt in tensor_types:
            pattern, sep, type_name = tt.rpartition("=")
            if not sep or not pattern:
                tbl.err("tensor_types", f"tensor_types entry {tt!r} in {tbl.label}: write PATTERN=TYPE, e.g. \"ffn_down=q6_k\"", value=tt)
                continue
            try:
                re.compile(pattern)
            except re.error as e:
                tbl.err("tensor_types", f"tensor_types entry {tt!r} in {tbl.label}: bad regular expression ({e})", value=tt)
            _ggml_type(tbl, "tensor_types", type_name)
        out.append(GGUFVariant(
            type=qt.name, imatrix=use, name=_artifact_name(tbl, "name"),
            output_tensor_type=_ggml_type(tbl, "output_tensor_type", ott) if ott else None,
            token_embedding_type=_ggml_type(tbl, "token_embedding_type", tet) if tet else None,
            tensor_types=tensor_types, pure=tbl.bool("pure", False), leave_output_tensor=tbl.bool("leave_output_tensor", False)))
    return out


def _entry_err(chk: _Checker, type_value: str | None, tbl: _Table | None):
    """Errors of a release.gguf entry: the line holding its key (inline table) or its type string."""

    def err(key: str | None, message: str, value: Any = None) -> None:
        if tbl is not None and key is not None and key != "type" and key in tbl.data and chk.text and ("release", "gguf") not in chk.flags:
            # the key's own line, searched from the line of the entry's type onwards
            entry_line = find_line(chk.text, "release", "gguf", value=type_value) if type_value else None
            line = find_line(chk.text, "release", key, after=entry_line)
            where = f"{chk.file}:{line}" if line else str(chk.file)
        else:
            where = chk.where("release", "gguf", value=type_value, flag_key=("release", "gguf"))
        chk.errors.append(f"{where}: {message}")

    return err


def _gate(chk: _Checker, e: dict, i: int, names: dict[str, str], devices: tuple[str, ...], speed: bool) -> Gate | None:
    t = _Table(chk, e, "gates", i)
    t.unknown_keys(TABLES["gates"])
    ok = True
    artifact = t.str("artifact", None)
    if artifact is None:
        t.err(None, f"{t.label} has no artifact: add artifact = \"Q4_K_M\" (or \"*\" for every quantized artifact)")
        ok = False
    elif artifact != "*":
        if artifact.casefold() in names:
            artifact = names[artifact.casefold()]
        else:
            close = difflib.get_close_matches(artifact, list(names.values()), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            t.err("artifact", f"gate artifact {artifact!r} is not in this recipe{hint}; artifacts: {', '.join(names.values())}, or \"*\"",
                  value=artifact)
            ok = False
    metric = t.str("metric", None)
    if metric is None:
        t.err(None, f"{t.label} has no metric: add metric = one of {', '.join(map(repr, METRICS))}")
        return None
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, list(METRICS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.err("metric", f"unknown metric {metric!r} in {t.label}{hint}; use one of {', '.join(METRICS)}", value=metric)
        return None
    hi, lo = t.float("max", None), t.float("min", None)
    if (e.get("max") is not None and hi is None) or (e.get("min") is not None and lo is None):
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
    device = t.str("device", None, choices=DEVICES, lower=True)
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
    if not ok:
        return None
    return Gate(artifact=artifact, metric=metric, max=hi, min=lo, device=(device or devices[0]) if metric in SPEED_METRICS else None)


# -- a small TOML writer (the recipe's own data only) ----------------------------------------------------


def to_toml(recipe: Mapping[str, Any]) -> str:
    """Write a ``Recipe.to_dict()`` as a recipe file (``None`` values and defaults of GGUF entries left out).

    ``load_recipe`` of the text gives the same recipe back."""
    lines: list[str] = []
    scalar_tables = [k for k, v in recipe.items() if isinstance(v, dict)]
    order = [t for t in ("release", "imatrix", "calibration", "bench", "card") if t in scalar_tables]
    order += [t for t in scalar_tables if t not in order]
    for name in order:
        body = _toml_table_body(recipe[name], compact_gguf=(name == "release"))
        if body:
            lines += ["" if lines else None, f"[{name}]", *body]
    for name, value in recipe.items():
        if isinstance(value, list) and all(isinstance(x, dict) for x in value):
            for entry in value:
                lines += ["", f"[[{name}]]", *_toml_table_body(entry)]
    return "\n".join(x for x in lines if x is not None).strip("\n") + "\n"


_GGUF_DEFAULTS = {k: v for k, v in GGUFVariant("Q4_0").to_dict().items() if k != "type"}


def _toml_table_body(table: Mapping[str, Any], compact_gguf: bool = False) -> list[str]:
    out = []
    for key, value in table.items():
        if value is None:
            continue
        if compact_gguf and key == "gguf" and isinstance(value, list):
            items = []
            for e in value:
                if isinstance(e, dict):
                    e = {k: v for k, v in e.items() if v is not None and not (k in _GGUF_DEFAULTS and _GGUF_DEFAULTS[k] == v)}
                    items.append(_toml_value(e["type"]) if list(e) == ["type"] else _toml_value(e))
                else:
                    items.append(_toml_value(e))
            out.append(f"{key} = [{', '.join(items)}]")
            continue
        out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(v: Any) -> str:
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
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
