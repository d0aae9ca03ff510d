"""The llama family: Llama, Mistral and Mixtral all become GGUF architecture ``llama``.

Layout rules (llama.cpp's, see docs/adding-an-architecture.md):
- Q and K rows go from HF's rotate-half order to llama.cpp's interleaved order (K with n_kv_head).
- Mixtral experts become ``blk.N.ffn_{gate,up,down}_exps``, 3-D stacks written expert by expert;
  both the hub's per-expert names (``block_sparse_moe.experts.E.w1``) and transformers 5's fused
  ``mlp.experts.gate_up_proj`` / ``down_proj`` are read. The router (``ffn_gate_inp``) stays F32.
- A Llama 3 ``rope_type: llama3`` config becomes a ``rope_freqs`` tensor of per-dimension factors.
- Mistral's sliding window: llama.cpp's ``llama`` architecture always attends to the whole context
  and never reads a window key. With ``sliding_window="ignore"`` we write ``llama`` and
  ``llama.attention.sliding_window`` as information only, and say that beyond the window llama.cpp
  differs from transformers (as with every Mistral GGUF made by llama.cpp's own converter). With
  ``"exact"`` a dense model whose window is shorter than its context becomes ``granite_swa``: the
  same block, tensors and RoPE layout (so the same Q/K permutation) plus a per-layer window
  (every layer sliding), a ``logit_scale`` of 1 and per-head ``attn_sinks`` of -1e30, which add
  nothing to the softmax; llama.cpp then equals transformers past the window too.
"""

from __future__ import annotations

import math
import re

import gguf
import numpy as np

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import Architecture, ExpertLayout, QuantLayout
from edgequant.export.plan import Part, PlannedTensor

T = gguf.MODEL_TENSOR

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
_EXPERT_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_EXPERT_TENSOR = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}
EXACT_WINDOW_ARCH = "granite_swa"  # llama.cpp PR #25505 (July 2026); llama-cpp-python 0.3.36 has it
NO_SINK = -1e30  # an attention sink whose exp() is 0: the softmax is the plain one


