"""How much each tensor loses in each candidate type: the importance-weighted squared error of
ggml's own quantizer on a sample of the tensor's rows.

For a weight row ``w`` and its quantized ``q``, a token with input ``x`` sees the output error
``(w - q) . x``; over the calibration tokens its mean square is about ``sum_j a_j (w_j - q_j)^2``
with ``a_j`` the mean squared activation of input column ``j`` (the importance matrix's
``in_sum2 / counts``; 1 without one). Summed over the rows this is the tensor's error in a type.
The rows are quantized by ggml itself (``ggml_rows``), with the same importance weights as
llama.cpp's quantizer, so the error is the file's error on those rows. About 32 K values per
tensor are quantized in each type (all rows of a small tensor): the rows a cheap proxy computed on
every row ranks worst, plus a spread of the others, scaled by the proxy (``measure``). Sampling rows
is sound because ggml quantizes every row on its own; the proxy keeps a few outlier rows, which
carry much of a tensor's error in real models, from being missed or over-counted.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import gguf
import numpy as np

from edgequant.gguf_layout import Layout, as_float32, float_rows
from edgequant.quantize.ggml_rows import roundtrip, row_bytes
from edgequant.quantize.imatrix_file import Imatrix

Q = gguf.GGMLQuantizationType
_LAYER = re.compile(r"^blk\.(\d+)\.")


def role_of(name: str) -> str:
    """``blk.7.attn_q.weight`` -> ``attn_q``; ``token_embd.weight`` -> ``token_embd``."""
    return _LAYER.sub("", name).removesuffix(".weight")


@dataclass
class TensorCosts:
    name: str
    role: str
    shape: list[int]
    source_type: Q
    n_rows: int
    sampled_rows: int
    bytes: dict[Q, int]  # data bytes of the whole tensor in each candidate type
    error: dict[Q, float] = field(default_factory=dict)  # weighted squared error of the whole tensor


def sized(layout: Layout, name: str, candidates: list[Q]) -> TensorCosts:
    """A tensor's record with the bytes of each candidate type and no errors yet."""
    loc = layout.tensors[name]
    n_rows = int(np.prod(loc.shape[1:]))
    return TensorCosts(name, role_of(name), list(loc.shape), loc.type, n_rows, 0,
                       {q: row_bytes(q, loc.shape[0]) * n_rows for q in candidates})


def _round_float(x: np.ndarray, q: Q) -> np.ndarray:
    if q == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    if q == Q.BF16:  # round to nearest even, as ggml's fp32 -> bf16
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return x


MIN_ROWS = 16
PROXY_BLOCK = 32
_CHUNK_VALUES = 1 << 22  # values per numpy pass over a tensor when computing the proxy


def row_proxy(rows: np.ndarray, source_type: Q, weights: np.ndarray | None, n_per_expert: int) -> np.ndarray:
    """A cheap stand-in for each row's quantization error, computed on every row: per block of 32
    values, the squared largest magnitude (a uniform quantizer's step is proportional to it) times the
    block's summed importance. Rows with outliers, which dominate a tensor's error, stand out."""
    n, k = rows.shape
    out = np.empty(n)
    step = max(1, _CHUNK_VALUES // k)
    blocks = k // PROXY_BLOCK
    for s in range(0, n, step):
        x = as_float32(rows[s:s + step], source_type)[:, :blocks * PROXY_BLOCK]
        amax2 = np.abs(x.reshape(len(x), blocks, PROXY_BLOCK)).max(axis=2) ** 2
        if weights is None:
            out[s:s + step] = amax2.sum(axis=1) * PROXY_BLOCK
            continue
        experts = np.minimum(np.arange(s, s + len(x)) // n_per_expert, len(weights) - 1)
        wsum = weights[:, :blocks * PROXY_BLOCK].reshape(len(weights), blocks, PROXY_BLOCK).sum(axis=2)
        out[s:s + step] = (amax2 * wsum[experts]).sum(axis=1)
    return out


def _sample(proxy: np.ndarray, row_length: int, elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows to quantize: about ``elements`` values, half of them the rows with the largest proxy (where
    the error concentrates), half evenly spaced over the others; all rows of a small tensor. Returns
    (top rows, spread rows), the same on every run."""
    n = len(proxy)
    limit = max(MIN_ROWS, elements // max(row_length, 1))
    if n <= limit:
        return np.arange(n), np.arange(0)
    top = np.sort(np.argsort(-proxy, kind="stable")[:limit // 2])
    rest = np.setdiff1d(np.arange(n), top)
    spread = rest[np.unique(np.linspace(0, len(rest) - 1, limit - len(top)).round().astype(np.int64))]
    return top, spread


def measure(layout: Layout, name: str, candidates: list[Q], imatrix: Imatrix | None,
            elements: int = 32768) -> TensorCosts:
    """Errors of one tensor in each of ``candidates`` (its own float type costs 0).

    A stratified ratio estimate: the rows with the largest proxy error are quantized and counted
    as they are; for the other rows, the error of a spread sample, over the sample's proxy, times the
    proxy summed over all of them. Exact when every row is quantized."""
    loc = layout.tensors[name]
    k = loc.shape[0]
    n_per_expert = loc.shape[1] if len(loc.shape) > 1 else 1
    rows = float_rows(layout, name)
    entry = imatrix.entries.get(name) if imatrix is not None else None
    weights = entry.values() if entry is not None else None  # [n_mat, k]
    proxy = row_proxy(rows, loc.type, weights, n_per_expert)
    top, spread = _sample(proxy, k, elements)
    out = sized(layout, name, candidates)
    out.sampled_rows = len(top) + len(spread)
    rest_proxy = float(proxy.sum() - proxy[top].sum())
    spread_proxy = float(proxy[spread].sum()) if len(spread) else 0.0
    parts = [(top, 1.0), (spread, rest_proxy / spread_proxy if spread_proxy > 0 else 0.0)]
    for q in candidates:
        if q == loc.type:
            out.error[q] = 0.0
            continue
        err = 0.0
        for idx, factor in parts:
            if len(idx) and factor:
                err += factor * _error(as_float32(rows[idx], loc.type), idx // n_per_expert, q, weights)
        out.error[q] = err
    return out


def _error(x: np.ndarray, experts: np.ndarray, q: Q, weights: np.ndarray | None) -> float:
    """Summed importance-weighted squared error of rows ``x`` in type ``q`` (ggml's quantizer)."""
    err = 0.0
    for e in np.unique(experts):
        sel = experts == e
        w = None if weights is None else weights[min(int(e), len(weights) - 1)]
        xe = x[sel]
        deq = _round_float(xe, q) if q in (Q.F16, Q.BF16, Q.F32) else roundtrip(xe, q, w)
        d = (xe - deq) ** 2
        err += float((d * w).sum() if w is not None else d.sum())
    return err


def measure_all(layout: Layout, candidates: dict[str, list[Q]], imatrix: Imatrix | None, *,
                elements: int = 32768, threads: int | None = None, on_done=None) -> dict[str, TensorCosts]:
    """``measure`` for every tensor, spread over threads (ggml's quantizers release the GIL)."""
    names = sorted(candidates, key=lambda n: -int(np.prod(layout.tensors[n].shape)))  # big ones first
    results: dict[str, TensorCosts] = {}
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        futures = {pool.submit(measure, layout, n, candidates[n], imatrix, elements): n for n in names}
        for fut in futures:
            results[futures[fut]] = fut.result()
            if on_done is not None:
                on_done(futures[fut])
    return {n: results[n] for n in candidates}
