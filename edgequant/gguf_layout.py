"""Where things are in a GGUF file, for the two jobs that need bytes rather than a summary: reading a
float tensor's rows (``float_rows``), and adding metadata keys to a written file (``with_metadata``)
without touching its tensor data.

The GGUF layout: magic, version, tensor count, key/value count, the key/value pairs, the tensor
infos (name, dims, type, offset relative to the data section), padding to ``general.alignment``, the
data section. Adding keys rewrites what comes before the data section and copies the data as is:
tensor offsets are relative to the data section, so they stay valid.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgequant.errors import EdgequantError
from edgequant.gguf_info import _Cursor

_STRING, _ARRAY, _UINT32, _INT64 = 8, 9, 4, 11


@dataclass
class TensorLocation:
    name: str
    shape: list[int]  # ggml order: shape[0] is the row length
    type: gguf.GGMLQuantizationType
    offset: int  # absolute, in the file


@dataclass
class Layout:
    path: Path
    version: int
    n_tensors: int
    kv: dict[str, tuple[int, int]]  # key -> (start, end) byte range of the whole pair
    kv_end: int
    infos_start: int
    infos_end: int
    alignment: int
    data_start: int
    tensors: dict[str, TensorLocation] = field(default_factory=dict)


def read_layout(path: str | Path) -> Layout:
    """Byte positions of a GGUF's header parts and of every tensor (one clear line for a broken file)."""
    from edgequant.gguf_info import read_header

    p = Path(path)
    metadata, _ = read_header(p)  # validates the file (magic, version, truncation)
    alignment = int(metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(memoryview(mm), p)
        try:
            cur.take(4)
            version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
            kv = {}
            for _ in range(n_kv):
                start = cur.pos
                key = cur.string()
                cur.value(cur.scalar("<I"))
                kv[key] = (start, cur.pos)
            kv_end = infos_start = cur.pos
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                shape = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
                raw.append((name, shape, cur.scalar("<I"), cur.scalar("<Q")))
            infos_end = cur.pos
        finally:
            cur.buf.release()
    data_start = -(-infos_end // alignment) * alignment
    tensors = {n: TensorLocation(n, s, gguf.GGMLQuantizationType(t), data_start + o) for n, s, t, o in raw}
    return Layout(p, version, n_tensors, kv, kv_end, infos_start, infos_end, alignment, data_start, tensors)


def float_rows(layout: Layout, name: str) -> np.ndarray:
    """A F32/F16/BF16 tensor as a read-only memory map of shape ``[rows, row_length]`` in its own
    dtype (BF16 as uint16 bits: ``as_float32`` converts)."""
    t = layout.tensors[name]
    dtypes = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
              gguf.GGMLQuantizationType.BF16: np.uint16}
    if t.type not in dtypes:
        raise EdgequantError(f"{layout.path}: {name} is {t.type.name}; choosing per-tensor types needs an F32, F16 or "
                             f"BF16 source GGUF")
    n = int(np.prod(t.shape))
    arr = np.memmap(layout.path, dtype=dtypes[t.type], mode="r", offset=t.offset, shape=(n,))
    return arr.reshape(-1, t.shape[0])


def as_float32(rows: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return (np.asarray(rows, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(rows, dtype=np.float32)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pair(key: str, value: str | int | list[str]) -> bytes:
    if isinstance(value, bool) or not isinstance(value, (str, int, list)):
        raise TypeError(f"metadata value of {key}: str, int or list of str, not {type(value).__name__}")
    if isinstance(value, str):
        return _string(key) + struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, int):
        return _string(key) + struct.pack("<Iq", _INT64, value)
    return (_string(key) + struct.pack("<IIQ", _ARRAY, _STRING, len(value))
            + b"".join(_string(str(v)) for v in value))


def with_metadata(src: str | Path, dst: str | Path, entries: dict[str, str | int | list[str]]) -> None:
    """Write ``dst``: ``src`` with ``entries`` added to its metadata (a key it already has is replaced);
    the tensor data is copied byte for byte."""
    layout = read_layout(src)
    kept = [(k, r) for k, r in layout.kv.items() if k not in entries]
    with open(layout.path, "rb") as f:
        head = f.read(layout.infos_end)
        parts = [b"GGUF", struct.pack("<IQQ", layout.version, layout.n_tensors, len(kept) + len(entries))]
        parts += [head[s:e] for _, (s, e) in kept]
        parts += [_pair(k, v) for k, v in entries.items()]
        parts.append(head[layout.infos_start:layout.infos_end])
        header = b"".join(parts)
        header += b"\0" * (-len(header) % layout.alignment)
        with open(dst, "wb") as out:
            out.write(header)
            f.seek(layout.data_start)
            shutil.copyfileobj(f, out, 16 << 20)
