"""SentencePiece vocabularies from tokenizer.json alone, as transformers 5 saves Llama 2 / Mistral / Gemma / Phi-3
tokenizers (no tokenizer.model): the same GGUF vocabulary as from tokenizer.model, llama.cpp's tokenization equal
to the HF tokenizer's on llama.cpp's own test strings, and llama.cpp's converter failing on the same folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

import fixtures
import fixtures_gemma
import fixtures_phi
import fixtures_tokjson
from edgequant.checkpoint import open_checkpoint
from edgequant.export.convert import convert
from edgequant.export.vocab import build_vocab
from edgequant.llamacpp import open_llama
from edgequant.llamacpp_tools import vendored
from llama_helpers import hf_tokenizer

SPM_FIXTURES = {"mistral": fixtures.tiny_mistral, "gemma3": fixtures_gemma.tiny_gemma3, "phi3": fixtures_phi.tiny_phi3}
CHAT_STRINGS = {
    "mistral": ["[INST] What is 2+2? [/INST] 4</s>[INST] And 3+3? [/INST]"],
    "gemma3": ["<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"],
    "phi3": ["<|user|>\nhi<|end|>\n<|assistant|>\n", "<|system|> sys <|end|><|endoftext|> after"],
}
VOCAB_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
              "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.eom_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix")


def vocab_test_strings(name: str) -> tuple[list[str], list[list[int]]]:
    """llama.cpp's tokenizer test strings for ``models/ggml-vocab-<name>.gguf`` and its expected ids."""
    texts = Path(vendored(f"models/ggml-vocab-{name}.gguf.inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":
        texts.pop()
    outs = Path(vendored(f"models/ggml-vocab-{name}.gguf.out")).read_text(encoding="utf-8").split("\n")
    assert len(texts) > 40 and len(outs) >= len(texts)
    return texts, [[int(x) for x in line.split()] for line in outs[: len(texts)]]


def _vocab_fields(path: Path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in VOCAB_KEYS if k in fields}


def _llama_ids(path: Path, texts: list[str], *, special: bool) -> list[list[int]]:
    llm = open_llama(path, vocab_only=True)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=special) for t in texts]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """name -> (folder with tokenizer.model, its transformers-5 copy, GGUF of each), converted once."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            src = SPM_FIXTURES[name]()
            tj = fixtures_tokjson.tokjson_variant(src)
            out = tmp_path_factory.mktemp(f"tokjson-{name}")
            a = convert(src, out / "model.gguf", outtype="f16")
            b = convert(tj, out / "tokjson.gguf", outtype="f16")
            done[name] = src, tj, Path(a.files[0]), Path(b.files[0]), b
        return done[name]

    return get


@pytest.mark.parametrize("name", list(SPM_FIXTURES))
def test_tokenizer_json_only_gives_the_tokenizer_model_vocabulary(name, spm_pair):
    src, tj, from_model, from_json, result = spm_pair(name)
    assert not (tj / "tokenizer.model").exists() and (src / "tokenizer.model").exists()
    assert result.tokenizer == "llama" and any("built from tokenizer.json" in n for n in result.notes)
    a, b = _vocab_fields(from_model), _vocab_fields(from_json)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


@pytest.mark.parametrize("name", list(SPM_FIXTURES))
def test_tokenizer_json_only_tokenizes_like_hf(name, spm_pair):
    """llama.cpp on the tokenizer.json-only GGUF against the HF tokenizer of that folder, on llama.cpp's test strings."""
    _, tj, _, from_json, _ = spm_pair(name)
    tok = hf_tokenizer(str(tj))
    texts = vocab_test_strings("llama-spm")[0] + vocab_test_strings("phi-3")[0]
    assert _llama_ids(from_json, texts, special=False) == [tok.encode(t, add_special_tokens=False) for t in texts]
    chats = CHAT_STRINGS[name]
    assert _llama_ids(from_json, chats, special=True) == [tok.encode(t, add_special_tokens=False) for t in chats]


