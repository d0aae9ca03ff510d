"""The one catalogue of quant types. ``quantize --list``, the docs, the bench and model cards read it.

GGUF types are llama.cpp's file types (``llama_ftype``): the name is what ``llama-quantize``
accepts, ``base`` the ggml type most matrices get, ``bpw`` the nominal bits/weight of that base
type (block bytes × 8 / block size; mixes such as Q4_K_M come out a little higher because some
tensors get a larger type). ``reference`` repeats llama-quantize's own size/quality line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import gguf

from edgequant.errors import EdgequantError

F = gguf.LlamaFileType
Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: F
    base: Q
    family: str  # float, legacy, k-quant, i-quant, ternary
    needs_imatrix: bool
    advice: str
    reference: str = ""

    @property
    def bpw(self) -> float:
        block, size = gguf.GGML_QUANT_SIZES[self.base]
        return round(8 * size / block, 4)

    @property
    def block_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.base][0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ftype=self.ftype.name, base=self.base.name, bpw=self.bpw)
        return d


def _t(name, ftype, base, family, needs, advice, reference=""):
    return QuantType(name, ftype, base, family, needs, advice, reference)


CATALOGUE: tuple[QuantType, ...] = (
    _t("F32", F.ALL_F32, Q.F32, "float", False, "lossless reference; twice F16's size", "26.00G @ 7B"),
    _t("F16", F.MOSTLY_F16, Q.F16, "float", False, "the usual quantization source; lossless for fp16 models", "14.00G, +0.0020 ppl @ Mistral-7B"),
    _t("BF16", F.MOSTLY_BF16, Q.BF16, "float", False, "lossless for bf16 models; slower than F16 on some CPUs", "14.00G, -0.0050 ppl @ Mistral-7B"),
    _t("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0, "legacy", False, "practically lossless; the safe choice when size allows", "7.96G, +0.0026 ppl @ Llama-3-8B"),
    _t("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K, "k-quant", False, "near-lossless at 3/4 of Q8_0's size", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    _t("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K, "k-quant", False, "very good quality; recommended when Q6_K is too big", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    _t("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K, "k-quant", False, "slightly smaller, slightly worse than Q5_K_M", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    _t("Q5_1", F.MOSTLY_Q5_1, Q.Q5_1, "legacy", False, "legacy 5-bit; prefer Q5_K_M", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    _t("Q5_0", F.MOSTLY_Q5_0, Q.Q5_0, "legacy", False, "legacy 5-bit; prefer Q5_K_S", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    _t("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K, "k-quant", False, "the default recommendation: good quality per byte", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    _t("Q4_K_S", F.MOSTLY_Q4_K_S, Q.Q4_K, "k-quant", False, "smaller than Q4_K_M, noticeably worse", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    _t("Q4_1", F.MOSTLY_Q4_1, Q.Q4_1, "legacy", False, "legacy 4-bit; fast on old kernels, prefer Q4_K_M", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    _t("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0, "legacy", False, "legacy 4-bit; fastest on ARM with repacking, prefer Q4_K_M", "4.34G, +0.4685 ppl @ Llama-3-8B"),
    _t("IQ4_XS", F.MOSTLY_IQ4_XS, Q.IQ4_XS, "i-quant", False, "close to Q4_K_S at less size; better with an imatrix", "4.25 bpw"),
    _t("IQ4_NL", F.MOSTLY_IQ4_NL, Q.IQ4_NL, "i-quant", False, "non-linear 4-bit with 32-blocks; better with an imatrix", "4.50 bpw"),
    _t("Q3_K_L", F.MOSTLY_Q3_K_L, Q.Q3_K, "k-quant", False, "3-bit with larger attention/ffn_down types", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    _t("Q3_K_M", F.MOSTLY_Q3_K_M, Q.Q3_K, "k-quant", False, "small with clear quality loss; use an imatrix", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    _t("Q3_K_S", F.MOSTLY_Q3_K_S, Q.Q3_K, "k-quant", False, "very high quality loss", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    _t("IQ3_M", F.MOSTLY_IQ3_M, Q.IQ3_S, "i-quant", False, "3.66 bpw mix; beats Q3_K_M with an imatrix", "3.66 bpw"),
    _t("IQ3_S", F.MOSTLY_IQ3_S, Q.IQ3_S, "i-quant", False, "3.44 bpw; use an imatrix", "3.44 bpw"),
    _t("IQ3_XS", F.MOSTLY_IQ3_XS, Q.IQ3_S, "i-quant", False, "3.3 bpw; use an imatrix", "3.3 bpw"),
    _t("IQ3_XXS", F.MOSTLY_IQ3_XXS, Q.IQ3_XXS, "i-quant", True, "3.06 bpw; needs an imatrix", "3.06 bpw"),
    _t("Q2_K", F.MOSTLY_Q2_K, Q.Q2_K, "k-quant", False, "extreme quality loss; only with an imatrix and big models", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    _t("Q2_K_S", F.MOSTLY_Q2_K_S, Q.Q2_K, "k-quant", True, "Q2_K with smaller attention; needs an imatrix", "2.96G, +3.1836 ppl @ Llama-3-8B"),
    _t("IQ2_M", F.MOSTLY_IQ2_M, Q.IQ2_S, "i-quant", True, "2.7 bpw; needs an imatrix", "2.7 bpw"),
    _t("IQ2_S", F.MOSTLY_IQ2_S, Q.IQ2_S, "i-quant", True, "2.5 bpw; needs an imatrix", "2.5 bpw"),
    _t("IQ2_XS", F.MOSTLY_IQ2_XS, Q.IQ2_XS, "i-quant", True, "2.31 bpw; needs an imatrix", "2.31 bpw"),
    _t("IQ2_XXS", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, "i-quant", True, "2.06 bpw; needs an imatrix", "2.06 bpw"),
    _t("IQ1_M", F.MOSTLY_IQ1_M, Q.IQ1_M, "i-quant", True, "1.75 bpw; needs an imatrix; for very large models only", "1.75 bpw"),
    _t("IQ1_S", F.MOSTLY_IQ1_S, Q.IQ1_S, "i-quant", True, "1.56 bpw; needs an imatrix; for very large models only", "1.56 bpw"),
    _t("TQ2_0", F.MOSTLY_TQ2_0, Q.TQ2_0, "ternary", False, "ternary 2.06 bpw; only for ternary-trained models (BitNet)", "2.06 bpw"),
    _t("TQ1_0", F.MOSTLY_TQ1_0, Q.TQ1_0, "ternary", False, "ternary 1.69 bpw; only for ternary-trained models (BitNet)", "1.69 bpw"),
)

ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}
_BY_NAME = {t.name: t for t in CATALOGUE}


def get(name: str) -> QuantType:
    key = ALIASES.get(name.upper(), name.upper())
    try:
        return _BY_NAME[key]
    except KeyError:
        raise EdgequantError(f"unknown quant type {name!r}; valid: {', '.join(t.name for t in CATALOGUE)} (edgequant quantize --list)") from None



# -- per-tensor candidates for quantize --target (edgequant/mix) -------------------------------------
# The base types of the catalogue a mix may give one tensor: every standard type stock llama.cpp,
# Ollama and LM Studio load, except the ternary ones (only for ternary-trained models) and IQ1_S/IQ1_M
# (so lossy that the additive error model behind the choice no longer holds). i-quants only with an
# importance matrix; the float type is the source's own (F32 sources: F16).
_MIX_EXCLUDED = {Q.F32, Q.TQ1_0, Q.TQ2_0, Q.IQ1_S, Q.IQ1_M}
# tensor types llama.cpp's quantizer refuses for a tensor without importance data (its
# tensor_requires_imatrix; ggml itself asserts on IQ2_XXS/IQ2_XS/IQ1_S even where llama.cpp lets it through)
NEEDS_IMATRIX_DATA = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})


def mix_candidates(with_imatrix: bool) -> list[Q]:
    """Quantized base types a tensor may take in a mix, highest bits/weight first."""
    seen: dict[Q, QuantType] = {}
    for t in CATALOGUE:
        if t.family == "float" or t.base in _MIX_EXCLUDED or (t.family == "i-quant" and not with_imatrix):
            continue
        seen.setdefault(t.base, t)
    return sorted(seen, key=lambda q: -nominal_bpw(q))


def nominal_bpw(q: Q) -> float:
    block, size = gguf.GGML_QUANT_SIZES[q]
    return 8 * size / block
