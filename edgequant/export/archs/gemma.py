"""Gemma 2 and Gemma 3 (text): GGUF architectures ``gemma2`` and ``gemma3``.

Layout rules (llama.cpp's ``gemma2`` / ``gemma3`` graphs, read in its ``src/models/``):
- No Q/K permutation: llama.cpp runs Gemma with NEOX (rotate-half) RoPE, HF's own order.
- Every RMSNorm weight is stored as ``1 + w`` (HF's Gemma RMSNorm multiplies by ``1 + w`` in float32,
  llama.cpp's by ``w``): the block norms, the post-attention and post-FFN norms, the final norm and
  Gemma 3's per-head ``q_norm`` / ``k_norm``.
- The embedding is tied (Gemma 2 always reads ``token_embd`` as the output) and truncated to the
  tokenizer's own size when config.json pads ``vocab_size`` (Gemma 3's 262208 rows for 262144 tokens).
- llama.cpp scales queries by ``1/sqrt(head_dim)`` (``1/sqrt(hidden/heads)`` for the 27B layer counts)
  and has no key for another ``query_pre_attn_scalar``: a config that differs is refused.
- Sliding windows are honoured by llama.cpp's own graphs: ``attention.sliding_window`` and the
  per-layer ``attention.sliding_window_pattern`` (from ``layer_types``). Gemma 3's local layers use
  ``rope.freq_base_swa`` (``rope_local_base_freq``), its global ones ``rope.freq_base`` and the
  linear scaling of the 4B+ models.
- Gemma 2 soft-caps attention scores and final logits (``attn_logit_softcapping``,
  ``final_logit_softcapping``); Gemma 3 only the final logits, when set.
- ``Gemma3ForConditionalGeneration``: the text model under ``language_model.`` / ``model.language_model.``
  with its config in ``text_config``; the vision tower and the projector are left out (llama.cpp
  keeps them in a separate mmproj file).
"""

from __future__ import annotations

import gguf

from edgequant.errors import EdgequantError
from edgequant.export.archs import register
from edgequant.export.archs.base import MULTIMODAL_TEXT_LAYOUT, MULTIMODAL_TEXT_PREFIXES, VISION_PARTS, Architecture, QuantLayout
from edgequant.export.plan import Part, PlannedTensor

T = gguf.MODEL_TENSOR

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
# Gemma3ForConditionalGeneration: transformers' modules under model.language_model, checkpoints under either spelling
_BLOCK_NEEDS = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_POST_NORM, T.FFN_NORM,
                T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM)


