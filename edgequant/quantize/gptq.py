"""``edgequant gptq``: GPTQ checkpoints (v1 ``format: gptq``) through a swappable backend.

The work is split so that the quantizer can be replaced:

* a :class:`GPTQBackend` quantizes one HF folder at one :class:`GPTQSpec` from calibration token
  windows and writes the weights, ``config.json`` (with ``quantization_config``) and
  ``quantize_config.json`` into a folder; :class:`GPTQModelBackend` does that with GPTQModel;
* everything around it is ours: option checks (bits, group size against every input dimension),
  calibration windows from :func:`edgequant.text.load_text` (seeded), one
  ``<Name>-GPTQ-<bits>bit[-<g>g]`` folder per bit width written into ``<folder>.part/`` and renamed
  at the end (removed on any exception, Ctrl-C included), the source's tokenizer files and chat
  template copied byte for byte, a short README, and the per-layer error report.

Reloading a checkpoint is :func:`edgequant.gptq_load.load_gptq_model` (the base layer, so that the
bench loads GPTQ folders without this module).
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from edgequant.atomic import atomic_folder, atomic_outputs, check_output_folder, check_writable, folder_lock, write_text
from edgequant.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from edgequant.devices import resolve_device
from edgequant.errors import EdgequantError
from edgequant.export.archs.base import QuantLayout, quant_layout
from edgequant.gptq_load import EXPERT_LINEARS, defuser_model_type, gptq_loader, load_snippet, quiet_gptqmodel  # also sets GPTQMODEL_CPU_WORKERS before GPTQModel is imported
from edgequant.naming import gptq_folder, gptq_label
from edgequant.progress import progress_count
from edgequant.quantize.gptq_fuse import fuse_split_linears, merge_fused_errors
from edgequant.quantize.expert_coverage import ExpertCoverage, LayerCoverage
from edgequant.quantize.gptq_options import MIN_EXPERT_SHARE, MOE_ROUTINGS, GPTQOptions  # GPTQOptions re-exported: the CLI and the pipeline import it from here
from edgequant.text import Text, load_text

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (128, 64, 32)  # the first one that divides every input dimension
EXTRA_FILES = ("generation_config.json",)  # copied from the source beside the tokenizer files
_EXPERT_NAME = dict(zip(("gate", "up", "down"), EXPERT_LINEARS))  # an expert's Linears in our GPTQ folders


@dataclass(frozen=True)
class GPTQSpec:
    """What one backend run makes: one bit width, everything else fixed."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    true_sequential: bool
    device: str
    batch_size: int
    seed: int
    # MoE: how the quantizing forward routes calibration tokens to experts, "native" (the router's top-k) or
    # "all" (every token to every expert); None for a dense model
    moe_routing: str | None = None


@dataclass
class LayerError:
    """One quantized module, as the backend reports it (GPTQ's loss is its output error on the calibration)."""

    layer: int
    module: str
    loss: float
    samples: int
    damp: float
    seconds: float
    # "gptq"; "rtn" where the backend had too few calibration tokens for the module and rounded its weights to
    # the nearest grid point instead (GPTQModel's fallback; its loss is then not measured and reads 0)
    method: str = "gptq"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationCoverage:
    """Whether GPTQ calibrated every expert: the tokens each one gets from its router, and what GPTQ did about it."""

    routing: str  # how the quantizing forward routed: "native" (the router's top-k) or "all" (every token to every expert)
    tokens: int  # calibration tokens; every MoE layer sees each of them
    min_tokens: int  # the fewest routed tokens an expert needs under native routing (MIN_EXPERT_SHARE of ``tokens``)
    layers: list[LayerCoverage] = field(default_factory=list)  # per MoE layer: each expert's routed tokens
    # from the backend's report: the fewest calibration tokens any expert Linear was quantized from, and the
    # expert Linears it had to quantize without calibration (round-to-nearest)
    gptq_min_samples: int | None = None
    rtn_modules: list[str] = field(default_factory=list)

    @property
    def routed(self) -> ExpertCoverage:
        """The router's counts as an imatrix-style coverage (its ``tokens``, ``min``, ``max``, ``unseen``)."""
        return ExpertCoverage(layers=self.layers)

    @property
    def counts(self) -> list[int]:
        return self.routed.tokens

    @property
    def min(self) -> int:
        return self.routed.min

    @property
    def max(self) -> int:
        return self.routed.max

    @property
    def unseen(self) -> int:
        """Experts (over all layers) the router sends no calibration token to."""
        return self.routed.unseen

    @property
    def short(self) -> list[tuple[int, int, int]]:
        """``(layer, expert, tokens)`` of every expert under :attr:`min_tokens`."""
        return [(l.layer, e, c) for l in self.layers for e, c in enumerate(l.tokens) if c < self.min_tokens]

    def summary(self) -> str:
        """``min-max tokens, N unseen`` over every expert, as the table shows it."""
        return f"{self.min}-{self.max}, {self.unseen} unseen"

    def to_dict(self) -> dict:
        return {"routing": self.routing, "tokens": self.tokens, "min_tokens": self.min_tokens,
                "experts": len(self.counts), "min": self.min, "max": self.max, "unseen": self.unseen,
                "short": len(self.short), "gptq_min_samples": self.gptq_min_samples, "rtn_modules": list(self.rtn_modules),
                "layers": [l.to_dict() for l in self.layers]}


