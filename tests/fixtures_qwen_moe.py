"""Tiny Qwen3-MoE folders with the real Qwen tokenizer and Qwen3 template, for tests/test_arch_qwen3_moe.py.

Qwen3MoeForCausalLM: 2 layers, hidden 128, 4/2 heads of 64 (head_dim free, as in Qwen3), 8 experts of width
``moe_intermediate_size`` 64, top-2, ``norm_topk_prob`` true (as Qwen3-30B-A3B ships), untied output.
``intermediate_size`` 256 is set too and unused by the experts: llama.cpp's fallback when
``expert_feed_forward_length`` is missing (256 / 2 = 128) would not load the 64-wide stacks.

Both expert layouts hold the same weights (same seed):
- ``per_expert``: a plain ``save_pretrained()`` (transformers 5 converts back to the hub's names),
  ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``, and config.json's ``num_experts`` as on the
  hub (transformers 5 writes ``num_local_experts``, kept in the fused folder);
- ``fused``: the names transformers 5 holds in memory and trainers dump (``save_original_format=False`` in
  earlier transformers 5 releases; 5.24 converts back to per-expert names even then, so the per-expert
  tensors are stacked here): ``model.layers.N.mlp.experts.gate_up_proj`` [8, 128, 128] (gate rows first) and
  ``down_proj`` [8, 128, 64].
Norms and the router are re-drawn after init (the stock router init of std 0.02 gives near-ties between
experts that float rounding flips; a std of 0.3 makes routing decided, as in a trained model).
"""

from __future__ import annotations

from pathlib import Path

from fixtures import SEED, TINY_DIMS, _build_cached, _patch_json, _to_bf16, _write_readme
from fixtures_qwen import ENDOFTEXT, IM_END, QWEN3_TEMPLATE, QWEN_VOCAB_SIZE, _randomise, _save_tokenizer

QWEN3_MOE_VERSION = "2"
LAYOUTS = ("per_expert", "fused")
N_EXPERT, TOP_K, EXPERT_FF = 8, 2, 64
ROUTER_STD = 0.3


def _model():
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=QWEN_VOCAB_SIZE, **TINY_DIMS, head_dim=64, max_position_embeddings=4096,
                            rope_theta=1e6, num_experts=N_EXPERT, num_experts_per_tok=TOP_K,
                            moe_intermediate_size=EXPERT_FF, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], use_sliding_window=False, sliding_window=None, max_window_layers=2,
                            attention_bias=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END)
    torch.manual_seed(SEED)
    model = Qwen3MoeForCausalLM(config)
    _randomise(model)
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * ROUTER_STD)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT],
                                               pad_token_id=ENDOFTEXT)
    return model


def _build(folder: Path, layout: str) -> None:
    _save_tokenizer(folder, QWEN3_TEMPLATE)
    model = _model()
    if layout == "fused":
        model.save_pretrained(folder)
        stack_experts(folder)
    else:  # config.json spelled as on the hub (Qwen3-30B-A3B: num_experts; transformers 5 writes num_local_experts)
        model.save_pretrained(folder)
        _patch_json(folder / "config.json", {"num_experts": N_EXPERT}, remove=("num_local_experts",))
    names = "experts.E.{gate,up,down}_proj" if layout == "per_expert" else "experts.gate_up_proj / down_proj"
    _write_readme(folder, f"tiny-qwen3-moe, {layout} layout (edgequant test fixture)", "edgequant-fixtures/tiny-qwen3-moe",
                  f"Random weights, Qwen3-MoE layout: 8 experts of 64, top-2, norm_topk_prob true, mlp.{names}.")


def stack_experts(folder: Path) -> None:
    """Rewrite ``folder``'s per-expert tensors as the fused stacks (gate rows above up rows), in place."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    n_layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    for layer in range(n_layers):
        p = f"model.layers.{layer}.mlp.experts"
        e = range(N_EXPERT)
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{i}.gate_proj.weight"], tensors[f"{p}.{i}.up_proj.weight"]]) for i in e])
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{i}.down_proj.weight"] for i in e])
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})


def tiny_qwen3_moe(layout: str = "per_expert") -> Path:
    """A Qwen3MoeForCausalLM folder in one of :data:`LAYOUTS` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return _build_cached("tiny-qwen3-moe-" + layout.replace("_", "-"), QWEN3_MOE_VERSION,
                         lambda folder: _build(folder, layout))
