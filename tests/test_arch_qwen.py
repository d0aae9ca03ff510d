"""Qwen2 / Qwen3 (dense) through convert, checked against independent references: transformers'
float32 logits, the HF tokenizer and llama.cpp's own tokenizer test strings and ids, the HF chat
template render, and llama.cpp (llama-cpp-python) running every file written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import fixtures_qwen
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.llamacpp_tools import vendored
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from edgequant.quantize.imatrix import compute_imatrix
from fixtures_qwen import ENDOFTEXT, IM_END, IM_START, N_BPE, QWEN3_ADDED, QWEN_VOCAB_SIZE
from llama_helpers import hf_logits, hf_tokenizer, llama, llama_logits, llama_tokenize

MODELS = ["tiny_qwen2_dir", "tiny_qwen3_dir"]
# Longer than the tiny Qwen2's unused sliding_window (32): a converter that honoured it would differ.
PROBE = ("The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times; "
         "东京は日本の首都です。 def f(x):\n    return x ** 2  # 🙂")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    return fixtures_qwen.tiny_qwen2()


@pytest.fixture(scope="session")
def tiny_qwen3_dir() -> Path:
    return fixtures_qwen.tiny_qwen3()


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """convert() once per (model, outtype) for the session; returns the ConvertResult."""
    results: dict = {}

    def get(src: Path, outtype: str = "f32"):
        key = (str(src), outtype)
        if key not in results:
            results[key] = convert(src, tmp_path_factory.mktemp("gguf"), outtype=outtype)
        return results[key]

    return get


def _ids(src: Path) -> list[int]:
    ids = hf_tokenizer(str(src)).encode(PROBE)
    assert len(ids) > fixtures_qwen.QWEN2_UNUSED_WINDOW
    return ids


def _reader(result) -> gguf.GGUFReader:
    return gguf.GGUFReader(result.files[0])


# -- logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
def test_f32_logits_equal_transformers(fixture, request, converted):
    src = request.getfixturevalue(fixture)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    got = llama_logits(converted(src).files[0], ids)
    assert got.shape == ref.shape == (len(ids), QWEN_VOCAB_SIZE)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fixture", MODELS)
def test_f16_logits_stay_close(fixture, request, converted):
    src = request.getfixturevalue(fixture)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    got = llama_logits(converted(src, "f16").files[0], ids)
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# -- layout ------------------------------------------------------------------------------------


def test_qwen2_layout_has_biases_and_untied_output(tiny_qwen2_dir, converted):
    r = converted(tiny_qwen2_dir)
    names = {t.name for t in _reader(r).tensors}
    assert r.architecture == "qwen2" and r.sliding_window is None and not r.notes
    assert {f"blk.{b}.attn_{p}.bias" for b in range(2) for p in "qkv"} <= names
    assert "output.weight" in names and "blk.0.attn_q_norm.weight" not in names
    assert "qwen2.attention.sliding_window" not in _reader(r).fields  # use_sliding_window is false


def test_qwen3_layout_has_qk_norms_head_dim_and_tied_output(tiny_qwen3_dir, converted):
    r = converted(tiny_qwen3_dir)
    reader = _reader(r)
    names = {t.name for t in reader.tensors}
    assert r.architecture == "qwen3"
    assert "output.weight" not in names and "blk.1.attn_k_norm.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert reader.fields["qwen3.attention.key_length"].contents() == 64
    assert reader.fields["qwen3.attention.value_length"].contents() == 64
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert list(q.shape) == [128, 4 * 64]


def test_vocabulary_is_padded_to_vocab_size(tiny_qwen3_dir, converted):
    fields = _reader(converted(tiny_qwen3_dir)).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == QWEN_VOCAB_SIZE
    first_pad = N_BPE + len(QWEN3_ADDED)
    assert tokens.contents(first_pad) == f"[PAD{first_pad}]" and types.contents(first_pad) == gguf.TokenType.UNUSED
    assert types.contents(IM_END) == gguf.TokenType.CONTROL
    think = N_BPE + [t for t, _ in QWEN3_ADDED].index("<think>")
    assert tokens.contents(think) == "<think>" and types.contents(think) == gguf.TokenType.USER_DEFINED
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


# -- tokenizer ---------------------------------------------------------------------------------


def _vocab_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's own test strings for the Qwen2 vocabulary and the ids the real HF tokenizer gave."""
    texts = Path(vendored("models/ggml-vocab-qwen2.gguf.inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = Path(vendored("models/ggml-vocab-qwen2.gguf.out")).read_text(encoding="utf-8").split("\n")
    if texts[-1] == "":
        texts.pop()
    assert len(texts) > 40 and len(outs) >= len(texts)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def test_token_ids_equal_hf_and_llamacpp_reference(tiny_qwen3_dir, converted):
    path = converted(tiny_qwen3_dir).files[0]
    tok = hf_tokenizer(str(tiny_qwen3_dir))
    for text, want in _vocab_cases():
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert llama_tokenize(path, text, add_bos=True) == want, text  # add_bos=True: the vocabulary adds none
    special = "<|im_start|>user\n<think>\nhi</think><|im_end|>"
    assert llama_tokenize(path, special) == tok.encode(special, add_special_tokens=False)


# -- chat template and end of turn -------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
def test_chat_template_renders_like_transformers_without_bos(fixture, request, converted):
    src = request.getfixturevalue(fixture)
    path = converted(src).files[0]
    fields = _reader(converted(src)).fields
    template = fields["tokenizer.chat_template"].contents()
    ours = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="")(messages=MESSAGES).prompt
    tok = hf_tokenizer(str(src))
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    ids = llama_tokenize(path, ours, add_bos=True)
    assert ids[0] == IM_START and ENDOFTEXT not in ids  # one BOS where the family uses BOS: Qwen uses none
    assert ids == tok.encode(theirs, add_special_tokens=False)


def test_qwen3_template_keeps_think_blocks(tiny_qwen3_dir, converted):
    template = _reader(converted(tiny_qwen3_dir)).fields["tokenizer.chat_template"].contents()
    turns = [*MESSAGES[1:3], {"role": "user", "content": "Why?"}]
    turns[1] = {"role": "assistant", "content": "<think>\nrecall\n</think>\n\nParis."}
    ours = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="")(messages=turns).prompt
    theirs = hf_tokenizer(str(tiny_qwen3_dir)).apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and "<think>" not in ours  # earlier turns' reasoning is dropped, as Qwen3 does


