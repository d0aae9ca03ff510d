"""``edgequant inspect``: what a GGUF file holds (metadata, chat template, tensor types, size, bits/weight)."""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgequant.errors import EdgequantError

KEY_SLIDING_WINDOW = "edgequant.sliding_window"  # convert's record: "exact" or "ignored"
KEY_TENSOR_TYPES = "quantize.tensor_types"  # the --tensor-type overrides a file was quantized with (a mix)
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass
class TensorSummary:
    name: str
    type: str
    shape: list[int]  # ggml order (fastest dimension first), as llama.cpp prints it
    n_elements: int
    n_bytes: int


@dataclass
class GGUFInfo:
    files: list[str]
    architecture: str | None
    name: str | None
    file_type: str | None
    n_params: int
    size_bytes: int
    tensor_bytes: int
    bits_per_weight: float
    type_counts: dict[str, int]
    chat_template: str | None
    metadata: dict[str, Any]
    tensors: list[TensorSummary] = field(default_factory=list)
    # "exact": the runtime honours the model's sliding window; "ignored": it attends to the whole context
    # (llama.cpp's llama architecture); None: no window shorter than the context, or one the runtime knows
    sliding_window: str | None = None

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        return d


def shard_name(stem: str, i: int, n: int) -> str:
    """``<stem>-0000i-of-0000n.gguf``: the shard names llama.cpp's gguf-split writes (gguf-py's format)."""
    return gguf.SHARD_NAME_FORMAT.format(stem, i, n)


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """``(stem, i, n)`` of a shard name from :func:`shard_name`; None for a file that is not a shard."""
    m = _SHARD.match(name)
    return (m.group("stem"), int(m.group("i")), int(m.group("n"))) if m else None


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (or the file itself)."""
    m = _SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(shard_name(m.group("stem"), i, n)) for i in range(1, n + 1)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EdgequantError(f"split GGUF is incomplete: {missing[0]} is missing; copy every shard next to the first")
    return paths


# GGUF value types (gguf-py's GGUFValueType): struct format of the scalar ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 256  # longer arrays (token lists, merges, scores) are summarised as "[N items]"


class _Cursor:
    """A bounds-checked reader over a memory-mapped file; a short file raises EdgequantError."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise EdgequantError(f"{self.path} is a truncated or corrupt GGUF (its header runs past the end); re-create or re-download it")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, n = self.scalar("<I"), self.scalar("<Q")
            if n <= _SMALL_ARRAY:
                return [self.value(sub) for _ in range(n)]
            if sub in _SCALARS:
                self.take(n * struct.calcsize(_SCALARS[sub]))
            else:
                for _ in range(n):
                    self.value(sub)
            return f"[{n} items]"
        raise EdgequantError(f"{self.path}: unknown GGUF value type {vtype}; the file is corrupt or from a newer GGUF version")


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorSummary]]:
    """Metadata and tensor infos of one GGUF file, without reading tensor data.

    A small parser of our own: gguf-py's GGUFReader builds a numpy view for every token and
    merge (seconds for a 50k-token vocabulary); this skips long arrays in milliseconds.
    """
    path = Path(path)
    if path.is_dir():
        raise EdgequantError(f"{path} is a folder; pass a .gguf file")
    if not path.is_file():
        raise EdgequantError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgequantError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf written by a converter")
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(memoryview(mm), path)
            try:
                cur.take(4)
                version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
                if version < 2:
                    raise EdgequantError(f"{path} is GGUF version {version}; re-convert it with a current converter")
                if version > gguf.GGUF_VERSION:
                    raise EdgequantError(f"{path} is GGUF version {version}, newer than the {gguf.GGUF_VERSION} edgequant "
                                         f"reads (or a corrupt header); update edgequant and gguf, or re-convert it")
                metadata = {}
                for _ in range(n_kv):
                    key = cur.string()
                    metadata[key] = cur.value(cur.scalar("<I"))
                tensors, infos = [], []
                for _ in range(n_tensors):
                    name = cur.string()
                    shape = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
                    qtype, offset = cur.scalar("<I"), cur.scalar("<Q")
                    infos.append((name, shape, qtype, offset))
                alignment = int(metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
                if alignment <= 0 or alignment & (alignment - 1):
                    raise EdgequantError(f"{path} declares general.alignment = {alignment}, not a power of two; the file is corrupt")
                data_start = -(-cur.pos // alignment) * alignment
            finally:
                cur.buf.release()
    for name, shape, qtype, offset in infos:
        try:
            qt = gguf.GGMLQuantizationType(qtype)
        except ValueError:
            raise EdgequantError(f"{path}: tensor {name} has unknown type {qtype}; the file is corrupt or too new") from None
        n = int(math.prod(shape))
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = n // block * type_size
        if data_start + offset + nbytes > size:
            raise EdgequantError(f"{path} is truncated: tensor {name} ends past the end of the file; re-create or re-download it")
        tensors.append(TensorSummary(name, qt.name, shape, n, nbytes))
    return metadata, tensors


def inspect_gguf(path: str | Path) -> GGUFInfo:
    paths = shard_paths(Path(path))
    metadata: dict[str, Any] = {}
    tensors: list[TensorSummary] = []
    for p in paths:
        meta, infos = read_header(p)
        for k, v in meta.items():
            metadata.setdefault(k, v)
        tensors += infos
    n_params = sum(t.n_elements for t in tensors)
    tensor_bytes = sum(t.n_bytes for t in tensors)
    ft = metadata.get(gguf.Keys.General.FILE_TYPE)
    try:
        file_type = gguf.LlamaFileType(ft).name.partition("_")[2] if ft is not None else None
    except ValueError:
        file_type = str(ft)
    return GGUFInfo(
        files=[str(p) for p in paths],
        architecture=metadata.get(gguf.Keys.General.ARCHITECTURE),
        name=metadata.get(gguf.Keys.General.NAME),
        file_type=file_type,
        n_params=n_params,
        size_bytes=sum(p.stat().st_size for p in paths),
        tensor_bytes=tensor_bytes,
        bits_per_weight=round(8 * tensor_bytes / n_params, 4) if n_params else 0.0,
        type_counts=dict(Counter(t.type for t in tensors)),
        chat_template=metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE),
        metadata=metadata,
        tensors=tensors,
        sliding_window=_sliding_window(metadata),
    )


def _sliding_window(metadata: dict) -> str | None:
    """What the file does with a sliding window (convert's key, or what a file from another tool implies)."""
    if metadata.get(KEY_SLIDING_WINDOW) in ("exact", "ignored"):
        return metadata[KEY_SLIDING_WINDOW]
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    window = metadata.get(f"{arch}.attention.sliding_window")
    if not window:
        return None
    if metadata.get(f"{arch}.attention.sliding_window_pattern") is not None:
        return "exact"
    n_ctx = metadata.get(f"{arch}.context_length")
    return "ignored" if arch == "llama" and (n_ctx is None or window < n_ctx) else None

