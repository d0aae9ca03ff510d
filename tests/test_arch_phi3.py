"""Phi3ForCausalLM (Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini) -> GGUF ``phi3``, checked against transformers
float32 logits, the HF tokenizer and apply_chat_template, with llama.cpp (llama-cpp-python) running every file."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import fixtures_phi
from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.quantize.gguf_quant import quantize
from llama_helpers import hf_logits, hf_model, hf_tokenizer, llama, llama_tokenize

PHI = ["tiny_phi3_dir", "tiny_phi4_mini_dir"]
PROBE = "The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times."
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And  Italy?\nThanks."},
]


@pytest.fixture(scope="session")
def tiny_phi3_dir() -> Path:
    return fixtures_phi.tiny_phi3()


@pytest.fixture(scope="session")
def tiny_phi4_mini_dir() -> Path:
    return fixtures_phi.tiny_phi4_mini()


@pytest.fixture(scope="session")
def phi_gguf(tmp_path_factory):
    """convert() once per (model, outtype) for the session; returns the file."""
    done: dict = {}

    def get(src: Path, outtype: str = "f32") -> Path:
        if (src, outtype) not in done:
            done[src, outtype] = Path(convert(src, tmp_path_factory.mktemp("phi"), outtype=outtype).files[0])
        return done[src, outtype]

    return get


def _llama_logits(path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    with llama(path, n_ctx=n_ctx) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _assert_close(got: np.ndarray, ref: np.ndarray) -> float:
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel <= 1e-3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return rel


def _long_ids(src: Path, n: int) -> list[int]:
    from pydoc_data.topics import topics

    ids = hf_tokenizer(str(src)).encode(topics["assignment"] + topics["compound"])
    assert len(ids) >= n
    return ids[:n]


# -- logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", PHI)
def test_f32_logits_equal_transformers(fixture, request, phi_gguf):
    """Phi-3-like: full rotary, fused qkv/gate_up. Phi-4-mini-like: partial rotary 0.75, tied, LongRoPE short factors."""
    src = request.getfixturevalue(fixture)
    ids = hf_tokenizer(str(src)).encode(PROBE)
    n_ctx = fixtures_phi.PHI4_MINI_ORIG_CTX  # <= original context: llama.cpp picks the short factors
    _assert_close(_llama_logits(phi_gguf(src), ids, n_ctx), hf_logits(src, ids))


def test_longrope_long_factors_past_original_context(tiny_phi4_mini_dir, phi_gguf):
    """A sequence (and a llama.cpp context) longer than original_max_position_embeddings: the long factors."""
    orig = fixtures_phi.PHI4_MINI_ORIG_CTX
    ids = _long_ids(tiny_phi4_mini_dir, orig + 40)
    ref = hf_logits(tiny_phi4_mini_dir, ids)
    _assert_close(_llama_logits(phi_gguf(tiny_phi4_mini_dir), ids, 2 * orig), ref)


def test_layout_and_metadata(tiny_phi3_dir, tiny_phi4_mini_dir, phi_gguf):
    r3 = gguf.GGUFReader(phi_gguf(tiny_phi3_dir))
    names3 = {t.name for t in r3.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= names3
    assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "rope_factors_long.weight"} & names3
    f3 = r3.fields
    assert f3["general.architecture"].contents() == "phi3"
    assert f3["phi3.rope.dimension_count"].contents() == 32
    assert f3["phi3.attention.sliding_window"].contents() == 2047
    r4 = gguf.GGUFReader(phi_gguf(tiny_phi4_mini_dir))
    names4 = {t.name: t for t in r4.tensors}
    assert "output.weight" not in names4  # tied: llama.cpp reuses token_embd
    assert list(names4["rope_factors_short.weight"].shape) == [12]
    f4 = r4.fields
    assert f4["phi3.rope.dimension_count"].contents() == 24
    assert f4["phi3.attention.sliding_window"].contents() == 0
    assert f4["phi3.rope.scaling.original_context_length"].contents() == fixtures_phi.PHI4_MINI_ORIG_CTX
    factor = 131072 / fixtures_phi.PHI4_MINI_ORIG_CTX
    expect = np.sqrt(1 + np.log(factor) / np.log(fixtures_phi.PHI4_MINI_ORIG_CTX))
    assert f4["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(expect, rel=1e-6)
    assert f4["tokenizer.ggml.pre"].contents() == "gpt-4o"
    assert f4["tokenizer.ggml.model"].contents() == "gpt2"


# -- tokens, templates, end of turn ------------------------------------------------------------


@pytest.mark.parametrize("fixture", PHI)
def test_llamacpp_tokenizer_equals_hf(fixture, request, phi_gguf, text_samples):
    src = request.getfixturevalue(fixture)
    path = phi_gguf(src)
    tok = hf_tokenizer(str(src))
    extra = ["<|user|>\nhi<|end|>\n<|assistant|>\n", "<|system|> sys <|end|><|endoftext|> after"]
    for text in [*text_samples, *extra]:
        assert llama_tokenize(path, text, add_bos=False) == tok.encode(text), repr(text)


@pytest.mark.parametrize("fixture", PHI)
def test_template_renders_like_hf(fixture, request, phi_gguf):
    """llama-cpp-python's formatter from the GGUF renders and tokenizes as apply_chat_template (Phi adds no BOS)."""
    src = request.getfixturevalue(fixture)
    tok = hf_tokenizer(str(src))
    expected = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    with llama(phi_gguf(src), n_ctx=256) as llm:
        bos = llm._model.token_get_text(llm.token_bos())
        eos = llm._model.token_get_text(llm.token_eos())
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
        result = fmt(messages=MESSAGES)
        assert result.prompt == expected
        ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
    hf_ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == hf_ids
    assert ids.count(tok.bos_token_id) == hf_ids.count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("fixture", PHI)
def test_end_of_turn_is_end_of_generation(fixture, request, phi_gguf):
    """llama.cpp stops at every id generation_config.json lists: ``<|end|>``, ``<|endoftext|>`` and
    ``<|assistant|>`` (the last one through the otherwise free ``eom`` key; llama.cpp's own converter
    leaves it out)."""
    src = request.getfixturevalue(fixture)
    stops = list(hf_model(str(src)).generation_config.eos_token_id)
    tok = hf_tokenizer(str(src))
    assert {tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")} <= set(stops)
    with llama(phi_gguf(src), n_ctx=64) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in stops)


# -- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", PHI)
def test_quantized_files_load_and_run(fixture, request, phi_gguf, tmp_path):
    src = request.getfixturevalue(fixture)
    f16 = phi_gguf(src, "f16")
    ids = hf_tokenizer(str(src)).encode(PROBE)
    ref = hf_logits(src, ids)
    for res in quantize(f16, ["Q8_0", "Q4_K_M"], tmp_path):
        got = _llama_logits(Path(res.files[0]), ids, 256)
        assert np.isfinite(got).all() and got.shape == ref.shape
        if "Q8_0" in res.files[0]:
            assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        print(fixture, Path(res.files[0]).name, inspect_gguf(res.files[0]).type_counts,
              [f"{f.tensor}" for f in res.fallbacks])
