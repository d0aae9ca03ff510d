"""Tiny random models of architectures edgequant does not convert itself, for tests/test_delegate.py
(converted through llama.cpp's own converter).

Each has a real tokenizer: llama.cpp's vendored vocab-only GGUF (``models/ggml-vocab-<name>.gguf``) turned
into a Hugging Face tokenizer by transformers' GGUF loader, so llama.cpp's converter recognises its
pre-tokenizer by the hash of its tokens, as for the released model. Every norm weight and bias is re-drawn
after init (ones and zeros would hide a dropped norm or bias); weights are stored in bfloat16.

- ``tiny_gpt2``: GPT2LMHeadModel (learned positions, Conv1D weights, LayerNorm and biases everywhere,
  tied output), GPT-2's tokenizer.
- ``tiny_starcoder2``: Starcoder2ForCausalLM (GQA, RoPE, biases, LayerNorm, a GELU MLP), StarCoder's tokenizer,
  and ``generation_config.json`` stopping at ``EXTRA_STOP`` too.
- ``tiny_stablelm``: StableLmForCausalLM (partial rotary, LayerNorm with biases, q/k/v biases), GPT-2's
  tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures import SEED, _build_cached, _patch_json, _to_bf16, _write_readme
from fixtures_relatives import randomise_norms_and_biases

DELEGATE_VERSION = "4"
DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, ff=128)
EXTRA_STOP = "<issue_closed>"  # StarCoder's vocabulary has it; llama.cpp ends generation on it only if told
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _tokenizer(folder: Path, vocab: str, *, bos: str | None, eos: str) -> dict:
    """llama.cpp's ``ggml-vocab-<vocab>.gguf`` as an HF tokenizer in ``folder``; its ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from edgequant.llamacpp_tools import vendored

    path = Path(vendored(f"models/ggml-vocab-{vocab}.gguf"))
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = PreTrainedTokenizerFast(tokenizer_object=loaded.backend_tokenizer, bos_token=bos, eos_token=eos,
                                  chat_template=CHATML, clean_up_tokenization_spaces=False)
    tok.save_pretrained(folder)
    ids = {"vocab_size": len(tok), "eos_token_id": tok.convert_tokens_to_ids(eos)}
    ids["bos_token_id"] = tok.convert_tokens_to_ids(bos) if bos else ids["eos_token_id"]
    return ids


def _save(folder: Path, model, title: str, eos_id: int | list[int]) -> None:
    from transformers import GenerationConfig

    randomise_norms_and_biases(model)
    model = _to_bf16(model)
    first = eos_id[0] if isinstance(eos_id, list) else eos_id
    model.generation_config = GenerationConfig(eos_token_id=eos_id, bos_token_id=first)
    model.save_pretrained(folder)
    _write_readme(folder, f"{title} (edgequant test fixture)", f"edgequant-fixtures/{title}",
                  "Random weights with randomised norms and biases, a real tokenizer. For tests only.")


def _build_gpt2(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = _tokenizer(folder, "gpt-2", bos="<|endoftext|>", eos="<|endoftext|>")
    config = GPT2Config(vocab_size=ids["vocab_size"], n_positions=256, n_embd=DIMS["hidden"], n_layer=DIMS["layers"],
                        n_head=DIMS["heads"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    torch.manual_seed(SEED)
    _save(folder, GPT2LMHeadModel(config), "tiny-gpt2", ids["eos_token_id"])
    _patch_json(folder / "config.json", {"n_ctx": config.n_positions})  # as the hub's GPT-2 configs have it


def _build_starcoder2(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Starcoder2Config, Starcoder2ForCausalLM

    ids = _tokenizer(folder, "starcoder", bos="<|endoftext|>", eos="<|endoftext|>")
    config = Starcoder2Config(vocab_size=ids["vocab_size"], hidden_size=DIMS["hidden"], intermediate_size=DIMS["ff"],
                              num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                              num_key_value_heads=DIMS["kv_heads"], max_position_embeddings=256, use_bias=True,
                              sliding_window=None, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    torch.manual_seed(SEED)
    # a second stop id that llama.cpp does not know by its text: convert must write it as eot/eom
    stops = [ids["eos_token_id"], AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(EXTRA_STOP)]
    _save(folder, Starcoder2ForCausalLM(config), "tiny-starcoder2", stops)


def _build_stablelm(folder: Path) -> None:
    import torch
    from transformers import StableLmConfig, StableLmForCausalLM

    ids = _tokenizer(folder, "gpt-2", bos="<|endoftext|>", eos="<|endoftext|>")
    config = StableLmConfig(vocab_size=ids["vocab_size"], hidden_size=DIMS["hidden"], intermediate_size=DIMS["ff"],
                            num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                            num_key_value_heads=DIMS["kv_heads"], max_position_embeddings=256, partial_rotary_factor=0.5,
                            use_qkv_bias=True, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    torch.manual_seed(SEED)
    _save(folder, StableLmForCausalLM(config), "tiny-stablelm", ids["eos_token_id"])


def tiny_gpt2() -> Path:
    return _build_cached("tiny-gpt2", DELEGATE_VERSION, _build_gpt2)


def tiny_starcoder2() -> Path:
    return _build_cached("tiny-starcoder2", DELEGATE_VERSION, _build_starcoder2)


def tiny_stablelm() -> Path:
    return _build_cached("tiny-stablelm", DELEGATE_VERSION, _build_stablelm)


def pre_tokenizer_hash(folder: Path) -> str:
    """The hash llama.cpp's converter identifies a BPE pre-tokenizer by (for diagnosing a fixture)."""
    import ast
    import hashlib

    from transformers import AutoTokenizer

    from edgequant.llamacpp_tools import vendored

    base = Path(vendored("conversion/base.py")).read_text(encoding="utf-8")
    chktxt = base.split("chktxt = ", 1)[1].split("\n", 1)[0]
    text = ast.literal_eval(chktxt)  # a string literal in llama.cpp's source
    tok = AutoTokenizer.from_pretrained(str(folder))
    return hashlib.sha256(str(tok.encode(text)).encode()).hexdigest()


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
