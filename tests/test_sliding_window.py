"""Mistral's sliding window honoured by llama.cpp (convert --sliding-window exact -> granite_swa): a
miniature whose window is 16 tokens, on a prompt of several windows, equals transformers (eager
attention) at every position; the ``ignore`` file keeps today's llama architecture and differs past
the window; the exact file quantizes (sinks stay F32) and its tokenizer and template checks pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from llama_helpers import hf_tokenizer, llama, llama_logits

WINDOW = 16
N_TOKENS = 120  # 7.5 windows


@pytest.fixture(scope="module")
def mistral16(tiny_mistral_dir, tmp_path_factory) -> Path:
    """The tiny Mistral with a 16-token window and randomised norms (default init leaves them at 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("mistral16") / "tiny-mistral-swa16"
    shutil.copytree(tiny_mistral_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    model.config.sliding_window = WINDOW
    model.to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == WINDOW
    return folder


@pytest.fixture(scope="module")
def files(mistral16, tmp_path_factory) -> dict:
    out = {}
    for mode in ("exact", "ignore"):
        out[mode] = convert(mistral16, tmp_path_factory.mktemp(mode), outtype="f32", sliding_window=mode)
    return out


def _hf_eager_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert model.config.sliding_window == WINDOW
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _prompt(folder: Path) -> list[int]:
    tok = hf_tokenizer(str(folder))
    ids = tok("Sliding windows keep attention local. " * 40)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS
    return ids


def test_exact_file_equals_transformers_past_the_window(mistral16, files):
    r = files["exact"]
    assert r.architecture == "granite_swa" and r.sliding_window == "exact"
    md = inspect_gguf(r.files[0]).metadata
    assert md["granite_swa.attention.sliding_window"] == WINDOW
    assert md["granite_swa.attention.sliding_window_pattern"] == [True, True]
    assert md["granite_swa.logit_scale"] == 1.0
    assert md["edgequant.sliding_window"] == "exact"
    ids = _prompt(mistral16)
    ours, ref = llama_logits(r.files[0], ids), _hf_eager_logits(mistral16, ids)
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() <= 1e-4, (rel[:WINDOW].max(), rel[WINDOW:].max())
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert any("granite_swa" in n for n in r.notes)


def test_ignore_file_is_the_llama_architecture_and_differs_past_the_window(mistral16, files):
    r = files["ignore"]
    assert r.architecture == "llama" and r.sliding_window == "ignored"
    md = inspect_gguf(r.files[0]).metadata
    assert md["llama.attention.sliding_window"] == WINDOW and md["edgequant.sliding_window"] == "ignored"
    ids = _prompt(mistral16)
    ours, ref = llama_logits(r.files[0], ids), _hf_eager_logits(mistral16, ids)
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel[:WINDOW].max() <= 1e-4  # inside the window both attend to the same tokens
    assert rel[WINDOW + 1:].max() > 1e-2  # past it llama attends to everything
    assert any("--sliding-window exact" in n for n in r.notes)


def test_exact_file_quantizes_with_f32_sinks_and_runs(files, tmp_path):
    results = quantize(files["exact"].files[0], ["Q8_0", "Q4_K_M"], tmp_path, QuantizeOptions())
    for q in results:
        info = inspect_gguf(q.files[0])
        assert info.architecture == "granite_swa"
        sinks = [t for t in info.tensors if t.name.endswith("attn_sinks.weight")]
        assert len(sinks) == 2 and {t.type for t in sinks} == {"F32"}
        assert info.metadata["granite_swa.attention.sliding_window_pattern"] == [True, True]
        with llama(q.files[0], n_ctx=256) as llm:
            llm.eval(list(range(3, 3 + N_TOKENS)))
            assert np.isfinite(np.asarray(llm.scores[:N_TOKENS])).all()


def test_exact_file_keeps_tokenizer_and_template(mistral16, files):
    """convert checked the token ids and the template itself; the chat prompt still has one BOS."""
    tok = hf_tokenizer(str(mistral16))
    messages = [{"role": "user", "content": "Hi there"}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    with llama(files["exact"].files[0], n_ctx=128) as llm:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                  eos_token=llm._model.token_get_text(llm.token_eos()),
                                  bos_token=llm._model.token_get_text(llm.token_bos()))
        result = fmt(messages=messages)
        ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
    assert ids == expected and ids.count(1) == 1


def test_mixtral_exact_request_falls_back_with_a_note(tiny_mixtral_dir, tmp_path):
    src = tmp_path / "mixtral-swa"
    shutil.copytree(tiny_mixtral_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = WINDOW
    (src / "config.json").write_text(json.dumps(cfg))
    r = convert(src, tmp_path / "out", outtype="f16", sliding_window="exact")
    assert r.architecture == "llama" and r.sliding_window == "ignored"
    assert any("not offered for mixture-of-experts" in n for n in r.notes)


def test_unknown_mode_is_one_clear_error(tiny_mistral_dir, tmp_path):
    from edgequant.errors import EdgequantError

    with pytest.raises(EdgequantError, match="--sliding-window 'sometimes': use ignore or exact"):
        convert(tiny_mistral_dir, tmp_path, sliding_window="sometimes")


def test_cli_flag_json_and_inspect(mistral16, tmp_path):
    from typer.testing import CliRunner

    from edgequant.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(mistral16), "--outtype", "f16", "--sliding-window", "exact",
                              "-o", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sliding_window"] == "exact" and data["architecture"] == "granite_swa"
    res = runner.invoke(app, ["inspect", data["files"][0], "--json"])
    assert json.loads(res.stdout)["sliding_window"] == "exact"
    res = runner.invoke(app, ["convert", str(mistral16), "--sliding-window", "always", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--sliding-window 'always': use ignore or exact" in res.output


def test_release_of_an_exact_file(mistral16, tmp_path):
    """release.sliding_window = "exact": the base, the quant, the bench, the card and the Modelfile."""
    from edgequant.release.pipeline import release
    from edgequant.release.recipe import load_recipe

    out = tmp_path / "dist"
    recipe = tmp_path / "release.toml"
    recipe.write_text(f"""
[release]
source = "{mistral16.as_posix()}"
name = "Swa"
output = "{out.as_posix()}"
gguf = ["Q8_0"]
sliding_window = "exact"

[bench]
ctx = 64
chunks = 2
speed = false
""")
    result = release(load_recipe(recipe))
    assert result.status == "ok"
    m = json.loads((out / "manifest.json").read_text())
    ggufs = [a for a in m["artifacts"] if a["kind"] == "gguf"]
    assert {a["sliding_window"] for a in ggufs} == {"exact"} and len(ggufs) == 2
    assert all(inspect_gguf(out / a["path"]).architecture == "granite_swa" for a in ggufs)
    q8 = next(a for a in ggufs if a["type"] == "Q8_0")
    assert q8["metrics"]["kld_mean"] is not None  # llama.cpp ran both files
    card = (out / "README.md").read_text()
    assert "### Sliding window" in card and "`granite_swa`" in card
    assert "](quality.png)" in card and "  bench.json" in card  # the plot and the reports are in the card
    modelfile = (out / "Modelfile").read_text()
    assert "\nFROM ./Swa-Q8_0.gguf" in modelfile and "granite_swa" in modelfile
