"""Write a GGUF file (or ``-0000i-of-0000N`` shards) from metadata and a tensor plan, streaming.

gguf-py's ``GGUFWriter`` lays out the header, key/values and tensor infos and assigns tensors to
shards; we declare every tensor's shape and byte size up front, then stream each one in row
chunks straight into the ``.part`` file of its shard. Peak memory is one chunk, not one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
import torch
from gguf.gguf_writer import WriterState

from edgequant.atomic import atomic_outputs, check_free_space, check_writable, part_path
from edgequant.export.plan import PlannedTensor
from edgequant.progress import progress_bytes

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

OUTTYPES: dict[str, F] = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}
_FTYPE_QTYPE = {F.ALL_F32: Q.F32, F.MOSTLY_F16: Q.F16, F.MOSTLY_BF16: Q.BF16, F.MOSTLY_Q8_0: Q.Q8_0}


def ftype_label(ftype: F) -> str:
    """``MOSTLY_Q8_0`` -> ``Q8_0``, ``ALL_F32`` -> ``F32`` (the file-name suffix)."""
    return ftype.name.partition("_")[2]


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


@dataclass
class TensorChoice:
    planned: PlannedTensor
    qtype: Q
    fallback: str | None = None  # why this tensor is not of the file's type, when it is a fallback


def choose_types(plan: list[PlannedTensor], ftype: F) -> list[TensorChoice]:
    """llama.cpp's converter rules: norms, 1-D tensors and routers stay F32; rows that do not fill
    whole quant blocks fall back to F16 (reported, never silent)."""
    want = _FTYPE_QTYPE[ftype]
    out = []
    for pt in plan:
        shape = pt.shape
        if pt.keep_f32 or len(shape) <= 1 or pt.name.endswith("_norm.weight"):
            out.append(TensorChoice(pt, Q.F32))
            continue
        block = gguf.GGML_QUANT_SIZES[want][0]
        if shape[-1] % block != 0:
            out.append(TensorChoice(pt, Q.F16, f"{pt.name}: row length {shape[-1]} is not a multiple of {want.name}'s block of {block}; written as F16"))
        else:
            out.append(TensorChoice(pt, want))
    return out


class _StreamingWriter(gguf.GGUFWriter):
    """GGUFWriter whose shards are opened as ``.part`` files and whose tensors arrive in chunks."""

    parts: list[Path] | None = None  # the write's own .part names (from atomic_outputs), one per shard

    def final_names(self, path: Path) -> list[Path]:
        return gguf.GGUFWriter.format_shard_names(self, path)

    def format_shard_names(self, path: Path) -> list[Path]:
        if self.parts is None:
            self.parts = [part_path(p) for p in self.final_names(path)]
        return self.parts

    def print_plan(self) -> list[Path]:  # the base class logs and may exit() on dry runs
        assert self.path is not None
        return self.format_shard_names(self.path)

    def write_chunks(self, chunks: Iterable[np.ndarray]) -> None:
        assert self.fout is not None
        file_id = next(i for i, t in enumerate(self.tensors) if t)
        fout = self.fout[file_id]
        name = next(iter(self.tensors[file_id]))
        info = self.tensors[file_id].pop(name)
        self.write_padding(fout, fout.tell())
        written = 0
        for c in chunks:
            c = np.ascontiguousarray(c)
            fout.write(c.data)
            written += c.nbytes
        if written != info.nbytes:
            raise RuntimeError(f"internal error: {name} wrote {written} bytes, declared {info.nbytes}")
        self.write_padding(fout, info.nbytes)
        self.state = WriterState.WEIGHTS


def write_gguf(
    final_path: Path,
    arch_name: str,
    choices: list[TensorChoice],
    add_metadata: Callable[[gguf.GGUFWriter], None],
    *,
    split_max_tensors: int = 0,
    split_max_size: int = 0,
    force: bool = False,
    description: str = "writing",
) -> list[Path]:
    """Write the file(s) atomically; return the final paths (one, or the shards in order)."""
    w = _StreamingWriter(path=None, arch=arch_name, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    for c in choices:
        w.add_tensor_info(c.planned.name, c.planned.shape, np.dtype(np.float32), tensor_nbytes(c.planned.shape, c.qtype), raw_dtype=c.qtype)
    add_metadata(w)
    finals = w.final_names(final_path)
    check_writable(finals, force=force)
    total = sum(tensor_nbytes(c.planned.shape, c.qtype) for c in choices)
    check_free_space(final_path.parent, total + 64 * 1024 * 1024)
    with atomic_outputs(finals) as parts:
        w.parts = parts
        try:
            w.open_output_file(final_path)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with progress_bytes(description, total) as bar:
                for c in choices:
                    bar.describe(f"{description} {c.planned.name}")
                    w.write_chunks(_converted(c, bar.advance))
            w.flush()
        finally:
            w.close()
    return finals


def encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    """One chunk in the file's type, bit-identical to llama.cpp's converter (which widens anything
    but F16/F32 to F32 and then uses gguf-py's quantizers). F32/F16 conversions round the same in
    torch, and are much faster there; bf16 -> BF16 passes the bits through, quieting NaNs as
    gguf-py does."""
    if qtype == Q.F32:
        return t.to(torch.float32).numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16 and t.dtype == torch.bfloat16:
        bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        nan = (bits & 0x7FFF) > 0x7F80
        return np.where(nan, bits | 0x0040, bits).astype(np.uint16) if nan.any() else bits
    return gguf.quants.quantize(t.to(torch.float32).numpy(), qtype)


def _converted(c: TensorChoice, advance: Callable[[float], None]) -> Iterable[np.ndarray]:
    for part in c.planned.parts:
        for chunk in part.chunks():
            out = encode(chunk, c.qtype)
            del chunk
            advance(out.nbytes)
            yield out
