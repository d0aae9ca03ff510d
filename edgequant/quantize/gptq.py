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
from edgequant.gptq_load import EXPERT_LINEARS, defuser_model_type, load_snippet, quiet_gptqmodel  # also sets GPTQMODEL_CPU_WORKERS before GPTQModel is imported
from edgequant.naming import gptq_folder, gptq_label
from edgequant.progress import progress_count
from edgequant.quantize.gptq_fuse import fuse_split_linears, merge_fused_errors
from edgequant.quantize.gptq_options import GPTQOptions  # re-exported: the CLI and the pipeline import it from here
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


@dataclass
class LayerError:
    """One quantized module, as the backend reports it (GPTQ's loss is its output error on the calibration)."""

    layer: int
    module: str
    loss: float
    samples: int
    damp: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


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

    @property
    def max_loss(self) -> float:
        """The largest per-module loss (0 when the backend reported none)."""
        return max((l.loss for l in self.layers), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_loss"] = self.max_loss
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

            qc = QuantizeConfig(
                bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
                damp_percent=spec.damp_percent, true_sequential=spec.true_sequential, format="gptq",
                offload_to_disk=False,  # its default spills every layer to /tmp: 30x slower on small models
            )
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
            rows.append(LayerError(layer=int(e["layer"]), module=str(e["module"]), loss=float(e["loss"]),
                                   samples=int(e.get("samples", 0)), damp=float(e.get("damp", 0) or 0),
                                   seconds=float(e.get("time", 0) or 0)))
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
            defuser_type: str | None) -> str:
    """The folder's short README: format, calibration and how to load it."""
    g = "one group per row" if spec.group_size == -1 else f"group size {spec.group_size}"
    return (
        f"# {name}\n\n"
        f"GPTQ {spec.bits}-bit ({g}, desc_act={spec.desc_act}, sym={spec.sym}) of `{source.name}`, made by "
        f"`edgequant gptq` with {backend}.\n\n"
        f"- format: GPTQ v1 (`quantization_config.format: gptq`), packed int32 `qweight`/`qzeros`, `scales`, `g_idx`\n"
        f"- calibration: {samples} x {seq_len} tokens of {calibration} (seed {spec.seed}), damp {spec.damp_percent}, "
        f"true_sequential={spec.true_sequential}\n\n"
        "Load it with transformers (needs `optimum` and `gptqmodel`), from the folder above this one:\n\n"
        f"```python\n{load_snippet(name, defuser_type)}```\n\n"
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
    run = _Run(ckpt, opts, group_size, corpus, _calibration(ckpt, corpus, opts), opts.backend or GPTQModelBackend(),
               layout, layout.n_blocks(ckpt.tensors), _n_params(ckpt), notes)
    with folder_lock(out_dir):  # one writer per folder: the <folder>.part names are this run's alone
        return [_quantize_bits(run, b, final) for b, final in zip(bit_list, finals)]


def _check_options(ckpt: Checkpoint, opts: GPTQOptions) -> tuple[int, list[str]]:
    """Refuse what cannot work before any work; the group size to use and the notes about it."""
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
    resolve_device(opts.device)
    return group_size, [note] if note else []


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
                    batch_size=opts.batch_size, seed=opts.seed)
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
        _check_layers_exist(part, run.ckpt, run.layout, bits)
        defuse = defuser_model_type(part)
        readme = _readme(final.name, run.ckpt.path, spec, run.corpus.name, len(run.windows), opts.seq_len, run.backend.name,
                         defuse)
        _finish_folder(part, run.ckpt, readme)
    result = _result(run, spec, final, layers, time.perf_counter() - t0)
    result.defuser_model_type = defuse
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
