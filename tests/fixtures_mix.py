"""A tiny Llama whose rows fill k-quant blocks (hidden 256, feed-forward 512: multiples of 256), so that
``quantize --target-*`` has Q2_K..Q6_K and the 256-block i-quants among its candidates, which the
hidden-128 fixtures and SmolLM2's 576-wide rows never offer.

The tokenizer is tiny-llama's (Llama-3 layout byte-level BPE). Weights are random with a spread of
scales per layer and role (so that tensors differ in how much they matter), and every norm weight is
re-drawn after init.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures import SEED, _build_cached, _to_bf16, _write_readme, tiny_llama

KQUANT_LLAMA_VERSION = "1"


def _build(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = tiny_llama()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, folder / f)
    import json

    base = json.loads((src / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         max_position_embeddings=2048, rope_theta=500000.0, bos_token_id=base["bos_token_id"],
                         eos_token_id=base["eos_token_id"])
    torch.manual_seed(SEED + 7)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(SEED + 8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 2:
                # heavier-tailed weights with a per-tensor scale: some tensors matter more than others
                scale = float(torch.empty(1).uniform_(0.5, 3.0, generator=g))
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 * scale)
                p.add_(torch.randn(p.shape, generator=g).pow(3) * 0.004 * scale)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"])
    model.save_pretrained(folder)
    _write_readme(folder, "tiny-kquant-llama (edgequant test fixture)", "edgequant-fixtures/tiny-kquant-llama",
                  "Random weights, rows that fill 256-value blocks. For tests of quantize --target only.")


def tiny_kquant_llama() -> Path:
    """LlamaForCausalLM, 3 layers, hidden 256, feed-forward 512, tiny-llama's tokenizer, random bf16 weights."""
    return _build_cached("tiny-kquant-llama", KQUANT_LLAMA_VERSION, _build)
