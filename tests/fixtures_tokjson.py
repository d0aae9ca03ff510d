"""Folder variants for the tokenizer.json-only and end-of-generation tests, built offline and cached.

- ``tokjson_variant(folder)``: the same model with its tokenizer loaded by ``AutoTokenizer`` and saved
  again by transformers 5, which writes ``tokenizer.json``, ``tokenizer_config.json`` and
  ``chat_template.jinja`` but no ``tokenizer.model`` (weights and configs hard-linked, or copied).
- ``real_spm_tokenizer(name)``: a real SentencePiece tokenizer (Llama 2's, Phi-3's) as transformers 5
  saves it: llama.cpp's own vocab-only ``models/ggml-vocab-<name>.gguf`` (written by llama.cpp's
  converter from the real ``tokenizer.model``) turned into an HF tokenizer by transformers' GGUF loader
  and saved, with a ``config.json`` and a one-tensor ``model.safetensors`` so it opens as a model folder.
- ``eot_variant(folder, eot_id, after)``: a copy whose ``lm_head`` (or tied embedding) makes the end-of-turn
  token the greedy choice once ``after`` tokens have been generated (see ``_boost``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fixtures import _build_cached

TOKJSON_VERSION = "1"
REAL_SPM_VERSION = "1"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
REAL_SPM_ARCH = {"llama-spm": "LlamaForCausalLM", "phi-3": "Phi3ForCausalLM"}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_model_files(src: Path, dst: Path) -> None:
    """Everything but the tokenizer files."""
    for f in src.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES:
            _link_or_copy(f, dst / f.name)


def _build_tokjson(src: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    copy_model_files(src, folder)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(folder))
    assert not (folder / "tokenizer.model").exists()


def tokjson_variant(src: Path) -> Path:
    """``src`` with its tokenizer re-saved by transformers 5 (tokenizer.json only)."""
    return _build_cached(f"tokjson-{src.name}", TOKJSON_VERSION, lambda folder: _build_tokjson(src, folder))


def _build_real_spm(name: str, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from edgequant.llamacpp_tools import vendored

    gguf_path = Path(vendored(f"models/ggml-vocab-{name}.gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"architectures": [REAL_SPM_ARCH[name]], "vocab_size": len(tok)}))
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))


def real_spm_tokenizer(name: str) -> Path:
    """A tokenizer-only folder holding llama.cpp's real ``name`` SentencePiece vocabulary as tokenizer.json."""
    return _build_cached(f"real-spm-{name}", REAL_SPM_VERSION, lambda folder: _build_real_spm(name, folder))
