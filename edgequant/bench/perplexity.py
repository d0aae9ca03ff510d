"""Perplexity exactly as ``llama-perplexity`` computes it (its default mode).

The text is tokenized once (BOS first when the vocabulary adds BOS) and cut into back-to-back
chunks of ``ctx`` tokens; each chunk starts from an empty KV cache with its first token replaced
by BOS (when the vocabulary adds BOS), and only the second half is scored: the negative
log-likelihood of token ``i+1`` given the logits at ``i`` for ``i`` in ``[ctx/2, ctx-2]``.
PPL = exp(mean NLL), error = sqrt(var(NLL) / (count - 1)) * PPL, as the tool prints them in
``Final estimate: PPL = 11.6116 +/- 0.30324``.

llama-perplexity runs with flash attention (``-fa auto`` is on for CPU); so do we by default,
since it changes the fourth decimal. Like the tool, several chunks go into one decode (its
``n_seq = n_batch / n_ctx`` with ``n_batch`` 2048, each chunk its own sequence) and logits are
computed only for the scored half of each chunk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgequant.bench.backends import LlamaCppBackend, chunks_per_decode, gguf_header
from edgequant.bench.quality import QualityAccumulator, nll_of_next_tokens  # noqa: F401 (re-exported)
from edgequant.text import Text, chunk_ids, load_text
from edgequant.errors import EdgequantError


@dataclass
class PerplexityResult:
    model: str
    text: str
    ctx: int
    chunks: int
    scored_tokens: int
    ppl: float
    ppl_error: float
    seconds: float
    flash_attn: bool
    running_ppl: list[float] = field(default_factory=list)  # after each chunk, as the tool prints [1]..[n]

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"


def gguf_perplexity(
    model: str | Path,
    text: str | Path | Text | None = None,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    flash_attn: bool = True,
) -> PerplexityResult:
    """Perplexity of a GGUF through llama.cpp, the number llama-perplexity prints for the same inputs."""
    gguf_header(model)  # one clear line for a missing or broken file
    corpus = text if isinstance(text, Text) else load_text(text)
    if ctx < 16 or ctx % 2:
        raise EdgequantError(f"--ctx {ctx}: use an even context of at least 16 tokens (512 is llama-perplexity's usual)")
    t0 = time.perf_counter()
    n_seq = chunks_per_decode(ctx, chunks)
    backend = LlamaCppBackend(model, threads=threads, ctx=ctx, flash_attn=flash_attn, n_seq=n_seq)
    try:
        batches = chunk_ids(backend.tokenize(corpus.text), ctx, chunks, backend.info.bos_id, minimum=2)
        acc = QualityAccumulator(with_kld=False)
        first = ctx // 2
        for i in range(0, len(batches), n_seq):
            group = batches[i:i + n_seq]
            for chunk, logits in zip(group, backend.logits_of(group, first)):
                acc.add(logits, np.asarray(chunk[first + 1:]))
    finally:
        backend.close()
    ppl, err = acc.ppl()
    return PerplexityResult(
        model=str(model), text=corpus.name, ctx=ctx, chunks=len(batches), scored_tokens=acc.count, ppl=ppl,
        ppl_error=err, seconds=round(time.perf_counter() - t0, 2), flash_attn=flash_attn, running_ppl=acc.running_ppl,
    )
