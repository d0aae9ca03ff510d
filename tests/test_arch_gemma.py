"""Gemma 2 and Gemma 3 (text, and the text part of Gemma3ForConditionalGeneration) through convert.

Tiny random models with randomised norms (tests/fixtures_gemma.py): F32 logits in llama.cpp equal
transformers' float32 with eager attention on a prompt of several 16-token windows (Gemma 2 with
soft-caps small enough to matter, Gemma 3 with local and global layers, dual RoPE bases and a padded
vocabulary); token ids equal the HF tokenizer's on llama.cpp's own test strings; the embedded template
renders like apply_chat_template with one BOS; ``<end_of_turn>`` ends generation; Q8_0 and Q4_K_M of
the F16 file load and run. llama.cpp's ggml GELU is tabulated in F16 on the CPU, hence 1e-3, not 1e-4.
"""

from __future__ import annotations

import math

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures_gemma
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.llamacpp_tools import vendored
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from llama_helpers import hf_tokenizer, llama, llama_logits

N_TOKENS = 120  # 7.5 windows of 16
REL_TOL = 1e-3
BUILDERS = {"gemma2": fixtures_gemma.tiny_gemma2, "gemma3": fixtures_gemma.tiny_gemma3,
            "gemma3-vlm": fixtures_gemma.tiny_gemma3_vlm}


@pytest.fixture(scope="module")
def folders() -> dict[str, Path]:
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def converted(folders, tmp_path_factory) -> dict:
    """Each fixture as F32 (the parity files) and the Gemma 3 as F16 (the quantization source)."""
    out = {name: convert(folder, tmp_path_factory.mktemp(name), outtype="f32") for name, folder in folders.items()}
    out["gemma3-f16"] = convert(folders["gemma3"], tmp_path_factory.mktemp("gemma3-f16"), outtype="f16")
    return out


class _TableGelu(torch.nn.Module):
    """ggml's CPU GELU (GGML_GELU_FP16): the argument rounded to F16, its tanh GELU read as an F16 value; x
    itself from 10 on, 0 from -10 down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x16 = x.half().to(x.dtype)
        g = (0.5 * x16 * (1 + torch.tanh(math.sqrt(2 / math.pi) * x16 * (1 + 0.044715 * x16 * x16)))).half().to(x.dtype)
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), g))


def _hf_logits(folder: Path, ids: list[int], table_gelu: bool = False, **overrides) -> np.ndarray:
    """transformers' float32 eager logits (the multimodal class run on text only); with ``table_gelu`` its
    MLPs use ggml's F16-table GELU instead of the exact one."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForConditionalGeneration

    cls = Gemma3ForConditionalGeneration if "vlm" in folder.name else AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = cls.from_pretrained(folder, config=config, dtype=torch.float32, attn_implementation="eager").eval()
    for m in (m for m in model.modules() if table_gelu and hasattr(m, "act_fn") and hasattr(m, "gate_proj")):
        m.act_fn = _TableGelu()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _prompt(folder: Path) -> list[int]:
    ids = hf_tokenizer(str(folder))("Sliding windows keep attention local. " * 40)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS and ids[0] == 2
    return ids


def _rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_f32_logits_equal_transformers_past_the_window(name, folders, converted):
    ids = _prompt(folders[name])
    ours = llama_logits(converted[name].files[0], ids)
    ref = _hf_logits(folders[name], ids)[:, : ours.shape[1]]  # Gemma 3's padding rows are not in the GGUF
    rel = _rel(ours, ref)
    assert rel.max() <= REL_TOL, (rel[:16].max(), rel[16:].max())
    assert (ours.argmax(1) == ref.argmax(1)).all()
    # The gap is llama.cpp's CPU GELU, read from an F16 table: with that GELU in transformers the distance
    # falls to the table model's own noise floor (its float32 and float64 evaluations differ by ~1e-4, as
    # F16 rounding boundaries flip), 2.5-6x below the gap to the exact GELU.
    table = _rel(ours, _hf_logits(folders[name], ids, table_gelu=True)[:, : ours.shape[1]]).max()
    assert table <= 2.5e-4 and table < rel.max() / 2, (table, rel.max())


