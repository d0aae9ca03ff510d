"""The recipe's schema: every key is one dataclass field, and its metadata says the rest.

A field's ``metadata["key"]`` is a ``Key``: its doc, its choices or minimum, a named check
(``check.py`` and ``build.py`` carry them out) and how its flag is spelled. The field's type
annotation is the key's TOML type, its default is the key's default. ``TABLES``, ``FLAGS``,
``to_dict``, the validator and the TOML writer are all read off these fields, so adding a key
is adding a field (and a line of docs/recipe.md).

Defaults that the library also has come from the library's option dataclasses
(``GPTQOptions``, ``BenchOptions``): ``Key.option`` names the option a key mirrors.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Iterable, Mapping

from edgequant.bench.options import BenchOptions
from edgequant.export.options import CONVERTERS, DEFAULT_CONVERTER, DEFAULT_SLIDING_WINDOW, SLIDING_WINDOW_MODES
from edgequant.mix.target import Target, TargetOptions, parse_target
from edgequant.naming import gptq_label
from edgequant.quantize.expert_coverage import DEFAULT_POLICY as DEFAULT_UNSEEN_EXPERTS, POLICIES as UNSEEN_EXPERTS
from edgequant.quantize.gptq_options import MOE_ROUTINGS, GPTQOptions
from edgequant.quantize.imatrix_llamacpp import ENGINES as IMATRIX_ENGINES
from edgequant.text import BUILTIN_ALIASES, DATASETS

BASE_TYPES = ("auto", "f16", "bf16")
DEVICES = ("cpu", "cuda")
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's accepted values
DEFAULT_GGUF = ("Q8_0", "Q4_K_M")
TARGET_KEYS = ("target_size", "target_bpw", "target_kld")
# keys only a target entry takes, and keys only a type entry takes
TARGET_OPTIONS = ("max_slowdown", "speed_check", "calibration_chunks", "exclude_types")
TYPE_OPTIONS = ("output_tensor_type", "token_embedding_type", "tensor_types", "pure", "leave_output_tensor")

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


# -- declaring a key ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """What the schema says about one key, besides its type and default (the field's)."""

    doc: str
    check: str | None = None  # a check beyond the type: one of build.CHECKS, "size", or read by build's own code
    choices: tuple = ()
    minimum: int | None = None
    hint: str = ""  # appended to a choices or minimum message
    lower: bool = False  # a string read in lower case
    option: str | None = None  # the library option the default comes from, e.g. "BenchOptions.reps"
    flag: str | None = None  # the command-line spelling when it is not the keyword with dashes (--device)
    alias: str | None = None  # one more accepted command-line spelling (--card-tag)
    verbatim: bool = False  # the flag's text is the value, never read as a number or a boolean
    positional: bool = False  # given as the command's argument, not as a flag


def key(default: Any = MISSING, doc: str = "", **spec: Any) -> Any:
    """A recipe key: a dataclass field whose metadata is its ``Key``."""
    return field(default=default, metadata={"key": Key(doc, **spec)})


def option_key(options: type, name: str, doc: str, **spec: Any) -> Any:
    """A key whose default is the library option ``options.name`` (``GPTQOptions``, ``BenchOptions``)."""
    default = next(f.default for f in fields(options) if f.name == name)
    return key(default, doc, option=f"{options.__name__}.{name}", **spec)


def table(default: Any, doc: str, **spec: Any) -> Any:
    """A field of ``Recipe`` holding a whole table (``[bench]``) or array of tables (``[[gptq]]``)."""
    return field(default=default, metadata={"table": Key(doc, **spec)})


def key_fields(cls: type) -> list[Field]:
    """The fields of ``cls`` that are recipe keys, in declaration order."""
    return [f for f in fields(cls) if "key" in f.metadata]


def spec(f: Field) -> Key:
    return f.metadata.get("key") or f.metadata["table"]


@cache
def kind(cls: type, name: str) -> str:
    """The TOML type of a key, from its annotation: str, bool, int, float, list (a tuple) or other."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return "list"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "other")


def plain(value: Any) -> Any:
    """A key's value as JSON/TOML data: tuples become lists, tables their ``to_dict()``."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value.to_dict() if hasattr(value, "to_dict") else value


class _Keys:
    """``to_dict`` for a table's dataclass: every key, in declaration order."""

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in key_fields(type(self))}