def _vocab_only_gguf(vocab, like: Path, out: Path) -> Path:
    """A vocab-only GGUF: ``like``'s hyper-parameters (llama.cpp reads them even for a vocabulary) and ``vocab``."""
    fields = gguf.GGUFReader(like).fields
    w = gguf.GGUFWriter(str(out), fields["general.architecture"].contents())
    adders = {gguf.GGUFValueType.UINT32: w.add_uint32, gguf.GGUFValueType.FLOAT32: w.add_float32,
              gguf.GGUFValueType.STRING: w.add_string}
    for key, f in fields.items():
        if not key.startswith(("GGUF.", "tokenizer.", "general.architecture")):
            adders[f.types[0]](key, f.contents())
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_real_sentencepiece_tokenizer_from_tokenizer_json(name, tmp_path):
    """Llama 2's and Phi-3's real tokenizers as transformers 5 saves them (from llama.cpp's vocab files): the
    vocabulary llama.cpp's converter built from their tokenizer.model, and llama.cpp's expected ids on all
    its test strings.

    Legitimate differences: scores are ranks of tokenizer.json's merges, not the tokenizer.model's values
    (Llama 2 gives its 16 whitespace-run pieces -1e9, tied; the merges order them), which llama.cpp only
    compares with each other; Phi-3's ``<unk>`` is UNKNOWN (its hub tokenizer_config.json marked it
    special, CONTROL in llama.cpp's file), and its 53 ``[PADn]`` rows, which transformers' GGUF loader
    turned into pieces, are NORMAL rather than llama.cpp's UNKNOWN."""
    ref = Path(vendored(f"models/ggml-vocab-{name}.gguf"))
    vocab = build_vocab(open_checkpoint(fixtures_tokjson.real_spm_tokenizer(name)))
    fields = _vocab_fields(ref)
    assert vocab.tokens == fields["tokenizer.ggml.tokens"]
    differ = [i for i, (a, b) in enumerate(zip(vocab.types, fields["tokenizer.ggml.token_type"])) if a != b]
    assert all(i == 0 or vocab.tokens[i].startswith("[PAD") for i in differ) and len(differ) <= 54, differ[:5]
    assert vocab.add_bos == fields["tokenizer.ggml.add_bos_token"] and vocab.add_space_prefix
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id")):
        assert vocab.special_ids[role] == fields[f"tokenizer.ggml.{key}"]
    texts, expected = vocab_test_strings(name)
    ours = _vocab_only_gguf(vocab, ref, tmp_path / "vocab.gguf")
    assert _llama_ids(ours, texts, special=False) == expected == _llama_ids(ref, texts, special=False)


def _llamacpp_converter(into: Path) -> Path | None:
    """The vendored llama.cpp's convert_hf_to_gguf.py with conversion/ and gguf-py/ beside it, or None."""
    import tarfile

    from edgequant.llamacpp_tools import sdist

    src = sdist()
    if src.is_dir():
        found = list(src.glob("**/vendor/llama.cpp/convert_hf_to_gguf.py"))
        return found[0].parent if found else None
    parts = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.split("/", 1)[-1].removeprefix("vendor/llama.cpp/").startswith(parts)
                   and "/vendor/llama.cpp/" in f"/{m.name.split('/', 1)[-1]}"]
        for m in members:
            m.name = m.name.split("/", 1)[-1].removeprefix("vendor/llama.cpp/")
        tar.extractall(into, members=members, filter="data")
    return into if (into / "convert_hf_to_gguf.py").is_file() else None


def test_llamacpp_converter_fails_on_tokenizer_json_only_folder(tmp_path):
    """llama.cpp's own converter on the transformers-5 Phi-3 folder: ``Missing tokenizer.model`` (#19152)."""
    tree = _llamacpp_converter(tmp_path / "llama.cpp")
    if tree is None:
        pytest.skip("the llama-cpp-python sdist has no convert_hf_to_gguf.py here")
    folder = fixtures_tokjson.tokjson_variant(fixtures_phi.tiny_phi3())
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    run = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                          str(tmp_path / "x.gguf"), "--vocab-only"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "Missing" in run.stderr and "tokenizer.model" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "x.gguf").exists()
    assert convert(folder, tmp_path / "ours.gguf", outtype="f16").tokenizer == "llama"
