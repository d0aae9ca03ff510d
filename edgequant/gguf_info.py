"""``edgequant inspect``: what a GGUF file holds (metadata, chat template, tensor types, size, bits/weight)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgequant.errors import EdgequantError

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_BIG_ARRAYS = {gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE, gguf.Keys.Tokenizer.SCORES, gguf.Keys.Tokenizer.MERGES}


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

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        return d


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (or the file itself)."""
    m = _SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EdgequantError(f"split GGUF is incomplete: {missing[0]} is missing; copy every shard next to the first")
    return paths


def open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise EdgequantError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgequantError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf written by a converter")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise EdgequantError(f"{path} is a truncated or corrupt GGUF ({type(e).__name__}: {e}); re-create or re-download it") from None


def field_value(f: gguf.ReaderField) -> Any:
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    v = f.parts[f.data[0]].tolist()
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def read_metadata(reader: gguf.GGUFReader, *, full_arrays: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if not full_arrays and name in _BIG_ARRAYS:
            out[name] = f"[{len(f.data)} items]"
            continue
        out[name] = field_value(f)
    return out


def inspect_gguf(path: str | Path) -> GGUFInfo:
    paths = shard_paths(Path(path))
    metadata: dict[str, Any] = {}
    tensors: list[TensorSummary] = []
    for p in paths:
        reader = open_reader(p)
        for k, v in read_metadata(reader).items():
            metadata.setdefault(k, v)
        for t in reader.tensors:
            tensors.append(TensorSummary(t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_elements), int(t.n_bytes)))
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
    )

