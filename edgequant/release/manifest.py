"""The release manifest (``manifest.json``, schema ``edgequant.manifest/1``) as dataclasses.

The pipeline builds a :class:`Manifest`, the model card, the Modelfile and ``release merge`` read
its attributes; ``to_dict()`` writes the JSON and ``from_dict()`` reads it back (also a manifest
written by an older edgequant, whose base file recorded its fallbacks as a count). For a manifest
edgequant wrote, ``Manifest.from_dict(d).to_dict() == d``.

Layout: the release's ``name``, ``created``, ``command`` and ``recipe`` (the recipe's ``to_dict``
with its paths made public); the ``source`` (path, fingerprint, architecture, parameters, license);
the tool ``versions`` and the ``host``; the ``chat_template``; the ``bench`` settings; the wall time
per stage (``stages``); the ``artifacts`` (files, hashes, type, options, measured ``metrics``; for a
MoE model the imatrix's expert ``coverage``, ``edgequant.quantize.expert_coverage``);
the reference's ``base_metrics``; the ``gates`` with their results and the ``status``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from edgequant.env import Versions
from edgequant.quantize.expert_coverage import ExpertCoverage

MANIFEST_SCHEMA = "edgequant.manifest/1"
MODEL_KINDS = ("gguf", "gptq")  # what the bench measures and the card's table lists
KLD_KEYS = ("kld_mean", "kld_p99", "kld_max", "delta_p_mean", "delta_p_rms", "same_top", "ln_ppl_ratio", "ppl_ratio")
SPEED_KEYS = ("pp_tps", "pp_std", "tg_tps", "tg_std", "load_seconds", "peak_rss_bytes", "peak_vram_bytes", "threads",
              "pp", "tg")


def _pick(cls, data: Mapping[str, Any] | None, **override: Any):
    """``cls`` from the keys of ``data`` that are its fields (others ignored), then ``override``."""
    data = data or {}
    return cls(**{**{f.name: data[f.name] for f in fields(cls) if f.name in data}, **override})


# -- measurements --------------------------------------------------------------------------------------


@dataclass
class Speed:
    """One device's llama-bench style numbers, or why that device was not measured (``absent``)."""

    absent: str | None = None
    pp_tps: float | None = None
    pp_std: float | None = None
    tg_tps: float | None = None
    tg_std: float | None = None
    load_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    threads: int | None = None
    pp: int | None = None
    tg: int | None = None

    @classmethod
    def from_bench(cls, s: Mapping[str, Any]) -> Speed:
        """From one entry of a bench row's ``speed`` list."""
        if s.get("absent"):
            return cls(absent=s["absent"])
        return cls(**{k: s.get(k) for k in SPEED_KEYS})

    def to_dict(self) -> dict:
        return {"absent": self.absent} if self.absent else {k: getattr(self, k) for k in SPEED_KEYS}


@dataclass
class Metrics:
    """What the bench measured on one model: perplexity, divergence from the reference, speed per device."""

    ppl: float | None = None
    ppl_error: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    delta_p_mean: float | None = None
    delta_p_rms: float | None = None
    same_top: float | None = None
    ln_ppl_ratio: float | None = None
    ppl_ratio: float | None = None
    speed: dict[str, Speed] = field(default_factory=dict)

    @classmethod
    def from_bench_row(cls, row: Mapping[str, Any] | None, *, reference: bool = False) -> Metrics | None:
        """A bench row as metrics; the reference's KLD columns stay empty (it is what the others are compared with)."""
        if not row:
            return None
        q = row.get("quality") or {}
        values = {k: q.get(k) for k in ("ppl", "ppl_error", *([] if reference else KLD_KEYS))}
        return cls(**values, speed={s["device"]: Speed.from_bench(s) for s in row.get("speed") or []})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Metrics | None:
        if d is None:
            return None
        speed = {dev: _pick(Speed, s) for dev, s in (d.get("speed") or {}).items() if isinstance(s, Mapping)}
        return _pick(cls, d, speed=speed)

    def to_dict(self) -> dict:
        """The manifest's ``metrics``; also what :meth:`Gate.value` reads."""
        d = {k: getattr(self, k) for k in ("ppl", "ppl_error", *KLD_KEYS)}
        d["speed"] = {dev: s.to_dict() for dev, s in self.speed.items()}
        return d

    @property
    def measured(self) -> bool:
        """Compared with the reference (mean KLD or same-top rate present)."""
        return _number(self.kld_mean) is not None or _number(self.same_top) is not None


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real, finite-or-infinite number (not NaN, not a bool), else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


