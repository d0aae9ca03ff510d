"""GPT-OSS through convert and quantize, against independent references: transformers' float32 eager logits
(a prompt longer than layer 0's window), the HF tokenizer and Harmony template, transformers' greedy
``generate``, and llama.cpp (llama-cpp-python) running every file written.

The source is the tiny fixture whose ``<|return|>`` output row is boosted (fixtures_tokjson.eot_variant, as in
test_eog), so that one F32 conversion serves parity, tokenizer, template and the greedy stop."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import fixtures_gpt_oss
import fixtures_tokjson
from edgequant.checkpoint import open_checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.archs import architecture_for
from edgequant.export.convert import convert
from edgequant.gguf_info import read_header
from edgequant.quantize.gguf_quant import quantize
from fixtures_gpt_oss import EXPERT_FF, N_EXPERT, TOP_K, WINDOW
from llama_helpers import hf_greedy, llama_greedy, hf_tokenizer, llama, llama_logits, llama_tokenize

PROBE = ("The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times; "
         "东京は日本の首都です。 def f(x):\n    return x ** 2  # 🙂 <|start|>assistant<|message|>hm<|end|>")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@functools.lru_cache(maxsize=1)
def _src() -> Path:
    return fixtures_tokjson.eot_variant(fixtures_gpt_oss.tiny_gpt_oss(), "<|return|>")


@functools.lru_cache(maxsize=2)
def _hf(path: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _ids() -> list[int]:
    return hf_tokenizer(str(_src())).encode(PROBE)


def _hf_logits(ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return _hf(str(_src()))(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="session")
def oss_converted(tmp_path_factory):
    results: dict = {}

    def get(outtype: str = "f32"):
        if outtype not in results:
            results[outtype] = convert(_src(), tmp_path_factory.mktemp("gptoss"), outtype=outtype)
        return results[outtype]

    return get


def _variant(tmp_path: Path, **config) -> Path:
    """A copy of the fixture with config.json keys changed (weights shared by a symlink)."""
    src, dst = fixtures_gpt_oss.tiny_gpt_oss(), tmp_path / "variant"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# -- logits and layout -------------------------------------------------------------------------


def test_f32_logits_equal_transformers_eager_past_the_window(oss_converted):
    ids = _ids()
    assert len(ids) > 4 * WINDOW
    ref = _hf_logits(ids)
    r = oss_converted()
    got = llama_logits(r.files[0], ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    meta, tensors = read_header(r.files[0])
    tensors = {t.name: t for t in tensors}
    assert r.architecture == "gpt-oss" and not r.notes
    assert meta["gpt-oss.attention.sliding_window"] == WINDOW
    assert list(meta["gpt-oss.attention.sliding_window_pattern"]) == [True, False]
    assert meta["gpt-oss.expert_count"] == N_EXPERT and meta["gpt-oss.expert_used_count"] == TOP_K
    assert meta["gpt-oss.expert_feed_forward_length"] == EXPERT_FF
    assert meta["tokenizer.ggml.pre"] == "gpt-4o"
    for b in range(2):
        assert tensors[f"blk.{b}.ffn_gate_exps.weight"].shape == [128, EXPERT_FF, N_EXPERT]
        assert tensors[f"blk.{b}.ffn_down_exps.weight"].shape == [EXPERT_FF, 128, N_EXPERT]
        assert tensors[f"blk.{b}.ffn_up_exps.bias"].shape == [EXPERT_FF, N_EXPERT]
        assert tensors[f"blk.{b}.attn_sinks.weight"].shape == [4]
    f16 = {t.name: t for t in read_header(oss_converted("f16").files[0])[1]}
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.bias", "blk.0.attn_sinks.weight"):
        assert f16[name].type == "F32", name
    assert f16["blk.0.ffn_gate_exps.weight"].type == "F16"


def _mxfp4_variant(tmp_path: Path) -> Path:
    """The fixture with layer 0's gate_up_proj stored as MXFP4 blocks and scales, as openai/gpt-oss-20b ships."""
    from safetensors.torch import load_file, save_file

    dst = _variant(tmp_path, quantization_config={"quant_method": "mxfp4"})
    (dst / "model.safetensors").unlink()
    tensors = load_file(str(fixtures_gpt_oss.tiny_gpt_oss() / "model.safetensors"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    del tensors[name]
    tensors[name + "_blocks"] = torch.zeros((N_EXPERT, 2 * EXPERT_FF, 4, 16), dtype=torch.uint8)
    tensors[name + "_scales"] = torch.zeros((N_EXPERT, 2 * EXPERT_FF, 4), dtype=torch.uint8)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mxfp4_is_refused_and_untruncated_yarn_is_noted(tmp_path):
    with pytest.raises(EdgequantError, match="MXFP4.*convert a bf16 copy"):
        convert(_mxfp4_variant(tmp_path / "a"), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    rope = {**fixtures_gpt_oss.YARN, "truncate": False}
    ckpt = open_checkpoint(_variant(tmp_path / "b", rope_parameters=rope))
    notes = architecture_for(ckpt.hf_architecture)(ckpt).notes
    assert any("truncate is false" in n for n in notes), notes
    with pytest.raises(EdgequantError, match="swiglu_limit is 5.0"):
        convert(_variant(tmp_path / "c", swiglu_limit=5.0), tmp_path / "out-c")


# -- tokenizer, template, end of generation ----------------------------------------------------


def test_tokens_and_harmony_template_equal_transformers(oss_converted):
    path, tok = oss_converted().files[0], hf_tokenizer(str(_src()))
    assert llama_tokenize(path, PROBE) == tok.encode(PROBE)  # neither adds a BOS, as gpt-oss-20b
    template = read_header(path)[0]["tokenizer.chat_template"]
    ours = Jinja2ChatFormatter(template=template, eos_token="<|return|>", bos_token="<|startoftext|>")(
        messages=MESSAGES).prompt
    theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and ours.endswith("<|start|>assistant")
    assert llama_tokenize(path, ours, add_bos=False) == tok.encode(theirs, add_special_tokens=False)


def test_greedy_generation_stops_at_return_like_transformers(oss_converted):
    tok, model, path = hf_tokenizer(str(_src())), _hf(str(_src())), oss_converted().files[0]
    prompt = tok.apply_chat_template(fixtures_tokjson.EOT_MESSAGES, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    want = hf_greedy(model, prompt, 16)
    ret, end, call = (tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|end|>", "<|call|>"))
    assert want[-1] == ret and len(want) == fixtures_tokjson.EOT_STEP + 1, want
    with llama(path, n_ctx=512) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert llama_cpp.llama_vocab_is_eog(vocab, ret) and llama_cpp.llama_vocab_is_eog(vocab, call)
        assert not llama_cpp.llama_vocab_is_eog(vocab, end)  # Harmony: <|end|> closes a message, not the answer
        assert llama_greedy(llm, prompt, 16) == want


# -- quantize ----------------------------------------------------------------------------------


def test_q8_0_and_q4_k_m_of_the_f16_load_and_run(oss_converted, tmp_path):
    ids = _ids()
    ref = _hf_logits(ids)
    results = quantize(oss_converted("f16").files[0], ["Q8_0", "Q4_K_M"], tmp_path)
    for res, tol in zip(results, (5e-2, 2.5e-1)):
        got = llama_logits(res.files[0], ids)
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), res


def test_imatrix_covers_the_experts_and_the_torch_engine_refuses(oss_converted, tmp_path):
    """The llama.cpp engine (on the F16 file) collects every expert stack; the torch engine's hooks do not
    reach GPT-OSS's fused experts module, so it refuses in one line instead of writing a partial imatrix."""
    from edgequant.quantize.imatrix import compute_imatrix
    from edgequant.quantize.imatrix_file import read_imatrix

    im = tmp_path / "imatrix.gguf"
    compute_imatrix(oss_converted("f16").files[0], im, ctx=64, chunks=2)
    entries = read_imatrix(im).entries
    for b in range(2):
        for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert f"blk.{b}.{k}.weight" in entries
        assert entries[f"blk.{b}.ffn_up_exps.weight"].sums.shape[0] == N_EXPERT
    with pytest.raises(EdgequantError, match="use --engine llama.cpp"):
        compute_imatrix(_src(), tmp_path / "torch.gguf", ctx=64, chunks=2, engine="torch")
    assert not (tmp_path / "torch.gguf").exists()
