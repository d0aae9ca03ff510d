"""The Qwen family: Qwen2 / Qwen2.5 become GGUF architecture ``qwen2``, Qwen3 (dense) ``qwen3``.

Layout rules (llama.cpp's ``src/models/qwen2.cpp`` and ``qwen3.cpp``):
- No Q/K permutation: llama.cpp runs these with NEOX (rotate-half) RoPE, HF's own order.
- Qwen2 has q/k/v biases (``blk.N.attn_{q,k,v}.bias``); Qwen3 has none by default but reads them if
  ``attention_bias`` is set, and adds per-head RMSNorms ``attn_q_norm`` / ``attn_k_norm`` applied
  before RoPE. Qwen3's ``head_dim`` may differ from hidden / heads (``key_length`` / ``value_length``);
  llama.cpp's ``qwen2`` block has no room for that, so a Qwen2 config that sets it is refused.
- Small sizes tie the output to the embedding: no ``lm_head`` tensor in the checkpoint and no
  ``output.weight`` in the GGUF (llama.cpp reuses ``token_embd``).
- The embedding has ``vocab_size`` rows, more than the tokenizer has tokens; the vocabulary is
  padded with ``[PADn]`` UNUSED tokens (vocab.py), as llama.cpp's converter does.
- Sliding window: transformers uses one only when ``use_sliding_window`` is true, and then on the
  layers from ``max_window_layers`` on (or those ``layer_types`` names). Hub configs carry
  ``use_sliding_window: false`` with a ``sliding_window`` value that is then ignored, as here.
  llama.cpp's qwen2/qwen3 always attend to the whole context, so a real window is reported
  (``ignore``) or refused (``exact``: no llama.cpp architecture runs a windowed Qwen block).
- RoPE scaling: ``linear`` and ``yarn`` (Qwen2.5's long-context recipe) as for Llama.
- Qwen3-MoE (``qwen3moe``): Qwen3 attention, a softmax router ``mlp.gate`` (``ffn_gate_inp``, kept F32)
  and experts stacked into ``ffn_{gate,up,down}_exps`` by the Mixtral mechanism (per-expert
  ``mlp.experts.E.gate_proj`` or fused ``mlp.experts.gate_up_proj`` / ``down_proj``, streamed expert by
  expert). One expert's width is ``moe_intermediate_size``, written as ``expert_feed_forward_length``
  (without it llama.cpp guesses intermediate_size / experts used). llama.cpp's qwen3moe puts experts on
  every layer and always renormalises the top-k weights: dense layers (``mlp_only_layers``,
  ``decoder_sparse_step`` > 1) are refused, ``norm_topk_prob: false`` is written with a note.
"""

from __future__ import annotations

import gguf

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import ExpertLayout, QuantLayout
from edgequant.export.archs.llama import Llama

T = gguf.MODEL_TENSOR