# -- artifacts ------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Artifact:
    """A published file or folder: its path in the release, its files and their SHA-256."""

    path: str
    kind: str  # gguf, gptq, imatrix, tensor_types, bench, plot, card, modelfile
    files: list[str] = field(default_factory=list)
    sha256: str | None = None  # the file's; for several files, over their sorted ``path  sha256`` lines
    size_bytes: int | None = None
    file_sha256: dict[str, str] | None = None  # per file, when there are several

    def _common(self) -> dict:
        d = {"path": self.path, "files": self.files, "kind": self.kind, "sha256": self.sha256, "size_bytes": self.size_bytes}
        if self.file_sha256 is not None:
            d["file_sha256"] = self.file_sha256
        return d

    def to_dict(self) -> dict:
        return self._common()

    @property
    def hashes(self) -> dict[str, str]:
        """The recorded sha256 of each file."""
        return self.file_sha256 or {self.files[0]: self.sha256}


@dataclass(kw_only=True)
class ModelArtifact(Artifact):
    """A model the bench measures (GGUF file or GPTQ folder)."""

    type: str  # the artifact name: Q4_K_M, Q4_K_L, BF16, GPTQ-4bit-128g ...
    bits_per_weight: float | None = None
    options: dict = field(default_factory=dict)  # the recipe entry it was made with
    metrics: Metrics | None = None


@dataclass(kw_only=True)
class GGUFArtifact(ModelArtifact):
    """A GGUF file (its first shard's path when split); the 16-bit base has no ``quant_type``."""

    kind: str = "gguf"
    quant_type: str | None = None
    imatrix: bool = False
    fallbacks: list[str] = field(default_factory=list)  # tensors written in another type than asked
    sliding_window: str | None = None  # "exact" or "ignored" (convert --sliding-window); None: no window
    architecture: str | None = None  # llama.cpp's general.architecture, as the converter wrote it
    notes: list[str] = field(default_factory=list)  # the converter's notes on the file it was quantized from
    # a target entry's per-tensor mix (quant_type "mix"): target, predicted and calibration KLD, the standard type
    # it was compared with, speed, left-out types, types per role, its .tensor-types.txt, the reproduce command
    mix: dict | None = None

    def to_dict(self) -> dict:
        d = {**self._common(), "type": self.type}
        if self.quant_type is not None:
            d["quant_type"] = self.quant_type
        d = {**d, "bits_per_weight": self.bits_per_weight, "imatrix": self.imatrix, "fallbacks": self.fallbacks,
             "options": self.options, "metrics": _metrics_dict(self.metrics)}
        if self.mix is not None:
            d["mix"] = self.mix
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        if self.architecture is not None:
            d["architecture"] = self.architecture
        if self.notes:
            d["notes"] = self.notes
        return d


@dataclass(kw_only=True)
class GPTQArtifact(ModelArtifact):
    """A GPTQ checkpoint folder."""

    kind: str = "gptq"
    bits: int | None = None
    group_size: int | None = None
    notes: list[str] = field(default_factory=list)
    defuser_model_type: str | None = None  # per-expert MoE folders: defuser.replace_fused_blocks(this) before loading
    gptq_loader: str | None = None  # "gptqmodel": the folder loads through GPTQModel.load (gptq_load.gptq_loader)

    def to_dict(self) -> dict:
        d = {**self._common(), "type": self.type, "bits": self.bits, "group_size": self.group_size,
             "bits_per_weight": self.bits_per_weight, "options": self.options, "notes": self.notes,
             "metrics": _metrics_dict(self.metrics)}
        if self.defuser_model_type:
            d["defuser_model_type"] = self.defuser_model_type
        if self.gptq_loader:
            d["gptq_loader"] = self.gptq_loader
        return d


@dataclass(kw_only=True)
class ImatrixArtifact(Artifact):
    """The importance matrix, and what it was computed on."""

    kind: str = "imatrix"
    type: str = "imatrix"
    text: str | None = None
    ctx: int | None = None
    chunks: int | None = None
    engine: str | None = None  # llama.cpp or torch; None in manifests written before there was a choice
    coverage: ExpertCoverage | None = None  # MoE models: tokens per expert per layer; None: dense (or an older manifest)

    def to_dict(self) -> dict:
        d = {**self._common(), "type": self.type, "text": self.text, "ctx": self.ctx, "chunks": self.chunks,
             "engine": self.engine}
        if self.coverage is not None:
            d["coverage"] = self.coverage.to_dict()
        return d


def _metrics_dict(m: Metrics | None) -> dict | None:
    return None if m is None else m.to_dict()


