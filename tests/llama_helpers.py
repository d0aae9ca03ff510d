"""Run GGUF files with the real llama.cpp (llama-cpp-python) and HF folders with transformers."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from edgequant.llamacpp import open_llama


@contextlib.contextmanager
def llama(path: Path | str, n_ctx: int = 512, **kw):
    """A llama.cpp context with an F32 KV cache (exact comparisons) and every position's logits."""
    llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2, **kw)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(path: Path | str, ids: list[int]) -> np.ndarray:
    with llama(path, n_ctx=max(64, len(ids))) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_tokenize(path: Path | str, text: str, *, add_bos: bool = True) -> list[int]:
    llm = open_llama(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    finally:
        llm.close()


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@functools.lru_cache(maxsize=8)
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_logits(path: Path | str, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(str(path))(torch.tensor([ids])).logits[0].float().numpy()
