"""Llama-path relatives: SmolLM3 (``smollm3``), Granite (``granite``) and Ministral 3 / Mistral 3's
text model (``mistral3``). Each is the llama block, tensors and Q/K permutation (llama.cpp runs them
with normal RoPE) plus what its llama.cpp graph reads besides (``src/models/<arch>.cpp``):

- SmolLM3: no RoPE on every 4th layer. llama.cpp hard-codes that step (``n_no_rope_layer_step = 4``)
  and reads no key for it, so a config whose ``no_rope_layers`` is another pattern is refused.
- Granite: four multipliers: ``attention_multiplier`` (the query scale, instead of 1/sqrt(head_dim)),
  ``embedding_multiplier``, ``residual_multiplier`` and ``logits_scaling`` (logits are divided by it)
  become ``attention.scale``, ``embedding_scale``, ``residual_scale`` and ``logit_scale``, always
  written (transformers' defaults are 1.0, and an absent attention scale would mean 1/sqrt(head_dim)).
  The graph needs head_dim = hidden / heads.
- Ministral 3 (``model_type: ministral3``): YaRN RoPE plus Llama 4's attention temperature: queries
  are multiplied by ``1 + beta * ln(1 + floor(pos / original_ctx))``; ``llama_4_scaling_beta`` becomes
  ``attention.temperature_scale`` and ``mscale_all_dim`` ``rope.scaling.yarn_log_mul`` (llama.cpp
  assumes ``mscale`` 1 and refines the YaRN attention factor from it). ``Mistral3ForConditionalGeneration``
  is its text model under ``model.language_model.`` with the config in ``text_config``; the vision
  tower and projector are left out (llama.cpp keeps them in a separate mmproj file).
- None of these llama.cpp graphs has a sliding window: a window shorter than the context is
  reported (``--sliding-window ignore``) or refused (``exact``).
"""

from __future__ import annotations

import dataclasses

import gguf

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import MULTIMODAL_TEXT_LAYOUT, MULTIMODAL_TEXT_PREFIXES, VISION_PARTS, QuantLayout
from edgequant.export.archs.llama import Llama

SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp's fixed n_no_rope_layer_step


class _Relative(Llama):
    """A dense llama-path architecture with its own GGUF name and no sliding window in llama.cpp."""

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        self.sliding_window = self.used_window()
        self.window_shorter = bool(self.sliding_window and self.sliding_window < self.n_ctx)
        if self.window_shorter and self.sliding_window_mode == "exact":
            raise EdgequantError(f"--sliding-window exact: llama.cpp's {self.arch_name} has no sliding window and this "
                                 f"config uses one of {self.sliding_window} tokens; use --sliding-window ignore "
                                 f"(llama.cpp then attends to the whole context)")

    @property
    def no_exact_window(self) -> str:
        return f"llama.cpp's {self.arch_name} has no windowed attention"

    def used_window(self) -> int | None:
        return self.sliding_window

    def exact_window_possible(self) -> bool:
        return False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def claims(self, name: str) -> bool:
        return False  # dense: an expert tensor has no place


@register("SmolLM3ForCausalLM")
class SmolLM3(_Relative):
    gguf_arch = gguf.MODEL_ARCH.SMOLLM3

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        every = int(self.hparam("no_rope_layer_interval", default=SMOLLM3_NO_ROPE_STEP))
        given = self.config.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(self.n_blocks)]
        runtime = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(self.n_blocks)]
        if [int(x) for x in given] != runtime:
            raise EdgequantError(
                f"config.json no_rope_layers is {given}, but llama.cpp's smollm3 leaves out RoPE on every "
                f"{SMOLLM3_NO_ROPE_STEP}th layer exactly ({runtime}) and reads no key for another pattern; "
                f"this checkpoint cannot be converted exactly")

    def used_window(self) -> int | None:
        """transformers windows only the no-RoPE layers, and only with use_sliding_window."""
        return self.sliding_window if self.config.get("use_sliding_window") else None


@register("GraniteForCausalLM")
class Granite(_Relative):
    gguf_arch = gguf.MODEL_ARCH.GRANITE

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        if self.head_dim * self.n_head != self.n_embd:
            raise EdgequantError(f"config.json head_dim {self.head_dim} x num_attention_heads {self.n_head} != "
                                 f"hidden_size {self.n_embd}: llama.cpp's granite cannot run it; fix config.json")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                         ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
            value = self.hparam(key, default=1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise EdgequantError(f"config.json {key} is {value!r}; it must be a positive number (fix config.json)")
            add(float(value))


# transformers builds Mistral 3's multimodal class only as an image-text model, not through AutoModelForCausalLM,
# which loads GPTQ folders (the card's snippet, edgequant's reload check)
_MISTRAL3_VLM_LAYOUT = dataclasses.replace(MULTIMODAL_TEXT_LAYOUT, gptq_refused=(
    "edgequant gptq does not quantize Mistral3ForConditionalGeneration: transformers loads it only as an image-text "
    "model, not as the causal LM a GPTQ folder is loaded as; quantize its text model (Ministral3ForCausalLM) or use the GGUF files"))


@register("Ministral3ForCausalLM", "Mistral3ForConditionalGeneration")
class Mistral3(_Relative):
    gguf_arch = gguf.MODEL_ARCH.MISTRAL3
    text_prefixes = MULTIMODAL_TEXT_PREFIXES
    non_text = VISION_PARTS

    @classmethod
    def model_config(cls, ckpt) -> dict:
        if ckpt.hf_architecture != "Mistral3ForConditionalGeneration":
            return ckpt.config
        text = ckpt.config.get("text_config")
        if not isinstance(text, dict):
            raise EdgequantError("config.json of a Mistral3ForConditionalGeneration has no text_config; fix config.json")
        return text

    @classmethod
    def vocab_rows(cls, ckpt) -> int | None:
        return cls.model_config(ckpt).get("vocab_size")

    @classmethod
    def layout_for(cls, hf_architecture: str) -> QuantLayout:
        return _MISTRAL3_VLM_LAYOUT if hf_architecture == "Mistral3ForConditionalGeneration" else cls.quant_layout

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        self.temperature_beta = None
        if self.config.get("model_type") == "ministral3":
            self._check_ministral3_rope()
            self.temperature_beta = self.rope.get("llama_4_scaling_beta")

    def _check_ministral3_rope(self) -> None:
        r = self.rope
        if self.rope_type != "yarn":
            raise EdgequantError(f"config.json rope_parameters.rope_type is {self.rope_type!r}; Ministral 3 uses 'yarn' "
                                 f"and llama.cpp's mistral3 expects it (fix config.json)")
        if r.get("mscale") not in (None, 1, 1.0) or r.get("attention_factor") is not None or r.get("truncate") is False:
            raise EdgequantError("config.json rope_parameters sets mscale other than 1, attention_factor or truncate false; "
                                 "llama.cpp's mistral3 assumes mscale 1 and derives the factor itself, so this checkpoint "
                                 "cannot be converted exactly")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        r = self.rope
        if r.get("mscale") and r.get("mscale_all_dim"):  # transformers refines the attention factor only then
            w.add_rope_scaling_yarn_log_mul(float(r["mscale_all_dim"]))
        if self.temperature_beta:
            w.add_attn_temperature_scale(float(self.temperature_beta))
