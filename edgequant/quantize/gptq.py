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

:func:`load_gptq_model` is the one reload path (tests and the bench use it): plain
``transformers`` ``from_pretrained`` (through optimum + GPTQModel's kernels), with the MoE
experts module given per-expert ``nn.Linear`` children when the checkpoint stores experts per
expert (GPTQModel always does; transformers 5 fuses experts into 3-D tensors). Missing,
unexpected or mismatched keys are an error, never a silent re-initialisation.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

# GPTQModel sizes a CPU worker pool from the core count and crashes on 2-core machines unless
# this is set before it is imported (anything that imports it, transformers' GPTQ path included).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

from edgequant.atomic import check_output_folder, check_writable, folder_lock  # noqa: E402
from edgequant.text import load_text  # noqa: E402
from edgequant.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint  # noqa: E402
from edgequant.errors import EdgequantError  # noqa
from edgequant.naming import gptq_folder, gptq_label  # noqa
from edgequant.quantize.gptq_options import GPTQOptions  # noqa: F401 (re-exported): E402
from edgequant.progress import progress_count  # noqa: E402
from edgequant.devices import resolve_device  # noqa: E402

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (128, 64, 32)  # the first one that divides every input dimension
EXTRA_FILES = ("generation_config.json",)  # copied from the source beside the tokenizer files
_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.(.+)\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


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

    @property
    def max_loss(self) -> float:
        return max((l.loss for l in self.layers), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_loss"] = self.max_loss
        return d


# --------------------------------------------------------------------------- #
# GPTQModel
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def quiet_gptqmodel() -> Iterator[io.StringIO]:
    """GPTQModel draws its own progress bars and logs to stdout: send them to a buffer, so that
    ``--json`` output stays clean and progress is ours. ``EDGEQUANT_GPTQ_VERBOSE=1`` passes them
    to stderr instead."""
    sink: io.TextIOBase = io.StringIO()
    if os.environ.get("EDGEQUANT_GPTQ_VERBOSE"):
        import sys

        sink = sys.stderr
    env = {"LOGBAR_ANIMATION": "0", "TQDM_DISABLE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    levels = {}
    try:
        with contextlib.redirect_stdout(sink):
            for name in ("gptqmodel", "optimum", "transformers", "defuser", "logbar", "tokenicer"):
                lg = logging.getLogger(name)
                levels[name] = lg.level
                lg.setLevel(logging.ERROR)
            yield sink if isinstance(sink, io.StringIO) else io.StringIO()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed)


# --------------------------------------------------------------------------- #
# Options, calibration, naming
# --------------------------------------------------------------------------- #


def input_dims(ckpt: Checkpoint) -> dict[int, list[str]]:
    """Input dimension -> the decoder matrices that have it (what GPTQ quantizes: 2-D weights and
    fused expert tensors inside ``model.layers``)."""
    dims: dict[int, list[str]] = {}
    for name, ref in ckpt.tensors.items():
        if _LAYER_WEIGHT.match(name) and len(ref.shape) == 2 and not name.endswith(("norm.weight", ".gate.weight", ".router.weight")):
            dims.setdefault(ref.shape[1], []).append(name)
        elif _FUSED_EXPERTS.match(name) and len(ref.shape) == 3:
            dims.setdefault(ref.shape[2], []).append(name)
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
    return ckpt.path.name or "model"


def _n_params(ckpt: Checkpoint) -> int:
    n = 0
    for ref in ckpt.tensors.values():
        p = 1
        for d in ref.shape:
            p *= d
        n += p
    return n


def _readme(name: str, source: Path, spec: GPTQSpec, calibration: str, samples: int, seq_len: int, backend: str) -> str:
    g = "one group per row" if spec.group_size == -1 else f"group size {spec.group_size}"
    return (
        f"# {name}\n\n"
        f"GPTQ {spec.bits}-bit ({g}, desc_act={spec.desc_act}, sym={spec.sym}) of `{source.name}`, made by "
        f"`edgequant gptq` with {backend}.\n\n"
        f"- format: GPTQ v1 (`quantization_config.format: gptq`), packed int32 `qweight`/`qzeros`, `scales`, `g_idx`\n"
        f"- calibration: {samples} x {seq_len} tokens of {calibration} (seed {spec.seed}), damp {spec.damp_percent}, "
        f"true_sequential={spec.true_sequential}\n\n"
        "Load it with transformers (needs `optimum` and `gptqmodel`), vLLM (`--quantization gptq`) or "
        "`edgequant.quantize.gptq.load_gptq_model`.\n"
    )


def _finish_folder(part: Path, ckpt: Checkpoint, readme: str) -> None:
    """The source's tokenizer files and chat template, byte for byte, and our README."""
    for fname in TOKENIZER_FILES + EXTRA_FILES:
        src = ckpt.path / fname
        if src.is_file():
            shutil.copyfile(src, part / fname)
    (part / "README.md").write_text(readme, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def gptq(source: str | Path, bits, output: str | Path | None = None, options: GPTQOptions | None = None) -> list[GPTQResult]:
    """Quantize ``source`` with GPTQ at each of ``bits``; one HF folder per bit width under ``output``."""
    opts = options or GPTQOptions()
    bit_list = parse_bits(bits)
    ckpt = open_checkpoint(source)
    dims = input_dims(ckpt)
    if not dims:
        raise EdgequantError(f"{ckpt.path} has no decoder weight matrices (model.layers.N.*.weight) GPTQ can quantize; pass a causal LM checkpoint")
    group_size, note = resolve_group_size(opts.group_size, dims)
    if not 0 < opts.damp_percent < 1:
        raise EdgequantError(f"--damp-percent {opts.damp_percent}: use a fraction between 0 and 1 (0.01 to 0.1 is usual)")
    if opts.batch_size < 1:
        raise EdgequantError(f"--batch-size {opts.batch_size}: use at least 1")
    resolve_device(opts.device)
    out_dir = Path(output) if output is not None else Path.cwd()
    check_output_folder(out_dir)
    name = _model_name(ckpt)
    finals = [out_dir / folder_name(name, b, group_size, opts.desc_act, opts.sym) for b in bit_list]
    check_writable(finals, force=opts.force, folders_ok=True)  # each checkpoint is a folder

    corpus = load_text(opts.calibration)
    from transformers import AutoTokenizer

    from edgequant.remote_code import load_kwargs, refused

    with refused(ckpt.path):
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
    windows = calibration_windows(tokenizer, corpus.text, opts.samples, opts.seq_len, opts.seed)
    backend = opts.backend or GPTQModelBackend()
    n_layers = len({int(m.group(1)) for n in ckpt.tensors if (m := re.match(r"^model\.layers\.(\d+)\.", n))})
    n_params = _n_params(ckpt)
    notes = [note] if note else []

    with folder_lock(out_dir):  # one writer per folder: the <folder>.part names are this run's alone
        results = _quantize_each(bit_list, finals, group_size, opts, ckpt, corpus, windows, backend, n_layers, n_params, notes)
    return results


def _quantize_each(bit_list, finals, group_size, opts, ckpt, corpus, windows, backend, n_layers, n_params, notes):
    """Each bit width into ``<folder>.part/``, then renamed (the caller holds the folder's lock)."""
    results = []
    for b, final in zip(bit_list, finals):
        spec = GPTQSpec(bits=b, group_size=group_size, desc_act=opts.desc_act, sym=opts.sym, damp_percent=opts.damp_percent,
                        true_sequential=opts.true_sequential, device=opts.device, batch_size=opts.batch_size, seed=opts.seed)
        part = final.with_name(final.name + ".part")
        _remove(part)  # left by a run that was killed outright
        t0 = time.perf_counter()
        try:
            part.mkdir(parents=True)
            with progress_count(f"GPTQ {b}-bit", n_layers) as bar:
                def on_layer(i: int, bar=bar, b=b) -> None:
                    bar.describe(f"GPTQ {b}-bit layer {i + 1}/{n_layers}")
                    bar.advance(1)

                layers = backend.quantize(ckpt.path, spec, windows, part, on_layer)
            if not any(part.glob("*.safetensors")):
                raise RuntimeError(f"internal error: the {backend.name} backend wrote no weights into {part}")
            _finish_folder(part, ckpt, _readme(final.name, ckpt.path, spec, corpus.name, len(windows), opts.seq_len, backend.name))
            if final.exists():
                _remove(final)
            os.replace(part, final)
        except BaseException:
            _remove(part)
            raise
        weights = sum(p.stat().st_size for p in final.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
        results.append(GPTQResult(
            folder=str(final), bits=b, group_size=group_size, desc_act=opts.desc_act, sym=opts.sym, size_bytes=size,
            weights_bytes=weights, bits_per_weight=round(weights * 8 / n_params, 3) if n_params else 0.0,
            seconds=round(time.perf_counter() - t0, 2), calibration=corpus.name, samples=len(windows), seq_len=opts.seq_len,
            seed=opts.seed, device=opts.device, backend=backend.name, layers=layers, notes=list(notes),
        ))
    return results


# --------------------------------------------------------------------------- #
# Reload
# --------------------------------------------------------------------------- #


def is_gptq_folder(path: str | Path) -> bool:
    """An HF folder whose config.json carries a GPTQ ``quantization_config``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
    return str(qc.get("quant_method", "")).lower() == "gptq"


class _Expert(torch.nn.Module):
    def __init__(self, hidden: int, ff: int, act_fn, dtype, device):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, ff, bias=False, dtype=dtype, device=device)
        self.up_proj = torch.nn.Linear(hidden, ff, bias=False, dtype=dtype, device=device)
        self.down_proj = torch.nn.Linear(ff, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertLinears(torch.nn.ModuleList):
    """Stand-in for transformers 5's fused experts module (``gate_up_proj [E, 2ff, h]``,
    ``down_proj [E, h, ff]``) with one ``gate_proj``/``up_proj``/``down_proj`` Linear per expert,
    the layout GPTQ checkpoints store; same call and the same math as the fused module."""

    def __init__(self, fused: torch.nn.Module):
        n_expert, two_ff, hidden = fused.gate_up_proj.shape
        dtype, device = fused.gate_up_proj.dtype, fused.gate_up_proj.device
        super().__init__([_Expert(hidden, two_ff // 2, fused.act_fn, dtype, device) for _ in range(n_expert)])
        self.num_experts = n_expert

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def defuse_experts(model: torch.nn.Module) -> int:
    """Replace every fused experts module (3-D ``gate_up_proj``/``down_proj``, no biases) by
    :class:`PerExpertLinears`; returns how many were replaced."""
    count = 0
    for name, module in list(model.named_modules()):
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gu, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gu.dim() == 3):
            continue
        if any(n.endswith("_bias") for n, _ in module.named_parameters(recurse=False)) or not hasattr(module, "act_fn"):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, PerExpertLinears(module))
        count += 1
    return count


def _per_expert_checkpoint(folder: Path) -> bool:
    from safetensors import safe_open

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if any(_PER_EXPERT_KEY.search(k) and k.endswith(".qweight") for k in f.keys()):
                return True
    return False


def load_gptq_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """The GPTQ folder as a transformers model ready for inference (eval mode) on ``device``.

    Fails with :class:`EdgequantError` when any weight would be missing, unexpected or re-shaped,
    instead of running a model with re-initialised weights.
    """
    folder = Path(folder)
    if not is_gptq_folder(folder):
        raise EdgequantError(f"{folder} is not a GPTQ folder (config.json has no GPTQ quantization_config); make one with edgequant gptq")
    dev = resolve_device(device)
    with quiet_gptqmodel():
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        from transformers.utils import is_optimum_available

        if not is_optimum_available():
            raise EdgequantError("loading GPTQ checkpoints in transformers needs optimum: pip install optimum")
        from edgequant.remote_code import load_kwargs, refused

        with refused(folder):
            config = AutoConfig.from_pretrained(str(folder), **load_kwargs(folder))
        try:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise EdgequantError(f"{folder}: {type(config).__name__} is not a causal LM transformers knows") from None
        if _per_expert_checkpoint(folder):
            base = cls

            class _PerExpert(base):  # type: ignore[misc, valid-type]
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    defuse_experts(self)

            _PerExpert.__name__ = _PerExpert.__qualname__ = base.__name__
            cls = _PerExpert
        kwargs = {"dtype": dtype} if dtype is not None else {}
        kwargs.update(load_kwargs(folder))
        model, info = cls.from_pretrained(str(folder), device_map={"": dev}, output_loading_info=True, **kwargs)
    problems = [(k, info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")]
    problems = [(k, sorted(map(str, v))) for k, v in problems if v]
    if problems:
        k, v = problems[0]
        raise EdgequantError(
            f"{folder} does not load cleanly in transformers: {len(v)} {k.replace('_', ' ')} (e.g. {v[0]}); "
            "the weights would be re-initialised. Re-make the folder with edgequant gptq"
        )
    return model.eval()
