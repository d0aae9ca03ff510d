"""How fast this machine's ggml CPU kernels multiply by a tensor in each type: one ``ggml_mul_mat`` per
type and row length, timed at a prompt batch (pp) and at one token (tg), through ctypes on the
libggml that llama-cpp-python ships (the kernels llama.cpp runs a model with).

The result is seconds per weight, per type and row length; ``speed.py``'s model sums it over a
file's tensors to compare a mix's matrix-multiplication time with a standard type's before any
file is written. Weight repacking (llama.cpp's CPU_REPACK/AMX buffers) is not used here: on hosts
where llama.cpp repacks, the repacked types (Q4_0, Q4_K, IQ4_NL, Q8_0) run faster than measured.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgequant.quantize.ggml_rows import library, row_bytes

Q = gguf.GGMLQuantizationType


class _InitParams(ctypes.Structure):  # ggml.h's struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp  # loads libggml first, so the CDLL below is the same library

    base = library()  # ggml_row_size and ggml_quantize_chunk are declared there
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    p = ctypes.c_void_p
    base.ggml_init.restype, base.ggml_init.argtypes = p, [_InitParams]
    base.ggml_free.restype, base.ggml_free.argtypes = None, [p]
    base.ggml_new_tensor_2d.restype = p
    base.ggml_new_tensor_2d.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = p, [p, p, p]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = p, [p]
    base.ggml_build_forward_expand.restype, base.ggml_build_forward_expand.argtypes = None, [p, p]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = p, [p]
    cpu.ggml_cpu_init.restype, cpu.ggml_cpu_init.argtypes = None, []
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


@dataclass(frozen=True)
class KernelSpeed:
    """Seconds per weight of one type at one row length: a ``pp``-token batch and a single token."""

    type: str
    row_length: int
    pp_s_per_weight: float
    tg_s_per_weight: float


def _fill(base, tensor: int, q: Q, rows: int, k: int, rng: np.random.Generator) -> None:
    data = base.ggml_get_data(tensor)
    x = rng.standard_normal((rows, k), dtype=np.float32) * 0.02
    if q == Q.F32:
        ctypes.memmove(data, x.ctypes.data, x.nbytes)
    elif q in (Q.F16, Q.BF16):
        raw = x.astype(np.float16) if q == Q.F16 else (x.view(np.uint32) >> 16).astype(np.uint16)
        ctypes.memmove(data, raw.ctypes.data, raw.nbytes)
    else:
        w = np.ones(k, dtype=np.float32)  # the types that need importance weights take uniform ones
        fp = ctypes.POINTER(ctypes.c_float)
        base.ggml_quantize_chunk(int(q), x.ctypes.data_as(fp), data, 0, rows, k, w.ctypes.data_as(fp))


def _time_matmul(base, cpu, q: Q, k: int, rows: int, tokens: int, threads: int, reps: int,
                 rng: np.random.Generator) -> float:
    """The fastest of ``reps`` runs of [rows x k] in type ``q`` times [k x tokens] float32, in seconds."""
    w_bytes = row_bytes(int(q), k) * rows
    mem = w_bytes + 4 * k * tokens + 4 * rows * tokens + 4 * k * tokens + (64 << 20)
    ctx = base.ggml_init(_InitParams(mem, None, False))
    if not ctx:
        raise MemoryError(f"ggml_init({mem} bytes) failed")
    try:
        a = base.ggml_new_tensor_2d(ctx, int(q), k, rows)
        b = base.ggml_new_tensor_2d(ctx, int(Q.F32), k, tokens)
        _fill(base, a, q, rows, k, rng)
        _fill(base, b, Q.F32, tokens, k, rng)
        c = base.ggml_mul_mat(ctx, a, b)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, c)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        base.ggml_free(ctx)


def measure_kernels(types: list[Q], row_lengths: list[int], *, threads: int | None = None, pp: int = 512,
                    rows: int = 1024, reps: int = 3, seed: int = 0) -> dict[tuple[str, int], KernelSpeed]:
    """Seconds per weight of each type at each row length (types whose blocks do not fill a row length
    are skipped), for a ``pp``-token batch and for one token."""
    base, cpu = _libs()
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(seed)
    out = {}
    for k in sorted(set(row_lengths)):
        n = max(64, min(rows, (1 << 19) // k))  # about 0.5 M weights: long enough to time, quick to fill
        for q in types:
            if k % gguf.GGML_QUANT_SIZES[q][0]:
                continue
            pp_s = _time_matmul(base, cpu, q, k, n, pp, threads, reps, rng)
            tg_s = _time_matmul(base, cpu, q, k, n, 1, threads, reps * 4, rng)
            out[(q.name, k)] = KernelSpeed(q.name, k, pp_s / (n * k), tg_s / (n * k))
    return out
