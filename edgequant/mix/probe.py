"""KL divergence of candidate files against the source on a few fixed calibration chunks.

The source's logits are evaluated once and kept in llama-perplexity's compressed form (bench's
``CompressedReference``); every probe file is then scored chunk by chunk against them with the
bench's own accumulator, so a probe's KLD is the number ``edgequant bench`` (and llama-perplexity)
would print for that file on those chunks.

The calibration chunks are taken from the end of the text, and the bench reads a text from its
start: on the built-in text the tokens used for choosing are not the tokens a default bench run
evaluates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgequant.bench.backends import LlamaCppBackend, chunks_per_decode
from edgequant.bench.quality import CompressedReference, QualityAccumulator
from edgequant.errors import EdgequantError
from edgequant.text import Text, chunk_ids


class KldProbe:
    def __init__(self, reference: str | Path, text: Text, *, ctx: int, chunks: int, threads: int | None):
        self.ctx, self.threads = ctx, threads
        self.n_seq = chunks_per_decode(ctx, chunks)
        self.first = ctx // 2
        backend = self._open(reference)
        try:
            ids = backend.tokenize(text.text)
            available = len(ids) // ctx
            if available < 1:
                raise EdgequantError(f"the calibration text ({text.name}) has {len(ids)} tokens, fewer than one chunk of "
                                     f"{ctx}; pass a longer --calibration text or a smaller --ctx")
            all_chunks = chunk_ids(ids, ctx, None, backend.info.bos_id)
            self.batches = all_chunks[-min(chunks, available):]  # from the end: see the module docstring
            self.refs = [CompressedReference.from_logits(lg) for lg in self._logits(backend)]
            self.n_vocab = backend.info.n_vocab
        finally:
            backend.close()

    @property
    def tokens(self) -> int:
        return len(self.batches) * (self.ctx - self.first - 1)

    def _open(self, path: str | Path) -> LlamaCppBackend:
        return LlamaCppBackend(path, threads=self.threads, ctx=self.ctx, flash_attn=True, n_seq=self.n_seq)

    def _logits(self, backend: LlamaCppBackend):
        for i in range(0, len(self.batches), self.n_seq):
            group = self.batches[i:i + self.n_seq]
            for logits in backend.logits_of(group, self.first):
                yield np.array(logits, dtype=np.float32)

    def kld(self, path: str | Path) -> dict:
        """The KLD summary of ``path`` against the reference on the calibration chunks."""
        backend = self._open(path)
        acc = QualityAccumulator(with_kld=True)
        try:
            k = 0
            for i in range(0, len(self.batches), self.n_seq):
                group = self.batches[i:i + self.n_seq]
                for chunk, logits in zip(group, backend.logits_of(group, self.first)):
                    nxt = np.asarray(chunk[self.first + 1:], dtype=np.int64)
                    acc.add(logits[:, :self.n_vocab], nxt, self.refs[k])
                    k += 1
        finally:
            backend.close()
        return acc.kld()