# -- the tables ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVariant(_Keys):
    """One GGUF file: a catalogue type, or a target (``target_size``/``target_bpw``/``target_kld``) for which
    ``edgequant.mix`` chooses per-tensor types. ``imatrix`` is resolved: types that need one always have it."""

    type: str | None = key(None, "catalogue name (edgequant.quantize.types), upper case; absent for a target entry",
                           check="gguf_type")
    imatrix: bool = key(False, "quantize with the importance matrix; default: [imatrix] default", check="gguf_imatrix")
    name: str | None = key(None, "artifact name when it is not the type, e.g. Q4_K_L for Q4_K_M + Q8_0 output",
                           check="artifact_name")
    output_tensor_type: str | None = key(None, "ggml type of output.weight", check="ggml_type")
    token_embedding_type: str | None = key(None, "ggml type of token_embd.weight", check="ggml_type")
    tensor_types: tuple[str, ...] = key((), "PATTERN=TYPE, llama-quantize's --tensor-type", check="tensor_types")
    pure: bool = key(False, "every matrix in the base type (--pure)")
    leave_output_tensor: bool = key(False, "do not quantize output.weight")
    # a target entry: per-tensor types chosen by measurement (edgequant quantize --target-*)
    target_size: str | None = key(None, "the lowest-KLD mix within this file size, e.g. \"4.2G\"", check="target")
    target_bpw: float | None = key(None, "the lowest-KLD mix within these bits per weight, e.g. 4.5", check="target")
    target_kld: float | None = key(None, "the smallest mix whose mean KLD stays within this, e.g. 0.01", check="target")
    max_slowdown: float = option_key(TargetOptions, "max_slowdown", "target entries: percent pp/tg the mix may lose "
                                     "against the standard type nearest its size")
    speed_check: bool = key(True, "target entries: keep the mix within max_slowdown of the standard type (this "
                            "machine's kernel speeds, then a measurement); false: choose on KLD alone")
    calibration_chunks: int = option_key(TargetOptions, "calibration_chunks", "target entries: chunks of the "
                                         "calibration text its KLD probes run on", minimum=1)
    exclude_types: tuple[str, ...] = key((), "target entries: ggml types no tensor may take, e.g. [\"q4_1\"]",
                                         check="ggml_types")

    def to_dict(self) -> dict:
        """The keys that apply: a type entry's (as before target entries existed, so stage keys stay), or a
        target entry's (its target, the target options and the keys both share)."""
        d = super().to_dict()
        if self.target is None:
            return {k: v for k, v in d.items() if k not in TARGET_KEYS + TARGET_OPTIONS}
        return {k: v for k, v in d.items() if k not in ("type", *TYPE_OPTIONS) and not (k in TARGET_KEYS and v is None)}

    @property
    def target(self) -> Target | None:
        """The mix target of a target entry, else None."""
        if self.target_size is not None:
            return parse_target(size=self.target_size)
        if self.target_bpw is not None:
            return parse_target(bpw=self.target_bpw)
        if self.target_kld is not None:
            return parse_target(kld=self.target_kld)
        return None

    @property
    def artifact(self) -> str:
        """The name, else the type, else ``<target>-mix`` (``4.2G-mix``, ``4.5bpw-mix``, ``kld0.01-mix``)."""
        if self.name or self.type:
            return self.name or self.type
        return f"{self.target.label}-mix"


