"""Qwen3-MoE through convert, imatrix and quantize, against independent references: transformers' float32
logits (both expert layouts), the HF tokenizer and chat template, transformers' greedy ``generate``, and
llama.cpp (llama-cpp-python) running every file written.

The fused folder is the one whose ``<|im_end|>`` output row is boosted (fixtures_tokjson.eot_variant, as in
test_eog) so that one F32 conversion serves parity, tokenizer, template and the greedy stop."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import fixtures_qwen_moe
import fixtures_tokjson
from edgequant.checkpoint import open_checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.archs import architecture_for
from edgequant.export.convert import convert
from edgequant.gguf_info import read_header
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from edgequant.llamacpp_tools import run_tool
from edgequant.quantize.imatrix import compute_imatrix
from edgequant.quantize.imatrix_file import read_imatrix
from fixtures_qwen import ENDOFTEXT, IM_END, IM_START, QWEN_VOCAB_SIZE
from fixtures_qwen_moe import EXPERT_FF, LAYOUTS, N_EXPERT, TOP_K
from llama_helpers import hf_greedy, llama_greedy, hf_logits, hf_model, hf_tokenizer, llama, llama_logits, llama_tokenize

PROBE = ("The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times; "
         "东京は日本の首都です。 def f(x):\n    return x ** 2  # 🙂 <think>\nhm</think>")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _src(layout: str) -> Path:
    src = fixtures_qwen_moe.tiny_qwen3_moe(layout)
    return fixtures_tokjson.eot_variant(src, "<|im_end|>") if layout == "fused" else src


@pytest.fixture(scope="session")
def moe_converted(tmp_path_factory):
    """convert() once per (layout, outtype) for the session; returns the ConvertResult."""
    results: dict = {}

    def get(layout: str, outtype: str = "f32"):
        if (layout, outtype) not in results:
            results[layout, outtype] = convert(_src(layout), tmp_path_factory.mktemp("qwen3moe"), outtype=outtype)
        return results[layout, outtype]

    return get


def _header(result) -> tuple[dict, dict]:
    """Metadata and name -> tensor summary (edgequant's header reader: gguf-py's takes seconds on 152k tokens)."""
    meta, tensors = read_header(result.files[0])
    return meta, {t.name: t for t in tensors}


def _ids(src: Path) -> list[int]:
    return hf_tokenizer(str(src)).encode(PROBE)


def _variant(src: Path, tmp_path: Path, **config) -> Path:
    """A copy of a fixture folder with config.json keys changed (weights shared by a symlink)."""
    dst = tmp_path / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# -- logits and layout -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_f32_logits_equal_transformers(layout, moe_converted):
    src = _src(layout)
    ids = _ids(src)
    ref = hf_logits(src, ids)
    got = llama_logits(moe_converted(layout).files[0], ids)
    assert got.shape == ref.shape == (len(ids), QWEN_VOCAB_SIZE)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_stacks_keys_and_f32_router(layout, moe_converted):
    r = moe_converted(layout)
    meta, tensors = _header(r)
    assert r.architecture == "qwen3moe" and not r.notes
    for b in range(2):
        for kind in STACKS:
            want = [EXPERT_FF, 128, N_EXPERT] if kind == "ffn_down_exps" else [128, EXPERT_FF, N_EXPERT]
            assert tensors[f"blk.{b}.{kind}.weight"].shape == want
        assert tensors[f"blk.{b}.ffn_gate_inp.weight"].shape == [128, N_EXPERT]
    assert meta["qwen3moe.expert_count"] == N_EXPERT and meta["qwen3moe.expert_used_count"] == TOP_K
    assert meta["qwen3moe.expert_feed_forward_length"] == EXPERT_FF  # without it llama.cpp would guess 256 / 2
    assert meta["qwen3moe.attention.key_length"] == 64
    if layout == "fused":
        assert _header(moe_converted(layout, "f16"))[1]["blk.0.ffn_gate_inp.weight"].type == "F32"
        # the source really is fused (a transformers release once saved per-expert names even when asked not to)
        import json

        index = json.loads(_safetensors_header(_src(layout) / "model.safetensors"))
        assert "model.layers.0.mlp.experts.gate_up_proj" in index and "model.layers.0.mlp.experts.0.gate_proj.weight" not in index


def test_dense_layers_are_refused_and_unnormalised_top_k_is_noted(tmp_path):
    src = fixtures_qwen_moe.tiny_qwen3_moe("fused")
    with pytest.raises(EdgequantError, match=r"layers \[1\] dense .*experts on every layer"):
        convert(_variant(src, tmp_path / "a", mlp_only_layers=[1]), tmp_path / "out-a")
    with pytest.raises(EdgequantError, match=r"layers \[0\] dense .*decoder_sparse_step 2"):
        convert(_variant(src, tmp_path / "b", decoder_sparse_step=2), tmp_path / "out-b")
    ckpt = open_checkpoint(_variant(src, tmp_path / "c", norm_topk_prob=False))
    notes = architecture_for(ckpt.hf_architecture)(ckpt).notes  # what convert reports (ConvertResult.notes)
    assert any("norm_topk_prob is false" in n and "renormalises" in n for n in notes), notes


# -- tokenizer, template, end of turn ----------------------------------------------------------


def test_tokens_and_template_equal_transformers(moe_converted):
    src = _src("fused")
    path = moe_converted("fused").files[0]
    tok = hf_tokenizer(str(src))
    assert llama_tokenize(path, PROBE) == tok.encode(PROBE, add_special_tokens=False)
    template = _header(moe_converted("fused"))[0]["tokenizer.chat_template"]
    ours = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="")(messages=MESSAGES).prompt
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    ids = llama_tokenize(path, ours)
    assert ids[0] == IM_START and ENDOFTEXT not in ids and ids == tok.encode(theirs, add_special_tokens=False)


def test_greedy_generation_stops_at_im_end_like_transformers(moe_converted):
    """transformers' greedy answer (generation_config.json's stop ids) against llama.cpp's, as in test_eog."""
    folder, path = _src("fused"), moe_converted("fused").files[0]
    tok, model = hf_tokenizer(str(folder)), hf_model(str(folder))
    prompt = tok.apply_chat_template(fixtures_tokjson.EOT_MESSAGES, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    want = hf_greedy(model, prompt, 16)
    assert want[-1] == IM_END and len(want) == fixtures_tokjson.EOT_STEP + 1, want
    with llama(path, n_ctx=128) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert llama_cpp.llama_vocab_is_eog(vocab, IM_END) and llama_cpp.llama_vocab_is_eog(vocab, ENDOFTEXT)
        assert llama_greedy(llm, prompt, 16) == want


# -- quantize ----------------------------------------------------------------------------------


def test_q8_0_and_q4_k_m_of_the_f16_load_and_run(moe_converted, tmp_path):
    src = _src("fused")
    ids = _ids(src)
    ref = hf_logits(src, ids)
    results = quantize(moe_converted("fused", "f16").files[0], ["Q8_0", "Q4_K_M"], tmp_path)
    for res, tol in zip(results, (5e-2, 2.5e-1)):
        got = llama_logits(res.files[0], ids)
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), res