@pytest.mark.parametrize("fixture", MODELS)
def test_generation_stops_at_im_end(fixture, request, converted):
    src = request.getfixturevalue(fixture)
    path = converted(src).files[0]
    fields = _reader(converted(src)).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == IM_END
    with llama(path) as llm:
        vocab = llm._model.vocab
        assert llama_cpp.llama_vocab_is_eog(vocab, IM_END) and llama_cpp.llama_vocab_is_eog(vocab, ENDOFTEXT)
        out = llm.create_completion("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", max_tokens=8,
                                    temperature=0.0, logit_bias={IM_END: 1000.0})
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 1


# -- sliding window and rope scaling -----------------------------------------------------------


def _variant(src: Path, tmp_path: Path, **config) -> Path:
    """A copy of a fixture folder with config.json keys changed (weights shared by a symlink)."""
    dst = tmp_path / src.name
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_real_sliding_window_is_reported_or_refused(tiny_qwen3_dir, tmp_path):
    src = _variant(tiny_qwen3_dir, tmp_path, use_sliding_window=True, sliding_window=16,
                   layer_types=["full_attention", "sliding_attention"])
    r = convert(src, tmp_path / "out", outtype="f16")
    assert r.sliding_window == "ignored" and any("1 of 2 layers" in n for n in r.notes)
    with pytest.raises(EdgequantError, match="--sliding-window ignore"):
        convert(src, tmp_path / "out2", sliding_window="exact")


def test_yarn_rope_scaling_is_written(tiny_qwen3_dir, tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 1e6}
    r = convert(_variant(tiny_qwen3_dir, tmp_path, rope_parameters=rope), tmp_path / "out", outtype="f16")
    fields = _reader(r).fields
    assert fields["qwen3.rope.scaling.type"].contents() == "yarn"
    assert fields["qwen3.rope.scaling.factor"].contents() == 4.0
    assert fields["qwen3.rope.scaling.original_context_length"].contents() == 1024


def test_qwen2_with_a_free_head_dim_is_refused(tiny_qwen2_dir, tmp_path):
    with pytest.raises(EdgequantError, match="head_dim 16 x num_attention_heads 4 != hidden_size 128"):
        convert(_variant(tiny_qwen2_dir, tmp_path, head_dim=16), tmp_path / "out")


# -- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", MODELS)
def test_q8_0_and_q4_k_m_of_the_f16_load_and_run(fixture, request, converted, tmp_path):
    src = request.getfixturevalue(fixture)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    results = quantize(converted(src, "f16").files[0], ["Q8_0", "Q4_K_M"], tmp_path)
    for res, tol in zip(results, (5e-2, 2.5e-1)):
        got = llama_logits(res.files[0], ids)
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), res


def test_imatrix_of_qwen3_drives_an_iq2_quant(tiny_qwen3_dir, converted, tmp_path):
    """The collector sees every block matrix (q/k/v/o, gate/up/down; the tied output has none of its own)."""
    compute_imatrix(tiny_qwen3_dir, tmp_path / "imatrix.gguf", ctx=128, chunks=2)
    names = {t.name.rsplit(".", 1)[0] for t in gguf.GGUFReader(tmp_path / "imatrix.gguf").tensors}
    assert names == {f"blk.{b}.{k}.weight" for b in range(2)
                     for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    (res,) = quantize(converted(tiny_qwen3_dir, "f16").files[0], ["IQ2_XS"], tmp_path,
                      QuantizeOptions(imatrix=tmp_path / "imatrix.gguf"))
    assert np.isfinite(llama_logits(res.files[0], _ids(tiny_qwen3_dir))).all()
