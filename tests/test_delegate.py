"""Architectures edgequant does not convert itself, through llama.cpp's own converter (``--converter
llama.cpp``), checked by the same harness as native conversions: llama.cpp running the file against
transformers in float32, the HF tokenizer and ``apply_chat_template``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from typer.testing import CliRunner

import fixtures_delegate
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.llamacpp import open_llama
from llama_helpers import hf_logits, hf_tokenizer, llama, llama_logits

DELEGATED = {"gpt2": fixtures_delegate.tiny_gpt2, "starcoder2": fixtures_delegate.tiny_starcoder2,
             "stablelm": fixtures_delegate.tiny_stablelm}
PROBE = "The quick brown fox jumps over 1234 lazy dogs.\nIt was the best of times, it was the worst of times."
CONVERSATION = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And Italy?"}]
# Measured max |llama.cpp - transformers| / max |logit| of the F32 files (docs/convert.md lists them).
PARITY = {"gpt2": 1e-4, "starcoder2": 1e-4, "stablelm": 1e-6}  # GELU archs: llama.cpp's F16-table GELU


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def delegated(tmp_path_factory):
    """Each delegated fixture converted once to F32 by llama.cpp's converter (one subprocess each; GPT-2 with
    the default --converter auto); StableLM
    through the CLI with --json and --chat-template (the template the file must then carry)."""
    from edgequant.cli import app

    out = {}
    for name, build in DELEGATED.items():
        src, folder = build(), tmp_path_factory.mktemp(name)
        if name != "stablelm":
            how = {} if name == "gpt2" else {"converter": "llama.cpp"}  # gpt2: the default, auto, picks llama.cpp
            out[name] = (src, convert(src, folder, outtype="f32", **how).to_dict(), None)
            continue
        template = folder.parent / "template.jinja"
        template.write_text(TEMPLATE)
        run = CliRunner().invoke(app, ["convert", str(src), "-o", str(folder), "--outtype", "f32", "--converter",
                                       "llama.cpp", "--chat-template", str(template), "--json"])
        assert run.exit_code == 0, run.output
        out[name] = (src, json.loads(run.stdout), TEMPLATE)
    return out


@pytest.mark.parametrize("name", sorted(DELEGATED))
def test_f32_logits_equal_transformers(name, delegated):
    src, result, _ = delegated[name]
    ids = hf_tokenizer(str(src)).encode(PROBE)
    ref = hf_logits(src, ids)
    got = llama_logits(result["files"][0], ids)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{name}: parity {rel:.2e}")
    assert rel <= PARITY[name]
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", sorted(DELEGATED))
def test_tokens_template_and_result(name, delegated, text_samples):
    src, result, template = delegated[name]
    path = Path(result["files"][0])
    tok = hf_tokenizer(str(src))
    vocab = open_llama(path, vocab_only=True)  # one load for all samples
    try:
        for text in text_samples:
            assert vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tok.encode(text), repr(text)
    finally:
        vocab.close()
    use = {"chat_template": template} if template else {}
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True, **use)
    with llama(path, n_ctx=256) as llm:
        bos, eos = (llm._model.token_get_text(t) for t in (llm.token_bos(), llm.token_eos()))
        assert llm.metadata["tokenizer.chat_template"] == (template or tok.chat_template)
        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
        prompt = fmt(messages=CONVERSATION)
        assert prompt.prompt == expected
        ids = llm.tokenize(prompt.prompt.encode(), add_bos=not prompt.added_special, special=True)
        assert ids.count(llm.token_bos()) <= 1
        assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True,
                                              return_dict=False, **use)
    assert result["converter"] == "llama.cpp"
    assert {c["name"]: c["status"] for c in result["checks"]} == {
        "token_ids": "passed", "chat_template": "passed", "end_of_generation": "passed", "logits": "passed"}
    md = inspect_gguf(path).metadata
    assert md["edgequant.source.fingerprint"] == result["fingerprint"]
    assert md["edgequant.source.architecture"] == fixtures_delegate.config(src)["architectures"][0]
    assert md["edgequant.converter"].startswith("llama.cpp convert_hf_to_gguf.py")
    assert path.name.endswith("-F32.gguf") and [p.name for p in path.parent.iterdir()] == [path.name]


def test_generation_config_stop_ids_end_generation(delegated):
    """StarCoder2's fixture also stops at a token llama.cpp does not know as a stop: a metadata edit makes it one."""
    import llama_cpp

    src, result, _ = delegated["starcoder2"]
    stops = json.loads((src / "generation_config.json").read_text())["eos_token_id"]
    assert len(stops) == 2
    llm = open_llama(result["files"][0], vocab_only=True)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, t) for t in stops)
    finally:
        llm.close()
    assert any(fixtures_delegate.EXTRA_STOP in n and "eot_token_id" in n for n in result["notes"]), result["notes"]


