"""Llama-path relatives (SmolLM3, Granite, Ministral 3, Mistral 3's text model) through convert, checked
against transformers' float32 logits and run by llama.cpp (llama-cpp-python): F32 equal, Q8_0 runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import fixtures_relatives
from fixtures import _patch_json
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.quantize.gguf_quant import quantize
from llama_helpers import hf_logits, hf_tokenizer, llama_logits

MODELS = {"tiny_smollm3": "smollm3", "tiny_granite": "granite", "tiny_ministral3": "mistral3",
          "tiny_mistral3_vlm": "mistral3"}
# 73 tokens: past several of Ministral 3's temperature steps (every 16 positions) and SmolLM3's NoPE layer.
PROBE = ("The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times; "
         "def f(x):\n    return x ** 2")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    results: dict = {}

    def get(name: str):
        if name not in results:
            src = getattr(fixtures_relatives, name)()
            results[name] = (src, convert(src, tmp_path_factory.mktemp(name), outtype="f32"))
        return results[name]

    return get


def _reference(src: Path, ids: list[int]) -> np.ndarray:
    if "vlm" not in src.name:
        return hf_logits(src, ids)
    from transformers import Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("name", MODELS)
def test_f32_equals_transformers_and_q8_0_runs(name, converted, tmp_path):
    src, r = converted(name)
    assert r.architecture == MODELS[name] and r.sliding_window is None
    ids = hf_tokenizer(str(src)).encode(PROBE)
    assert len(ids) > 4 * fixtures_relatives.MINISTRAL3_ORIG_CTX
    ref = _reference(src, ids)
    got = llama_logits(r.files[0], ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    (q8,) = quantize(r.files[0], ["Q8_0"], tmp_path)
    got8 = llama_logits(q8.files[0], ids)
    assert np.isfinite(got8).all() and np.abs(got8 - ref).max() <= 5e-2 * np.abs(ref).max()


def test_layouts(converted):
    fields = gguf.GGUFReader(converted("tiny_granite")[1].files[0]).fields
    assert [fields[f"granite.{k}"].contents() for k in ("attention.scale", "embedding_scale", "residual_scale",
                                                          "logit_scale")] == pytest.approx([0.15, 3.0, 0.6, 2.5])
    names = {t.name for t in gguf.GGUFReader(converted("tiny_granite")[1].files[0]).tensors}
    assert {"blk.0.attn_q.bias", "blk.1.ffn_down.bias"} <= names
    reader = gguf.GGUFReader(converted("tiny_mistral3_vlm")[1].files[0])
    assert reader.fields["mistral3.attention.temperature_scale"].contents() == pytest.approx(0.3)
    assert reader.fields["mistral3.rope.scaling.original_context_length"].contents() == 16
    assert not any("vision" in t.name or "mm" in t.name for t in reader.tensors)
    smol = {t.name for t in gguf.GGUFReader(converted("tiny_smollm3")[1].files[0]).tensors}
    assert "output.weight" not in smol and "blk.3.attn_q.weight" in smol  # tied output


def _variant(src: Path, dst: Path, **config) -> Path:
    """A copy of a (tiny) fixture folder with config.json keys changed."""
    shutil.copytree(src, dst)
    _patch_json(dst / "config.json", update=config)
    return dst


def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tmp_path):
    smol = _variant(fixtures_relatives.tiny_smollm3(), tmp_path / "a", no_rope_layers=[1, 1, 0, 1])
    with pytest.raises(EdgequantError, match="every 4th layer") as e:
        convert(smol, tmp_path / "o1")
    assert "\n" not in str(e.value)
    windowed = _variant(fixtures_relatives.tiny_ministral3(), tmp_path / "b", sliding_window=8)
    with pytest.raises(EdgequantError, match="--sliding-window ignore"):
        convert(windowed, tmp_path / "o2", sliding_window="exact")
    r = convert(windowed, tmp_path / "o3", outtype="f16")
    assert r.sliding_window == "ignored" and any("no windowed attention" in n for n in r.notes)
