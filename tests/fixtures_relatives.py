"""Tiny random llama-path relatives, built offline from their transformers 5 config classes and cached.

All four reuse the tiny Llama's real tokenizer files (Llama-3 layout byte-level BPE; the tokenizer is
not what these tests are about) and re-draw every norm weight and bias after init (ones and zeros
would hide a dropped norm or bias):
- ``tiny_smollm3``: SmolLM3ForCausalLM with 4 layers, so layer 4 runs without RoPE; tied embeddings.
- ``tiny_granite``: GraniteForCausalLM with all four multipliers away from 1 and attention / MLP
  biases (the Q/K biases are permuted like the weights).
- ``tiny_ministral3``: Ministral3ForCausalLM with YaRN (factor 4 over an original context of
  ``MINISTRAL3_ORIG_CTX``) and Llama 4's attention temperature, which steps every
  ``MINISTRAL3_ORIG_CTX`` positions, so a short probe crosses several steps.
- ``tiny_mistral3_vlm``: Mistral3ForConditionalGeneration with that text model and a one-layer
  Pixtral vision tower and projector (which the converter leaves out).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fixtures import SEED, TINY_DIMS, _build_cached, _to_bf16, _write_readme, tiny_llama

RELATIVES_VERSION = "1"
MINISTRAL3_ORIG_CTX = 16


def randomise_norms_and_biases(model) -> None:
    """Norm weights to U(0.5, 1.5), biases to N(0, 0.1), deterministically (after the model's own init)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _tokenizer(folder: Path) -> dict:
    """The tiny Llama's tokenizer files into ``folder``; returns its config.json (ids, vocab size)."""
    src = tiny_llama()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, folder / name)
    return json.loads((src / "config.json").read_text())


def _ids(cfg: dict) -> dict:
    return dict(vocab_size=cfg["vocab_size"], bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])


def _save(folder: Path, model, title: str) -> None:
    import torch

    torch.manual_seed(SEED)
    randomise_norms_and_biases(model)
    _to_bf16(model).save_pretrained(folder)
    _write_readme(folder, f"{title} (edgequant test fixture)", f"edgequant-fixtures/{title}",
                  "Random weights with randomised norms and biases, the tiny Llama's tokenizer. For tests only.")


def _build_smollm3(folder: Path) -> None:
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    cfg = _tokenizer(folder)
    config = SmolLM3Config(**{**TINY_DIMS, "num_hidden_layers": 4, "tie_word_embeddings": True}, **_ids(cfg),
                           max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                           pad_token_id=None)
    torch.manual_seed(SEED)
    _save(folder, SmolLM3ForCausalLM(config), "tiny-smollm3")


def _build_granite(folder: Path) -> None:
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = _tokenizer(folder)
    config = GraniteConfig(**TINY_DIMS, **_ids(cfg), max_position_embeddings=2048, attention_bias=True, mlp_bias=True,
                           embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.15,
                           logits_scaling=2.5, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                           pad_token_id=None)
    torch.manual_seed(SEED)
    _save(folder, GraniteForCausalLM(config), "tiny-granite")


def ministral3_config(cfg: dict):
    from transformers import Ministral3Config

    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": MINISTRAL3_ORIG_CTX,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.3}
    return Ministral3Config(**TINY_DIMS, head_dim=32, **_ids(cfg), max_position_embeddings=4 * MINISTRAL3_ORIG_CTX,
                            rope_parameters=rope, pad_token_id=None)


def _build_ministral3(folder: Path) -> None:
    import torch
    from transformers import Ministral3ForCausalLM

    config = ministral3_config(_tokenizer(folder))
    torch.manual_seed(SEED)
    _save(folder, Ministral3ForCausalLM(config), "tiny-ministral3")


def _build_mistral3_vlm(folder: Path) -> None:
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    text = ministral3_config(_tokenizer(folder))
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, head_dim=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10, spatial_merge_size=2)
    torch.manual_seed(SEED)
    _save(folder, Mistral3ForConditionalGeneration(config), "tiny-mistral3-vlm")


def tiny_smollm3() -> Path:
    return _build_cached("tiny-smollm3", RELATIVES_VERSION, _build_smollm3)


def tiny_granite() -> Path:
    return _build_cached("tiny-granite", RELATIVES_VERSION, _build_granite)


def tiny_ministral3() -> Path:
    return _build_cached("tiny-ministral3", RELATIVES_VERSION, _build_ministral3)


def tiny_mistral3_vlm() -> Path:
    return _build_cached("tiny-mistral3-vlm", RELATIVES_VERSION, _build_mistral3_vlm)
