"""Hardening classes (one test per class): model text never read as rich markup, ..."""

from __future__ import annotations

import json

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