@dataclass(frozen=True)
class GPTQVariant(_Keys):
    """One GPTQ checkpoint (GPTQModel's QuantizeConfig plus calibration sampling)."""

    bits: int = key(4, "weight bits", choices=GPTQ_BITS)
    # GPTQOptions.group_size None means "128, or what divides every input dimension"; a recipe names its artifact
    group_size: int = key(128, "columns per quantization group; -1: one group per column", choices=GPTQ_GROUP_SIZES,
                          hint=" (-1: per column)")
    desc_act: bool = option_key(GPTQOptions, "desc_act", "act-order; false keeps the fast exllama/marlin kernels usable")
    sym: bool = option_key(GPTQOptions, "sym", "symmetric quantization")
    damp_percent: float = option_key(GPTQOptions, "damp_percent", "Hessian dampening, a fraction in (0, 1)", check="fraction")
    samples: int = option_key(GPTQOptions, "samples", "calibration sequences", minimum=1)
    seq_len: int = option_key(GPTQOptions, "seq_len", "tokens per calibration sequence", minimum=16)
    seed: int = option_key(GPTQOptions, "seed", "sampling seed", minimum=0)
    moe_routing: str = option_key(GPTQOptions, "moe_routing", "MoE calibration: auto routes every token to every expert "
                                  "when one would be short of samples; native: refuse then; all: always",
                                  choices=MOE_ROUTINGS, lower=True)
    name: str | None = key(None, "artifact and folder name; default: the canonical name", check="artifact_name")

    @property
    def canonical_name(self) -> str:
        """``GPTQ-4bit-128g``; ``-perchannel`` for group_size -1; ``-act`` with desc_act; ``-asym`` without sym."""
        return gptq_label(self.bits, self.group_size, self.desc_act, self.sym)

    @property
    def artifact(self) -> str:
        return self.name or self.canonical_name


@dataclass(frozen=True)
class ImatrixSettings(_Keys):
    text: str | None = key(None, "calibration text; default: the [calibration] text", check="text")
    ctx: int = key(512, "tokens per chunk (llama-imatrix -c)", minimum=1)
    chunks: int | None = key(None, "at most this many chunks; default: all", minimum=1)
    device: str | None = key(None, "where it is collected; default: cuda when devices has it, else cpu",
                             choices=DEVICES, lower=True)
    engine: str = key("auto", "llama.cpp (runs the base GGUF) or torch (the HF folder); auto: torch on cuda, "
                      "else llama.cpp", choices=IMATRIX_ENGINES, lower=True)
    unseen_experts: str = key(DEFAULT_UNSEEN_EXPERTS, "MoE experts no token reached: fill (the mean of the layer's other "
                              "experts), uniform (llama.cpp's weight 1) or error", choices=UNSEEN_EXPERTS, lower=True)
    default: bool = key(False, "use the imatrix for GGUF types that do not say imatrix = true/false")


@dataclass(frozen=True)
class CalibrationSettings(_Keys):
    text: str | None = key(None, "GPTQ (and imatrix) calibration text; default: the built-in corpus (pydoc)", check="text")


@dataclass(frozen=True)
class BenchSettings(_Keys):
    text: str | None = key(None, "evaluation text; default: the built-in corpus (pydoc)", check="text")
    ctx: int = option_key(BenchOptions, "ctx", "tokens per chunk (llama-perplexity -c)", minimum=1)
    chunks: int | None = option_key(BenchOptions, "chunks", "at most this many chunks; default: all", minimum=1)
    speed: bool = option_key(BenchOptions, "speed", "measure pp/tg tokens per second")
    pp_tokens: int = option_key(BenchOptions, "pp", "prompt length of the pp test (llama-bench pp512)", minimum=1)
    tg_tokens: int = option_key(BenchOptions, "tg", "generated tokens of the tg test (llama-bench tg128)", minimum=1)
    repetitions: int = option_key(BenchOptions, "reps", "speed runs per file and device (llama-bench -r)", minimum=1)
    threads: int | None = option_key(BenchOptions, "threads", "CPU threads; default: llama.cpp's choice", minimum=1)
    flash_attn: bool = option_key(BenchOptions, "flash_attn", "flash attention")