class _Gemma(Architecture):
    """What Gemma 2 and Gemma 3 share; the subclasses add their attention details."""

    wide_layer_counts: tuple[int, ...] = ()  # the 27B sizes, where llama.cpp scales queries by hidden/heads
    block_needs = _BLOCK_NEEDS
    text_prefixes = MULTIMODAL_TEXT_PREFIXES
    non_text = VISION_PARTS
    missing_embedding = "the checkpoint has no embed_tokens.weight; it is incomplete (download every shard)"

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)  # the window mode does not apply: llama.cpp's graphs honour it
        self.read_attention_shape()
        self.n_ctx = self.positive_int("max_position_embeddings")
        act = self.hparam("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        if act not in _GELU_TANH:
            raise EdgequantError(f"config.json hidden_activation is {act!r}; llama.cpp's {self.arch_name} runs "
                                 f"gelu_pytorch_tanh only (fix config.json if the model was trained with it)")
        self._check_query_scale()
        self.layer_sliding = self._layer_sliding()

    @classmethod
    def vocab_rows(cls, ckpt) -> int | None:
        return None  # the tokenizer's own size: config.json's padding rows are dropped, as llama.cpp does

    def _check_query_scale(self) -> None:
        scalar = self.hparam("query_pre_attn_scalar", default=self.head_dim)
        wide = self.n_blocks in self.wide_layer_counts
        expected = self.n_embd // self.n_head if wide else self.head_dim
        if float(scalar) != float(expected):
            raise EdgequantError(
                f"config.json query_pre_attn_scalar is {scalar}, but llama.cpp's {self.arch_name} scales queries by "
                f"1/sqrt({expected}) ({'hidden_size/num_attention_heads' if wide else 'head_dim'}) and reads no key "
                f"for another value; this checkpoint cannot be converted exactly")

    def _layer_sliding(self) -> list[bool]:
        """Which layers use the sliding window: config.json's layer_types, else the family's pattern."""
        types = self.config.get("layer_types")
        if types:
            if len(types) != self.n_blocks or not set(types) <= {"sliding_attention", "full_attention"}:
                raise EdgequantError(f"config.json layer_types must give sliding_attention or full_attention for each "
                                     f"of the {self.n_blocks} layers; fix config.json")
            return [t == "sliding_attention" for t in types]
        every = int(self.hparam("sliding_window_pattern", default=self.default_pattern))
        return [(i + 1) % every != 0 for i in range(self.n_blocks)]

    @property
    def sliding_window(self) -> int | None:
        window = self.config.get("sliding_window")
        return int(window) if window and any(self.layer_sliding) else None

    @property
    def window(self) -> str | None:
        return "exact" if self.sliding_window and self.sliding_window < self.n_ctx else None

    # -- hyperparameters ----------------------------------------------------------------------

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_vocab_size(self.vocab_size())
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_blocks)
        w.add_feed_forward_length(self.positive_int("intermediate_size"))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv_head)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_dimension_count(self.head_dim)
        w.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps")))
        if self.sliding_window:
            w.add_sliding_window(self.sliding_window)
            w.add_sliding_window_pattern(self.layer_sliding)
        self.write_attention(w)

    def write_attention(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def rope_params(self, layer_type: str) -> dict:
        """One layer type's RoPE parameters, from transformers 5's nested rope_parameters or the older keys."""
        rope = self.config.get("rope_parameters") or {}
        if layer_type in rope:
            return dict(rope[layer_type] or {})
        if layer_type == "sliding_attention":
            return {"rope_theta": self.hparam("rope_local_base_freq", default=10000.0)}
        flat = dict(rope if "rope_theta" in rope or "rope_type" in rope else self.config.get("rope_scaling") or {})
        flat.setdefault("rope_theta", self.hparam("rope_theta", default=10000.0))
        return flat

    def write_rope(self, w: gguf.GGUFWriter, params: dict, *, swa: bool = False) -> None:
        """A layer type's base (``freq_base`` or ``freq_base_swa``); linear scaling only on the global layers."""
        (w.add_rope_freq_base_swa if swa else w.add_rope_freq_base)(float(params.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type")) or "default"
        if kind == "default":
            return
        if kind != "linear" or swa or params.get("factor") is None:
            where = "sliding-window" if swa else "global"
            raise EdgequantError(f"{where} RoPE scaling {kind!r} is not supported for {self.ckpt.hf_architecture} "
                                 f"(llama.cpp's {self.arch_name} takes linear scaling on the global layers only)")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))

    def softcap(self, key: str) -> float | None:
        value = self.config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise EdgequantError(f"config.json {key} is {value!r}; it must be a positive number or null")
        return float(value) if value is not None else None

    # -- tensors ------------------------------------------------------------------------------

    def vocab_size(self) -> int:
        """The tokenizer's token count, which the embedding rows are truncated to."""
        from edgequant.export.vocab import tokenizer_size

        tok_cfg = self.ckpt.read_json("tokenizer_config.json") or {}
        model = self.ckpt.file("tokenizer.model")
        if model is not None:
            from sentencepiece import SentencePieceProcessor

            n_pieces = SentencePieceProcessor(model_file=str(model)).vocab_size()
        else:
            n_pieces = len(((self.ckpt.read_json("tokenizer.json") or {}).get("model") or {}).get("vocab") or {})
        return tokenizer_size(self.ckpt, n_pieces, tok_cfg)

    def plan(self) -> list[PlannedTensor]:
        self._n_vocab = self.vocab_size()  # read the tokenizer once
        return super().plan()

    def skipped(self, name: str) -> bool:
        return super().skipped(name) or (name == "lm_head.weight" and self.tied())  # the embedding's rows again

    def mapped_name(self, name: str) -> str | None:
        gguf_name = super().mapped_name(name)
        if name == "lm_head.weight" and gguf_name is not None and not gguf_name.startswith("output"):
            return None
        return gguf_name

    def planned(self, name: str, gguf_name: str, ref) -> PlannedTensor:
        part = Part(ref=ref)
        if name.endswith("norm.weight"):
            part.offset = 1.0  # HF multiplies by 1 + w
        elif gguf_name.split(".")[0] in ("token_embd", "output"):
            part.rows = self._vocab_part(ref, self._n_vocab)
        return PlannedTensor(name=gguf_name, parts=[part], sources=[ref.name])

    def tied(self) -> bool:
        return bool(self.ckpt.config.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)))

    def _vocab_part(self, ref, n_vocab: int) -> tuple[int, int] | None:
        rows = ref.shape[0]
        if rows < n_vocab:
            raise EdgequantError(f"{ref.name} has {rows} rows but the tokenizer has {n_vocab} tokens; the checkpoint "
                                 f"and its tokenizer do not belong together")
        if rows > n_vocab:
            self.notes.append(f"{ref.name}: {rows} rows truncated to the tokenizer's {n_vocab} tokens (padding)")
            return (0, n_vocab)
        return None


