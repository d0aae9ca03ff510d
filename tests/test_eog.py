"""End of generation: llama.cpp stops a greedy chat answer where transformers' ``generate`` does.

The real SmolLM2-135M-Instruct answers "The colour is: Red<|im_end|>"; each other family's tiny model is
made to end its turn after a few tokens of its own random prefix (fixtures_tokjson.eot_variant); transformers generates with the folder's generation_config.json, llama.cpp
(an F32 GGUF, F32 KV cache) decodes greedily until ``llama_vocab_is_eog``, both from the chat prompt the
GGUF's own template renders. The SentencePiece families go through their tokenizer.json-only
(transformers 5) folders, so these are also end-to-end runs of that vocabulary."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import fixtures
import fixtures_gemma
import fixtures_phi
import fixtures_qwen
import fixtures_tokjson
from edgequant.export.convert import convert
from llama_helpers import hf_greedy, hf_model, hf_tokenizer, llama, llama_greedy

MAX_NEW = 32
FAMILIES = {  # name: (source folder, the end-of-turn token of its chat template)
    "smollm2": (fixtures.smollm2_hf, "<|im_end|>"),  # the real SmolLM2-135M-Instruct: it stops by itself
    "llama3": (fixtures.tiny_llama, "<|eot_id|>"),
    "mistral": (lambda: fixtures_tokjson.tokjson_variant(fixtures.tiny_mistral()), "</s>"),
    "qwen2": (fixtures_qwen.tiny_qwen2, "<|im_end|>"),
    "gemma3": (lambda: fixtures_tokjson.tokjson_variant(fixtures_gemma.tiny_gemma3()), "<end_of_turn>"),
    "phi3": (lambda: fixtures_tokjson.tokjson_variant(fixtures_phi.tiny_phi3()), "<|end|>"),
}


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory):
    """name -> (the HF folder, its F32 (SmolLM2: F16) GGUF, the convert result), built and converted once."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            make, eot = FAMILIES[name]
            folder = make() if name == "smollm2" else fixtures_tokjson.eot_variant(make(), eot)
            outtype = "f16" if name == "smollm2" else "f32"  # a real model's greedy margins are wide; half the write
            res = convert(folder, tmp_path_factory.mktemp(f"eog-{name}") / "model.gguf", outtype=outtype)
            done[name] = folder, Path(res.files[0]), res
        return done[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_stops_at_end_of_turn_like_transformers(name, eot_model):
    folder, path, _ = eot_model(name)
    tok, model = hf_tokenizer(str(folder)), hf_model(str(folder))
    messages = fixtures_tokjson.EOT_MESSAGES
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = hf_greedy(model, prompt, MAX_NEW)
    eot = tok.convert_tokens_to_ids(FAMILIES[name][1])
    assert want[-1] == eot and len(want) == (6 if name == "smollm2" else fixtures_tokjson.EOT_STEP + 1), want
    with llama(path, n_ctx=256) as llm:
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token=bos,
                                  eos_token=llm._model.token_get_text(llm.token_eos()))
        rendered = fmt(messages=messages)
        ids = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        assert ids == prompt
        assert llama_greedy(llm, ids, MAX_NEW) == want


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_generation_config_stop_id_is_end_of_generation(name, eot_model):
    """Phi-3 also stops at ``<|assistant|>``, a token llama.cpp does not know by its text: convert writes it as
    ``tokenizer.ggml.eom_token_id`` and says so."""
    folder, path, res = eot_model(name)
    stops = hf_model(str(folder)).generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    eot = hf_tokenizer(str(folder)).convert_tokens_to_ids(FAMILIES[name][1])
    assert eot in stops
    with llama(path, n_ctx=64) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in stops), stops
        assert llama_cpp.llama_vocab_eot(vocab) == eot
    if name == "phi3":
        assert any("<|assistant|>" in n and "eom_token_id" in n for n in res.notes), res.notes


def test_stop_ids_llamacpp_cannot_hold_are_reported(tmp_path):
    """Four stop ids beyond llama.cpp's known texts: two take the free keys, the rest are named in notes."""
    import json
    import shutil

    from edgequant.checkpoint import open_checkpoint
    from edgequant.export.template import find_templates
    from edgequant.export.vocab import build_vocab

    folder = tmp_path / "phi3"
    shutil.copytree(fixtures_tokjson.tokjson_variant(fixtures_phi.tiny_phi3()), folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    tok = hf_tokenizer(str(folder))
    extra = [tok.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|user|>", "<|system|>")]
    gen["eos_token_id"] = [*gen["eos_token_id"], *extra, 99999]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    ckpt = open_checkpoint(folder)
    vocab = build_vocab(ckpt)
    vocab.resolve_end_of_generation(ckpt, find_templates(ckpt).default)
    assert vocab.special_ids["eot"] == tok.convert_tokens_to_ids("<|end|>")  # the template's end of turn
    assert vocab.special_ids["eom"] == extra[0]
    notes = " ".join(vocab.notes)
    assert "'<|user|>'" in notes and "'<|system|>'" in notes and "llama.cpp will not stop there" in notes
    assert "99999" in notes and "does not have" in notes
