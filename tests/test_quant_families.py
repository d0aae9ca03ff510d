"""The quantizers on the dense families of issue 13 (Qwen2, Qwen3, Gemma 2, Gemma 3 and its multimodal
class, Phi-3, and the llama-path relatives SmolLM3, Granite, Ministral 3 and its multimodal class): a GPTQ checkpoint that transformers reloads and whose kernel computes what our own
unpacking says (Phi-3's split gate/up layers stacked back exactly), and an imatrix whose entries are
exactly the converted GGUF's block matrices, which llama.cpp's quantizer finds, and a Q4_K_M made
with it that llama.cpp runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures_gemma
import fixtures_phi
import fixtures_qwen
import fixtures_relatives
from edgequant.checkpoint import open_checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.archs.base import quant_layout
from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.gptq_load import load_gptq_model
from edgequant.llamacpp_tools import run_tool
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from edgequant.quantize.gptq import GPTQOptions, gptq
from edgequant.quantize.gptq_fuse import stack_gptq_modules
from edgequant.quantize.imatrix import compute_imatrix
from edgequant.quantize.imatrix_file import read_imatrix
from edgequant.text import builtin_text
from gptq_check import ERROR_BOUND, check_gptq_folder, dequantize, dequantized_weights, replace_weights, rtn_model_
from llama_helpers import hf_logits, hf_tokenizer, llama_logits

FAMILIES = {
    "qwen2": fixtures_qwen.tiny_qwen2,
    "qwen3": fixtures_qwen.tiny_qwen3,
    "gemma2": fixtures_gemma.tiny_gemma2,
    "gemma3": fixtures_gemma.tiny_gemma3,
    "gemma3_vlm": fixtures_gemma.tiny_gemma3_vlm,
    "phi3": fixtures_phi.tiny_phi3,
    "smollm3": fixtures_relatives.tiny_smollm3,
    "granite": fixtures_relatives.tiny_granite,
    "ministral3": fixtures_relatives.tiny_ministral3,
    "mistral3_vlm": fixtures_relatives.tiny_mistral3_vlm,
}
# Qwen's imatrix (Qwen3's names, the same as Qwen2's) is checked by tests/test_arch_qwen.py: converting
# the 151,936-token vocabulary again would cost ~25 s. The llama-path relatives have the tiny Llama's
# tensor names: only Mistral 3's multimodal class (its decoder under the language model) is checked.
IMATRIX_FAMILIES = [f for f in FAMILIES if not f.startswith("qwen") and f not in ("smollm3", "granite", "ministral3")]
# transformers loads Mistral 3's multimodal class only as an image-text model: edgequant gptq refuses it (below)
GPTQ_FAMILIES = [f for f in FAMILIES if f != "mistral3_vlm"]
TINY = GPTQOptions(samples=16, seq_len=128)
PHI3_MODULES = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


def _ids(src: Path, n: int = 128) -> list[int]:
    return hf_tokenizer(str(src))(builtin_text()[60_000:70_000]).input_ids[:n]


def _plain(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("family", GPTQ_FAMILIES)
def test_gptq_reloads_in_transformers(family, tmp_path):
    src = FAMILIES[family]()
    ckpt = open_checkpoint(src)
    (r,) = gptq(src, [4], tmp_path, TINY)
    folder = Path(r.folder)

    check = check_gptq_folder(folder, src)  # our unpacking, against the source's matrices
    assert not check.problems, check.problems
    assert check.max_rel_error <= ERROR_BOUND[4], check.max_rel_error
    expected = quant_layout(ckpt.hf_architecture).quantized_inputs({n: t.shape for n, t in ckpt.tensors.items()})
    names = {m.name for m in check.modules}
    assert len(names) == len(expected) == len(r.layers), (sorted(names), sorted(expected))  # every decoder matrix, once
    if family == "phi3":  # fused as transformers' Phi3 has them, the loss rows too
        assert {n.split(".", 3)[3] for n in names} == {l.module for l in r.layers} == PHI3_MODULES
    assert not any("vision" in n for n in names)  # Gemma 3 multimodal: the language model only

    model = load_gptq_model(folder)  # raises on any missing, unexpected or re-shaped key
    assert type(model).__name__ == ckpt.hf_architecture
    ids = _ids(src)
    got = _logits(model, ids)
    ours = _plain(src)
    weights = dequantized_weights(folder)
    assert replace_weights(ours, weights) == len(names)
    ours_logits = _logits(ours, ids)
    assert _cos(got, ours_logits) > 0.999  # the kernel computes what our unpacked weights say
    ref = _logits(_plain(src), ids)
    rtn = _plain(src)
    rtn_model_(rtn, list(weights), 4, r.group_size, True)
    cos_gptq, cos_rtn = _cos(ref, ours_logits), _cos(ref, _logits(rtn, ids))
    print(f"{family}: cos(ref, gptq kernel) {_cos(ref, got):.5f}, unpacked {cos_gptq:.5f}, rtn {cos_rtn:.5f}")
    assert cos_gptq >= cos_rtn - 1e-3, (cos_gptq, cos_rtn)


def test_gptq_refuses_mistral3_multimodal_class(tmp_path):
    with pytest.raises(EdgequantError, match="only as an image-text model.*Ministral3ForCausalLM") as e:
        gptq(fixtures_relatives.tiny_mistral3_vlm(), [4], tmp_path, TINY)
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", IMATRIX_FAMILIES)
def test_imatrix_names_every_block_matrix_of_the_gguf(family, tmp_path, llama_tools):
    src = FAMILIES[family]()
    f16 = convert(src, tmp_path, outtype="f16").files[0]
    im = tmp_path / "imatrix.gguf"
    compute_imatrix(src, im, ctx=64, chunks=2)
    entries = set(read_imatrix(im).entries)
    matrices = {t.name for t in inspect_gguf(f16).tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    assert entries == matrices, (sorted(entries ^ matrices))
    if family == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= entries

    # llama.cpp's own quantizer finds an entry for every block matrix (it says so for those it misses)
    out = run_tool("llama-quantize", "--imatrix", str(im), str(f16), str(tmp_path / "tool-Q4_K_M.gguf"), "Q4_K_M", "2")
    assert f"have importance matrix data with {len(entries)} entries" in out
    assert not re.search(r"did not find weights for blk\.", out), out

    (res,) = quantize(f16, ["Q4_K_M"], tmp_path / "q", QuantizeOptions(imatrix=im))
    ids = _ids(src)
    got = llama_logits(res.files[0], ids)
    ref = hf_logits(src, ids)[:, :got.shape[1]]  # Gemma 3's padding rows are not in the GGUF
    assert np.isfinite(got).all()
    cos = _cos(torch.from_numpy(got), torch.from_numpy(ref))
    print(f"{family}: Q4_K_M with the imatrix, cos(llama.cpp, transformers) {cos:.5f}")
    assert cos > 0.95, cos


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stacked_parts_dequantize_to_the_stacked_matrices(bits):
    """Fusing GPTQ parts (Phi-3's gate_proj + up_proj) is exact for every packing, 3 bits included,
    and what cannot be fused is refused in one line."""
    g = torch.Generator().manual_seed(bits)
    n_in, group, rows = 64, 32, (32, 64)

    def part(n_out: int, g_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        words = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
        return {"qweight": words(n_in * bits // 32, n_out), "qzeros": words(n_in // group, n_out * bits // 32),
                "scales": torch.rand(n_in // group, n_out, generator=g).half(), "g_idx": g_idx}

    g_idx = (torch.arange(n_in) // group).to(torch.int32)
    pieces = [part(n, g_idx) for n in rows]
    fused = stack_gptq_modules(pieces, bits, "mlp.gate_up_proj")
    expect = torch.cat([dequantize(*(p[k] for k in ("qweight", "qzeros", "scales", "g_idx")), bits) for p in pieces])
    assert torch.equal(dequantize(*(fused[k] for k in ("qweight", "qzeros", "scales", "g_idx")), bits), expect)

    with pytest.raises(EdgequantError, match="different column orders.*without --desc-act"):
        stack_gptq_modules([pieces[0], part(32, g_idx.flip(0))], bits, "mlp.gate_up_proj")
    if bits == 3:  # 8 rows x 3 bits = 24 bits: the zero points of the next part would start mid-word
        with pytest.raises(EdgequantError, match="whole 32-bit words"):
            stack_gptq_modules([part(8, g_idx), part(32, g_idx)], bits, "mlp.gate_up_proj")


class _Writes:
    """A GPTQ backend that writes given packed tensors (what a backend with another layout might write)."""

    name = "writes"

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def quantize(self, source, spec, calibration, workdir, on_layer):
        from safetensors.torch import save_file

        save_file(self.tensors, str(workdir / "model.safetensors"), metadata={"format": "pt"})
        return []


def test_layers_transformers_would_not_load_are_refused(tmp_path):
    """Split parts that cannot be stacked, or a layer of the wrong shape: one line, nothing written."""
    def module(name: str, n_out: int, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        g_idx = torch.zeros(128, dtype=torch.int32) if g_idx is None else g_idx
        return {f"{name}.qweight": torch.zeros(16, n_out, dtype=torch.int32),
                f"{name}.qzeros": torch.zeros(1, n_out // 8, dtype=torch.int32),
                f"{name}.scales": torch.ones(1, n_out, dtype=torch.float16), f"{name}.g_idx": g_idx}

    out = tmp_path / "out"
    reordered = torch.arange(128, dtype=torch.int32).flip(0) // 128
    cases = [({**module("model.layers.0.mlp.gate_proj", 256), **module("model.layers.0.mlp.up_proj", 256, reordered + 1)},
              "different column orders"),
             (module("model.layers.0.self_attn.qkv_proj", 256), "does not have")]
    for tensors, expect in cases:
        with pytest.raises(EdgequantError, match=expect) as e:
            gptq(fixtures_phi.tiny_phi3(), [4], out, GPTQOptions(samples=2, seq_len=32, backend=_Writes(tensors)))
        assert "\n" not in str(e.value)
    assert not any(out.iterdir())
