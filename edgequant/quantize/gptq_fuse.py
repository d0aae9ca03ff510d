"""Fused Linears a GPTQ backend quantized as their parts, stacked back into the source's layout.

GPTQModel quantizes Phi-3's ``mlp.gate_up_proj`` (one Linear, gate rows then up rows) as two Linears,
``mlp.gate_proj`` and ``mlp.up_proj``, and saves them so; transformers' ``Phi3ForCausalLM`` has only the
fused module, and would leave it randomly initialised. The parts see the same input, so they share
GPTQ's Hessian, and GPTQ treats every output row on its own: stacking the parts' packed tensors along
the output dimension gives exactly the checkpoint GPTQ of the fused matrix would. Which Linears are
fused is the architecture's quantization layout (``QuantLayout.fused``).

A v1 GPTQ module stacks along its output dimension as: ``qweight [in*bits/32, out]`` and
``scales [groups, out]`` side by side, ``qzeros [groups, out*bits/32]`` side by side (each part but the
last must fill whole int32 words), ``bias [out]`` end to end, ``g_idx [in]`` shared (it must agree).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from edgequant.atomic import atomic_outputs, write_text
from edgequant.checkpoint import Checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.archs.base import QuantLayout

_SIDE_BY_SIDE = ("qweight", "qzeros", "scales")
INDEX = "model.safetensors.index.json"


def fuse_split_linears(part: Path, ckpt: Checkpoint, layout: QuantLayout, bits: int) -> list[tuple[int, str, tuple[str, ...]]]:
    """Stack, in the folder ``part``, every set of split parts of a Linear the source stores fused.
    Returns ``(block, fused path, part paths)`` for each one stacked."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(part.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            where.update({k: path for k in f.keys()})
    shapes = {name: ref.shape for name, ref in ckpt.tensors.items()}
    jobs = []
    for bid in range(layout.n_blocks(ckpt.tensors)):
        prefix = f"{layout.module_blocks}.{bid}."
        for fl in layout.fused:
            names = [prefix + p for p in fl.parts]
            if (prefix + fl.name + ".qweight" in where or not all(n + ".qweight" in where for n in names)
                    or layout.find_weight(prefix + fl.name, shapes) is None):
                continue  # nothing split, or a source that stores the parts split too
            jobs.append((bid, fl.name, fl.parts))
    if jobs:
        _rewrite(part, where, [(f"{layout.module_blocks}.{b}.", name, parts) for b, name, parts in jobs], bits)
    return jobs


def _rewrite(part: Path, where: dict[str, Path], jobs: list[tuple[str, str, tuple[str, ...]]], bits: int) -> None:
    """Load the files the jobs touch, stack the parts into the first part's file, write them back."""
    from safetensors.torch import load_file, save_file

    files: dict[Path, dict[str, torch.Tensor]] = {}
    for prefix, name, parts in jobs:
        target = where[f"{prefix}{parts[0]}.qweight"]
        pieces = []
        for p in parts:
            keys = sorted(k for k in where if k.startswith(f"{prefix}{p}."))
            for k in keys:
                files.setdefault(where[k], load_file(str(where[k])))
            pieces.append({k.rsplit(".", 1)[1]: files[where.pop(k)].pop(k) for k in keys})
        for suffix, t in stack_gptq_modules(pieces, bits, prefix + name).items():
            files[target][f"{prefix}{name}.{suffix}"] = t
            where[f"{prefix}{name}.{suffix}"] = target
    for path, tensors in files.items():
        with atomic_outputs([path]) as (tmp,):
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
    index = part / INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: p.name for k, p in sorted(where.items())}
        write_text(index, json.dumps(data, indent=2) + "\n")


def stack_gptq_modules(pieces: list[dict[str, torch.Tensor]], bits: int, name: str) -> dict[str, torch.Tensor]:
    """One v1 GPTQ module from its parts along the output dimension (``pieces``: suffix -> tensor, first rows first)."""
    suffixes = set(pieces[0])
    if any(set(p) != suffixes for p in pieces) or not {"qweight", "g_idx", *_SIDE_BY_SIDE} <= suffixes:
        raise EdgequantError(f"{name}: the GPTQ backend wrote its parts with different tensors; cannot fuse them")
    if any(not torch.equal(p["g_idx"], pieces[0]["g_idx"]) for p in pieces):
        raise EdgequantError(f"{name}: the GPTQ backend quantized its parts with different column orders (g_idx), so "
                             f"they cannot be fused; run edgequant gptq without --desc-act")
    for p in pieces[:-1]:
        if p["scales"].shape[1] * bits % 32:
            raise EdgequantError(f"{name}: a part of {p['scales'].shape[1]} rows does not fill whole 32-bit words at "
                                 f"{bits} bits, so the parts cannot be fused; use another --bits")
    out = {s: torch.cat([p[s] for p in pieces], dim=1) for s in _SIDE_BY_SIDE}
    out["g_idx"] = pieces[0]["g_idx"]
    if "bias" in suffixes:
        out["bias"] = torch.cat([p["bias"] for p in pieces], dim=0)
    extra = suffixes - {"g_idx", "bias", *_SIDE_BY_SIDE}
    if extra:
        raise EdgequantError(f"{name}: the GPTQ backend wrote {sorted(extra)[0]} beside the packed weights; cannot fuse")
    return out


def merge_fused_errors(layers: list, fused: list[tuple[int, str, tuple[str, ...]]]) -> list:
    """The per-module report with each stacked set of parts as one row of the fused module: GPTQ's
    loss adds up over output rows, the samples are the same, damp the largest, time the sum."""
    if not fused:
        return layers
    groups = {(bid, p): (bid, name) for bid, name, parts in fused for p in parts}
    out, merged = [], {}
    for row in layers:
        key = groups.get((row.layer, row.module))
        if key is None:
            out.append(row)
        elif key not in merged:
            merged[key] = dataclasses.replace(row, module=key[1])
            out.append(merged[key])
        else:
            m = merged[key]
            m.loss, m.damp, m.seconds = m.loss + row.loss, max(m.damp, row.damp), m.seconds + row.seconds
            m.samples = max(m.samples, row.samples)
    out.sort(key=lambda r: (r.layer, r.module))
    return out