def test_gemma2_softcaps_and_window_are_active(folders, converted):
    """The caps and the window change transformers' logits, so the parity above covers them."""
    folder, ids = folders["gemma2"], _prompt(folders["gemma2"])
    ref = _hf_logits(folder, ids)
    for override in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 4096}):
        assert _rel(_hf_logits(folder, ids, **override), ref).max() > 1e-2, override
    md = inspect_gguf(converted["gemma2"].files[0]).metadata
    assert md["gemma2.attn_logit_softcapping"] == fixtures_gemma.ATTN_CAP
    assert md["gemma2.final_logit_softcapping"] == fixtures_gemma.FINAL_CAP
    assert md["gemma2.attention.sliding_window_pattern"] == [True, False]


def test_gemma3_keys_window_and_truncated_embedding(folders, converted):
    ref_window = _hf_logits(folders["gemma3"], _prompt(folders["gemma3"]))
    no_window = _hf_logits(folders["gemma3"], _prompt(folders["gemma3"]), sliding_window=4096)
    assert _rel(no_window, ref_window)[16:].max() > 1e-2  # the local layers matter past the window
    for name in ("gemma3", "gemma3-vlm"):
        r = converted[name]
        assert r.architecture == "gemma3" and r.sliding_window == "exact"
        info = inspect_gguf(r.files[0])
        md = info.metadata
        assert md["gemma3.attention.sliding_window"] == fixtures_gemma.WINDOW
        assert md["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert md["gemma3.rope.freq_base"] == 1e6 and md["gemma3.rope.freq_base_swa"] == 10000.0
        assert md["gemma3.rope.scaling.factor"] == 4.0 and md["gemma3.attention.key_length"] == 64
        names = {t.name: t for t in info.tensors}
        assert "output.weight" not in names and not any(n.startswith(("v.", "mm.")) for n in names)
        assert names["token_embd.weight"].shape[-1] == md["gemma3.vocab_size"] == 1000
        assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(names)
        assert any("truncated" in n for n in r.notes)


def _test_strings() -> list[str]:
    text = vendored("models/ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    return [s for s in text.split("\n__ggml_vocab_test__\n") if s]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_token_ids_equal_hf_on_llamacpp_test_strings(name, folders, converted):
    tok = hf_tokenizer(str(folders[name]))
    with llama(converted[name].files[0], n_ctx=64) as llm:
        for text in [*_test_strings(), "<start_of_turn>user\nHi<end_of_turn>\n"]:
            want = tok(text)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == want, repr(text)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_template_renders_like_transformers_with_one_bos_and_end_of_turn_stops(name, folders, converted):
    from llama_cpp import llama_cpp as C
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = hf_tokenizer(str(folders[name]))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "And now?"}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    with llama(converted[name].files[0], n_ctx=128) as llm:
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                  eos_token=llm._model.token_get_text(llm.token_eos()),
                                  bos_token=llm._model.token_get_text(llm.token_bos()))
        result = fmt(messages=messages)
        ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        eot = llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)
        vocab = C.llama_model_get_vocab(llm._model.model)
        assert len(eot) == 1 and C.llama_vocab_is_eog(vocab, eot[0]) and C.llama_vocab_is_eog(vocab, 1)
    assert ids == expected and ids.count(2) == 1


def test_q8_0_and_q4_k_m_of_the_f16_file_run(converted, tmp_path):
    results = quantize(converted["gemma3-f16"].files[0], ["Q8_0", "Q4_K_M"], tmp_path, QuantizeOptions())
    for q in results:
        assert inspect_gguf(q.files[0]).architecture == "gemma3"
        with llama(q.files[0], n_ctx=256) as llm:
            llm.eval(list(range(3, 3 + N_TOKENS)))
            assert np.isfinite(np.asarray(llm.scores[:N_TOKENS])).all()


def _edited_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(config)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("config, words", [
    ({"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
    ({"attn_logit_softcapping": None}, "attn_logit_softcapping"),
    ({"hidden_activation": "relu"}, "gelu_pytorch_tanh"),
])
def test_gemma2_configs_llamacpp_cannot_run_are_one_clear_line(config, words, folders, tmp_path):
    src = _edited_copy(folders["gemma2"], tmp_path / "edited", **config)
    with pytest.raises(EdgequantError, match=words) as e:
        convert(src, tmp_path / "out", outtype="f32")
    assert "\n" not in str(e.value)