@register("Qwen2ForCausalLM")
class Qwen2(Llama):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    permute_qk = False  # NEOX RoPE: Q/K as HF stores them

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        if self.rope_type not in (None, "linear", "yarn"):
            raise EdgequantError(f"rope scaling type {self.rope_type!r} is not supported for {ckpt.hf_architecture} "
                                 f"(supported: linear, yarn); fix rope_scaling in config.json")
        self._check_head_dim()
        self.sliding_layers = self._sliding_layers()
        self.sliding_window = int(self.config["sliding_window"]) if any(self.sliding_layers) else None
        self.window_shorter = bool(self.sliding_window and self.sliding_window < self.n_ctx)
        if self.window_shorter and self.sliding_window_mode == "exact":
            raise EdgequantError(
                f"--sliding-window exact: llama.cpp has no {self.arch_name} architecture with a sliding window, and "
                f"this config uses one ({self.sliding_window} tokens on {sum(self.sliding_layers)} of {self.n_blocks} "
                f"layers); use --sliding-window ignore (llama.cpp then attends to the whole context)")

    def _check_head_dim(self) -> None:
        if self.head_dim * self.n_head != self.n_embd:
            raise EdgequantError(f"config.json head_dim {self.head_dim} x num_attention_heads {self.n_head} != "
                                 f"hidden_size {self.n_embd}: llama.cpp's qwen2 cannot run it; fix config.json")

    def _sliding_layers(self) -> list[bool]:
        """Which layers transformers runs with a window (its Qwen2Config / Qwen3Config rule)."""
        if not self.config.get("use_sliding_window") or not self.config.get("sliding_window"):
            return [False] * self.n_blocks
        types = self.config.get("layer_types")
        if types:
            return [t == "sliding_attention" for t in types]
        first = int(self.hparam("max_window_layers", default=self.n_blocks))
        return [i >= first for i in range(self.n_blocks)]

    def exact_window_possible(self) -> bool:
        return False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def _write_window_mode(self, w: gguf.GGUFWriter) -> None:
        if self.window_shorter:
            self.notes.append(
                f"sliding window {self.sliding_window} < context {self.n_ctx} on {sum(self.sliding_layers)} of "
                f"{self.n_blocks} layers (use_sliding_window true): llama.cpp's {self.arch_name} attends to the full "
                f"context; up to {self.sliding_window} tokens the logits equal transformers', beyond that they differ")

    def claims(self, name: str) -> bool:
        return False  # no experts in a dense Qwen: such a tensor has no place

    def check_heads(self, name: str, ref) -> None:
        """Projections against config.json's head counts (a mismatch is caught here, not by llama.cpp)."""
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            self._heads(ref, "num_attention_heads", self.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            self._heads(ref, "num_key_value_heads", self.n_kv_head)
        elif name.endswith(("q_norm.weight", "k_norm.weight")) and ref.shape[0] != self.head_dim:
            raise EdgequantError(f"{name} has {ref.shape[0]} weights but config.json gives head_dim "
                                 f"{self.head_dim}; config.json does not match the weights")

    def check_complete(self, head, blocks, tail) -> None:
        super().check_complete(head, blocks, tail)
        if self.gguf_arch == gguf.MODEL_ARCH.QWEN2:
            have = {t.name for b in blocks for t in b}
            for bid in range(self.n_blocks):
                for key in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
                    if self.tensor_name(key, bid, ".bias") not in have:
                        raise EdgequantError(f"the checkpoint lacks layer {bid}'s {key.name.lower()} bias, which every "
                                             f"Qwen2 has; it is incomplete (download every shard)")


@register("Qwen3ForCausalLM")
class Qwen3(Qwen2):
    gguf_arch = gguf.MODEL_ARCH.QWEN3

    def _check_head_dim(self) -> None:
        """Qwen3's head_dim is free (Qwen3-0.6B: 16 heads of 128 over hidden 1024)."""

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        if self.config.get("head_dim") is None:  # the base class writes them only when config.json sets head_dim
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)

    def check_complete(self, head, blocks, tail) -> None:
        super().check_complete(head, blocks, tail)
        for bid, block in enumerate(blocks):
            have = {t.name for t in block}
            for key in (T.ATTN_Q_NORM, T.ATTN_K_NORM):
                if self.tensor_name(key, bid) not in have:
                    raise EdgequantError(f"the checkpoint lacks layer {bid}'s self_attn.{key.name.lower()[5:]} weight, "
                                         f"which every Qwen3 has; it is incomplete (download every shard)")


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Qwen3):
    """Qwen3-MoE: Qwen3 attention, a softmax top-k router and 3-D expert stacks on every layer."""

    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    # mlp.gate, mlp.experts.{E.gate_proj,gate_up_proj}, ...; GPTQModel 7.6.0 reads fused experts as fresh ones
    quant_layout = QuantLayout(experts=ExpertLayout(gptq_fused_source=False))
    block_needs = (*Qwen3.block_needs, T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        self.n_expert = self.positive_int("num_experts", "num_local_experts")  # the hub's, transformers 5's
        self.n_expert_used = self.positive_int("num_experts_per_tok")
        if self.n_expert_used > self.n_expert:
            raise EdgequantError(f"config.json num_experts_per_tok {self.n_expert_used} > num_experts {self.n_expert}; "
                                 f"fix config.json")
        self._check_all_sparse()
        if not self.config.get("norm_topk_prob", False):  # transformers' Qwen3MoeConfig default is false
            self.notes.append(
                "norm_topk_prob is false: transformers weights each token's top-k experts by their share of the "
                "full softmax, llama.cpp's qwen3moe always renormalises them to sum to 1, so llama.cpp's logits will "
                "differ from transformers' (the GGUF is written; no llama.cpp key turns renormalisation off)")

    def _check_all_sparse(self) -> None:
        """transformers' rule: layer i has experts unless in mlp_only_layers or (i + 1) % decoder_sparse_step."""
        step = self.positive_int("decoder_sparse_step", default=1)
        only = set(self.config.get("mlp_only_layers") or [])
        dense = [i for i in range(self.n_blocks) if i in only or (i + 1) % step]
        if dense:
            raise EdgequantError(
                f"config.json makes layers {dense} dense (mlp_only_layers {sorted(only)}, decoder_sparse_step {step}): "
                f"llama.cpp's qwen3moe has experts on every layer and cannot run them; edgequant converts only "
                f"Qwen3-MoE checkpoints with mlp_only_layers [] and decoder_sparse_step 1")

    def expert_ff_length(self) -> int:
        return self.positive_int("moe_intermediate_size")

    def claims(self, name: str) -> bool:
        return Llama.claims(self, name)  # the expert tensors, stacked in add_block_tensors

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(self.n_expert_used)
        w.add_expert_feed_forward_length(self.expert_ff_length())