@dataclass(frozen=True)
class Gate(_Keys):
    """A quality/speed threshold on one artifact (``*``: every quantized artifact)."""

    artifact: str = key(doc="an artifact name of this recipe, or * for every quantized artifact")
    metric: str = key(doc="one of METRICS")
    max: float | None = key(None, "the threshold of a lower-is-better metric")
    min: float | None = key(None, "the threshold of a higher-is-better metric")
    device: str | None = key(None, "speed metrics only; default: the first of devices", choices=DEVICES, lower=True)

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


@dataclass(frozen=True)
class CardSettings(_Keys):
    license: str | None = key(None, "front matter license; default: the source's license")
    quantized_by: str | None = key(None, "front matter quantized_by")
    base_model: str | None = key(None, "front matter base_model; default: the source's hub id", check="hub_id")
    pipeline_tag: str = key("text-generation", "front matter pipeline_tag")
    tags: tuple[str, ...] = key((), "added to the card's tags", alias="card-tag")
    description: str | None = key(None, "the card's first paragraph; default: a generated sentence")
    repo_id: str | None = key(None, "where the release will be uploaded: download commands in the card", check="hub_id")


@dataclass(frozen=True)
class _Origin:
    """Where a recipe came from: the raw dict, the TOML text (for line numbers), the file, flag keys."""

    raw: dict
    text: str | None
    file: str | None
    flags: dict = field(default_factory=dict)  # (section, key) -> the flag's name on the command line


