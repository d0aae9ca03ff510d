"""Perplexity exactly as ``llama-perplexity`` computes it (its default mode).

The text is tokenized once (BOS first when the vocabulary adds BOS) and cut into back-to-back
chunks of ``ctx`` tokens; each chunk starts from an empty KV cache with its first token replaced
by BOS (when the vocabulary adds BOS), and only the second half is scored: the negative
log-likelihood of token ``i+1`` given the logits at ``i`` for ``i`` in ``[ctx/2, ctx-2]``.
PPL = exp(mean NLL), error = sqrt(var(NLL) / (count - 1)) * PPL, as the tool prints them in
``Final estimate: PPL = 11.6116 +/- 0.30324``.

llama-perplexity runs with flash attention (``-fa auto`` is on for CPU); so do we by default,
since it changes the fourth decimal. Packing several chunks into one batch (the tool's n_seq)
does not change the result, so we evaluate one chunk at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgequant.bench.text import Text, chunk_ids, load_text
from edgequant.errors import EdgequantError
from edgequant.gguf_info import inspect_gguf


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


def nll_of_next_tokens(logits: np.ndarray, next_ids: list[int]) -> np.ndarray:
    """-log softmax(logits[i])[next_ids[i]] per row, in float64 (llama.cpp sums exp in double)."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return lse - x[np.arange(len(next_ids)), next_ids]


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
    import llama_cpp

    inspect_gguf(model)  # one clear line for a missing or broken file
    corpus = text if isinstance(text, Text) else load_text(text)
    if ctx < 16 or ctx % 2:
        raise EdgequantError(f"--ctx {ctx}: use an even context of at least 16 tokens (512 is llama-perplexity's usual)")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          flash_attn=flash_attn, n_threads=threads, verbose=False)
    try:
        ids = llm.tokenize(corpus.text.encode("utf-8"), add_bos=True, special=False)  # BOS only if the vocab adds it
        bos = llm.token_bos() if llm._model.add_bos_token() else None
        batches = chunk_ids(ids, ctx, chunks, bos, minimum=2)
        first = ctx // 2
        nll_sum = nll2_sum = 0.0
        count = 0
        running = []
        for chunk in batches:
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[first:ctx - 1], dtype=np.float32)
            nll = nll_of_next_tokens(logits, chunk[first + 1:ctx])
            nll_sum += float(nll.sum())
            nll2_sum += float((nll * nll).sum())
            count += len(nll)
            running.append(math.exp(nll_sum / count))
    finally:
        llm.close()
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 else 0.0
    return PerplexityResult(
        model=str(model), text=corpus.name, ctx=ctx, chunks=len(batches), scored_tokens=count, ppl=ppl,
        ppl_error=err, seconds=round(time.perf_counter() - t0, 2), flash_attn=flash_attn, running_ppl=running,
    )


def bench_perplexity(
    models: list[str | Path],
    text: str | Path | None = None,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    flash_attn: bool = True,
) -> list[PerplexityResult]:
    """Perplexity of several GGUF files on the same text (loaded once)."""
    if not models:
        raise EdgequantError("name at least one .gguf file to measure")
    corpus = load_text(text)
    for m in models:
        inspect_gguf(m)  # fail on a bad path before spending minutes on the others
    return [gguf_perplexity(m, corpus, ctx=ctx, chunks=chunks, threads=threads, flash_attn=flash_attn) for m in models]
