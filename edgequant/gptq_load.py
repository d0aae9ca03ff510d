"""Loading GPTQ checkpoints (v1 ``format: gptq`` folders) for inference: the one reload path the
bench, ``edgequant gptq`` and the tests use.

:func:`load_gptq_model` is plain ``transformers`` ``from_pretrained`` (through optimum + GPTQModel's
kernels), with the MoE experts module given per-expert ``nn.Linear`` children when the checkpoint
stores experts per expert (GPTQModel always does; transformers 5 fuses experts into 3-D tensors).
Missing, unexpected or mismatched keys are an error, never a silent re-initialisation.

This module knows no architecture (it is in the base layer; ``edgequant.export.archs`` holds those
facts): it reads what the folder holds. Quantized experts are recognised by their keys
(``….experts.E.<linear>.qweight``) and the fused experts module by its shape (3-D ``gate_up_proj`` and
``down_proj``); the per-expert Linears are named :data:`EXPERT_LINEARS`, the names GPTQModel writes and
``edgequant gptq`` checks every folder for, whatever names the source checkpoint used (the hub's
Mixtral ``w1``/``w3``/``w2``).
:func:`load_snippet` is how a user loads a folder with plain transformers (the model card shows it):
for per-expert MoE folders it first calls ``defuser.replace_fused_blocks(model_type)`` (defuser comes with
gptqmodel), which makes transformers build per-expert Linears too (:func:`defuser_model_type`).
Folders whose per-expert Linears carry biases (GPTQModel's GPT-OSS), which neither defuser nor
:class:`PerExpertLinears` builds, load through ``GPTQModel.load`` instead (:func:`gptq_loader`): their
snippet, and :func:`load_gptq_model`, use it.
:func:`quiet_gptqmodel` keeps GPTQModel's own bars and logs off stdout, for loading and quantizing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

# GPTQModel sizes a CPU worker pool from the core count and crashes on 2-core machines unless
# this is set before it is imported (anything that imports it, transformers' GPTQ path included).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

from edgequant.devices import resolve_device  # noqa: E402
from edgequant.errors import EdgequantError  # noqa: E402

_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")
GPTQMODEL = "gptqmodel"  # gptq_loader's value for folders that load through GPTQModel.load
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")  # one expert's gate, up and down Linears in a GPTQ folder
_QUIET_LOGGERS = ("gptqmodel", "optimum", "transformers", "defuser", "logbar", "tokenicer")


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
            for name in _QUIET_LOGGERS:
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
    """One expert's SwiGLU MLP as three Linears (the names GPTQ checkpoints store)."""

    def __init__(self, hidden: int, ff: int, act_fn, dtype, device):
        super().__init__()
        for name, (n_in, n_out) in zip(EXPERT_LINEARS, ((hidden, ff), (hidden, ff), (ff, hidden))):
            self.add_module(name, torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in EXPERT_LINEARS)
        return down(self.act_fn(gate(x)) * up(x))


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


def _per_expert_keys(folder: Path, suffix: str) -> bool:
    """Whether any per-expert key (``.experts.E.*``) of the folder's weights ends with ``suffix``."""
    from safetensors import safe_open

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if any(_PER_EXPERT_KEY.search(k) and k.endswith(suffix) for k in f.keys()):
                return True
    return False


def _per_expert_checkpoint(folder: Path) -> bool:
    """Whether the folder's weights store quantized experts one by one (``.experts.E.*.qweight``)."""
    return _per_expert_keys(folder, ".qweight")


def _expert_biases(folder: Path) -> bool:
    """Whether the folder's per-expert Linears carry biases (``.experts.E.<linear>.bias``)."""
    return _per_expert_keys(folder, ".bias")


def gptq_loader(folder: str | Path) -> str | None:
    """``"gptqmodel"`` when the folder loads only through ``GPTQModel.load`` (per-expert Linears with
    biases: transformers and defuser build no such experts), else None (transformers' from_pretrained)."""
    folder = Path(folder)
    return GPTQMODEL if _per_expert_checkpoint(folder) and _expert_biases(folder) else None


def defuser_model_type(folder: str | Path) -> str | None:
    """The ``model_type`` a user hands to ``defuser.replace_fused_blocks`` before loading the folder
    with plain transformers, or None when the folder needs no such step.

    transformers 5 builds a MoE's experts as one fused module; a GPTQ folder stores each expert's
    Linears on their own (``….experts.E.gate_proj.qweight``). Without defuser (installed with
    gptqmodel) transformers would report those keys unexpected and initialise the experts at random.
    """
    folder = Path(folder)
    if not _per_expert_checkpoint(folder) or gptq_loader(folder):
        return None
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, OSError, AttributeError):
        model_type = None
    if not isinstance(model_type, str) or not model_type:
        raise EdgequantError(f"{folder}/config.json has no model_type; re-make the folder with edgequant gptq")
    return model_type


