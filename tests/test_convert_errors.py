"""Bad input: one clear line naming the fix, a non-zero exit, and no file left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.errors import EdgequantError
from edgequant.export import plan as plan_mod
from edgequant.export.convert import convert

runner = CliRunner()


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _fails(args: list[str], expect: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = result.stderr.strip()
    assert len(message.splitlines()) <= 3, message  # one logical line (rich may wrap it)
    assert expect in " ".join(message.split()), message
    return message


def _no_outputs(out: Path) -> None:
    left = [p.name for p in out.glob("*")] if out.exists() else []
    assert not left, left


def test_missing_config(tmp_path):
    (tmp_path / "model").mkdir()
    _fails(["convert", str(tmp_path / "model"), "-o", str(tmp_path / "out")], "no config.json")
    _no_outputs(tmp_path / "out")


def test_missing_folder(tmp_path):
    _fails(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], "does not exist")


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    src = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    msg = _fails(["convert", str(src), "-o", str(tmp_path / "out"), "--converter", "native"],
                 "unsupported architecture GPT2LMHeadModel")  # auto would hand it to llama.cpp's converter
    assert "MistralForCausalLM" in msg
    _no_outputs(tmp_path / "out")


def test_truncated_safetensors(tiny_mistral_dir, tmp_path):
    src = _copy(tiny_mistral_dir, tmp_path)
    st = next(src.glob("*.safetensors"))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    _fails(["convert", str(src), "-o", str(tmp_path / "out")], "truncated")
    _no_outputs(tmp_path / "out")


def test_missing_shard(tiny_mixtral_dir, tmp_path):
    src = _copy(tiny_mixtral_dir, tmp_path)
    sorted(src.glob("model-*.safetensors"))[-1].unlink()
    _fails(["convert", str(src), "-o", str(tmp_path / "out")], "download every shard")


def test_template_syntax_error(tiny_mistral_dir, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}{{ m['content'] }\n{% endfor %}")
    _fails(["convert", str(tiny_mistral_dir), "-o", str(tmp_path / "out"), "--chat-template", str(bad)], "Jinja syntax error at line 2")
    _no_outputs(tmp_path / "out")


def test_template_in_folder_with_runtime_error(tiny_llama_dir, tmp_path):
    src = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] | no_such_filter }}"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in src.glob("chat_template.*"):
        f.unlink()
    _fails(["convert", str(src), "-o", str(tmp_path / "out")], "chat template")
    _no_outputs(tmp_path / "out")


def test_output_exists_needs_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    ok = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "q8_0", "--json"])
    assert ok.exit_code == 0, ok.output
    produced = Path(json.loads(ok.stdout)["files"][0])
    before = produced.stat().st_mtime_ns
    _fails(["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "q8_0"], "--force")
    assert produced.stat().st_mtime_ns == before
    again = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "q8_0", "--force", "--json"])
    assert again.exit_code == 0
    assert [p.name for p in out.iterdir()] == [produced.name]


def test_unknown_bpe_pre_tokenizer_names_the_flag(tiny_llama_dir, tmp_path):
    src = _copy(tiny_llama_dir, tmp_path)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|[^\s\p{L}\p{N}]+|\s+"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    _fails(["convert", str(src), "-o", str(tmp_path / "out")], "--pre-tokenizer NAME")
    _no_outputs(tmp_path / "out")
    # the user names one whose regex is not this tokenizer's: llama.cpp's ids would differ from HF's on
    # plain text, so the file is refused (and removed), not published
    _fails(["convert", str(src), "-o", str(tmp_path / "out"), "--outtype", "q8_0", "--pre-tokenizer", "llama-bpe"],
           "tokenizes the written file differently from the HF tokenizer")
    _no_outputs(tmp_path / "out")
    # a name that is right for the tokenizer: accepted, recorded in the notes
    result = convert(tiny_llama_dir, tmp_path / "ok", outtype="q8_0", pre_tokenizer="llama-bpe")
    assert result.pre_tokenizer == "llama-bpe"
    assert any("--pre-tokenizer" in n for n in result.notes)


def test_bogus_pre_tokenizer_name(tiny_llama_dir, tmp_path):
    _fails(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--pre-tokenizer", "nonsense"], "not a name llama.cpp knows")


def test_bad_outtype_and_split_size(tiny_llama_dir, tmp_path):
    _fails(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--outtype", "q4_k_xl"], "unknown quant type")
    _no_outputs(tmp_path / "out")
    _fails(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--split-max-size", "lots"], "--split-max-size")
    _fails(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--split-max-tensors", "-1"], "must be positive")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    _fails(["convert", str(tiny_llama_dir), "-o", str(notes)], "existing file")


def test_no_disk_space(tiny_llama_dir, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _fails(["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out")], "not enough disk space")
    _no_outputs(tmp_path / "out")


def test_interrupt_leaves_no_partial_file(tiny_mixtral_dir, tmp_path, monkeypatch):
    real = plan_mod.Part.chunks
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        for chunk in real(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 10:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(plan_mod.Part, "chunks", interrupted)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny_mixtral_dir), "-o", str(out), "--split-max-tensors", "8"])
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    _no_outputs(out)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_mixtral_dir, out)
    _no_outputs(out)


def test_library_raises_edgequant_error(tmp_path):
    with pytest.raises(EdgequantError, match="no config.json"):
        convert(tmp_path, tmp_path / "out")


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgequant", "convert", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_json_and_inspect(tiny_mistral_dir, tmp_path):
    out = tmp_path / "out"
    conv = runner.invoke(app, ["convert", str(tiny_mistral_dir), "-o", str(out), "--outtype", "q8_0", "--json"])
    assert conv.exit_code == 0, conv.output
    result = json.loads(conv.stdout)
    assert result["outtype"] == "Q8_0" and result["tokenizer"] == "llama" and result["bos_policy"] == "template"
    insp = runner.invoke(app, ["inspect", result["files"][0], "--json", "--tensors"])
    assert insp.exit_code == 0, insp.output
    info = json.loads(insp.stdout)
    assert info["file_type"] == "Q8_0"
    assert info["metadata"]["tokenizer.ggml.model"] == "llama"
    assert info["chat_template"].startswith("{{ bos_token }}")
    assert abs(info["bits_per_weight"] - result["bits_per_weight"]) < 1e-3
    assert {t["name"] for t in info["tensors"]} >= {"token_embd.weight", "output.weight"}
    table = runner.invoke(app, ["inspect", result["files"][0]])
    assert table.exit_code == 0 and "Q8_0" in table.stdout


def test_inspect_rejects_non_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not a gguf at all")
    _fails(["inspect", str(f)], "not a GGUF file")
