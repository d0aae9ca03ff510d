"""A tiny random GptOssForCausalLM folder with a GPT-4o-style BPE and the real Harmony template, built offline.

GPT-OSS layout at toy size: 2 layers (layer 0 sliding with a window of ``WINDOW`` tokens, layer 1 full, as
transformers' default ``layer_types`` alternate), hidden 128, 4 query / 2 KV heads of 64, q/k/v/o biases,
per-head attention ``sinks``, a router with a bias, 4 experts of width ``EXPERT_FF`` (top-2) whose fused
``gate_up_proj`` [E, hidden, 2 ff] interleaves gate (even columns) and up (odd columns), with biases; YaRN
RoPE. Every norm, bias and sink is re-drawn after init (zeros or ones would hide a dropped tensor); the router
is drawn with a large std so that routing is decided (no near-ties that float rounding flips).

Tokenizer: no o200k vocabulary ships offline (the vendored ``models/ggml-vocab-*.gguf`` has none), so the
smallest honest substitute is a byte-level BPE trained on Python's docs with the o200k split regex
(Split(GPT-4o) + ByteLevel(use_regex=False), as fixtures_phi's Phi-4-mini) plus the Harmony special tokens by
name (``<|start|>``, ``<|message|>``, ``<|return|>``, ...). The chat template is the real one
(``models/templates/openai-gpt-oss-120b.jinja``); generation stops at ``<|return|>``, ``<|endoftext|>`` and
``<|call|>`` as gpt-oss-20b's ``generation_config.json`` says.
"""

from __future__ import annotations

from pathlib import Path

from fixtures import SEED, TINY_DIMS, _build_cached, _patch_json, _to_bf16, _training_documents, _write_readme
from fixtures_phi import GPT4O_PATTERN

GPT_OSS_VERSION = "1"
WINDOW = 8  # layer 0's sliding window: the parity prompt is longer
N_EXPERT, TOP_K, EXPERT_FF = 4, 2, 64
ROUTER_STD = 0.3
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": True, "original_max_position_embeddings": 1024}
# Harmony's special tokens (o200k_harmony), in id order there
HARMONY_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                   "<|end|>", "<|message|>", "<|call|>")
BPE_VOCAB = 900


def build_harmony_tokenizer():
    """Split(GPT-4o regex) + ByteLevel BPE trained on the docs, then the Harmony special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4O_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_documents(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIAL])
    return tok


def _randomise(model) -> None:
    """Norms around 1, biases and sinks N(0, 0.5), the router N(0, ROUTER_STD): drawn after init."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(("bias", ".sinks")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("mlp.router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * ROUTER_STD)


def _build(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast

    from edgequant.llamacpp_tools import vendored

    backend = build_harmony_tokenizer()
    ids = {t: backend.token_to_id(t) for t in HARMONY_SPECIAL}
    template = Path(vendored("models/templates/openai-gpt-oss-120b.jinja")).read_text(encoding="utf-8")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|return|>",
                                     pad_token="<|endoftext|>", chat_template=template, model_max_length=131072)
    hf_tok.save_pretrained(folder, save_jinja_files=False)
    _patch_json(folder / "tokenizer_config.json", update={"add_bos_token": False, "add_eos_token": False})
    n_vocab = (backend.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    config = GptOssConfig(vocab_size=n_vocab, **{**TINY_DIMS, "intermediate_size": EXPERT_FF}, head_dim=64,
                          num_local_experts=N_EXPERT, num_experts_per_tok=TOP_K, sliding_window=WINDOW,
                          max_position_embeddings=4096, rope_parameters=dict(YARN), attention_bias=True,
                          bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|return|>"],
                          pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(SEED)
    model = GptOssForCausalLM(config)
    _randomise(model)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|startoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]])
    model.save_pretrained(folder)
    _write_readme(folder, "tiny-gpt-oss (edgequant test fixture)", "edgequant-fixtures/tiny-gpt-oss",
                  "Random weights, GPT-OSS layout (sinks, biases, 4 interleaved experts, window 8 on layer 0, YaRN), "
                  "GPT-4o-style BPE on Python's docs with the Harmony special tokens.")


def tiny_gpt_oss() -> Path:
    """A GptOssForCausalLM folder (see the module docstring)."""
    return _build_cached("tiny-gpt-oss", GPT_OSS_VERSION, _build)