@register("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")
class Llama(Architecture):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    permute_qk = True  # llama.cpp runs the llama path with normal (interleaved) RoPE
    no_exact_window = "--sliding-window exact is not offered for mixture-of-experts models yet"

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        self.read_attention_shape()
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        self.rope = dict(rope)
        self.rope_theta = float(self.rope.get("rope_theta", self.hparam("rope_theta", default=10000.0)))
        self.rope_type = self.rope.get("rope_type", self.rope.get("type"))
        if self.rope_type == "default":
            self.rope_type = None
        self.n_ctx = int(self.hparam("max_position_embeddings"))
        window = self.config.get("sliding_window")
        self.sliding_window = int(window) if window else None
        self.window_shorter = bool(self.sliding_window and self.sliding_window < self.n_ctx)
        self.exact_window = self.window_shorter and self.sliding_window_mode == "exact" and self.exact_window_possible()

    def exact_window_possible(self) -> bool:
        """Dense blocks only: the MoE path of granite_swa has not been compared with Mixtral here."""
        return True

    @property
    def arch_name(self) -> str:
        return EXACT_WINDOW_ARCH if self.exact_window else super().arch_name

    @property
    def window(self) -> str | None:
        if not self.window_shorter:
            return None
        return "exact" if self.exact_window else "ignored"

    # -- hyperparameters ----------------------------------------------------------------------

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        n_ctx = self.n_ctx
        w.add_vocab_size(int(self.hparam("vocab_size")))
        w.add_context_length(n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_blocks)
        w.add_feed_forward_length(int(self.hparam("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv_head)
        w.add_rope_freq_base(self.rope_theta)
        w.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps")))
        w.add_rope_dimension_count(self.head_dim)
        if self.config.get("head_dim") is not None:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        self._write_rope_scaling(w)
        if self.sliding_window:
            w.add_sliding_window(self.sliding_window)
        self._write_window_mode(w)

    def _write_window_mode(self, w: gguf.GGUFWriter) -> None:
        """The exact window's keys, and a note on what the file does past the window either way."""
        window, n_ctx = self.sliding_window, self.n_ctx
        if self.exact_window:
            w.add_sliding_window_pattern([True] * self.n_blocks)  # every layer slides, as in Mistral
            w.add_logit_scale(1.0)
            self.notes.append(
                f"sliding window {window} < context {n_ctx}: written as llama.cpp's {EXACT_WINDOW_ARCH} architecture "
                f"(the llama block with a per-layer window), so llama.cpp equals transformers at every length; "
                f"llama.cpp builds before PR #25505 (July 2026) and the Ollama / LM Studio versions that bundle them "
                f"cannot load it (--sliding-window ignore writes the llama architecture)")
        elif self.window_shorter:
            how = "--sliding-window exact writes a file that honours it" if self.exact_window_possible() else self.no_exact_window
            self.notes.append(
                f"sliding window {window} < context {n_ctx}: llama.cpp's {self.arch_name} architecture attends to the full "
                f"context (it ignores the window, like llama.cpp's own converter); up to {window} tokens the "
                f"logits equal transformers', beyond that they differ ({how}). Written as "
                f"{self.arch_name}.attention.sliding_window for information.")

    def _write_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        kind, factor = self.rope_type, self.rope.get("factor")
        if kind is None or kind == "llama3":
            return  # llama3 scaling travels as the rope_freqs tensor
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            orig = self.rope.get("original_max_position_embeddings", self.config.get("original_max_position_embeddings"))
            if orig is None:
                raise EdgequantError("rope scaling 'yarn' needs original_max_position_embeddings in config.json; add the pre-extension context length")
            w.add_rope_scaling_orig_ctx_len(int(orig))
            for key, add in (
                ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
            ):
                if self.rope.get(key) is not None:
                    add(float(self.rope[key]))
        else:
            raise EdgequantError(
                f"rope scaling type {kind!r} is not supported for {self.ckpt.hf_architecture} "
                f"(supported: linear, yarn, llama3); remove rope_scaling from config.json only if you know the model does not need it"
            )

    def _rope_freqs(self) -> np.ndarray:
        """Per-dimension frequency divisors of Llama 3.1's ``llama3`` RoPE scaling."""
        r = self.rope
        factor = float(r.get("factor", 8.0))
        low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
        old_ctx = float(r.get("original_max_position_embeddings", 8192))
        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim))
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                out.append(1.0)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, dtype=np.float32)

    # -- tensors ------------------------------------------------------------------------------

    def head_tensors(self) -> list[PlannedTensor]:
        if self.rope_type == "llama3":
            return [PlannedTensor(name=self.tensor_name(T.ROPE_FREQS), parts=[Part(data=self._rope_freqs())])]
        return []

    def claims(self, name: str) -> bool:
        return bool(_PER_EXPERT.match(name) or _FUSED.match(name))

    def planned(self, name: str, gguf_name: str, ref) -> PlannedTensor:
        heads = self.check_heads(name, ref)
        pt = self.single(gguf_name, ref, permute_heads=heads if self.permute_qk else None)
        pt.keep_f32 = gguf_name.endswith("ffn_gate_inp.weight")  # the MoE router
        return pt

    def check_heads(self, name: str, ref) -> int | None:
        """Projections against config.json's head counts; the head count Q or K rows are permuted by."""
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return self._heads(ref, "num_attention_heads", self.n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return self._heads(ref, "num_key_value_heads", self.n_kv_head)
        if name.endswith("v_proj.weight"):
            self._heads(ref, "num_key_value_heads", self.n_kv_head)
        return None

    def add_block_tensors(self, blocks, claimed) -> None:
        experts: dict[int, dict] = {}
        for name, ref in claimed.items():
            m = _PER_EXPERT.match(name) or _FUSED.match(name)
            experts.setdefault(int(m.group(1)), {})[m.groups()[1:]] = ref
        for bid, found in sorted(experts.items()):
            blocks[bid].extend(self._expert_stacks(bid, found))
        if self.exact_window:
            for bid, block in enumerate(blocks):
                sinks = np.full(self.n_head, NO_SINK, dtype=np.float32)
                block.append(PlannedTensor(name=self.tensor_name(T.ATTN_SINKS, bid), parts=[Part(data=sinks)], keep_f32=True))

    def _heads(self, ref, key: str, n: int) -> int:
        """The head count a projection is permuted by, checked against its rows (config.json against the weights)."""
        if ref.shape[0] != n * self.head_dim:
            raise EdgequantError(f"{ref.name} has {ref.shape[0]} rows but config.json gives {key} {n} x head_dim "
                                 f"{self.head_dim} = {n * self.head_dim}; config.json does not match the weights")
        return n

    def expert_ff_length(self) -> int:
        """One expert's hidden size (Mixtral: ``intermediate_size``; a family with dense layers too has its own key)."""
        return int(self.hparam("intermediate_size"))

    def _expert_stacks(self, bid: int, found: dict) -> list[PlannedTensor]:
        n_expert = int(self.hparam("num_local_experts", "num_experts"))
        n_ff = self.expert_ff_length()
        parts: dict[str, list[Part]] = {"gate": [], "up": [], "down": []}
        sources: dict[str, list[str]] = {"gate": [], "up": [], "down": []}
        if any(len(k) == 2 for k in found):  # per-expert 2-D tensors, the hub's Mixtral layout
            for role in parts:
                for e in range(n_expert):
                    key = next((k for k in found if len(k) == 2 and int(k[0]) == e and _EXPERT_ROLE[k[1]] == role), None)
                    if key is None:
                        raise EdgequantError(f"layer {bid}: expert {e} has no {role} weight; the checkpoint is incomplete")
                    parts[role].append(Part(ref=found[key]))
                    sources[role].append(found[key].name)
        else:  # transformers 5 fused 3-D tensors
            for (kind,), ref in found.items():
                if len(ref.shape) != 3 or ref.shape[0] != n_expert:
                    raise EdgequantError(f"{ref.name} has shape {list(ref.shape)}; expected [{n_expert}, ...] experts first")
                if kind == "gate_up_proj":
                    if ref.shape[1] != 2 * n_ff:
                        raise EdgequantError(f"{ref.name} has shape {list(ref.shape)}; expected [{n_expert}, {2 * n_ff}, hidden]")
                    for role, rows in (("gate", (0, n_ff)), ("up", (n_ff, 2 * n_ff))):
                        parts[role] += [Part(ref=ref, index=(e,), rows=rows) for e in range(n_expert)]
                        sources[role].append(ref.name)
                else:
                    role = _EXPERT_ROLE[kind]
                    parts[role] += [Part(ref=ref, index=(e,)) for e in range(n_expert)]
                    sources[role].append(ref.name)
        out = []
        for role in ("gate", "up", "down"):
            if len(parts[role]) != n_expert:
                raise EdgequantError(f"layer {bid}: found {len(parts[role])} {role} experts, config says {n_expert}")
            out.append(PlannedTensor(name=self.tensor_name(_EXPERT_TENSOR[role], bid), parts=parts[role], sources=sources[role]))
        return out


@register("MixtralForCausalLM")
class Mixtral(Llama):
    """Mixtral: the llama layout plus 3-D expert stacks and an F32 router."""

    quant_layout = QuantLayout(experts=ExpertLayout(containers=("mlp", "block_sparse_moe"), gate=("gate_proj", "w1"),
                                                    up=("up_proj", "w3"), down=("down_proj", "w2")))

    def exact_window_possible(self) -> bool:
        return False

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_count(int(self.hparam("num_local_experts", "num_experts")))
        w.add_expert_used_count(int(self.hparam("num_experts_per_tok")))
