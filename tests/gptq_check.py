"""Our own check of a GPTQ v1 checkpoint, independent of GPTQModel and of any loader.

For every quantized module (``<name>.qweight``) the packed tensors are unpacked by hand:

* ``qweight`` int32 ``[in * bits / 32, out]``: the codes of each output column as one little-endian
  bit stream along the input dimension (``32 / bits`` codes per word for 2/4/8 bits; for 3 bits
  32 codes fill three words and a code may straddle two words);
* ``qzeros`` int32 ``[groups, out * bits / 32]``: the zero points packed the same way along the
  output dimension, stored minus one (the v1 convention: ``zero = stored + 1``);
* ``scales`` ``[groups, out]`` and ``g_idx`` ``[in]`` (the group of each input column).

The dequantized weight is ``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``.
It is compared with the original matrix of the source checkpoint (found through the architecture's
quantization layout, ``QuantLayout.find_weight``: plain layers under any spelling of the blocks, hub
per-expert ``w1/w3/w2`` and transformers 5's fused ``gate_up_proj``/``down_proj``) and with
round-to-nearest (RTN) on the same grid (bits, group size, sym) as a baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from edgequant.checkpoint import Checkpoint, open_checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.archs.base import QuantLayout, WeightSlice, quant_layout

# Relative Frobenius error ||W - W_q|| / ||W|| a sound GPTQ checkpoint stays under, per bit width.
# (RTN on bf16 Gaussian-like weights gives about 0.5 / 0.19 / 0.09 / 0.005 at group size 64-128.)
ERROR_BOUND = {2: 0.85, 3: 0.40, 4: 0.20, 8: 0.015}


@dataclass
class ModuleCheck:
    name: str
    shape: tuple[int, int]  # (out, in)
    rel_error: float  # ||W - dequant(GPTQ)|| / ||W||
    rtn_rel_error: float  # the same for round-to-nearest at the same bits / group size / sym

    @property
    def ratio(self) -> float:
        return self.rel_error / self.rtn_rel_error if self.rtn_rel_error > 0 else 1.0


@dataclass
class CheckResult:
    folder: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    modules: list[ModuleCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # format violations (codes out of range, bad g_idx, ...)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return float(np.mean([m.rel_error for m in self.modules])) if self.modules else 0.0

    @property
    def mean_rtn_rel_error(self) -> float:
        return float(np.mean([m.rtn_rel_error for m in self.modules])) if self.modules else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.max_rel_error <= ERROR_BOUND[self.bits]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(max_rel_error=self.max_rel_error, mean_rel_error=self.mean_rel_error,
                 mean_rtn_rel_error=self.mean_rtn_rel_error, ok=self.ok)
        return d


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed along dim 0 of an int32 tensor (one little-endian bit stream per column) -> int64 ``[n, cols]``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the int32 words as unsigned
    shifts = torch.arange(32, dtype=torch.int64)
    bitplane = (words.unsqueeze(1) >> shifts.view(1, 32, 1)) & 1  # [rows, 32, cols]: bit b of word r
    stream = bitplane.reshape(-1, packed.shape[1])  # bit index r*32+b
    if stream.shape[0] < n * bits:
        raise EdgequantError(f"packed tensor holds {stream.shape[0]} bits per column, fewer than {n} x {bits}")
    codes = stream[: n * bits].reshape(n, bits, -1)
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    return (codes * weights).sum(1)


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed along dim 1 (qzeros) -> int64 ``[rows, n]``."""
    return unpack_rows(packed.t().contiguous(), bits, n).t()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a v1 GPTQ module stands for."""
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight, bits, n_in)  # [in, out]
    zeros = unpack_cols(qzeros, bits, n_out) + 1  # v1: stored zero points are zero - 1
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (q - zeros[g]).float()  # [in, out]
    return w.t().contiguous()


def rtn_dequantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on GPTQ's grid (min/max per group, zero included, sym: symmetric around 0)."""
    w = w.float()
    out, n_in = w.shape
    gs = n_in if group_size in (-1, 0) else group_size
    x = w.reshape(out, n_in // gs, gs)
    maxq = 2**bits - 1
    xmin = torch.clamp(x.amin(-1, keepdim=True), max=0)
    xmax = torch.clamp(x.amax(-1, keepdim=True), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(out, n_in)


def original_weight(ckpt: Checkpoint, module: str, layout: QuantLayout | None = None) -> torch.Tensor:
    """The source matrix ``[out, in]`` of a quantized module name, whatever the source's layout."""
    layout = layout or quant_layout(ckpt.hf_architecture)
    where = layout.find_weight(module, {n: r.shape for n, r in ckpt.tensors.items()})
    if where is None:
        raise EdgequantError(f"{module}: no matching weight in the source checkpoint {ckpt.path} (is it the model this GPTQ folder was made from?)")
    index = () if where.expert is None else (where.expert,)
    return ckpt.tensors[where.tensor].read(index, where.rows).float()


def _read_quant_config(folder: Path) -> dict:
    path = folder / "quantize_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" not in cfg:
        raise EdgequantError(f"{folder} has no quantize_config.json nor quantization_config in config.json: not a GPTQ folder")
    return cfg["quantization_config"]


def check_gptq_folder(folder: str | Path, source: str | Path) -> CheckResult:
    """Unpack every quantized module of ``folder`` and compare it with ``source``'s original weights."""
    folder = Path(folder)
    qc = _read_quant_config(folder)
    bits, group_size, sym, desc_act = int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True)), bool(qc.get("desc_act", False))
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    result = CheckResult(folder=str(folder), bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    if fmt != "gptq":
        result.problems.append(f"checkpoint format {fmt!r}, expected 'gptq' (v1)")
    ckpt = open_checkpoint(source)
    layout = quant_layout(ckpt.hf_architecture)
    maxq = 2**bits - 1
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".qweight")):
                name = key[: -len(".qweight")]
                qweight, qzeros, scales, g_idx = (f.get_tensor(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx"))
                n_in, n_out = g_idx.shape[0], scales.shape[1]
                gs = n_in if group_size == -1 else group_size
                q = unpack_rows(qweight, bits, n_in)
                zeros = unpack_cols(qzeros, bits, n_out) + 1
                if int(q.min()) < 0 or int(q.max()) > maxq:
                    result.problems.append(f"{name}: codes outside 0..{maxq}")
                if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
                    result.problems.append(f"{name}: g_idx outside 0..{scales.shape[0] - 1}")
                if not desc_act and not torch.equal(g_idx.to(torch.int64), torch.arange(n_in) // gs):
                    result.problems.append(f"{name}: g_idx is not i // group_size although desc_act is off")
                if sym and not bool((zeros == 2 ** (bits - 1)).all()):
                    result.problems.append(f"{name}: sym checkpoint with zero points other than {2 ** (bits - 1)}")
                if not bool((scales.float() > 0).all()):
                    result.problems.append(f"{name}: non-positive scales")
                w_q = dequantize(qweight, qzeros, scales, g_idx, bits)
                w = original_weight(ckpt, name, layout)
                if tuple(w.shape) != tuple(w_q.shape):
                    result.problems.append(f"{name}: shape {tuple(w_q.shape)} != source {tuple(w.shape)}")
                    continue
                norm = float(w.norm()) or 1.0
                rel = float((w - w_q).norm()) / norm
                rtn = float((w - rtn_dequantize(w, bits, group_size, sym)).norm()) / norm
                result.modules.append(ModuleCheck(name=name, shape=tuple(w.shape), rel_error=rel, rtn_rel_error=rtn))
    if not result.modules:
        result.problems.append("no quantized module (*.qweight) found")
    return result


def dequantized_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> float32 ``[out, in]`` weight, unpacked by :func:`dequantize`, for every quantized module."""
    folder = Path(folder)
    bits = int(_read_quant_config(folder)["bits"])
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in (k for k in f.keys() if k.endswith(".qweight")):
                name = key[: -len(".qweight")]
                out[name] = dequantize(*(f.get_tensor(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")), bits)
    return out


def _model_layout(model: torch.nn.Module) -> QuantLayout:
    return quant_layout((getattr(model.config, "architectures", None) or [type(model).__name__])[0])


def _param_view(params: dict, where: WeightSlice) -> torch.Tensor:
    """The part of a model parameter a quantized module's matrix is (a view: writes go to the model)."""
    return where.view(params[where.tensor])


def _find_param(params: dict, shapes: dict, layout: QuantLayout, name: str) -> torch.Tensor:
    where = layout.find_weight(name, shapes)
    if where is None:
        raise EdgequantError(f"{name}: no such module in the model")
    return _param_view(params, where)


def replace_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Write ``weights`` (by GPTQ module name) into a plain transformers model of the source, in place:
    ``nn.Linear`` modules by name, per-expert names into transformers 5's fused expert tensors (the
    architecture's quantization layout places them). Returns how many matrices were replaced; every
    one of ``weights`` must find its place."""
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    layout = _model_layout(model)
    with torch.no_grad():
        for name, w in weights.items():
            view = _find_param(params, shapes, layout, name)
            view.copy_(w.to(view.dtype))
    return len(weights)


def rtn_model_(model: torch.nn.Module, names: list[str], bits: int, group_size: int, sym: bool) -> None:
    """Round-to-nearest, in place, of the same matrices (GPTQ module names) of a plain transformers model."""
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    layout = _model_layout(model)
    rtn = {name: rtn_dequantize(_find_param(params, shapes, layout, name).detach(), bits, group_size, sym)
           for name in names}
    replace_weights(model, rtn)