@dataclass(frozen=True)
class Recipe:
    """A whole release: the ``[release]`` keys, then one field per table. Build one with ``load_recipe``."""

    source: str = key(doc="as written: a hub id or a folder (relative to base_dir)", check="source", positional=True)
    output: str = key(doc="release folder as written (relative to base_dir); default: dist/<name>", check="output",
                      verbatim=True)
    name: str = key(doc="model name: file names and card title; default: the source's last path part", check="name",
                    verbatim=True)
    base_type: str = key("auto", "the 16-bit GGUF everything is quantized from", choices=BASE_TYPES, lower=True)
    keep_base: bool = key(True, "ship the 16-bit file")
    split_max_size: int = key(0, "bytes; 0: no split (\"50G\", \"500M\" in a recipe)", check="size")
    gguf: tuple[GGUFVariant, ...] = key(tuple(GGUFVariant(t) for t in DEFAULT_GGUF), "GGUF types", check="gguf")
    devices: tuple[str, ...] = key(("cpu",), "where the benchmark runs", check="devices", flag="device")
    template_gate: bool = key(True, "fail on any chat-template mismatch")
    chat_template: str | None = key(None, "embed this template file instead of the source's", check="file")
    sliding_window: str = key(DEFAULT_SLIDING_WINDOW, "Mistral's window: ignore (llama architecture) or exact "
                              "(granite_swa, equal to transformers past the window)", choices=SLIDING_WINDOW_MODES,
                              lower=True)
    converter: str = key(DEFAULT_CONVERTER, "auto: edgequant's converter where it has the architecture, else "
                         "llama.cpp's convert_hf_to_gguf.py; native; llama.cpp", choices=CONVERTERS, lower=True)
    imatrix: ImatrixSettings = table(ImatrixSettings(), "the importance matrix")
    calibration: CalibrationSettings = table(CalibrationSettings(), "GPTQ and imatrix calibration")
    bench: BenchSettings = table(BenchSettings(), "quality and speed measurements")
    card: CardSettings = table(CardSettings(), "the model card's fields")
    gptq: tuple[GPTQVariant, ...] = table((), "GPTQ checkpoints")
    gates: tuple[Gate, ...] = table((), "quality and speed gates", flag="gate")
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
        return base_names(self.base_type)

    @property
    def artifact_names(self) -> list[str]:
        return [v.artifact for v in self.gguf] + [v.artifact for v in self.gptq]

    @property
    def needs_imatrix(self) -> bool:
        return any(v.imatrix for v in self.gguf)

    @property
    def has_mix(self) -> bool:
        """A GGUF entry is a target (its choice reads the calibration text)."""
        return any(v.target is not None for v in self.gguf)

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
        release = {f.name: plain(getattr(self, f.name)) for f in key_fields(Recipe)}
        tables = {f.name: plain(getattr(self, f.name)) for f in fields(Recipe) if "table" in f.metadata}
        return {"release": release, **tables}

    def to_toml(self) -> str:
        from edgequant.release.recipe.toml_write import to_toml

        return to_toml(self.to_dict())

    def with_overrides(self, **flags: Any) -> Recipe:
        """The recipe with command-line flags applied as if written in the file (``None``: not given).

        Flag names are listed in ``FLAGS``; values are validated like the file's, and errors name the flag."""
        from edgequant.release.recipe.build import build
        from edgequant.release.recipe.flags import apply_flags

        origin = self._origin or _Origin(raw=self.to_dict(), text=None, file=None)
        raw = copy.deepcopy(origin.raw)
        given = apply_flags(raw, flags)
        return build(raw, base_dir=self.base_dir, text=origin.text, file=origin.file, flags={**origin.flags, **given})

    def select(self, only: Iterable[str]) -> Recipe:
        """Keep only the named artifacts (``--only``); the base file always stays (it is the source and reference).

        A name is an artifact name (``Q4_K_M``, ``Q4_K_L``, ``GPTQ-4bit-128g``), case-insensitive; ``gguf`` or ``gptq``
        keeps every artifact of that kind; a GPTQ name prefix keeps every variant it starts (``gptq-4bit`` keeps
        ``GPTQ-4bit-128g`` and ``GPTQ-4bit-32g-act``); ``base``/``F16``/``BF16`` name the base file. Gates on
        artifacts that are left out are dropped."""
        from edgequant.release.recipe.select import selected

        keep_gguf, keep_gptq = selected(self, [n.strip() for item in only for n in str(item).split(",") if n.strip()])
        gguf_kept = tuple(v for i, v in enumerate(self.gguf) if i in keep_gguf)
        gptq_kept = tuple(v for i, v in enumerate(self.gptq) if i in keep_gptq)
        kept_names = {v.artifact for v in gguf_kept} | {v.artifact for v in gptq_kept} | set(self.base_artifact_names)
        gates = tuple(g for g in self.gates if g.artifact == "*" or g.artifact in kept_names)
        left_out = tuple(v for i, v in enumerate(self.gguf) if i not in keep_gguf) + \
            tuple(v for i, v in enumerate(self.gptq) if i not in keep_gptq)
        return replace(self, gguf=gguf_kept, gptq=gptq_kept, gates=gates, _origin=None, left_out=self.left_out + left_out)


def base_names(base_type: str) -> tuple[str, ...]:
    """The names that mean the 16-bit base file for a ``base_type``."""
    return ("base", "F16", "BF16") if base_type == "auto" else ("base", base_type.upper())


# table name -> its dataclass, in the order messages list the tables; "release" is Recipe's own keys
SECTIONS: dict[str, type] = {
    "release": Recipe, "gguf": GGUFVariant, "gptq": GPTQVariant, "imatrix": ImatrixSettings,
    "calibration": CalibrationSettings, "bench": BenchSettings, "gates": Gate, "card": CardSettings,
}
ARRAY_TABLES = ("gguf", "gptq", "gates")  # [[name]] (one [name] table is taken as one entry)
# the keys each table accepts (the validator's and the docs' list)
TABLES: dict[str, tuple[str, ...]] = {name: tuple(f.name for f in key_fields(cls)) for name, cls in SECTIONS.items()}
