"""The tensor plan: what an architecture asks the writer to produce, without any data yet.

An output tensor is an ordered list of :class:`Part` s. Each part is a 2-D (or 1-D) block read
lazily from the checkpoint (optionally one expert of a fused 3-D tensor, optionally a row
range, optionally every step-th column, optionally Q/K-permuted), or a small array computed by
the architecture. Concatenated along the first axis they give the output tensor in torch order,
so a Mixtral expert stack is written expert by expert and never held in memory as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from edgequant.checkpoint import TensorRef

# Read at most this many (float32-equivalent) bytes at a time from one source tensor.
CHUNK_BYTES = 16 * 1024 * 1024


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half RoPE row order -> llama.cpp's interleaved order (per head, pairs of halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Part:
    ref: TensorRef | None = None
    index: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None
    permute_heads: int | None = None
    transpose: bool = False
    data: np.ndarray | None = None  # computed by the architecture instead of read
    offset: float = 0.0  # added to every value, in float32 (Gemma's RMSNorm weights are stored as 1 + w)
    # (first, step): every step-th entry of the source's last axis from first, taken before any transpose
    # (GPT-OSS's fused gate_up_proj interleaves gate and up columns)
    cols: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.data is not None:
            return tuple(self.data.shape)
        assert self.ref is not None
        shape = self.ref.shape[len(self.index):]
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        if self.cols is not None:
            first, step = self.cols
            shape = (*shape[:-1], len(range(first, shape[-1], step)))
        if self.transpose:
            shape = tuple(reversed(shape))
        return tuple(shape)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Row blocks in the source dtype (float32 with an offset), in order; the writer encodes each to the file's type."""
        if self.offset:
            for t in self._chunks(chunk_bytes):
                yield t.float() + self.offset
            return
        yield from self._chunks(chunk_bytes)

    def _chunks(self, chunk_bytes: int) -> Iterator[torch.Tensor]:
        if self.data is not None:
            yield torch.from_numpy(self.data)
            return
        assert self.ref is not None
        if self.transpose or len(self.shape) < 2:
            t = self._strided(self.ref.read(self.index, self.rows))
            if self.transpose:
                t = t.transpose(-1, -2).contiguous()
            yield permute_qk(t, self.permute_heads) if self.permute_heads else t
            return
        n_rows, row_len = self.shape[0], int(np.prod(self.shape[1:]))
        step = max(1, chunk_bytes // (4 * row_len))
        head_rows = n_rows // self.permute_heads if self.permute_heads else 1
        step = max(1, step // head_rows) * head_rows  # the RoPE permutation stays within a head
        base = self.rows[0] if self.rows is not None else 0
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            t = self._strided(self.ref.read(self.index, (base + start, base + stop)))
            yield permute_qk(t, (stop - start) // head_rows) if self.permute_heads else t

    def _strided(self, t: torch.Tensor) -> torch.Tensor:
        if self.cols is None:
            return t
        first, step = self.cols
        return t[..., first::step].contiguous()


@dataclass
class PlannedTensor:
    name: str
    parts: list[Part]
    keep_f32: bool = False  # routers and other tensors llama.cpp never quantizes
    sources: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order; a single part gives its own shape, several are stacked on a new first axis."""
        first = self.parts[0].shape
        if len(self.parts) == 1:
            return first
        return (len(self.parts), *first)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def source_dtype(self) -> torch.dtype:
        for p in self.parts:
            if p.ref is not None:
                return p.ref.dtype
        return torch.float32
