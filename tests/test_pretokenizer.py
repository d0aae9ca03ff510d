"""Every pre-tokenizer we name is proven by llama.cpp tokenizing exactly like the HF tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from edgequant.errors import EdgequantError
from edgequant.export import pretokenizer
from edgequant.export.convert import convert
from llama_helpers import llama_tokenize

BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTELEVEL_NOREGEX = {**BYTELEVEL, "use_regex": False}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


DECLARED = {
    "gpt-2": BYTELEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(pretokenizer.LLAMA3_REGEX), BYTELEVEL_NOREGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(pretokenizer.QWEN2_REGEX), BYTELEVEL_NOREGEX]},
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_identify_declared_structure(name):
    assert pretokenizer.identify({"pre_tokenizer": DECLARED[name], "decoder": {"type": "ByteLevel"}}, {}) == name


def test_clean_spaces_picks_starcoder():
    tj = {"pre_tokenizer": DECLARED["smollm"], "decoder": {"type": "ByteLevel"}}
    assert pretokenizer.identify(tj, {"clean_up_tokenization_spaces": True}) == "starcoder"


@pytest.mark.parametrize(
    "pre",
    [
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"},
        {**BYTELEVEL, "add_prefix_space": True},
        {"type": "Sequence", "pretokenizers": [_split(r"\p{L}+|\s+"), BYTELEVEL_NOREGEX]},
        {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, BYTELEVEL]},
    ],
)
def test_unknown_structures_are_refused(pre):
    with pytest.raises(EdgequantError, match="--pre-tokenizer"):
        pretokenizer.identify({"pre_tokenizer": pre, "decoder": {"type": "ByteLevel"}}, {})


def test_normalizer_that_llamacpp_ignores_is_refused():
    tj = {"pre_tokenizer": DECLARED["gpt-2"], "decoder": {"type": "ByteLevel"}, "normalizer": {"type": "Lowercase"}}
    with pytest.raises(EdgequantError, match="normalizer"):
        pretokenizer.identify(tj, {})


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_llamacpp_agrees_with_hf_for_each_name(name, tiny_llama_dir, tmp_path, text_samples):
    """Swap the tiny Llama's declared pre-tokenizer, convert, and tokenize with both runtimes."""
    from transformers import AutoTokenizer

    src = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = DECLARED[name]
    if name == "qwen2":
        tj["normalizer"] = {"type": "NFC"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    result = convert(src, tmp_path / "out", outtype="q8_0")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    expected = "starcoder" if name == "smollm" and tok_cfg.get("clean_up_tokenization_spaces") else name
    assert result.pre_tokenizer == expected
    tok = AutoTokenizer.from_pretrained(str(src))
    extra = ["x = 1234567 + 89", "I'VE  been 'told' 3.14159", "  leading\n\n\ttabs 2024-11-21"]
    for text in [*text_samples, *extra]:
        assert llama_tokenize(result.files[0], text) == tok.encode(text), (name, text)
