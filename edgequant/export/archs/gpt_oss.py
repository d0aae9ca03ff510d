"""GPT-OSS (``GptOssForCausalLM``) becomes GGUF architecture ``gpt-oss``.

Layout rules (llama.cpp's ``src/models/openai-moe.cpp`` and ``conversion/gpt_oss.py``):
- NEOX RoPE: Q/K as HF stores them. q/k/v/o projections carry biases; each layer has per-head attention
  ``sinks`` (``blk.N.attn_sinks.weight``, F32) that join the softmax as an extra logit.
- ``input_layernorm`` -> ``attn_norm``, ``post_attention_layernorm`` -> ``post_attention_norm`` (the MoE's
  input norm), a router ``mlp.router`` with weight and bias (``ffn_gate_inp``, F32).
- Experts: transformers keeps them fused and input-major, ``mlp.experts.gate_up_proj`` [E, hidden, 2 ff] with
  gate in the even columns and up in the odd ones, ``gate_up_proj_bias`` [E, 2 ff] interleaved the same way,
  ``down_proj`` [E, ff, hidden] and ``down_proj_bias`` [E, hidden]. They become ``ffn_{gate,up,down}_exps``
  (weights transposed to llama.cpp's [E, out, in], streamed expert by expert) and their ``.bias`` stacks
  [E, out], kept F32. ``intermediate_size`` is one expert's width (``expert_feed_forward_length``).
- The activation is llama.cpp's ``swiglu_oai`` with alpha 1.702 and limit 7.0 built in: a config with other
  ``swiglu_alpha`` / ``swiglu_limit`` is refused. The router weights the top-k by a softmax over their logits.
- Sliding window: ``layer_types`` says which layers slide; written as ``sliding_window`` and a per-layer
  ``sliding_window_pattern``, which llama.cpp's gpt-oss honours, so the file equals transformers past the
  window whatever ``--sliding-window`` says.
- YaRN: written as for Llama. llama.cpp always rounds YaRN's correction range to whole dimensions, which
  is transformers' ``truncate: true``; the released models say ``truncate: false`` and then llama.cpp's
  logits differ from transformers' (a note says so; no GGUF key changes it).
- MXFP4 checkpoints (``mlp.experts.*_blocks`` / ``*_scales`` tensors, as openai/gpt-oss-20b ships) are
  refused in one line: edgequant writes F32/F16/BF16/Q8_0 files and quantizes
  with llama.cpp, and has no MXFP4 repacking; convert a bf16 copy (docs/convert.md says how).
"""

from __future__ import annotations

import re

import gguf

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import ExpertLayout, QuantLayout
from edgequant.export.archs.llama import Llama
from edgequant.export.plan import Part, PlannedTensor

T = gguf.MODEL_TENSOR
_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # the constants llama.cpp's swiglu_oai hard-codes
_MXFP4 = ("this checkpoint stores its experts in MXFP4 (openai/gpt-oss-* as released); edgequant does not repack "
          "MXFP4 into GGUF: convert a bf16 copy (dequantize it with transformers, or use a bf16 fine-tune)")


