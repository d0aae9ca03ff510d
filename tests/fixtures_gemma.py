"""Tiny random Gemma 2 / Gemma 3 checkpoints for the Gemma converter tests, built offline and cached.

Tokenizer: a SentencePiece BPE trained here with Gemma's settings (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3, then ``<mask>``, ``<start_of_turn>``, ``<end_of_turn>``; no dummy prefix, byte fallback,
split digits), loaded and saved by transformers 5's ``GemmaTokenizer`` (tokenizer.json, the turn tokens
special) with ``tokenizer.model`` beside it as on the hub. Norms are randomised after init (HF inits
Gemma's to 0, i.e. a scale of 1, which would hide a missing ``1 + w``), and the init range is widened
so that the soft-caps and the window change the logits.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

from fixtures import SEED, _build_cached, _patch_json, _to_bf16, _training_lines

GEMMA_VERSION = "1"
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, query_pre_attn_scalar=64, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  initializer_range=0.1, pad_token_id=0, eos_token_id=1, bos_token_id=2)
WINDOW = 16
ATTN_CAP, FINAL_CAP = 1.0, 2.0  # small enough to change the logits of the tiny Gemma 2
GEMMA3_PAD_ROWS = 24  # config vocab_size exceeds the tokenizer, as Gemma 3's 262208 rows for 262144 tokens

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def train_gemma_sentencepiece(vocab_size: int = 1000) -> bytes:
    """A SentencePiece BPE with Gemma's special ids and normalizer settings; the serialized model."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", *TURN_TOKENS], split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
        character_coverage=0.9995, max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return out.getvalue()


def save_gemma_tokenizer(folder: Path, chat_template: str) -> int:
    """tokenizer.model + tokenizer.json + tokenizer_config.json as transformers 5 saves a Gemma; the token count."""
    from transformers import AutoTokenizer

    seed = folder / ".spm"
    seed.mkdir()
    (seed / "tokenizer.model").write_bytes(train_gemma_sentencepiece())
    (seed / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(seed)
    tok.chat_template = chat_template
    tok.save_pretrained(folder, save_jinja_files=False)
    (folder / "tokenizer.model").write_bytes((seed / "tokenizer.model").read_bytes())
    for p in seed.iterdir():
        p.unlink()
    seed.rmdir()
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for a in tj["added_tokens"]:
        a["special"] = a["special"] or a["content"] in TURN_TOKENS  # special in Google's tokenizer.json
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    _patch_json(folder / "tokenizer_config.json", remove=("vocab_file", "is_local", "local_files_only"))
    return len(tok)


def randomise_norms(model, seed: int = SEED) -> None:
    """Every RMSNorm weight (HF stores w of the scale 1 + w) drawn at random."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _save(model, folder: Path, eot_id: int) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=[1, eot_id], pad_token_id=0)
    _to_bf16(model).save_pretrained(folder)


def _eot(folder: Path) -> int:
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return next(a["id"] for a in tj["added_tokens"] if a["content"] == "<end_of_turn>")


def _build_gemma2(folder: Path) -> None:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edgequant.llamacpp_tools import vendored

    template = vendored("models/templates/google-gemma-2-2b-it.jinja").read_text(encoding="utf-8")
    n_tok = save_gemma_tokenizer(folder, template)
    config = Gemma2Config(vocab_size=n_tok, num_hidden_layers=2, sliding_window=WINDOW, **GEMMA_DIMS,
                          attn_logit_softcapping=ATTN_CAP, final_logit_softcapping=FINAL_CAP, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = Gemma2ForCausalLM(config)
    randomise_norms(model)
    _save(model, folder, _eot(folder))


def gemma3_text_config(n_tok: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=n_tok + GEMMA3_PAD_ROWS, num_hidden_layers=3, sliding_window=WINDOW, **GEMMA_DIMS,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def _build_gemma3(folder: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM

    n_tok = save_gemma_tokenizer(folder, GEMMA3_CHAT_TEMPLATE)
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(gemma3_text_config(n_tok))
    randomise_norms(model)
    _save(model, folder, _eot(folder))


def _build_gemma3_vlm(folder: Path) -> None:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    n_tok = save_gemma_tokenizer(folder, GEMMA3_CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=gemma3_text_config(n_tok).to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=n_tok - 1, boi_token_index=n_tok - 2,
                          eoi_token_index=n_tok - 3)
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config)
    randomise_norms(model)
    _save(model, folder, _eot(folder))


def tiny_gemma2() -> Path:
    """Gemma2ForCausalLM: 2 layers (sliding, full), window 16, soft-caps 1.0 / 2.0, tied, bf16."""
    return _build_cached("tiny-gemma2", GEMMA_VERSION, _build_gemma2)


def tiny_gemma3() -> Path:
    """Gemma3ForCausalLM: 3 layers (sliding, full, sliding), window 16, linear x4 global RoPE, padded vocab."""
    return _build_cached("tiny-gemma3", GEMMA_VERSION, _build_gemma3)


def tiny_gemma3_vlm() -> Path:
    """Gemma3ForConditionalGeneration: the tiny Gemma 3 text model plus a one-layer SigLIP tower."""
    return _build_cached("tiny-gemma3-vlm", GEMMA_VERSION, _build_gemma3_vlm)
