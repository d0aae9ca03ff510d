"""Hardening classes (one test per class): model text never read as rich markup, ..."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from edgequant.cli import app

runner = CliRunner()

# Strings rich would read as markup: a closing tag with no opener crashes it (MarkupError), a known
# style swallows the brackets.
MARKUP = "[INST] [b]bold[/b] [/] [/INST] [link=x]y[/link]"


def test_model_text_is_printed_literally_never_as_markup(tiny_mistral_dir, tmp_path):
    """convert of a Mistral-style checkpoint whose template quotes [INST] ... [/INST]: the note that
    quotes the rendered prompt, the table and the inspect output print it as text (this crashed with
    rich.errors.MarkupError: closing tag '[/INST]' after the GGUF was written)."""
    from llama_cpp.llama_chat_format import MISTRAL_INSTRUCT_CHAT_TEMPLATE

    template = tmp_path / "mistral.jinja"  # the exact template llama-cpp-python swaps for its own formatter
    template.write_text(MISTRAL_INSTRUCT_CHAT_TEMPLATE)
    r = runner.invoke(app, ["convert", str(tiny_mistral_dir), "-o", str(tmp_path / "a"), "--chat-template", str(template)])
    assert r.exit_code == 0, r.output
    assert "[/INST]" in r.output and "Traceback" not in r.output

    odd = tmp_path / "odd.jinja"
    odd.write_text("{{ bos_token }}{% for m in messages %}" + MARKUP + " {{ m['content'] }}{% endfor %}")
    out = tmp_path / "b"
    r = runner.invoke(app, ["convert", str(tiny_mistral_dir), "-o", str(out), "--chat-template", str(odd),
                            "--name", "Tiny [b]x[/b]"])
    assert r.exit_code == 0, r.output
    (gguf,) = out.glob("*.gguf")
    r = runner.invoke(app, ["inspect", str(gguf)])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())  # the terminal wraps long lines
    assert MARKUP in flat  # the template, verbatim
    info = json.loads(runner.invoke(app, ["inspect", str(gguf), "--json"]).stdout)
    assert "[b]x[/b]" in str(info["name"]) and "[b]x[/b]" in flat  # the table cell, brackets kept


# --- code from a model folder never runs without --trust-remote-code ---------------------------

_EVIL = """
import pathlib
pathlib.Path(MARKER_DIR, "RAN-" + __name__.rsplit(".", 1)[-1]).write_text("model-folder code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _folder_asking_for_code(src, dst):
    import shutil

    shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    code = _EVIL.replace("MARKER_DIR", repr(str(dst)))  # transformers imports a copy from its cache: mark here
    (dst / "tokenization_evil.py").write_text(code)
    (dst / "modeling_evil.py").write_text(code.replace("EvilTokenizer", "EvilForCausalLM"))
    return dst


def _cli(args, **kw):
    import subprocess
    import sys

    # a real process with no stdin: a transformers prompt would wait for it (15 s) and print on stdout
    return subprocess.run([sys.executable, "-m", "edgequant", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600, **kw)


def test_model_folder_code_never_runs_and_is_named(tiny_llama_dir, tmp_path):
    folder = _folder_asking_for_code(tiny_llama_dir, tmp_path / "asks")
    runs = {
        "convert": ["convert", str(folder), "-o", str(tmp_path / "c"), "--json"],
        "bench": ["bench", str(folder), "--quality-only", "--ctx", "64", "--chunks", "2", "--threads", "2", "--json"],
        "imatrix": ["imatrix", str(folder), "-o", str(tmp_path / "im.gguf"), "--ctx", "64", "--chunks", "1", "--json"],
    }
    for name, args in runs.items():
        r = _cli(args)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        json.loads(r.stdout)  # nothing but the JSON on stdout: no prompt
        assert "asks to run its own code" in r.stderr and "tokenization_evil.EvilTokenizer" in r.stderr, (name, r.stderr)
        assert "--trust-remote-code" in r.stderr
        assert not list(folder.glob("RAN-*")), f"{name} ran the folder's code"


def test_folder_that_only_loads_with_its_code_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    folder = _folder_asking_for_code(tiny_llama_dir, tmp_path / "custom")
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "EvilTokenizer"  # no built-in class of that name: only the folder's code can load it
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["auto_map"]  # the model itself is a built-in class
    (folder / "config.json").write_text(json.dumps(cfg))
    r = _cli(["bench", str(folder), "--quality-only", "--ctx", "64", "--chunks", "2", "--threads", "2"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "needs its own code to load" in r.stderr and "--trust-remote-code" in r.stderr
    assert "Traceback" not in r.stderr and not list(folder.glob("RAN-*"))
    ok = _cli(["bench", str(folder), "--quality-only", "--ctx", "64", "--chunks", "2", "--threads", "2",
               "--trust-remote-code", "--json"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert list(folder.glob("RAN-*"))  # with the flag, the folder's code is what loaded it


# --- a release never replaces the user's files --------------------------------------------------

def test_release_refuses_to_write_over_the_source_or_foreign_files(tiny_mistral_dir, tmp_path):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_mistral_dir, src)
    (src / "README.md").write_text("the source's own model card\n")
    before = sorted(p.name for p in src.iterdir())
    for output, expect in ((src, "is the source folder"), (src / "dist", "inside the source folder")):
        r = runner.invoke(app, ["release", str(src), "--gguf", "Q8_0", "-o", str(output)])
        assert r.exit_code == 2 and expect in " ".join(r.stderr.split()), r.output
    assert sorted(p.name for p in src.iterdir()) == before and (src / "README.md").read_text() == "the source's own model card\n"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "README.md").write_text("my notes\n")
    r = runner.invoke(app, ["release", str(src), "--gguf", "Q8_0", "-o", str(foreign)])
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "already holds files (README.md) and no edgequant release" in msg and "--force" in msg
    assert sorted(p.name for p in foreign.iterdir()) == ["README.md"]
    r = runner.invoke(app, ["release", "merge", str(tmp_path / "x" / "manifest.json"), "-o", str(foreign)])
    assert r.exit_code == 2 and "already holds files" in " ".join(r.stderr.split())


# --- two writers into one folder never mix their files -----------------------------------------

def test_one_writer_per_output_folder_with_its_own_part_names(tiny_llama_dir, tmp_path):
    from edgequant.atomic import folder_lock, part_path

    out = tmp_path / "out"
    a, b = part_path(out / "x.gguf"), part_path(out / "x.gguf")
    assert a != b and a.name.endswith(".part") and a.name.startswith("x.gguf.")
    with folder_lock(out):  # another process is writing here
        r = _cli(["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "f16"])
        assert r.returncode == 2, r.stderr[-2000:]
        assert "another edgequant process is writing into" in r.stderr and "Traceback" not in r.stderr
        assert list(out.iterdir()) == []
        with folder_lock(out):  # re-entrant within one process
            pass
    r = _cli(["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "f16", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    (made,) = json.loads(r.stdout)["files"]
    name = made.rsplit("/", 1)[-1]
    (out / f"{name}.4242-deadbeef.part").write_bytes(b"left by a killed run")
    r = _cli(["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "f16", "--force"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [name]  # the killed run's .part is gone


# --- what a release publishes names no local folder ----------------------------------------------

def test_card_and_manifest_publish_no_local_paths(tiny_mistral_dir, tmp_path):
    import shutil

    src = tmp_path / "work" / "my-finetune"
    shutil.copytree(tiny_mistral_dir, src)
    text = tmp_path / "work" / "eval.txt"
    from edgequant.text import builtin_text

    text.write_text(builtin_text()[:60_000])
    out = tmp_path / "work" / "dist"
    r = runner.invoke(app, ["release", str(src), "--gguf", "Q8_0", "-o", str(out), "--bench-speed", "false",
                            "--bench-ctx", "64", "--bench-chunks", "2", "--bench-text", str(text), "--json"])
    assert r.exit_code == 0, r.output
    local = str(tmp_path)
    for name in ("README.md", "manifest.json", "bench.json", "bench.md", "Modelfile"):
        body = (out / name).read_text()
        assert local not in body, (name, [line for line in body.splitlines() if local in line][:3])
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["path"] == "my-finetune" and m["recipe"]["release"]["output"] == "."
    assert m["bench"]["text"] == "eval.txt"
    from edgequant.release.pipeline import public_command

    cmd = public_command(f"edgequant release {src} -o {out} --gguf Q8_0 --bench-text {text}", out)
    assert cmd == "edgequant release my-finetune -o . --gguf Q8_0 --bench-text eval.txt"
    assert public_command("edgequant release org/model --gguf Q8_0", out) == "edgequant release org/model --gguf Q8_0"


# --- no GGUF that llama.cpp refuses is written with exit 0 ----------------------------------------

def _rewrite_safetensors_header(path, edit):
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    path.write_bytes(data[:8] + raw.ljust(n) + data[8 + n:])  # same length: the offsets stay valid


def test_inconsistent_checkpoints_are_refused_before_writing(tiny_llama_dir, tmp_path):
    import shutil

    bad = tmp_path / "shape"
    shutil.copytree(tiny_llama_dir, bad)
    st = sorted(bad.glob("*.safetensors"))[0]

    def shrink(h):
        name = next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2)
        h[name]["shape"][0] -= 1  # the byte range still holds the old row count
    _rewrite_safetensors_header(st, shrink)
    r = runner.invoke(app, ["convert", str(bad), "-o", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "is corrupt" in r.stderr and "re-download" in r.stderr, r.output
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").iterdir())

    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_llama_dir, vocab)
    cfg = json.loads((vocab / "config.json").read_text())
    cfg["vocab_size"] += 64  # more tokens than the embedding has rows
    (vocab / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", str(vocab), "-o", str(tmp_path / "o2")])
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "rows but the vocabulary has" in msg, r.output
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").iterdir())


def test_a_written_file_llama_cpp_refuses_is_removed(tiny_llama_dir, tmp_path):
    import pytest

    from edgequant.errors import EdgequantError
    from edgequant.export.convert import convert
    from edgequant.llamacpp import check_loads, verify_written

    (f,) = convert(tiny_llama_dir, tmp_path, outtype="f16").files
    check_loads(f)  # what every convert and quantize now does before it reports success
    size = Path(f).stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(EdgequantError, match="llama.cpp refuses .*not within the file bounds"):
        verify_written([f])
    assert not Path(f).exists()


# --- bad metadata and file-system errors: one line, never a traceback ------------------------------

def test_malformed_metadata_is_one_line(tiny_llama_dir, tmp_path):
    import shutil

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(tiny_llama_dir, d)
        edit(d)
        return d

    def set_cfg(**kv):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(kv)
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cases = {
        "latin1": (lambda d: (d / "config.json").write_bytes((d / "config.json").read_bytes().replace(b"}", b', "x": "\xe9"}', 1)),
                   "is not UTF-8 text"),
        "list": (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
        "tok-latin1": (lambda d: (d / "tokenizer_config.json").write_bytes(b'{"x": "\xff"}'), "is not UTF-8 text"),
        "heads0": (set_cfg(num_attention_heads=0), "num_attention_heads is 0"),
        "kvheads": (set_cfg(num_key_value_heads=cfg["num_attention_heads"] // 2 if cfg.get("num_key_value_heads") !=
                            cfg["num_attention_heads"] // 2 else cfg["num_attention_heads"]),
                    "config.json does not match the weights"),
    }
    for name, (edit, expect) in cases.items():
        d = variant(name, edit)
        r = runner.invoke(app, ["convert", str(d), "-o", str(tmp_path / f"out-{name}")])
        msg = " ".join(r.stderr.split())
        assert r.exit_code == 2 and expect in msg, (name, r.output)
        assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) <= 3, (name, r.stderr)
    tpl = tmp_path / "latin1.jinja"
    tpl.write_bytes(b"{{ '\xe9' }}")
    r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--chat-template", str(tpl)])
    assert r.exit_code == 2 and "is not UTF-8 text" in r.stderr, r.output


def test_file_system_errors_are_one_line(tiny_llama_dir, tmp_path):
    import errno
    import shutil

    from edgequant.errors import os_error_line

    assert "the disk is full" in os_error_line(OSError(errno.ENOSPC, "No space left on device", "/x/y.gguf.part"))
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/x")).startswith("/x: Read-only file system")
    # a dangling weight symlink, as in a broken HF cache
    d = tmp_path / "dangling"
    shutil.copytree(tiny_llama_dir, d)
    st = sorted(d.glob("*.safetensors"))[0]
    st.unlink()
    st.symlink_to(tmp_path / "blobs" / "gone")
    r = runner.invoke(app, ["convert", str(d), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert st.name in r.stderr, r.stderr
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(ro)])
        assert r.exit_code == 2 and "permission denied" in r.stderr.lower() and "Traceback" not in r.output


def test_weak_messages_name_the_problem(tiny_llama_dir, tmp_path):
    from edgequant.export.convert import convert

    def fails(args, expect):
        r = runner.invoke(app, args)
        msg = " ".join(r.stderr.split())
        assert r.exit_code == 2 and expect in msg, (args, r.output)
        assert "Traceback" not in r.output

    (f16,) = convert(tiny_llama_dir, tmp_path / "m", outtype="f16", model_name="Named").files
    assert Path(f16).name == "Named-F16.gguf"  # --name names the file, as its help says
    v99 = tmp_path / "v99.gguf"
    data = bytearray(Path(f16).read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    v99.write_bytes(bytes(data))
    fails(["inspect", str(v99)], "GGUF version 99, newer than")
    fails(["inspect", str(tmp_path)], "is a folder; pass a .gguf file")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 400)
    fails(["bench", f16, "--quality-only", "--text", str(binary), "--ctx", "64"], "looks binary")
    fails(["bench", f16, "--quality-only", "--text", str(tmp_path), "--ctx", "64"], "is a folder")
    fails(["bench", f16, "--quality-only", "--chunks", "-1", "--ctx", "64"], "--chunks -1: use a positive number")
    fails(["bench", f16, "--quality-only", "--ctx", "100000000", "--chunks", "1"], "or a smaller --ctx")  # before any load
    report = tmp_path / "r.md"
    report.write_text("keep me")
    fails(["bench", f16, "--speed-only", "--pp", "8", "--tg", "2", "--reps", "1", "-o", str(report)], "output exists")
    assert report.read_text() == "keep me"


def test_existing_outputs_are_found_before_any_work(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "Q4_K_M", "--json"])
    assert r.exit_code == 0, r.output
    (made,) = json.loads(r.stdout)["files"]
    again = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--outtype", "Q4_K_M"])
    assert again.exit_code == 2 and "output exists" in again.stderr and Path(made).name in again.stderr
    assert not list(out.glob(".edgequant-tmp-*"))  # refused before the temporary 16-bit file was made
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(folder), "--force"])
    assert r.exit_code == 2 and "is a folder" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "o"] and not list(folder.iterdir())


def test_sentencepiece_tokenizer_json_is_not_written_as_byte_level_bpe(tiny_mistral_dir, tmp_path):
    """A Mistral-style folder without tokenizer.model: its tokenizer.json is SentencePiece-style BPE, written as
    llama.cpp's SentencePiece vocabulary (tests/test_tokenizer_json.py checks it); --pre-tokenizer, which once
    turned it into GPT-2 BPE with ids that differ from HF's, is ignored with a note."""
    import shutil

    src = tmp_path / "no-spm"
    shutil.copytree(tiny_mistral_dir, src)
    (src / "tokenizer.model").unlink()
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "--pre-tokenizer", "llama-bpe", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tokenizer"] == "llama" and any("--pre-tokenizer llama-bpe ignored" in n for n in res["notes"])


def test_pickle_checkpoint_refused_without_torchs_advice(tiny_llama_dir, tmp_path):
    import fractions
    import shutil

    import torch

    d = tmp_path / "legacy"
    shutil.copytree(tiny_llama_dir, d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "meta": fractions.Fraction(1, 3)}, d / "pytorch_model.bin")
    r = runner.invoke(app, ["convert", str(d), "-o", str(tmp_path / "o")])
    msg = " ".join(r.stderr.split())
    assert r.exit_code == 2 and "pickle checkpoint that loads only by running code" in msg, r.output
    assert "weights_only=False" not in msg and "Traceback" not in r.output
    r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--chat-template", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.stderr


def test_full_disk_is_one_line_and_leaves_nothing(tiny_llama_dir, tmp_path):
    """A real small file system (tmpfs, mounted where the test runs as root) that cannot hold the GGUF."""
    import subprocess

    import pytest

    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(disk)])
        msg = " ".join(r.stderr.split())
        assert r.exit_code == 2 and "not enough disk space" in msg and "Traceback" not in r.output, r.output
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
