"""Name a BPE vocabulary's pre-tokenizer for llama.cpp (``tokenizer.ggml.pre``) from what
``tokenizer.json`` declares.

llama.cpp hard-codes one regex set per name and its own converter recognises a model only by
hashing the token ids of a probe text. We instead read the declared pre-tokenizer (Split regexes,
Digits, ByteLevel), reduce it to a canonical list of splitting steps, and look that list up in a
table of llama.cpp names whose regexes are the same. Anything we cannot match exactly is an
error that names ``--pre-tokenizer NAME``: a wrong pre-tokenizer silently changes every prompt.
"""

from __future__ import annotations

from typing import Any

from edgequant.errors import EdgequantError

# The names llama.cpp (vendored in llama-cpp-python 0.3.36, src/llama-vocab.cpp) accepts.
LLAMACPP_PRE_NAMES = (
    "default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano "
    "deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es "
    "jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 "
    "granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact "
    "command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat "
    "chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 "
    "exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m "
    "tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder "
    "hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open mellum2"
).split()

# HF ByteLevel(use_regex=True) splits with GPT-2's pattern.
_BYTELEVEL = ("bytelevel-gpt2-regex",)
_DIGITS = ("digits",)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o's o200k split (Phi-4-mini, Xenova/gpt-4o): llama.cpp's "gpt-4o" set, whose regex comment is this one.
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# canonical steps -> llama.cpp name. Each entry was checked against llama-vocab.cpp's regex set.
_KNOWN: dict[tuple, str] = {
    (_BYTELEVEL,): "gpt-2",
    (_DIGITS, _BYTELEVEL): "smollm",  # = starcoder's regexes; see clean-spaces rule below
    (("split", LLAMA3_REGEX),): "llama-bpe",  # or dbrx without ignore_merges (see _refine)
    (("split", QWEN2_REGEX),): "qwen2",
    (("split", GPT4O_REGEX),): "gpt-4o",
}


def _steps(pre: dict[str, Any] | None) -> tuple[list[tuple], bool]:
    """Canonical splitting steps of a tokenizers pre_tokenizer, and whether it is byte-level."""
    if pre is None:
        return [], False
    kind = pre.get("type")
    if kind == "Sequence":
        steps, byte_level = [], False
        for sub in pre.get("pretokenizers", []):
            s, b = _steps(sub)
            steps += s
            byte_level = byte_level or b
        return steps, byte_level
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise EdgequantError(
                "tokenizer.json's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's BPE tokenizer "
                "cannot do; pass --pre-tokenizer NAME only if you know the right one"
            )
        return ([_BYTELEVEL] if pre.get("use_regex", True) else []), True
    if kind == "Digits":
        if not pre.get("individual_digits", False):
            return [("digits-grouped",)], False
        return [_DIGITS], False
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex is None or pre.get("behavior") != "Isolated" or pre.get("invert"):
            return [("split-unsupported", str(pattern), pre.get("behavior"), pre.get("invert"))], False
        return [("split", regex)], False
    return [("unknown", kind)], False


def identify(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer name for this BPE ``tokenizer.json``, or an error naming the fix."""
    steps, byte_level = _steps(tokenizer_json.get("pre_tokenizer"))
    decoder = tokenizer_json.get("decoder") or {}
    byte_level = byte_level or decoder.get("type") == "ByteLevel"
    normalizer = tokenizer_json.get("normalizer")
    described = " + ".join(s[0] if s[0] != "split" else f"Split({s[1]!r})" for s in steps) or "none"
    hint = f"pass --pre-tokenizer NAME with the llama.cpp name for it (one of: {', '.join(sorted(set(_KNOWN.values())))}, ...)"
    if not byte_level:
        raise EdgequantError(f"tokenizer.json is not a byte-level BPE (pre-tokenizer: {described}); {hint}")
    name = _KNOWN.get(tuple(steps))
    if name is None:
        raise EdgequantError(f"cannot identify the BPE pre-tokenizer of tokenizer.json (declared: {described}); {hint}")
    norm_type = (normalizer or {}).get("type")
    if name == "qwen2" and norm_type not in (None, "NFC"):
        raise EdgequantError(f"tokenizer.json declares a {norm_type} normalizer that llama.cpp does not apply; {hint}")
    if name != "qwen2" and normalizer is not None:
        raise EdgequantError(f"tokenizer.json declares a {norm_type} normalizer that llama.cpp does not apply; {hint}")
    if name == "smollm" and (tokenizer_config or {}).get("clean_up_tokenization_spaces", False):
        name = "starcoder"  # same regexes; llama.cpp cleans spaces when detokenizing for this name
    return _refine(name, tokenizer_json)


# DeepSeek's BOS, which its R1 distills of Qwen2.5 add to Qwen's vocabulary
DEEPSEEK_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"


def _refine(name: str, tokenizer_json: dict[str, Any]) -> str:
    """Names that share a regex set but differ in a flag llama.cpp ties to the name, or in provenance.

    - ``llama-bpe`` turns on ``ignore_merges`` (a word found whole in the vocabulary is one token, as
      Llama 3's tokenizer.json asks); ``dbrx`` has the same regex without it (Phi-4, DBRX: cl100k
      vocabularies whose tokenizer.json leaves ignore_merges false).
    - ``deepseek-r1-qwen`` is llama.cpp's qwen2 set under the name its converter writes for the
      DeepSeek-R1 distills of Qwen (Qwen's BPE with DeepSeek's added tokens and BOS).
    """
    model = tokenizer_json.get("model") or {}
    if name == "llama-bpe" and not model.get("ignore_merges", False):
        return "dbrx"
    if name == "qwen2":
        added = {t.get("content") for t in tokenizer_json.get("added_tokens") or []}
        if DEEPSEEK_BOS in added or DEEPSEEK_BOS in (model.get("vocab") or {}):
            return "deepseek-r1-qwen"
    return name


def validate(name: str) -> str:
    if name not in LLAMACPP_PRE_NAMES:
        raise EdgequantError(
            f"--pre-tokenizer {name!r} is not a name llama.cpp knows; it would refuse to load the file "
            f"(known: {', '.join(LLAMACPP_PRE_NAMES)})"
        )
    return name
