"""Tiny random Phi3ForCausalLM folders (Phi-3-mini-like and Phi-4-mini-like), built offline and cached.

Both randomise every RMSNorm weight after init (ones would hide a dropped or misplaced norm).
- ``tiny_phi3``: Phi-3-mini layout: SentencePiece (``tokenizer.model`` + legacy ``tokenizer.json``)
  with Phi-3's eleven added tokens overlaid after the pieces (``<|end|>`` etc., rstrip like the hub's),
  vocab padded to a multiple of 64 as Phi-3's 32064, full rotary, sliding window 2047, no BOS added,
  the real Phi-3.5-mini chat template (from llama.cpp's ``models/templates``).
- ``tiny_phi4_mini``: Phi-4-mini layout: byte-level BPE with the GPT-4o (o200k) split regex, partial
  rotary 0.75, tied embeddings, GQA, LongRoPE with random short/long factors and an original
  context of ``PHI4_MINI_ORIG_CTX`` tokens (so the long factors are testable), Phi-4-mini's template.
"""

from __future__ import annotations

from pathlib import Path

from fixtures import SEED, TINY_DIMS, _build_cached, _patch_json, _to_bf16, _training_documents, _write_readme, \
    spm_legacy_tokenizer, train_sentencepiece

PHI3_VERSION = "2"
PHI4_MINI_VERSION = "1"
PHI4_MINI_ORIG_CTX = 256

# Phi-3's added tokens (ids 32000..32010 there), in order; rstrip as in the hub's tokenizer.json.
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
PHI3_NO_RSTRIP = ("<|endoftext|>",)

GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PHI4_MINI_SPECIAL = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>")
PHI4_MINI_VOCAB = 900  # trained pieces + specials; the model's vocab_size is padded to a multiple of 64
PHI4_MINI_TEMPLATE = (  # microsoft/Phi-4-mini-instruct's
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def _pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def randomise_norms(model) -> None:
    """Every norm weight to U(0.5, 1.5), deterministically (after the model's own init)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def _save_model(folder: Path, config, eos_ids: list[int], bos_id: int) -> None:
    import torch
    from transformers import GenerationConfig, Phi3ForCausalLM

    torch.manual_seed(SEED)
    model = Phi3ForCausalLM(config)
    randomise_norms(model)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids)
    model.save_pretrained(folder)


# -- Phi-3-mini-like -----------------------------------------------------------------------------


def _build_tiny_phi3(folder: Path) -> None:
    from tokenizers import AddedToken
    from transformers import Phi3Config, PreTrainedTokenizerFast

    from edgequant.llamacpp_tools import vendored

    model_bytes = train_sentencepiece()
    backend = spm_legacy_tokenizer(model_bytes)
    n_sp = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t not in PHI3_NO_RSTRIP)
                                for t in PHI3_ADDED])
    backend.post_processor = None  # Phi-3 (since mid-2024) and Phi-3.5 add no BOS
    template = Path(vendored("models/templates/microsoft-Phi-3.5-mini-instruct.jinja")).read_text(encoding="utf-8")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                     unk_token="<unk>", pad_token="<|endoftext|>", chat_template=template,
                                     clean_up_tokenization_spaces=False, model_max_length=4096)
    hf_tok.save_pretrained(folder, save_jinja_files=False)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    _patch_json(folder / "tokenizer_config.json", update={"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                                                           "add_eos_token": False, "legacy": False}, remove=("backend",))
    ids = {t: n_sp + i for i, t in enumerate(PHI3_ADDED)}
    dims = {**TINY_DIMS, "num_key_value_heads": 4}  # Phi-3-mini: as many KV heads as heads
    config = Phi3Config(vocab_size=_pad64(n_sp + len(PHI3_ADDED)), **dims, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, sliding_window=2047, rope_theta=10000.0,
                        bos_token_id=1, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    _save_model(folder, config, [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]], bos_id=1)
    _write_readme(folder, "tiny-phi3 (edgequant test fixture)", "edgequant-fixtures/tiny-phi-3-mini",
                  "Random weights, Phi-3-mini layout, SentencePiece BPE trained on Python's docs + Phi-3's added tokens.")


def tiny_phi3() -> Path:
    """A Phi-3-mini-like Phi3ForCausalLM folder (2 layers, hidden 128, 4 heads, random norms, bf16)."""
    return _build_cached("tiny-phi3", PHI3_VERSION, _build_tiny_phi3)


# -- Phi-4-mini-like -----------------------------------------------------------------------------


def build_gpt4o_tokenizer():
    """A byte-level BPE in Phi-4-mini's (o200k) layout: Split(GPT-4o regex) + ByteLevel(use_regex=False)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4O_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=PHI4_MINI_VOCAB - len(PHI4_MINI_SPECIAL), min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_documents(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI4_MINI_SPECIAL])
    return tok


def longrope_factors(n: int) -> tuple[list[float], list[float]]:
    """Random LongRoPE factors: short in [1, 1.5), long growing from 1 to about 8 (as the real ones do)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 2)
    short = (1.0 + 0.5 * torch.rand(n, generator=g)).tolist()
    long = (torch.linspace(1.0, 8.0, n) * (0.9 + 0.2 * torch.rand(n, generator=g))).tolist()
    return short, long


def _build_tiny_phi4_mini(folder: Path) -> None:
    from transformers import Phi3Config, PreTrainedTokenizerFast

    backend = build_gpt4o_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                     chat_template=PHI4_MINI_TEMPLATE, model_max_length=131072)
    hf_tok.save_pretrained(folder, save_jinja_files=False)
    _patch_json(folder / "tokenizer_config.json", update={"add_bos_token": False, "add_eos_token": False})
    end_id, eot_id = backend.token_to_id("<|endoftext|>"), backend.token_to_id("<|end|>")
    head_dim = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]
    short, long = longrope_factors(int(head_dim * 0.75) // 2)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "short_factor": short,
            "long_factor": long, "original_max_position_embeddings": PHI4_MINI_ORIG_CTX}
    dims = {**TINY_DIMS, "tie_word_embeddings": True}
    config = Phi3Config(vocab_size=_pad64(backend.get_vocab_size(with_added_tokens=True)), **dims,
                        max_position_embeddings=131072, original_max_position_embeddings=PHI4_MINI_ORIG_CTX,
                        rope_parameters=rope, partial_rotary_factor=0.75, sliding_window=None,
                        bos_token_id=end_id, eos_token_id=end_id, pad_token_id=end_id)
    _save_model(folder, config, [eot_id, end_id], bos_id=end_id)
    _write_readme(folder, "tiny-phi4-mini (edgequant test fixture)", "edgequant-fixtures/tiny-phi-4-mini",
                  "Random weights, Phi-4-mini layout (partial rotary, tied, LongRoPE), GPT-4o-style BPE on Python's docs.")


def tiny_phi4_mini() -> Path:
    """A Phi-4-mini-like Phi3ForCausalLM folder (2 layers, hidden 128, GQA 4/2, tied, LongRoPE, bf16)."""
    return _build_cached("tiny-phi4-mini", PHI4_MINI_VERSION, _build_tiny_phi4_mini)