@register("GptOssForCausalLM")
class GptOss(Llama):
    """GPT-OSS: attention sinks and biases, alternating sliding window, biased interleaved experts."""

    gguf_arch = gguf.MODEL_ARCH.GPT_OSS
    permute_qk = False
    # GPTQModel 7.6.0 quantizes the experts as per-expert Linears with biases (defuser splits the interleaved
    # gate_up_proj into halves), which transformers' from_pretrained cannot build (defuser 0.0.28 has no GPT-OSS
    # block): gptq_load.gptq_loader sends such folders to GPTQModel.load, which builds them (docs/gptq.md)
    quant_layout = QuantLayout(experts=ExpertLayout(router="router", input_major=True))
    block_needs = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_POST_NORM, T.ATTN_SINKS,
                   T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        if any(_EXPERTS.match(n) and n.endswith(("_blocks", "_scales")) for n in ckpt.tensors):
            raise EdgequantError(_MXFP4)  # the tensors decide: a bf16 copy may keep the quantization_config
        if self.rope_type not in (None, "yarn"):
            raise EdgequantError(f"rope scaling type {self.rope_type!r} is not supported for GptOssForCausalLM "
                                 f"(supported: yarn); fix rope_parameters in config.json")
        for key, want in SWIGLU.items():
            if float(self.config.get(key, want)) != want:
                raise EdgequantError(f"config.json {key} is {self.config[key]}; llama.cpp's gpt-oss hard-codes {want} "
                                     f"and cannot run this model")
        self.n_expert = self.positive_int("num_local_experts", "num_experts")
        self.n_expert_used = self.positive_int("num_experts_per_tok")
        self.sliding_layers = self._sliding_layers()
        if self.rope_type == "yarn" and not self.rope.get("truncate", True):
            self.notes.append(
                "rope_parameters truncate is false: transformers uses YaRN's fractional correction range, llama.cpp "
                "always rounds it to whole dimensions, so llama.cpp's logits differ slightly from transformers' "
                "(1.6e-4 of the largest logit on a tiny model; no GGUF key changes it)")

    def _sliding_layers(self) -> list[bool]:
        types = self.config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                   for i in range(self.n_blocks)]
        if len(types) != self.n_blocks:
            raise EdgequantError(f"config.json layer_types has {len(types)} entries for {self.n_blocks} layers; fix config.json")
        if "sliding_attention" in types and not self.sliding_window:
            raise EdgequantError("config.json has sliding_attention layers but no sliding_window; fix config.json")
        return [t == "sliding_attention" for t in types]

    def exact_window_possible(self) -> bool:
        return False  # the Llama mechanism (granite_swa) is not used: gpt-oss has its own window

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def window(self) -> str | None:
        return "exact" if self.window_shorter and any(self.sliding_layers) else None

    def _write_window_mode(self, w: gguf.GGUFWriter) -> None:
        w.add_sliding_window_pattern(self.sliding_layers)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        if not self.sliding_window:
            w.add_sliding_window(0)  # llama.cpp's gpt-oss requires the key
        super().write_hparams(w)
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(self.n_expert_used)
        w.add_expert_feed_forward_length(int(self.hparam("intermediate_size")))

    # -- tensors ------------------------------------------------------------------------------

    def mapped_name(self, hf_name: str) -> str | None:
        if hf_name.endswith(".self_attn.sinks"):
            name = self.name_map.get_name(hf_name)
            return None if name is None else name + ".weight"
        return super().mapped_name(hf_name)

    def claims(self, name: str) -> bool:
        return bool(_EXPERTS.match(name))

    def planned(self, name: str, gguf_name: str, ref) -> PlannedTensor:
        pt = super().planned(name, gguf_name, ref)
        pt.keep_f32 = pt.keep_f32 or gguf_name.endswith((".bias", "attn_sinks.weight", "ffn_gate_inp.weight"))
        return pt

    def add_block_tensors(self, blocks, claimed) -> None:
        found: dict[int, dict] = {}
        for name, ref in claimed.items():
            m = _EXPERTS.match(name)
            found.setdefault(int(m.group(1)), {})[m.group(2) + (m.group(3) or "")] = ref
        for bid in range(self.n_blocks):
            blocks[bid].extend(self._expert_tensors(bid, found.get(bid, {})))

    def _expert_tensors(self, bid: int, found: dict) -> list[PlannedTensor]:
        n_e, ff, hidden = self.n_expert, int(self.hparam("intermediate_size")), self.n_embd
        want = {"gate_up_proj": [n_e, hidden, 2 * ff], "gate_up_proj_bias": [n_e, 2 * ff],
                "down_proj": [n_e, ff, hidden], "down_proj_bias": [n_e, hidden]}
        for key, shape in want.items():
            if key not in found:
                raise EdgequantError(f"the checkpoint lacks model.layers.{bid}.mlp.experts.{key}; it is incomplete "
                                     f"(download every shard)")
            if list(found[key].shape) != shape:
                raise EdgequantError(f"{found[key].name} has shape {list(found[key].shape)}; config.json "
                                     f"(num_local_experts, hidden_size, intermediate_size) gives {shape}")
        gu, gub, dn, dnb = (found[k] for k in want)

        def stack(key, ref, suffix, **kw) -> PlannedTensor:
            parts = [Part(ref=ref, index=(e,), **kw) for e in range(n_e)]
            return PlannedTensor(name=self.tensor_name(key, bid, suffix), parts=parts, sources=[ref.name],
                                 keep_f32=suffix == ".bias")

        return [stack(T.FFN_GATE_EXP, gu, ".weight", cols=(0, 2), transpose=True),
                stack(T.FFN_UP_EXP, gu, ".weight", cols=(1, 2), transpose=True),
                stack(T.FFN_DOWN_EXP, dn, ".weight", transpose=True),
                stack(T.FFN_GATE_EXP, gub, ".bias", cols=(0, 2)),
                stack(T.FFN_UP_EXP, gub, ".bias", cols=(1, 2)),
                stack(T.FFN_DOWN_EXP, dnb, ".bias")]