# -- bad input: one line, nothing left behind ---------------------------------------------------------


def test_context_past_learned_positions_is_refused(delegated):
    """GPT-2's fixture has 256 learned positions: llama.cpp would abort (GGML_ASSERT) at token 257 of a
    512-token bench or imatrix chunk; the open refuses it in one line naming --ctx."""
    from edgequant.errors import EdgequantError
    from edgequant.llamacpp import open_llama

    path = delegated["gpt2"][1]["files"][0]
    with pytest.raises(EdgequantError, match="256 learned positions.*--ctx 256 or less") as e:
        open_llama(path, n_ctx=512)
    assert "\n" not in str(e.value)
    llm = open_llama(path, n_ctx=256)
    llm.close()


def _one_line_and_empty(excinfo, out: Path, expect: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and expect in message, message
    assert not (list(out.iterdir()) if out.exists() else []), list(out.iterdir())


def test_unknown_pre_tokenizer_names_the_option(tiny_llama_dir, tmp_path):
    """The tiny Llama's BPE was trained offline: llama.cpp's converter does not know its hash."""
    out = tmp_path / "out"
    with pytest.raises(EdgequantError) as e:
        convert(tiny_llama_dir, out, outtype="f32", converter="llama.cpp")
    _one_line_and_empty(e, out, "--pre-tokenizer llama-bpe")


def test_converter_error_is_one_line(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixtures_delegate.tiny_gpt2(), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(EdgequantError) as e:
        convert(src, out, converter="llama.cpp")
    _one_line_and_empty(e, out, "does not convert NoSuchModelForCausalLM either")


def test_sdist_not_obtainable_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEQUANT_LLAMA_CPP_SDIST", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without network
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    out = tmp_path / "out"
    with pytest.raises(EdgequantError) as e:
        convert(fixtures_delegate.tiny_gpt2(), out, converter="llama.cpp")
    _one_line_and_empty(e, out, "EDGEQUANT_LLAMA_CPP_SDIST")


def test_missing_dependency_names_the_pip_command(tmp_path, monkeypatch):
    """A converter whose environment lacks a module (here torch, hidden from its subprocess) says what to install."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    monkeypatch.setenv("PYTHONPATH", f"{hide}:{__import__('os').environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out"
    with pytest.raises(EdgequantError) as e:
        convert(fixtures_delegate.tiny_gpt2(), out, converter="llama.cpp")
    _one_line_and_empty(e, out, "pip install torch")


# -- a native architecture both ways ---------------------------------------------------------------------


def test_native_architecture_both_ways_same_tensors(tiny_llama_dir, tmp_path):
    native = convert(tiny_llama_dir, tmp_path / "native", outtype="f16")
    theirs = convert(tiny_llama_dir, tmp_path / "llama.cpp", outtype="f16", converter="llama.cpp",
                     pre_tokenizer="llama-bpe")
    assert (native.converter, theirs.converter) == ("native", "llama.cpp")
    a, b = gguf.GGUFReader(native.files[0]), gguf.GGUFReader(theirs.files[0])
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for n, t in ta.items():
        assert (t.tensor_type, list(t.shape)) == (tb[n].tensor_type, list(tb[n].shape)), n
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[n].data)), n
    assert Path(native.files[0]).name == Path(theirs.files[0]).name
