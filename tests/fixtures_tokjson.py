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


# -- a model that ends its turn after a few tokens --------------------------------------------------

EOT_VERSION = "1"
EOT_MESSAGES = [{"role": "user", "content": "Name a colour, then stop."}]
EOT_STEP = 3  # the end-of-turn token becomes the greedy choice at this step (the 4th generated token)
EOT_MARGIN = 1e-3  # the model's own choices before it win by at least this much (logits; F32 runtimes agree to ~1e-5)
EOT_WIN = 1.0  # and the end-of-turn token by this much


def _greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float], list]:
    """Greedy tokens, top-1 minus top-2 margins and final hidden states, each step recomputed from scratch."""
    import torch

    ids, margins, hidden = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([ids]), output_hidden_states=True)
            top = torch.topk(out.logits[0, -1].float(), 2)
            margins.append(float(top.values[0] - top.values[1]))
            hidden.append(out.hidden_states[-1][0, -1].float())
            ids.append(int(top.indices[0]))
    return ids[len(prompt):], margins, hidden


def _boost(model, prompt: list[int], eot: int):
    """A new output row for ``eot`` that makes it the greedy choice at step EOT_STEP and nowhere before.

    The row moves along the part of the step's last hidden state orthogonal to the earlier steps' ones,
    by just enough for ``eot`` to win by EOT_WIN: with an untied output the earlier logits do not change
    (the model's own random prefix stays), with tied embeddings the prompt's ``eot`` embedding moves
    too, so it is repeated until it holds. The row is rounded to bf16, as the folder stores it."""
    import torch

    row = model.get_output_embeddings().weight
    for _ in range(20):
        tokens, margins, hidden = _greedy(model, prompt, EOT_STEP + 1)
        if eot in tokens[:EOT_STEP] or min(margins[:EOT_STEP]) < EOT_MARGIN:
            break
        if tokens[EOT_STEP] == eot and margins[EOT_STEP] >= EOT_WIN / 2:
            return row.data[eot].to(torch.bfloat16)
        earlier = torch.stack(hidden[:EOT_STEP], dim=1)
        h = hidden[EOT_STEP]
        q, _ = torch.linalg.qr(earlier)
        d = h - q @ (q.T @ h)
        with torch.no_grad():
            logits = row.data @ h
            rival = torch.cat([logits[:eot], logits[eot + 1:]]).max()
            beta = (rival + EOT_WIN - logits[eot]) / (d @ h)
            row.data[eot] = (row.data[eot] + beta * d).to(torch.bfloat16).float()
    raise RuntimeError(f"could not make token {eot} the greedy choice at step {EOT_STEP} (margins {margins})")


def _build_eot(src: Path, eot_token: str, folder: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(EOT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    eot = tok.convert_tokens_to_ids(eot_token)
    new = _boost(model, prompt, eot)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            _link_or_copy(f, folder / f.name)
    (weights,) = sorted(src.glob("*.safetensors"))  # the tiny fixtures are single-file
    with safe_open(str(weights), "pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        meta = sf.metadata()
    name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    tensors[name][eot] = new.to(tensors[name].dtype)
    save_file(tensors, str(folder / weights.name), metadata=meta)


def eot_variant(src: Path, eot_token: str) -> Path:
    """``src`` whose greedy answer to EOT_MESSAGES ends with ``eot_token`` after a few tokens (see ``_boost``)."""
    return _build_cached(f"eot-{src.name}", EOT_VERSION, lambda folder: _build_eot(src, eot_token, folder))