class GPTQBackend(Protocol):
    """A GPTQ implementation edgequant can drive."""

    name: str

    def quantize(self, source: Path, spec: GPTQSpec, calibration: list[list[int]], workdir: Path,
                 on_layer: Callable[[int], None]) -> list[LayerError]:
        """Quantize ``source`` at ``spec`` on ``calibration`` (token id windows) and write the v1 GPTQ
        weights, ``config.json`` with ``quantization_config`` and ``quantize_config.json`` into
        ``workdir``; call ``on_layer(i)`` when decoder layer ``i`` is done."""
        ...


@dataclass
class GPTQResult:
    """One written GPTQ folder: its settings, sizes, calibration and the per-layer errors."""

    folder: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    size_bytes: int  # all files of the folder
    weights_bytes: int  # the *.safetensors files
    bits_per_weight: float  # weights_bytes * 8 / parameters of the source
    seconds: float
    calibration: str
    samples: int
    seq_len: int
    seed: int
    device: str
    backend: str
    layers: list[LayerError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the model_type to pass to defuser.replace_fused_blocks before transformers loads the folder
    # (per-expert MoE folders); None: plain from_pretrained loads it
    defuser_model_type: str | None = None
    # "gptqmodel": the folder loads through GPTQModel.load (per-expert Linears with biases); None: transformers
    gptq_loader: str | None = None
    experts: CalibrationCoverage | None = None  # MoE models: the calibration tokens per expert
    warnings: list[str] = field(default_factory=list)  # what the user must know about this folder (printed as warnings)

    @property
    def max_loss(self) -> float:
        """The largest per-module loss (0 when the backend reported none)."""
        return max((l.loss for l in self.layers), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_loss"] = self.max_loss
        d["experts"] = self.experts.to_dict() if self.experts is not None else None
        return d


# --------------------------------------------------------------------------- #
# GPTQModel
# --------------------------------------------------------------------------- #


class GPTQModelBackend:
    """GPTQ through GPTQModel (ModelCloud), which quantizes on CPU and CUDA."""

    name = "gptqmodel"

    def quantize(self, source: Path, spec: GPTQSpec, calibration: list[list[int]], workdir: Path,
                 on_layer: Callable[[int], None]) -> list[LayerError]:
        with quiet_gptqmodel():
            from gptqmodel import GPTQModel, QuantizeConfig
            from gptqmodel.quantization.config import (ExpertsRoutingOverride, Fallback, FallbackStrategy,
                                                       MoEConfig)

            qc = QuantizeConfig(
                bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
                damp_percent=spec.damp_percent, true_sequential=spec.true_sequential, format="gptq",
                offload_to_disk=False,  # its default spills every layer to /tmp: 30x slower on small models
                # a module reached by fewer tokens is rounded to nearest (reported as such), never quantized from
                # an empty Hessian (which zeroes its weights); the same share edgequant's own coverage check uses
                fallback=Fallback(strategy=FallbackStrategy.RTN, threshold=f"{MIN_EXPERT_SHARE * 100:g}%"),
            )
            if spec.moe_routing == "all":  # while capturing a layer's inputs only; the replay to the next layer routes natively
                qc.moe = MoEConfig(routing=ExpertsRoutingOverride(num_experts_per_tok="all"))
            _seed_everything(spec.seed)
            try:
                from edgequant.remote_code import load_kwargs, refused

                with refused(source):
                    model = GPTQModel.load(str(source), qc, device=spec.device, **load_kwargs(source))
            except (ValueError, TypeError, NotImplementedError, KeyError) as e:
                raise EdgequantError(f"GPTQModel cannot load {source} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                     "is it a causal LM architecture GPTQModel supports?") from None
            done: set[int] = set()

            def layer_complete(layer_idx: int, submodule_finalized: bool) -> None:
                if layer_idx not in done:
                    done.add(layer_idx)
                    on_layer(layer_idx)

            model.layer_callback = layer_complete
            data = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
            with _gptqmodel_logs_in(workdir.with_name(workdir.name.removesuffix(".part") + ".logs.part")):
                log = model.quantize(data, batch_size=spec.batch_size, calibration_data_min_length=1)
            model.save(str(workdir))
        (workdir / "quant_log.csv").unlink(missing_ok=True)  # the per-layer report is in our result
        return _layer_errors(log)


@contextlib.contextmanager
def _gptqmodel_logs_in(folder: Path) -> Iterator[None]:
    """GPTQModel writes per-run log files into ``./logs`` of the working folder; keep them out of the
    user's folder (in a temporary sibling of the output, removed afterwards)."""
    from gptqmodel.looper import loop_processor

    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = saved
        shutil.rmtree(folder, ignore_errors=True)


def _layer_errors(log) -> list[LayerError]:
    """GPTQModel's quantization log (a dict of per-module entries) as our rows, sorted by layer and module."""
    rows = []
    entries = log.get("gptq", []) if isinstance(log, dict) else []
    if not entries and isinstance(log, dict):
        entries = [e for v in log.values() if isinstance(v, list) for e in v]
    for e in entries:
        try:
            loss, method = str(e["loss"]).strip(), "gptq"
            if loss.endswith("fallback"):  # "rtn fallback": rounded to nearest, from too few calibration tokens
                loss, method = "0", loss.split()[0]
            rows.append(LayerError(layer=int(e["layer"]), module=str(e["module"]), loss=float(loss),
                                   samples=int(e.get("samples", 0)), damp=float(e.get("damp", 0) or 0),
                                   seconds=float(e.get("time", 0) or 0), method=method))
        except (KeyError, ValueError, TypeError):
            continue
    rows.sort(key=lambda r: (r.layer, r.module))
    return rows


def _seed_everything(seed: int) -> None:
    """Seed every generator GPTQModel may draw from."""
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed)


# --------------------------------------------------------------------------- #
# Options, calibration, naming
# --------------------------------------------------------------------------- #


def input_dims(ckpt: Checkpoint) -> dict[int, list[str]]:
    """Input dimension -> the decoder matrices that have it (what GPTQ quantizes: the 2-D weights and
    fused expert tensors of the decoder blocks, as the architecture's quantization layout says)."""
    dims: dict[int, list[str]] = {}
    shapes = {name: ref.shape for name, ref in ckpt.tensors.items()}
    for name, n_in in quant_layout(ckpt.hf_architecture).quantized_inputs(shapes).items():
        dims.setdefault(n_in, []).append(name)
    return dims


def resolve_group_size(requested: int | None, dims: dict[int, list[str]]) -> tuple[int, str | None]:
    """The group size to use, and a note when it was chosen for the user."""
    if requested is None:
        for g in DEFAULT_GROUP_SIZES:
            if all(d % g == 0 for d in dims):
                note = None if g == DEFAULT_GROUP_SIZES[0] else (
                    f"group size {g}: 128 does not divide every input dimension ({', '.join(map(str, sorted(dims)))}); "
                    f"pass --group-size to choose another")
                return g, note
        return -1, (f"group size -1 (one group per row): none of {', '.join(map(str, DEFAULT_GROUP_SIZES))} divides "
                    f"every input dimension ({', '.join(map(str, sorted(dims)))})")
    if requested == -1:
        return -1, None
    if requested <= 0:
        raise EdgequantError(f"--group-size {requested}: use a positive size that divides every input dimension, or -1 for one group per row")
    bad = sorted(d for d in dims if d % requested)
    if bad:
        fits = [g for g in (256, 128, 64, 32, 16) if all(d % g == 0 for d in dims)]
        raise EdgequantError(
            f"--group-size {requested} does not divide the input dimension {bad[0]} of {dims[bad[0]][0]}; "
            f"use one of {', '.join(map(str, fits)) or '-1'} (or -1 for one group per row)"
        )
    return requested, None


def parse_bits(bits) -> list[int]:
    """``[4]``, ``"2,3,4,8"`` or a list of either -> sorted unique bit widths, each checked."""
    items = [bits] if isinstance(bits, (int, str)) else list(bits)
    out: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                b = int(part)
            except ValueError:
                raise EdgequantError(f"--bits {part!r}: use a comma list of {', '.join(map(str, SUPPORTED_BITS))}") from None
            if b not in SUPPORTED_BITS:
                raise EdgequantError(f"--bits {b} is not supported; use {', '.join(map(str, SUPPORTED_BITS))}")
            if b not in out:
                out.append(b)
    if not out:
        raise EdgequantError(f"--bits: name at least one bit width ({', '.join(map(str, SUPPORTED_BITS))})")
    return sorted(out)


def folder_name(model_name: str, bits: int, group_size: int, desc_act: bool = False, sym: bool = True) -> str:
    """``Name-GPTQ-4bit-128g`` (``edgequant.naming``: ``-perchannel`` for group size -1, ``-act``, ``-asym``)."""
    return gptq_folder(model_name, gptq_label(bits, group_size, desc_act, sym))


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets of the once-tokenized text
    (the first token of each replaced by BOS when the tokenizer adds BOS), as GPTQ's reference
    code samples C4."""
    if samples < 1:
        raise EdgequantError(f"--samples {samples}: use at least 1 calibration sample (128 is usual)")
    if seq_len < 2:
        raise EdgequantError(f"--seq-len {seq_len}: use at least 2 tokens per sample (512 or 2048 are usual)")
    ids = tokenizer(text, add_special_tokens=True, verbose=False).input_ids
    if len(ids) < seq_len:
        raise EdgequantError(f"the calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}; pass a longer text or a smaller --seq-len")
    bos = tokenizer.bos_token_id if (tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id) else None
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        start = rng.randint(0, len(ids) - seq_len)
        w = list(ids[start:start + seq_len])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def _model_name(ckpt: Checkpoint) -> str:
    """The name the folders are named after: the source folder's."""
    return ckpt.path.name or "model"


def _n_params(ckpt: Checkpoint) -> int:
    """The parameter count of the source (every tensor)."""
    n = 0
    for ref in ckpt.tensors.values():
        p = 1
        for d in ref.shape:
            p *= d
        n += p
    return n


def _readme(name: str, source: Path, spec: GPTQSpec, calibration: str, samples: int, seq_len: int, backend: str,
            defuser_type: str | None, loader: str | None = None) -> str:
    """The folder's short README: format, calibration and how to load it."""
    g = "one group per row" if spec.group_size == -1 else f"group size {spec.group_size}"
    return (
        f"# {name}\n\n"
        f"GPTQ {spec.bits}-bit ({g}, desc_act={spec.desc_act}, sym={spec.sym}) of `{source.name}`, made by "
        f"`edgequant gptq` with {backend}.\n\n"
        f"- format: GPTQ v1 (`quantization_config.format: gptq`), packed int32 `qweight`/`qzeros`, `scales`, `g_idx`\n"
        f"- calibration: {samples} x {seq_len} tokens of {calibration} (seed {spec.seed}), damp {spec.damp_percent}, "
        f"true_sequential={spec.true_sequential}\n\n"
        f"Load it with {'GPTQModel' if loader else 'transformers (needs `optimum` and `gptqmodel`)'}, from the folder above this one:\n\n"
        f"```python\n{load_snippet(name, defuser_type, loader)}```\n\n"
        "or with vLLM (`--quantization gptq`) or `edgequant.gptq_load.load_gptq_model`.\n"
    )


def _finish_folder(part: Path, ckpt: Checkpoint, readme: str) -> None:
    """The source's tokenizer files and chat template, byte for byte, and our README."""
    for fname in TOKENIZER_FILES + EXTRA_FILES:
        src = ckpt.path / fname
        if src.is_file():
            with atomic_outputs([part / fname]) as (tmp,):
                shutil.copyfile(src, tmp)
    write_text(part / "README.md", readme)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


@dataclass
class _Run:
    """What every bit width of one ``gptq`` call shares."""

    ckpt: Checkpoint
    opts: GPTQOptions
    group_size: int
    corpus: Text
    windows: list[list[int]]
    backend: GPTQBackend
    layout: QuantLayout
    n_layers: int
    n_params: int
    notes: list[str]
    coverage: CalibrationCoverage | None = None  # MoE: the tokens per expert, counted once for every bit width


def gptq(source: str | Path, bits, output: str | Path | None = None, options: GPTQOptions | None = None) -> list[GPTQResult]:
    """Quantize ``source`` with GPTQ at each of ``bits``; one HF folder per bit width under ``output``."""
    opts = options or GPTQOptions()
    bit_list = parse_bits(bits)
    ckpt = open_checkpoint(source)
    group_size, notes = _check_options(ckpt, opts)
    out_dir = Path(output) if output is not None else Path.cwd()
    check_output_folder(out_dir)
    name = _model_name(ckpt)
    finals = [out_dir / folder_name(name, b, group_size, opts.desc_act, opts.sym) for b in bit_list]
    check_writable(finals, force=opts.force, folders_ok=True)  # each checkpoint is a folder

    corpus = load_text(opts.calibration)
    layout = quant_layout(ckpt.hf_architecture)
    windows = _calibration(ckpt, corpus, opts)
    coverage = None
    if layout.experts is not None:
        coverage = expert_coverage(ckpt, layout, windows, opts)
        notes += _routing_notes(coverage, opts.moe_routing)
    run = _Run(ckpt, opts, group_size, corpus, windows, opts.backend or GPTQModelBackend(),
               layout, layout.n_blocks(ckpt.tensors), _n_params(ckpt), notes, coverage)
    with folder_lock(out_dir):  # one writer per folder: the <folder>.part names are this run's alone
        return [_quantize_bits(run, b, final) for b, final in zip(bit_list, finals)]


def _check_options(ckpt: Checkpoint, opts: GPTQOptions) -> tuple[int, list[str]]:
    """Refuse what cannot work before any work; the group size to use and the notes about it."""
    refused = gptq_refusal(ckpt)
    if refused:
        raise EdgequantError(refused)
    dims = input_dims(ckpt)
    if not dims:
        blocks = quant_layout(ckpt.hf_architecture).module_blocks
        raise EdgequantError(f"{ckpt.path} has no decoder weight matrices ({blocks}.N.*.weight) GPTQ can quantize; pass a causal LM checkpoint")
    _check_fused_experts(ckpt)
    group_size, note = resolve_group_size(opts.group_size, dims)
    if not 0 < opts.damp_percent < 1:
        raise EdgequantError(f"--damp-percent {opts.damp_percent}: use a fraction between 0 and 1 (0.01 to 0.1 is usual)")
    if opts.batch_size < 1:
        raise EdgequantError(f"--batch-size {opts.batch_size}: use at least 1")
    if opts.moe_routing not in MOE_ROUTINGS:
        raise EdgequantError(f"--moe-routing {opts.moe_routing!r}: use one of {', '.join(MOE_ROUTINGS)}")
    resolve_device(opts.device)
    return group_size, [note] if note else []


def gptq_refusal(source: str | Path | Checkpoint) -> str | None:
    """Why ``gptq`` refuses the family of ``source`` (one line naming what to use instead), or None when
    it quantizes it: the release skips its GPTQ stage with this line as the note."""
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    return quant_layout(ckpt.hf_architecture).gptq_refused


def _check_fused_experts(ckpt: Checkpoint) -> None:
    """Refuse a fused-experts source the backend would quantize from freshly initialised experts."""
    experts = quant_layout(ckpt.hf_architecture).experts
    if experts is None or experts.gptq_fused_source:
        return
    fused = next((n for n in ckpt.tensors if n.endswith(f".experts.{experts.gate_up_stack}")), None)
    if fused is not None:
        raise EdgequantError(
            f"{ckpt.path} stores its experts fused ({fused}); GPTQModel loads such {ckpt.hf_architecture} checkpoints "
            f"with freshly initialised experts. Save the model with transformers' save_pretrained (per-expert weights) "
            f"and quantize that folder, or use the GGUF files")


def _calibration(ckpt: Checkpoint, corpus: Text, opts: GPTQOptions) -> list[list[int]]:
    """The calibration windows, tokenized with the source's own tokenizer."""
    from transformers import AutoTokenizer

    from edgequant.remote_code import load_kwargs, refused

    with refused(ckpt.path):
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
    return calibration_windows(tokenizer, corpus.text, opts.samples, opts.seq_len, opts.seed)


def _quantize_bits(run: _Run, bits: int, final: Path) -> GPTQResult:
    """One bit width into ``<final>.part/``, then renamed (the caller holds the folder's lock)."""
    opts = run.opts
    spec = GPTQSpec(bits=bits, group_size=run.group_size, desc_act=opts.desc_act, sym=opts.sym,
                    damp_percent=opts.damp_percent, true_sequential=opts.true_sequential, device=opts.device,
                    batch_size=opts.batch_size, seed=opts.seed,
                    moe_routing=run.coverage.routing if run.coverage is not None else None)
    t0 = time.perf_counter()
    with atomic_folder(final, replace=True) as part:  # <final>.<pid>-<rand>.part, renamed at the end
        with progress_count(f"GPTQ {bits}-bit", run.n_layers) as bar:
            def on_layer(i: int) -> None:
                bar.describe(f"GPTQ {bits}-bit layer {i + 1}/{run.n_layers}")
                bar.advance(1)

            layers = run.backend.quantize(run.ckpt.path, spec, run.windows, part, on_layer)
        if not any(part.glob("*.safetensors")):
            raise RuntimeError(f"internal error: the {run.backend.name} backend wrote no weights into {part}")
        layers = merge_fused_errors(layers, fuse_split_linears(part, run.ckpt, run.layout, bits))
        coverage, warnings = _calibrated(run, layers)
        _check_layers_exist(part, run.ckpt, run.layout, bits)
        defuse, loader = defuser_model_type(part), gptq_loader(part)
        readme = _readme(final.name, run.ckpt.path, spec, run.corpus.name, len(run.windows), opts.seq_len, run.backend.name,
                         defuse, loader)
        _finish_folder(part, run.ckpt, readme)
    result = _result(run, spec, final, layers, time.perf_counter() - t0)
    result.defuser_model_type, result.gptq_loader = defuse, loader
    result.experts, result.warnings = coverage, warnings
    return result


def _check_layers_exist(part: Path, ckpt: Checkpoint, layout: QuantLayout, bits: int) -> None:
    """Every quantized layer the backend wrote is a matrix of the source checkpoint, of the same shape
    (found through the architecture's layout: per-expert layers of fused experts sources included), and
    experts are named as ``edgequant.gptq_load`` loads them. A layer the source does not have would be
    left out by transformers at load time and the source's own weight initialised at random, silently;
    refuse instead."""
    shapes = {name: ref.shape for name, ref in ckpt.tensors.items()}
    unknown = []
    for name, (n_in, n_out) in _written_modules(part, bits).items():
        where, site = layout.find_weight(name, shapes), layout.site(name)
        if where is None or where.shape(shapes) != (n_out, n_in):
            unknown.append(name)
        elif site is not None and site.kind == "expert" and name.rsplit(".", 1)[1] != _EXPERT_NAME[site.role]:
            unknown.append(name)  # edgequant.gptq_load builds experts with these names only
    if unknown:
        raise EdgequantError(
            f"GPTQ wrote {len(unknown)} quantized layers that {ckpt.hf_architecture} does not have (e.g. {sorted(unknown)[0]}), "
            f"so transformers would load this checkpoint with random weights: nothing was written. edgequant gptq "
            f"cannot quantize {ckpt.hf_architecture} yet; use its GGUF files")


def _written_modules(part: Path, bits: int) -> dict[str, tuple[int, int]]:
    """Module -> (in, out) of every quantized module in the folder (``qweight``: ``[in * bits / 32, out]``)."""
    from safetensors import safe_open

    out = {}
    for path in part.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith(".qweight"):
                    rows, cols = f.get_slice(key).get_shape()
                    out[key.removesuffix(".qweight")] = (rows * 32 // bits, cols)
    return out


def _result(run: _Run, spec: GPTQSpec, final: Path, layers: list[LayerError], seconds: float) -> GPTQResult:
    """What one written folder holds, measured on disk."""
    weights = sum(p.stat().st_size for p in final.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
    return GPTQResult(
        folder=str(final), bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
        size_bytes=size, weights_bytes=weights,
        bits_per_weight=round(weights * 8 / run.n_params, 3) if run.n_params else 0.0,
        seconds=round(seconds, 2), calibration=run.corpus.name, samples=len(run.windows), seq_len=run.opts.seq_len,
        seed=spec.seed, device=spec.device, backend=run.backend.name, layers=layers, notes=list(run.notes),
    )


# --------------------------------------------------------------------------- #
# MoE: calibration tokens per expert
# --------------------------------------------------------------------------- #


def expert_coverage(ckpt: Checkpoint, layout: QuantLayout, windows: list[list[int]], opts: GPTQOptions) -> CalibrationCoverage:
    """Count, on the source model in transformers, the calibration tokens each MoE layer's router sends to each
    expert (its own top-k), and choose the routing of the quantizing forward from ``opts.moe_routing``:
    ``native`` when every expert gets at least ``MIN_EXPERT_SHARE`` of the tokens, else ``all`` (``auto``), or an
    error (``native``)."""
    tokens = sum(len(w) for w in windows)
    layers = count_expert_tokens(ckpt, layout, windows, opts.device, opts.batch_size)
    cov = CalibrationCoverage(routing="native", tokens=tokens, min_tokens=max(1, math.ceil(MIN_EXPERT_SHARE * tokens)),
                         layers=layers)
    short = cov.short
    if opts.moe_routing == "all" or (opts.moe_routing == "auto" and short):
        cov.routing = "all"
    elif short:
        layer, expert, n = min(short, key=lambda x: x[2])
        raise EdgequantError(
            f"{len(short)} of {len(cov.counts)} experts get {_fewer(cov)} of the {tokens} calibration tokens "
            f"from their router (layer {layer} expert {expert}: {n}), too few to quantize them with GPTQ; pass more "
            f"--samples or a longer --seq-len (or --moe-routing all: every token to every expert while quantizing)")
    return cov


def _routing_notes(cov: CalibrationCoverage, requested: str) -> list[str]:
    short = cov.short
    if cov.routing == "native":
        return []
    if requested == "all":
        return ["every calibration token was routed to every expert while quantizing (--moe-routing all)"]
    return [f"{len(short)} of {len(cov.counts)} experts get {_fewer(cov)} of the {cov.tokens} calibration "
            f"tokens from their router{f' ({cov.unseen} none)' if cov.min_tokens > 1 else ''}: every calibration token was routed to every expert while "
            f"quantizing; more --samples or a longer --seq-len lets each expert be calibrated on its own tokens"]


def _fewer(cov: CalibrationCoverage) -> str:
    return "none" if cov.min_tokens == 1 else f"fewer than {cov.min_tokens}"


def count_expert_tokens(ckpt: Checkpoint, layout: QuantLayout, windows: list[list[int]], device: str = "cpu",
                        batch_size: int = 1) -> list[LayerCoverage]:
    """Per MoE layer, the tokens of ``windows`` the router of the source model (transformers) sends to each
    expert: forward hooks on the routers the layout names (``ExpertLayout.router_paths``) read the chosen
    experts' indices (the router's integer output)."""
    from transformers import AutoModelForCausalLM

    from edgequant.remote_code import load_kwargs, refused

    dev = resolve_device(device)
    with quiet_gptqmodel(), refused(ckpt.path):
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype="auto", device_map={"": dev},
                                                     **load_kwargs(ckpt.path)).eval()
    counts: dict[int, torch.Tensor] = {}
    routers: dict[int, str] = {}
    hooks = []
    for name, module in model.named_modules():
        site = layout.site(name)
        if site is None or site.path not in layout.experts.router_paths or site.block in counts:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise RuntimeError(f"internal error: the router {name} has no [experts, hidden] weight")
        counts[site.block] = torch.zeros(int(weight.shape[0]), dtype=torch.int64)
        routers[site.block] = name
        hooks.append(module.register_forward_hook(_counter(counts[site.block], name)))
    if not counts:
        raise RuntimeError(f"internal error: no router ({' or '.join(layout.experts.router_paths)}) in {type(model).__name__}")
    try:
        with torch.no_grad(), progress_count("Counting tokens per expert", len(windows)) as bar:
            for i in range(0, len(windows), batch_size):
                batch = windows[i:i + batch_size]  # windows of one length: no padding to leave out
                model(input_ids=torch.tensor(batch, device=dev))
                bar.advance(len(batch))
    finally:
        for h in hooks:
            h.remove()
        del model
    return [LayerCoverage(layer=b, tensor=routers[b], tokens=[int(c) for c in counts[b]],
                          unseen=[e for e, c in enumerate(counts[b]) if int(c) == 0]) for b in sorted(counts)]


def _counter(acc: torch.Tensor, name: str):
    """A forward hook adding the router's chosen experts (its integer output, ``[tokens, top_k]``) to ``acc``."""
    def hook(module, args, out) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        idx = next((t for t in reversed(outs) if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
        if idx is None:
            raise RuntimeError(f"internal error: the router {name} returned no expert indices")
        acc.add_(torch.bincount(idx.reshape(-1).cpu(), minlength=acc.numel())[:acc.numel()])
    return hook


def _calibrated(run: _Run, layers: list[LayerError]) -> tuple[CalibrationCoverage | None, list[str]]:
    """What the backend's report says about the calibration each module got: the coverage of this bit width
    (the fewest tokens an expert Linear was quantized from, the ones rounded to nearest), and the warnings.
    A module quantized by GPTQ from no token at all (an empty Hessian) is an error."""
    empty = [r for r in layers if r.method == "gptq" and r.samples == 0 and r.loss >= 1e8]
    if empty:
        raise EdgequantError(
            f"GPTQ quantized {len(empty)} modules from no calibration token (e.g. layer {empty[0].layer} {empty[0].module}); "
            f"nothing was written. Pass more --samples or a longer --seq-len")
    rtn = [r for r in layers if r.method != "gptq"]
    warnings = []
    if rtn:
        warnings.append(
            f"{len(rtn)} modules got fewer than {MIN_EXPERT_SHARE:.1%} of the calibration tokens and were rounded to "
            f"nearest instead of GPTQ-quantized (e.g. layer {rtn[0].layer} {rtn[0].module}, {rtn[0].samples} tokens); "
            f"pass more --samples or a longer --seq-len")
    if run.coverage is None:
        return None, warnings
    cov = CalibrationCoverage(**{k: getattr(run.coverage, k) for k in ("routing", "tokens", "min_tokens", "layers")})
    prefix = run.layout.module_blocks
    experts = [r for r in layers if (site := run.layout.site(f"{prefix}.{r.layer}.{r.module}")) is not None
               and site.kind == "expert"]
    cov.gptq_min_samples = min((r.samples for r in experts), default=None)
    cov.rtn_modules = [f"{prefix}.{r.layer}.{r.module}" for r in experts if r.method != "gptq"]
    return cov, warnings
