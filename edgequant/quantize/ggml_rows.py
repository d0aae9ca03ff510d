"""ggml's own row quantizers and dequantizers, through ctypes on the libggml-base that llama-cpp-python
ships: the bytes a row gets in a type are exactly the bytes ``llama_model_quantize`` would write for
it (same function, same importance weights), so the error measured on them is the file's error.

``roundtrip(rows, type, imatrix)`` quantizes float32 rows and reads them back; ``row_bytes`` is
``ggml_row_size``. ggml's quantizers are single-threaded; ctypes releases the GIL while they run, so
callers may spread tensors over threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # ggml.h's struct ggml_type_traits
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    import llama_cpp  # loads libggml-base first, so the CDLL below is the same library

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def library() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base with the row functions above declared (``ggml_quantize_chunk`` takes
    float pointers for the values and the importance weights)."""
    return _lib()


def row_bytes(ggml_type: int, n_per_row: int) -> int:
    return int(_lib().ggml_row_size(int(ggml_type), int(n_per_row)))


def requires_imatrix(ggml_type: int) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(ggml_type)))


def roundtrip(rows: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (float32, [n, k]) quantized to ``ggml_type`` by ggml and dequantized back."""
    lib = _lib()
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = x.shape
    size = row_bytes(ggml_type, k) * n
    buf = (ctypes.c_uint8 * size)()
    fp = ctypes.POINTER(ctypes.c_float)
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data_as(fp), buf, 0, n, k,
                                      None if w is None else w.ctypes.data_as(fp))
    if written != size:
        raise RuntimeError(f"internal error: ggml wrote {written} bytes for {n}x{k}, expected {size}")
    traits = lib.ggml_get_type_traits(int(ggml_type)).contents
    out = np.empty((n, k), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(ctypes.cast(buf, ctypes.c_void_p), out.ctypes.data_as(fp), n * k)
    return out