def test_imatrix_covers_every_expert_stack_and_drives_iq2_xxs(moe_converted, tmp_path, llama_tools):
    src, f16 = _src("fused"), moe_converted("fused", "f16").files[0]
    im = tmp_path / "imatrix.gguf"
    compute_imatrix(f16, im, ctx=128, chunks=2)  # the llama.cpp engine, on the F16 file
    entries = read_imatrix(im).entries
    # as llama-imatrix: the router's input too (the router itself stays F32)
    assert set(entries) == {f"blk.{b}.{k}.weight" for b in range(2)
                            for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", *STACKS)}
    for name in (n for n in entries if "_exps" in n):  # one row per expert, each with its own token count
        assert entries[name].sums.shape[0] == N_EXPERT and (entries[name].counts > 0).sum() >= TOP_K, name
    # llama.cpp's own quantizer finds an entry for every matrix it quantizes, the expert stacks included
    tool_q = tmp_path / "tool-Q4_K_M.gguf"
    out = run_tool("llama-quantize", "--imatrix", str(im), str(f16), str(tool_q), "Q4_K_M", "2")
    assert f"have importance matrix data with {len(entries)} entries" in out
    assert not re.search(r"did not find weights for blk\.", out), out
    (iq2,) = quantize(f16, ["IQ2_XXS"], tmp_path, QuantizeOptions(imatrix=im))
    ids = _ids(src)
    for path in (tool_q, iq2.files[0]):
        assert np.isfinite(llama_logits(path, ids)).all(), path


def test_gptq_refuses_a_fused_experts_source(tmp_path):
    """GPTQModel 7.6.0 loads a fused-experts Qwen3-MoE with freshly initialised experts (its output matched the
    source no better than random weights): refused in one line before any work, nothing written."""
    from edgequant.errors import EdgequantError
    from edgequant.quantize.gptq import GPTQOptions, gptq

    with pytest.raises(EdgequantError, match="stores its experts fused .*save_pretrained"):
        gptq(fixtures_qwen_moe.tiny_qwen3_moe("fused"), [4], tmp_path / "out", GPTQOptions(samples=2, seq_len=16))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _safetensors_header(path) -> str:
    import struct

    with open(path, "rb") as fh:
        return fh.read(struct.unpack("<Q", fh.read(8))[0]).decode()
