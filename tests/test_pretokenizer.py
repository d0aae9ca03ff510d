"""Every pre-tokenizer we name is proven by llama.cpp tokenizing exactly like the HF tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
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
    "dbrx": {"type": "Sequence", "pretokenizers": [_split(pretokenizer.LLAMA3_REGEX), BYTELEVEL_NOREGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(pretokenizer.QWEN2_REGEX), BYTELEVEL_NOREGEX]},
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_identify_declared_structure(name):
    model = {"ignore_merges": name != "dbrx"}
    assert pretokenizer.identify({"pre_tokenizer": DECLARED[name], "decoder": {"type": "ByteLevel"}, "model": model}, {}) == name


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
    tj["model"]["ignore_merges"] = name != "dbrx"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    result = convert(src, tmp_path / "out", outtype="q8_0")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    expected = "starcoder" if name == "smollm" and tok_cfg.get("clean_up_tokenization_spaces") else name
    assert result.pre_tokenizer == expected
    tok = AutoTokenizer.from_pretrained(str(src))
    extra = ["x = 1234567 + 89", "I'VE  been 'told' 3.14159", "  leading\n\n\ttabs 2024-11-21"]
    for text in [*text_samples, *extra]:
        assert llama_tokenize(result.files[0], text) == tok.encode(text), (name, text)


# -- dbrx vs llama-bpe: one regex, two ignore_merges settings (Phi-4's cl100k tokenizer leaves it false) --


def _llama_bpe_vocabs(folder) -> None:
    """The real Llama 3 vocabulary (llama.cpp's models/ggml-vocab-llama-bpe.gguf) as a tokenizer.json, and
    a copy of that vocab-only GGUF with ``tokenizer.ggml.pre`` = dbrx (gguf-py's own metadata copier)."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    from transformers import AutoTokenizer

    from edgequant.llamacpp_tools import vendored

    path = Path(vendored("models/ggml-vocab-llama-bpe.gguf"))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    (folder / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(folder / "dbrx.gguf", arch=reader.fields["general.architecture"].contents())
    copy_with_new_metadata(reader, writer, {"tokenizer.ggml.pre": MetadataDetails(gguf.GGUFValueType.STRING, "dbrx")}, [])


def test_dbrx_is_llama_bpe_without_ignore_merges_on_llama_cpp_test_strings():
    """Each name tokenizes llama.cpp's own Llama 3 test strings like the HF tokenizer with its setting."""
    from tokenizers import Tokenizer

    from edgequant.llamacpp import open_llama
    from edgequant.llamacpp_tools import vendored
    from fixtures import _build_cached

    cached = _build_cached("llama-bpe-vocabs", "1", _llama_bpe_vocabs)
    tj = json.loads((cached / "tokenizer.json").read_text(encoding="utf-8"))
    files = {"llama-bpe": Path(vendored("models/ggml-vocab-llama-bpe.gguf")), "dbrx": cached / "dbrx.gguf"}
    texts = Path(vendored("models/ggml-vocab-llama-bpe.gguf.inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outs = Path(vendored("models/ggml-vocab-llama-bpe.gguf.out")).read_text(encoding="utf-8").split("\n")
    hf = {}
    for name, ignore in (("llama-bpe", True), ("dbrx", False)):
        tj["model"]["ignore_merges"] = ignore
        assert pretokenizer.identify(tj, {}) == name
        hf[name] = Tokenizer.from_str(json.dumps(tj))
    differ = 0
    for name, path in files.items():
        llm = open_llama(path, vocab_only=True)
        try:
            for text, out in zip(texts, outs):
                want = hf[name].encode(text, add_special_tokens=False).ids
                assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want, (name, text)
                if name == "llama-bpe":
                    assert want == [int(x) for x in out.split()], text  # the ids llama.cpp's authors recorded
                    differ += want != hf["dbrx"].encode(text, add_special_tokens=False).ids
        finally:
            llm.close()
    assert differ >= 1  # the strings tell the two names apart


def test_deepseek_r1_distill_is_named_as_llama_cpp_names_it():
    tj = {"pre_tokenizer": DECLARED["qwen2"], "decoder": {"type": "ByteLevel"}, "normalizer": {"type": "NFC"},
          "added_tokens": [{"id": 151646, "content": pretokenizer.DEEPSEEK_BOS}]}
    assert pretokenizer.identify(tj, {}) == "deepseek-r1-qwen"
    assert pretokenizer.identify({**tj, "added_tokens": []}, {}) == "qwen2"
