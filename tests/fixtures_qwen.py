"""Tiny Qwen2 / Qwen3 model folders with the real Qwen2 tokenizer, for tests/test_arch_qwen.py.

The tokenizer is llama.cpp's own ``models/ggml-vocab-qwen2.gguf`` (Qwen's 151,643 BPE tokens and
merges), turned into a Hugging Face tokenizer by transformers' GGUF loader and then laid out as
Qwen2.5 / Qwen3 ship it: ``[PADn]`` placeholders removed, Qwen3's 26 added tokens at 151643..151668
(``<think>`` and the tool tokens are not "special", as on the hub), an NFC normalizer, and
``vocab_size`` 151936 in config.json, so the embedding has more rows than the tokenizer has tokens
(the converter must pad). Chat templates are the real ones from llama.cpp's ``models/templates/``.

Weights are random; every norm weight and bias is re-drawn after init (default init sets norms
to 1 and biases to 0, which would hide a dropped bias or a swapped q/k norm).
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures import SEED, TINY_DIMS, _build_cached, _patch_json, _to_bf16, _write_readme

QWEN_TOKENIZER_VERSION = "1"
QWEN2_VERSION = "2"
QWEN3_VERSION = "1"

QWEN_VOCAB_SIZE = 151936  # config.json's vocab_size: the embedding rows of every Qwen2/2.5/3 model
N_BPE = 151643  # tokens of the BPE model proper; added tokens follow
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
# Qwen3's added tokens from 151643 on (Qwen2.5 has the same first 22); True: "special" on the hub.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN2_UNUSED_WINDOW = 32
QWEN2_TEMPLATE = "models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"
QWEN3_TEMPLATE = "models/templates/Qwen-Qwen3-0.6B.jinja"


def _build_tokenizer_json(folder: Path) -> None:
    """tokenizer.json of the Qwen layout, from the vendored vocab-only GGUF."""
    from transformers import AutoTokenizer

    from edgequant.llamacpp_tools import vendored

    gguf_path = Path(vendored("models/ggml-vocab-qwen2.gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tj = json.loads(tok.backend_tokenizer.to_str())
    tj["model"]["vocab"] = {t: i for t, i in tj["model"]["vocab"].items() if i < N_BPE}
    tj["added_tokens"] = [
        {"id": N_BPE + k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for k, (text, special) in enumerate(QWEN3_ADDED)
    ]
    tj["normalizer"] = {"type": "NFC"}
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


def qwen_tokenizer_json() -> Path:
    """The cached ``tokenizer.json`` (about 7 MB) every Qwen fixture shares."""
    return _build_cached("qwen-tokenizer", QWEN_TOKENIZER_VERSION, _build_tokenizer_json) / "tokenizer.json"


def _save_tokenizer(folder: Path, template_path: str) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from edgequant.llamacpp_tools import vendored

    template = Path(vendored(template_path)).read_text(encoding="utf-8")
    backend = Tokenizer.from_file(str(qwen_tokenizer_json()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     chat_template=template, model_max_length=131072, clean_up_tokenization_spaces=False)
    hf_tok.save_pretrained(folder, save_jinja_files=False)


def _randomise(model) -> None:
    """Norm weights around 1 and non-zero biases, drawn after init."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _save_model(folder: Path, model, title: str, body: str) -> None:
    from transformers import GenerationConfig

    _randomise(model)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT],
                                               pad_token_id=ENDOFTEXT)
    model.save_pretrained(folder)
    _write_readme(folder, title, f"edgequant-fixtures/{title.split()[0]}", body)


def _build_tiny_qwen2(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _save_tokenizer(folder, QWEN2_TEMPLATE)
    config = Qwen2Config(vocab_size=QWEN_VOCAB_SIZE, **TINY_DIMS, max_position_embeddings=4096, rope_theta=1e6,
                         use_sliding_window=False, max_window_layers=1,
                         bos_token_id=ENDOFTEXT, eos_token_id=IM_END)
    torch.manual_seed(SEED)
    _save_model(folder, Qwen2ForCausalLM(config), "tiny-qwen2 (edgequant test fixture)",
                "Random weights and biases, Qwen2.5 layout (q/k/v biases, untied output), real Qwen2 tokenizer.")
    # As on the hub (Qwen2.5-7B-Instruct): a sliding_window value that use_sliding_window false switches off,
    # and no layer_types; 32 tokens, so a longer prompt shows whether the converter wrongly honours it.
    _patch_json(folder / "config.json", {"sliding_window": QWEN2_UNUSED_WINDOW}, remove=("layer_types",))


def tiny_qwen2() -> Path:
    """Qwen2ForCausalLM: 2 layers, hidden 128, GQA 4/2, q/k/v biases, separate lm_head, Qwen2.5 template."""
    return _build_cached("tiny-qwen2", QWEN2_VERSION, _build_tiny_qwen2)


def _build_tiny_qwen3(folder: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _save_tokenizer(folder, QWEN3_TEMPLATE)
    dims = {**TINY_DIMS, "tie_word_embeddings": True}
    config = Qwen3Config(vocab_size=QWEN_VOCAB_SIZE, **dims, head_dim=64, max_position_embeddings=4096,
                         rope_theta=1e6, use_sliding_window=False, sliding_window=None, max_window_layers=2,
                         attention_bias=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END)
    torch.manual_seed(SEED)
    _save_model(folder, Qwen3ForCausalLM(config), "tiny-qwen3 (edgequant test fixture)",
                "Random weights, Qwen3 layout (q/k norms, head_dim 64 != 128/4, tied output), real Qwen2 tokenizer.")


def tiny_qwen3() -> Path:
    """Qwen3ForCausalLM: 2 layers, hidden 128, 4/2 heads of 64, per-head q/k RMSNorm, tied embeddings."""
    return _build_cached("tiny-qwen3", QWEN3_VERSION, _build_tiny_qwen3)
