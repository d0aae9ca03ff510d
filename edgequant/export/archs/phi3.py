"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (``Phi3ForCausalLM``) become GGUF architecture ``phi3``.

Layout rules (llama.cpp's ``phi3`` graph, src/models/phi3.cpp):
- ``self_attn.qkv_proj`` stays fused as ``blk.N.attn_qkv`` (rows: Q, then K, then V); a checkpoint
  with separate ``q_proj``/``k_proj``/``v_proj`` (an unfused fine-tune) is written split, which the
  runtime accepts too. No Q/K permutation: llama.cpp runs phi3 with NEOX (rotate-half) RoPE.
- ``mlp.gate_up_proj`` stays fused as ``blk.N.ffn_up`` of ``2 x n_ff`` rows, gate half first: the
  runtime splits it and applies SwiGLU, as transformers does.
- Partial rotary (Phi-4-mini: 0.75) is ``rope.dimension_count`` = int(head_dim x factor).
- LongRoPE (``rope_type: longrope``, or the older ``su``/``yarn`` names transformers maps to it)
  becomes ``rope_factors_short``/``rope_factors_long`` (n_rot/2 F32 divisors each) plus
  ``rope.scaling.attn_factor`` (transformers' attention factor) and
  ``rope.scaling.original_context_length``. llama.cpp picks the long factors when the context it
  is *created with* exceeds that length; transformers when the *sequence* does.
- The sliding window (Phi-3-mini: 2047): llama.cpp's phi3 graph disables it on load and attends to
  the whole context. Written as ``phi3.attention.sliding_window`` (0 when absent, as llama.cpp's
  converter does), with a note that beyond the window the logits differ from transformers'.
- Tied embeddings (Phi-4-mini): no ``output`` tensor; llama.cpp reuses ``token_embd``.
"""

from __future__ import annotations

import math
import re

import gguf
import numpy as np

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import Architecture, FusedLinear, QuantLayout
from edgequant.export.plan import Part, PlannedTensor

T = gguf.MODEL_TENSOR

_SPLIT_FFN = re.compile(r"\.mlp\.(gate_proj|up_proj)\.weight$")
_LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers' Phi3Config maps su and yarn to longrope


@register("Phi3ForCausalLM")
class Phi3(Architecture):
    gguf_arch = gguf.MODEL_ARCH.PHI3
    # transformers' Phi3 keeps both fused; GPTQModel quantizes the MLP as gate_proj and up_proj
    quant_layout = QuantLayout(fused=(
        FusedLinear("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        FusedLinear("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ))

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        self.read_attention_shape()
        self.n_ff = self.positive_int("intermediate_size")
        if self.head_dim * self.n_head != self.n_embd:
            raise EdgequantError(f"config.json: {self.n_head} heads x head_dim {self.head_dim} != hidden_size {self.n_embd}; "
                                 f"llama.cpp's phi3 graph needs them equal (fix config.json)")
        self.rope = dict(self.config.get("rope_parameters") or self.config.get("rope_scaling") or {})
        self.rope_theta = float(self.rope.get("rope_theta", self.hparam("rope_theta", default=10000.0)))
        partial = self.rope.get("partial_rotary_factor", self.hparam("partial_rotary_factor", default=1.0))
        self.n_rot = int(self.head_dim * float(partial))
        kind = self.rope.get("rope_type", self.rope.get("type"))
        self.longrope = kind in _LONGROPE_NAMES
        if kind not in (None, "default", *_LONGROPE_NAMES):
            raise EdgequantError(f"rope scaling type {kind!r} is not supported for Phi3ForCausalLM (supported: longrope); "
                                 f"fix rope_scaling in config.json")
        self.n_ctx = int(self.hparam("max_position_embeddings"))
        self.orig_ctx = int(self.rope.get("original_max_position_embeddings")
                            or self.hparam("original_max_position_embeddings", default=self.n_ctx))
        window = self.config.get("sliding_window")
        self.sliding_window = int(window) if window else 0

    @property
    def window(self) -> str | None:
        return "ignored" if 0 < self.sliding_window < self.n_ctx else None

    # -- hyperparameters ----------------------------------------------------------------------

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_vocab_size(int(self.hparam("vocab_size")))
        w.add_context_length(self.n_ctx)
        w.add_rope_scaling_orig_ctx_len(self.orig_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_block_count(self.n_blocks)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv_head)
        w.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps")))
        w.add_rope_dimension_count(self.n_rot)
        w.add_rope_freq_base(self.rope_theta)
        w.add_sliding_window(self.sliding_window)
        if self.longrope:
            w.add_rope_scaling_attn_factors(self._attention_factor())
            self.notes.append(
                f"LongRoPE: llama.cpp uses the long factors when the context it is created with exceeds "
                f"{self.orig_ctx} tokens (transformers: when the sequence does); with a context of at most "
                f"{self.orig_ctx} both use the short factors")
        if self.window:
            how = ("--sliding-window exact is not available: llama.cpp's phi3 graph has no windowed attention"
                   if self.sliding_window_mode == "exact" else "llama.cpp's own converter writes the same")
            self.notes.append(
                f"sliding window {self.sliding_window} < context {self.n_ctx}: llama.cpp's phi3 architecture attends "
                f"to the full context (it drops the window on load); up to {self.sliding_window} tokens the logits "
                f"equal transformers', beyond that they differ ({how}). Written as phi3.attention.sliding_window "
                f"for information.")

    def _attention_factor(self) -> float:
        """transformers' LongRoPE cos/sin scale: ``attention_factor`` if given, else from the extension factor."""
        if self.rope.get("attention_factor") is not None:
            return float(self.rope["attention_factor"])
        factor = float(self.rope.get("factor") or self.n_ctx / self.orig_ctx)
        return math.sqrt(1 + math.log(factor) / math.log(self.orig_ctx)) if factor > 1.0 else 1.0

    def _rope_factors(self) -> list[PlannedTensor]:
        out = []
        for key, tensor in (("long_factor", T.ROPE_FACTORS_LONG), ("short_factor", T.ROPE_FACTORS_SHORT)):
            values = self.rope.get(key)
            if not isinstance(values, list) or len(values) != self.n_rot // 2:
                raise EdgequantError(f"config.json rope_scaling.{key} must be a list of {self.n_rot // 2} numbers "
                                     f"(rotary dimensions / 2) for LongRoPE; fix config.json")
            data = np.asarray(values, dtype=np.float32)
            out.append(PlannedTensor(name=self.tensor_name(tensor), parts=[Part(data=data)], keep_f32=True))
        return out

    # -- tensors ------------------------------------------------------------------------------

    def head_tensors(self) -> list[PlannedTensor]:
        return self._rope_factors() if self.longrope else []

    def mapped_name(self, name: str) -> str | None:
        if _SPLIT_FFN.search(name):
            raise EdgequantError(
                f"{name}: this checkpoint stores gate_proj and up_proj separately; llama.cpp's phi3 needs them "
                f"fused as mlp.gate_up_proj (gate rows first): re-save the model with transformers' Phi3 class")
        return super().mapped_name(name)

    def planned(self, name: str, gguf_name: str, ref) -> PlannedTensor:
        # Fused projections must have the rows config.json implies (a wrong head count would silently misroute).
        expect = {"qkv_proj.weight": (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                  "gate_up_proj.weight": 2 * self.n_ff}
        for suffix, rows in expect.items():
            if name.endswith(suffix) and ref.shape[0] != rows:
                raise EdgequantError(f"{name} has {ref.shape[0]} rows but config.json implies {rows}; "
                                     f"config.json does not match the weights")
        return self.single(gguf_name, ref)

    def block_needed(self, bid: int, have: set[str]) -> tuple:
        attn = (T.ATTN_QKV,) if self.tensor_name(T.ATTN_QKV, bid) in have else (T.ATTN_Q, T.ATTN_K, T.ATTN_V)
        return (T.ATTN_NORM, *attn, T.ATTN_OUT, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN)
