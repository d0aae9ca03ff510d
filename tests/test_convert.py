"""HF -> GGUF conversion, checked against independent references: transformers logits and
tokenizers, llama.cpp (llama-cpp-python) running every file we write."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from llama_helpers import hf_logits, hf_tokenizer, llama, llama_logits, llama_tokenize

TINY = ["tiny_llama_dir", "tiny_mistral_dir", "tiny_mixtral_dir", "tiny_mixtral_fused_dir"]
PROBE = "The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times."


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """convert() once per (model, outtype, options) for the whole session; returns the first file."""
    results: dict = {}

    def get(src: Path, outtype: str = "f32", **kw) -> Path:
        return Path(get.result(src, outtype, **kw).files[0])

    def result(src: Path, outtype: str = "f32", **kw):
        key = (str(src), outtype, tuple(sorted(kw.items())))
        if key not in results:
            results[key] = convert(src, tmp_path_factory.mktemp("gguf"), outtype=outtype, **kw)
        return results[key]

    get.result = result
    return get


def _ids(src: Path, text: str = PROBE) -> list[int]:
    return hf_tokenizer(str(src)).encode(text)


# -- 1. logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", TINY)
def test_f32_logits_equal_transformers(fixture, request, converted):
    src = request.getfixturevalue(fixture)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    got = llama_logits(converted(src, "f32"), ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fixture", TINY)
@pytest.mark.parametrize("outtype,tol", [("f16", 2e-2), ("bf16", 5e-2), ("q8_0", 5e-2)])
def test_low_precision_files_load_and_stay_close(fixture, outtype, tol, request, converted):
    src = request.getfixturevalue(fixture)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    got = llama_logits(converted(src, outtype), ids)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= tol * max(1.0, scale)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_smollm2_f32_logits_equal_transformers(smollm2_hf_dir, converted):
    from pydoc_data.topics import topics

    text = topics["assignment"][:1500]
    ids = _ids(smollm2_hf_dir, text)[:256]
    ref = hf_logits(smollm2_hf_dir, ids)
    got = llama_logits(converted(smollm2_hf_dir, "f32"), ids)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.slow
def test_smollm2_q8_0_reports_fallbacks_and_runs(smollm2_hf_dir, converted):
    path = converted(smollm2_hf_dir, "q8_0")
    info = inspect_gguf(path)
    assert info.file_type == "Q8_0"
    assert info.type_counts.get("Q8_0", 0) > 0  # 576 is a multiple of 32: no fallback needed here
    with llama(path) as llm:
        out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"].strip()


# -- 2. tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_dir", "tiny_mixtral_dir"])
def test_llamacpp_tokenizer_equals_hf(fixture, request, converted, text_samples):
    src = request.getfixturevalue(fixture)
    path = converted(src, "f32")
    tok = hf_tokenizer(str(src))
    for text in text_samples:
        assert llama_tokenize(path, text) == tok.encode(text), repr(text)


@pytest.mark.slow
def test_smollm2_tokenizer_equals_hf(smollm2_hf_dir, converted, text_samples):
    path = converted(smollm2_hf_dir, "f32")
    tok = hf_tokenizer(str(smollm2_hf_dir))
    for text in text_samples:
        assert llama_tokenize(path, text) == tok.encode(text), repr(text)


def test_spm_plain_text_equals_sentencepiece(tiny_mistral_dir, converted, text_samples):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_mistral_dir / "tokenizer.model"))
    path = converted(tiny_mistral_dir, "f32")
    for text in text_samples:
        if "<" in text or "[" in text:  # special-token texts: sentencepiece knows nothing of added tokens
            continue
        assert llama_tokenize(path, text, add_bos=False) == sp.encode(text), repr(text)


# -- 3. chat template --------------------------------------------------------------------------

CONVERSATIONS = {
    "no_system": [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "A small test model."},
        {"role": "user", "content": "Tell me a joke about   spaces\nand newlines."},
    ],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Italy?"},
    ],
}


def _formatter_from_gguf(llm) -> Jinja2ChatFormatter:
    """The formatter llama-cpp-python builds from a GGUF's metadata when no chat_format is given."""
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    return Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_dir", "tiny_mixtral_dir"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_gguf_template_renders_like_hf_with_one_bos(fixture, conv, request, converted):
    src = request.getfixturevalue(fixture)
    messages = CONVERSATIONS[conv]
    tok = hf_tokenizer(str(src))
    try:
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        if conv == "system":
            pytest.skip(f"{fixture}'s template rejects a system message (so does transformers)")
        raise
    path = converted(src, "f32")
    with llama(path, n_ctx=256) as llm:
        fmt = _formatter_from_gguf(llm)
        result = fmt(messages=messages)
        assert result.prompt == expected
        # exactly what llama-cpp-python's chat handler does with the prompt
        ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        assert ids.count(llm.token_bos()) == 1
        assert ids[0] == llm.token_bos()
        assert ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_chat_template_override_is_embedded(tiny_mistral_dir, tmp_path):
    tmpl = tmp_path / "my.jinja"
    tmpl.write_text("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    result = convert(tiny_mistral_dir, tmp_path, outtype="q8_0", chat_template=tmpl)
    info = inspect_gguf(result.files[0])
    assert info.chat_template == tmpl.read_text()
    assert result.chat_template_source == str(tmpl)


# -- 4. shards ---------------------------------------------------------------------------------


def test_split_shards_load_and_give_same_logits(tiny_mixtral_dir, converted, tmp_path):
    single = converted(tiny_mixtral_dir, "f32")
    result = convert(tiny_mixtral_dir, tmp_path, outtype="f32", split_max_tensors=6)
    files = [Path(f) for f in result.files]
    assert len(files) >= 3
    assert all(f.name.endswith(f"-{i:05d}-of-{len(files):05d}.gguf") for i, f in enumerate(files, 1))
    assert not list(tmp_path.glob("*.part"))
    ids = _ids(tiny_mixtral_dir)
    np.testing.assert_array_equal(llama_logits(files[0], ids), llama_logits(single, ids))
    info = inspect_gguf(files[1])
    assert info.n_params == inspect_gguf(single).n_params
    reader = gguf.GGUFReader(files[0])
    assert reader.fields[gguf.Keys.Split.LLM_KV_SPLIT_COUNT].parts[-1][0] == len(files)


def test_split_by_size(tiny_llama_dir, tmp_path):
    result = convert(tiny_llama_dir, tmp_path, outtype="f16", split_max_size=200_000)
    assert len(result.files) >= 2
    with llama(result.files[0]) as llm:
        llm.eval(_ids(tiny_llama_dir))


# -- layout and metadata -----------------------------------------------------------------------


def test_mixtral_layout_and_metadata(tiny_mixtral_dir, converted):
    result = converted.result(tiny_mixtral_dir, "f16")
    path = Path(result.files[0])
    info = inspect_gguf(path)
    shapes = {t.name: (t.type, t.shape) for t in info.tensors}
    cfg = json.loads((tiny_mixtral_dir / "config.json").read_text())
    h, ff, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    assert shapes["blk.0.ffn_gate_exps.weight"] == ("F16", [h, ff, e])
    assert shapes["blk.0.ffn_up_exps.weight"] == ("F16", [h, ff, e])
    assert shapes["blk.0.ffn_down_exps.weight"] == ("F16", [ff, h, e])
    assert shapes["blk.0.ffn_gate_inp.weight"] == ("F32", [h, e])
    assert shapes["blk.0.attn_norm.weight"][0] == "F32"
    md = info.metadata
    assert md["llama.expert_count"] == e and md["llama.expert_used_count"] == cfg["num_experts_per_tok"]
    assert md["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert md["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert md["edgequant.source.fingerprint"] == result.fingerprint
    assert md["general.size_label"].startswith("8x")
    assert "8x" in Path(path).name and Path(path).name.endswith("-F16.gguf")


def test_mistral_sliding_window_and_head_dim(tiny_mistral_dir, converted):
    result = converted.result(tiny_mistral_dir, "f32")
    md = inspect_gguf(result.files[0]).metadata
    cfg = json.loads((tiny_mistral_dir / "config.json").read_text())
    assert md["llama.attention.sliding_window"] == cfg["sliding_window"]
    assert md["llama.attention.key_length"] == cfg["head_dim"]
    assert md["llama.rope.dimension_count"] == cfg["head_dim"]
    assert any("sliding window" in n for n in result.notes)
    assert md["general.license"] == "apache-2.0"


def test_auto_outtype_follows_source_dtype(tiny_llama_dir, tmp_path):
    result = convert(tiny_llama_dir, tmp_path, outtype="auto")
    assert result.outtype == "BF16"  # the fixture is stored in bfloat16
    assert result.files[0].endswith("-BF16.gguf")
