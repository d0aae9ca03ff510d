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
    """The checkpoint in float32; a multimodal class transformers has no causal-LM mapping for (Mistral 3)
    as its image-text model, which runs text-only input through the same language model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    causal = type(AutoConfig.from_pretrained(path)) in AutoModelForCausalLM._model_mapping
    auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
    model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@functools.lru_cache(maxsize=8)
def hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_logits(path: Path | str, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(str(path))(torch.tensor([ids])).logits[0].float().numpy()


def llama_greedy(llm, prompt: list[int], max_new: int) -> list[int]:
    """Greedy decoding in llama.cpp until it says end of generation (the EOG token included) or ``max_new`` tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < max_new:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        llm.eval([tok])
    return out


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """transformers' greedy generation with the folder's generation_config (its stop ids), new tokens only."""
    with torch.no_grad():
        full = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                              generation_config=model.generation_config)
    return full[0, len(prompt):].tolist()