def load_snippet(path: str, defuser_type: str | None, loader: str | None = None) -> str:
    """The Python lines that load the GPTQ folder at ``path`` with plain transformers (+ gptqmodel),
    or with ``GPTQModel.load`` when ``loader`` (:func:`gptq_loader` of the folder) says so, as the
    model card and the folder's README show them; ``defuser_type`` is :func:`defuser_model_type` of the folder."""
    if loader == GPTQMODEL:
        return ("import torch\nfrom gptqmodel import GPTQModel\nfrom transformers import AutoTokenizer\n\n"
                f"path = {json.dumps(path)}\n"
                "tokenizer = AutoTokenizer.from_pretrained(path)\n"
                "# GPTQModel builds the per-expert Linears (with biases) the folder stores, which transformers cannot;\n"
                "# float16: the dtype of the GPTQ scales, in which the kernels compute exactly what the folder holds\n"
                "model = GPTQModel.load(path, dtype=torch.float16)\n")
    head = "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
    if defuser_type:
        head = ("import defuser  # installed with gptqmodel\n" + head
                + f"defuser.replace_fused_blocks({json.dumps(defuser_type)})  # experts as one Linear each, as the folder stores them\n")
    return (head + f"path = {json.dumps(path)}\n"
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            "# float16: the dtype of the GPTQ scales, in which the kernels compute exactly what the folder holds\n"
            'model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="auto")\n')


def _model_class(folder: Path):
    """The causal LM class for the folder's config, defusing experts first when the checkpoint
    stores them per expert."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from edgequant.remote_code import load_kwargs, refused

    with refused(folder):
        config = AutoConfig.from_pretrained(str(folder), **load_kwargs(folder))
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise EdgequantError(f"{folder}: {type(config).__name__} is not a causal LM transformers knows") from None
    if not _per_expert_checkpoint(folder):
        return cls

    class _PerExpert(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            defuse_experts(self)

    _PerExpert.__name__ = _PerExpert.__qualname__ = cls.__name__
    return _PerExpert


def _check_loaded_cleanly(folder: Path, info: dict) -> None:
    """Every weight found its place: no missing, unexpected or re-shaped keys."""
    problems = [(k, info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")]
    problems = [(k, sorted(map(str, v))) for k, v in problems if v]
    if problems:
        k, v = problems[0]
        raise EdgequantError(
            f"{folder} does not load cleanly in transformers: {len(v)} {k.replace('_', ' ')} (e.g. {v[0]}); "
            "the weights would be re-initialised. Re-make the folder with edgequant gptq"
        )


def load_gptq_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """The GPTQ folder as a transformers model ready for inference (eval mode) on ``device``.

    Fails with :class:`EdgequantError` when any weight would be missing, unexpected or re-shaped,
    instead of running a model with re-initialised weights.
    """
    folder = Path(folder)
    if not is_gptq_folder(folder):
        raise EdgequantError(f"{folder} is not a GPTQ folder (config.json has no GPTQ quantization_config); make one with edgequant gptq")
    dev = resolve_device(device)
    if gptq_loader(folder) == GPTQMODEL:
        return _load_with_gptqmodel(folder, dev, dtype)
    with quiet_gptqmodel():
        from transformers.utils import is_optimum_available

        from edgequant.remote_code import load_kwargs

        if not is_optimum_available():
            raise EdgequantError("loading GPTQ checkpoints in transformers needs optimum: pip install optimum")
        cls = _model_class(folder)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        kwargs.update(load_kwargs(folder))
        model, info = cls.from_pretrained(str(folder), device_map={"": dev}, output_loading_info=True, **kwargs)
    _check_loaded_cleanly(folder, info)
    return model.eval()


def _load_with_gptqmodel(folder: Path, dev, dtype: torch.dtype | None):
    """The folder through ``GPTQModel.load``: its transformers model (the wrapper's ``.model``)."""
    with quiet_gptqmodel():
        from gptqmodel import GPTQModel

        kwargs = {"dtype": dtype} if dtype is not None else {}
        wrapper = GPTQModel.load(str(folder), device=str(dev), **kwargs)
    return wrapper.model.eval()