@register("Gemma2ForCausalLM")
class Gemma2(_Gemma):
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    wide_layer_counts = (46,)
    default_pattern = 2

    def __init__(self, ckpt, **options):
        super().__init__(ckpt, **options)
        if not self.tied() and any(self.text_name(n) == "lm_head.weight" for n in ckpt.tensors):
            raise EdgequantError("config.json unties lm_head from the embedding, but llama.cpp's gemma2 always "
                                 "uses the embedding as the output; this checkpoint cannot be converted exactly")

    def write_attention(self, w: gguf.GGUFWriter) -> None:
        self.write_rope(w, self.rope_params("full_attention"))
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            cap = self.softcap(key)
            if cap is None:
                raise EdgequantError(f"config.json has no {key}; llama.cpp's gemma2 always soft-caps "
                                     f"(Gemma 2 uses 50.0 for attention, 30.0 for the logits): set it")
            add(cap)


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3(_Gemma):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    wide_layer_counts = (62,)
    default_pattern = 6
    block_needs = (*_BLOCK_NEEDS, T.ATTN_Q_NORM, T.ATTN_K_NORM)

    @classmethod
    def model_config(cls, ckpt) -> dict:
        text = ckpt.config.get("text_config")
        if ckpt.hf_architecture == "Gemma3ForConditionalGeneration":
            if not isinstance(text, dict):
                raise EdgequantError("config.json of a Gemma3ForConditionalGeneration has no text_config; fix config.json")
            return text
        return ckpt.config

    @classmethod
    def layout_for(cls, hf_architecture: str) -> QuantLayout:
        return MULTIMODAL_TEXT_LAYOUT if hf_architecture == "Gemma3ForConditionalGeneration" else cls.quant_layout

    def write_attention(self, w: gguf.GGUFWriter) -> None:
        if self.softcap("attn_logit_softcapping") is not None:
            raise EdgequantError("config.json sets attn_logit_softcapping, which llama.cpp's gemma3 does not apply; "
                                 "Gemma 3 has none (set it to null if the model was trained without it)")
        self.write_rope(w, self.rope_params("full_attention"))
        if self.sliding_window:
            self.write_rope(w, self.rope_params("sliding_attention"), swa=True)
        cap = self.softcap("final_logit_softcapping")
        if cap is not None:
            w.add_final_logit_softcapping(cap)