def fallback_list(value: Any) -> list[str]:
    """A manifest's ``fallbacks``: a list of tensor descriptions; an older manifest's count for the base
    file becomes that many entries without their description."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return []
    if isinstance(value, int):
        return ["(not recorded)"] * value
    return [str(x) for x in value]


def artifact_from_dict(d: Mapping[str, Any]) -> Artifact:
    """The artifact class of ``d['kind']``."""
    common = {"path": d.get("path"), "kind": d.get("kind"), "files": list(d.get("files") or []), "sha256": d.get("sha256"),
              "size_bytes": d.get("size_bytes"), "file_sha256": d.get("file_sha256")}
    kind = d.get("kind")
    if kind in MODEL_KINDS:
        model = {**common, "type": str(d.get("type", "")), "bits_per_weight": d.get("bits_per_weight"),
                 "options": d.get("options") or {}, "metrics": Metrics.from_dict(d.get("metrics"))}
        if kind == "gguf":
            return GGUFArtifact(**model, quant_type=d.get("quant_type"), imatrix=bool(d.get("imatrix")),
                                fallbacks=fallback_list(d.get("fallbacks")), sliding_window=d.get("sliding_window"),
                                architecture=d.get("architecture"), notes=list(d.get("notes") or []), mix=d.get("mix"))
        return GPTQArtifact(**model, bits=d.get("bits"), group_size=d.get("group_size"), notes=list(d.get("notes") or []),
                            defuser_model_type=d.get("defuser_model_type"), gptq_loader=d.get("gptq_loader"))
    if kind == "imatrix":
        return ImatrixArtifact(**common, text=d.get("text"), ctx=d.get("ctx"), chunks=d.get("chunks"), engine=d.get("engine"),
                               coverage=ExpertCoverage.from_dict(d.get("coverage")))
    return Artifact(**common)


# -- where it came from, what it ran on -------------------------------------------------------------------


@dataclass
class Source:
    path: str | None = None  # public: a hub id, or the folder's name
    fingerprint: str | None = None
    architecture: str | None = None
    n_params: int | None = None
    license: str | None = None
    base_model: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Host:
    """``edgequant.env.host_info()``."""

    cpu: str | None = None
    cores: int | None = None
    physical_cores: int | None = None
    gpu: str | None = None
    os: str | None = None
    python: str | None = None
    llama_cpp_buffers: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Host | None:
        return None if d is None else _pick(cls, d)


@dataclass
class ChatTemplate:
    """The source's chat template, a rendered example, its stop tokens and the template gate's records."""

    template: str | None = None
    example: str | None = None
    eos_tokens: list[str] = field(default_factory=list)
    bos: str | None = None
    checks: dict[str, list[dict]] = field(default_factory=dict)  # GGUF file -> one record per conversation
    family: str | None = None  # a key of edgequant.release.modelfile.OLLAMA_FAMILIES, or None
    default_system: str | None = None  # None: read from the template; "": it has none

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ChatTemplate | None:
        if d is None:
            return None
        known = "default_system" in d
        return _pick(cls, d, eos_tokens=list(d.get("eos_tokens") or []), checks=dict(d.get("checks") or {}),
                     default_system=(d.get("default_system") or "") if known else None)

    def to_dict(self) -> dict:
        d = {"template": self.template, "example": self.example, "eos_tokens": self.eos_tokens, "bos": self.bos,
             "checks": self.checks, "family": self.family}
        if self.default_system is not None:
            d["default_system"] = self.default_system or None
        return d


@dataclass
class BenchInfo:
    """How the numbers were measured (the manifest's ``bench``)."""

    text: str | None = None  # public name of the evaluation text
    text_sha256: str | None = None
    ctx: int | None = None
    chunks: int | None = None
    reference: str | None = None  # the reference file when it is published, else None
    reference_file: str | None = None  # the 16-bit file the KLD is measured against
    devices: list[str] = field(default_factory=list)
    threads: int | None = None
    speed_settings: dict | None = None
    host: Host | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BenchInfo:
        d = d or {}
        return _pick(cls, d, devices=list(d.get("devices") or []), host=Host.from_dict(d.get("host")),
                     notes=list(d.get("notes") or []))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StageTime:
    seconds: float = 0.0
    skipped: bool = True  # every artifact of the stage was unchanged

    def add(self, seconds: float, *, skipped: bool) -> None:
        self.seconds = round(self.seconds + seconds, 2)
        self.skipped = self.skipped and skipped


@dataclass
class GateResult:
    gate: str  # Gate.describe()
    artifact: str
    metric: str
    value: float | None
    max: float | None
    min: float | None
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Shard:
    """One ``release --only`` folder a merged release was made from."""

    folder: str
    recipe_gguf: list[str]
    recipe_gptq: list[int]
    host: Host | None

    def to_dict(self) -> dict:
        return asdict(self)


# -- the recipe as published ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardInfo:
    """The recipe's ``[card]``."""

    license: str | None = None
    quantized_by: str | None = None
    base_model: str | None = None
    pipeline_tag: str | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None
    repo_id: str | None = None


@dataclass
class RecipeRecord:
    """The recipe as the manifest publishes it (``Recipe.to_dict()`` with public paths), with typed views
    of what the card and the merge read."""

    data: dict = field(default_factory=dict)

    def _table(self, name: str) -> Mapping[str, Any]:
        t = self.data.get(name)
        return t if isinstance(t, Mapping) else {}

    @property
    def card(self) -> CardInfo:
        t = self._table("card")
        return _pick(CardInfo, t, tags=tuple(t.get("tags") or ()))

    def setting(self, table: str, key: str) -> Any:
        """One value of a table (``bench``/``pp_tokens``, ``imatrix``/``ctx``...); None when absent."""
        return self._table(table).get(key)

    @property
    def gguf(self) -> list[dict]:
        return list(self._table("release").get("gguf") or [])

    @property
    def gptq(self) -> list[dict]:
        return list(self.data.get("gptq") or [])

    def merged(self, other: RecipeRecord) -> RecipeRecord:
        """This recipe with ``other``'s GGUF types, GPTQ variants and gates added (the shards' selections together)."""
        d = json.loads(json.dumps(self.data))
        for items, target in ((other.gguf, d["release"]["gguf"]), (other.gptq, d["gptq"]),
                              (other.data.get("gates") or [], d["gates"])):
            target += [item for item in items if item not in target]
        return RecipeRecord(d)


# -- the manifest -------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    name: str | None
    created: str | None = None
    command: str | None = None
    recipe: RecipeRecord = field(default_factory=RecipeRecord)
    source: Source = field(default_factory=Source)
    versions: Versions = field(default_factory=Versions)
    host: Host | None = None
    chat_template: ChatTemplate | None = None
    bench: BenchInfo = field(default_factory=BenchInfo)
    stages: dict[str, StageTime] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    base_metrics: Metrics | None = None
    gates: list[GateResult] = field(default_factory=list)
    status: str | None = None  # ok, gates failed
    merged_from: list[Shard] | None = None
    schema: str = MANIFEST_SCHEMA

    @property
    def models(self) -> list[ModelArtifact]:
        """The GGUF and GPTQ artifacts."""
        return [a for a in self.artifacts if isinstance(a, ModelArtifact)]

    def of_kind(self, kind: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == kind]

    def to_dict(self) -> dict:
        """The manifest.json data."""
        d = {"schema": self.schema, "name": self.name, "created": self.created, "command": self.command,
             "recipe": self.recipe.data, "source": self.source.to_dict(), "versions": self.versions.to_dict(),
             "host": None if self.host is None else self.host.to_dict(),
             "chat_template": None if self.chat_template is None else self.chat_template.to_dict(),
             "bench": self.bench.to_dict(), "stages": {k: asdict(v) for k, v in self.stages.items()},
             "artifacts": [a.to_dict() for a in self.artifacts], "base_metrics": _metrics_dict(self.base_metrics),
             "gates": [g.to_dict() for g in self.gates], "status": self.status}
        if self.merged_from is not None:
            d["merged_from"] = [s.to_dict() for s in self.merged_from]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """Read a manifest.json (this edgequant's or an older one's, or one built by hand with fewer keys)."""
        shards = d.get("merged_from")
        return cls(
            schema=d.get("schema", MANIFEST_SCHEMA), name=d.get("name"), created=d.get("created"), command=d.get("command"),
            recipe=RecipeRecord(dict(d.get("recipe") or {})), source=_pick(Source, d.get("source")),
            versions=Versions.from_dict(d.get("versions")), host=Host.from_dict(d.get("host")),
            chat_template=ChatTemplate.from_dict(d.get("chat_template")), bench=BenchInfo.from_dict(d.get("bench")),
            stages={k: _pick(StageTime, v) for k, v in (d.get("stages") or {}).items() if isinstance(v, Mapping)},
            artifacts=[artifact_from_dict(a) for a in d.get("artifacts") or []],
            base_metrics=Metrics.from_dict(d.get("base_metrics")),
            gates=[_pick(GateResult, g) for g in d.get("gates") or []], status=d.get("status"),
            merged_from=None if shards is None else [_pick(Shard, s, host=Host.from_dict(s.get("host"))) for s in shards])


def as_manifest(m: Manifest | Mapping[str, Any]) -> Manifest:
    """A :class:`Manifest` from itself or from its JSON form."""
    return m if isinstance(m, Manifest) else Manifest.from_dict(m)


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None when it is missing, not JSON or not an edgequant manifest."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        return None
    return Manifest.from_dict(data)
