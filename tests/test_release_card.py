"""Model card and Modelfile rendering from hand-built manifests (pure Python, no model files)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from edgequant.release import card as C
from edgequant.release import modelfile as M
from go_template import render_go
from edgequant.release.recipe import recipe_from_dict

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOL_EXAMPLE = ("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_EXAMPLE = "<s>[INST] You are a concise assistant.\n\nWhat is the capital of France? [/INST]"


def _gguf(name, t, size, bpw, metrics, **kw):
    a = {"path": f"{name}-{t}.gguf", "files": [f"{name}-{t}.gguf"], "kind": "gguf", "type": t, "sha256": f"{t.lower():0<64}"[:64],
         "size_bytes": size, "bits_per_weight": bpw, "imatrix": False, "fallbacks": 0, "options": {}, "metrics": metrics}
    a.update(kw)
    return a


def _speed(pp, tg):
    return {"cpu": {"pp_tps": pp, "pp_std": 5.1, "tg_tps": tg, "tg_std": 1.0}, "cuda": {"absent": "no CUDA device"}}


def smol_manifest() -> dict:
    name = "SmolLM2-135M-Instruct"
    recipe = recipe_from_dict({
        "release": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf": ["Q8_0", "Q4_K_M", {"type": "Q2_K", "imatrix": True}]},
        "gptq": [{"bits": 4, "group_size": 64}],
        "card": {"quantized_by": "edgequant-bot", "tags": ["smollm2"]},
    }).to_dict()
    return {
        "schema": "edgequant.manifest/1",
        "name": name,
        "created": "2026-11-21T10:00:00Z",
        "recipe": recipe,
        "source": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": "sha256:" + "ab" * 32,
                   "architecture": "LlamaForCausalLM", "n_params": 134515008, "license": "apache-2.0",
                   "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "versions": {"edgequant": "0.1.0", "llama_cpp_python": "0.3.36", "llama_cpp_commit": "abc123", "gguf": "0.19.0",
                     "torch": "2.13.0+cpu", "transformers": "5.23.0", "gptqmodel": "7.6.0", "python": "3.11.7"},
        "host": {"cpu": "AMD EPYC 7B13", "cores": 2, "ram_gb": 24, "gpu": None, "os": "Linux-6.1"},
        "chat_template": {"template": SMOL_TEMPLATE, "example": SMOL_EXAMPLE, "family": "chatml",
                          "eos_tokens": ["<|im_end|>"], "bos": None},
        "bench": {"text": "pydoc_data.topics (Python 3.11.7)", "ctx": 512, "chunks": 8,
                  "reference": f"{name}-F16.gguf", "devices": ["cpu", "cuda"], "threads": 2},
        "stages": {"convert": {"seconds": 3.1, "skipped": False}, "imatrix": {"seconds": 40.2, "skipped": True},
                   "quantize": {"seconds": 12.0, "skipped": False}, "gptq": {"seconds": 300.5, "skipped": False},
                   "bench": {"seconds": 95.0, "skipped": False}},
        "artifacts": [
            _gguf(name, "F16", 270_900_000, 16.11, {"ppl": 13.0015, "ppl_error": 1.10764, "kld_mean": 0.0, "kld_p99": 0.0,
                                                     "same_top": 1.0, "ln_ppl_ratio": 0.0, "speed": _speed(610.25, 41.87)}),
            _gguf(name, "Q8_0", 144_800_000, 8.61, {"ppl": 13.0102, "ppl_error": 1.1081, "kld_mean": 0.000512345, "kld_p99": 0.004,
                                                     "same_top": 0.991, "ln_ppl_ratio": 0.0007, "speed": _speed(700.04, 70.55)}),
            _gguf(name, "Q4_K_M", 105_000_000, 6.2, {"ppl": 14.1234, "ppl_error": 1.2, "kld_mean": 0.0561, "kld_p99": 0.6,
                                                      "delta_p_mean": -0.5, "delta_p_rms": 4.1, "same_top": 0.91,
                                                      "ln_ppl_ratio": 0.05, "speed": _speed(820.3, 95.2)}, fallbacks=180),
            _gguf(name, "Q2_K", 88_000_000, 5.1, {"ppl": 25.5, "ppl_error": 2.5, "kld_mean": 0.4123, "kld_p99": 3.2,
                                                   "same_top": 0.7012, "ln_ppl_ratio": 0.6, "speed": _speed(900.0, 101.0)}, imatrix=True),
            {"path": f"{name}-GPTQ-4bit-64g", "kind": "gptq", "type": "GPTQ-4bit-64g", "bits": 4, "group_size": 64,
             "files": ["config.json", "model.safetensors", "tokenizer.json"], "sha256": "c" * 64, "size_bytes": 120_000_000,
             "bits_per_weight": 4.5, "metrics": {"ppl": 14.9, "ppl_error": 1.3, "kld_mean": 0.0789, "same_top": 0.88}},
            {"path": "imatrix.gguf", "kind": "imatrix", "sha256": "d" * 64, "files": ["imatrix.gguf"]},
            {"path": "bench.json", "kind": "bench", "sha256": "e" * 64},
            {"path": "bench.md", "kind": "bench", "sha256": "f" * 64},
            {"path": "quality.png", "kind": "plot", "sha256": "1" * 64},
        ],
    }


def mistral_manifest() -> dict:
    name = "Tiny-Mistral|Instruct"  # a pipe in the name must not break the table
    return {
        "schema": "edgequant.manifest/1",
        "name": name,
        "created": "2026-11-21T10:00:00Z",
        "recipe": recipe_from_dict({"release": {"source": "someone/tiny-mistral", "name": "Tiny-Mistral", "gguf": ["Q4_K_M"]}}).to_dict(),
        "source": {"path": "/models/tiny-mistral", "architecture": "MistralForCausalLM", "n_params": 1000000,
                   "license": None, "base_model": None},
        "versions": {"edgequant": "0.1.0", "llama_cpp_python": "0.3.36", "llama_cpp_commit": None},
        "host": {"cpu": "x86", "cores": 2, "ram_gb": 8, "gpu": None, "os": "Linux"},
        "chat_template": {"template": MISTRAL_TEMPLATE, "example": MISTRAL_EXAMPLE, "family": None,
                          "eos_tokens": ["</s>"], "bos": "<s>"},
        "bench": {"text": "notes.txt", "ctx": 128, "chunks": None, "reference": "Tiny-Mistral-F16.gguf", "devices": ["cpu"]},
        "stages": {},
        "artifacts": [
            _gguf("Tiny-Mistral", "Q4_K_M", 2_000_000, 5.5, {"ppl": None, "kld_mean": None}),  # not measured
        ],
    }


def _table_rows(card: str) -> list[list[str]]:
    body = card.split("## Files", 1)[1]
    rows = [ln for ln in body.splitlines() if ln.startswith("| ")]
    header, *rows = rows
    split = lambda ln: [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]  # noqa: E731
    return [split(header)] + [split(r) for r in rows]


# -- model card ----------------------------------------------------------------------------------------


def test_front_matter_parses_with_huggingface_hub():
    text = C.render_model_card(smol_manifest())
    assert text.startswith("---\n")
    card = ModelCard(text)
    d = card.data.to_dict()
    assert d["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert d["base_model_relation"] == "quantized"
    assert d["license"] == "apache-2.0"
    assert d["quantized_by"] == "edgequant-bot"
    assert d["pipeline_tag"] == "text-generation"
    assert d["model_name"] == "SmolLM2-135M-Instruct"
    assert {"gguf", "gptq", "llama-cpp", "imatrix", "smollm2"} <= set(d["tags"])
    # every key is one ModelCardData knows or passes through unchanged
    assert ModelCardData(**d).to_dict() == d
    assert card.text.lstrip().startswith("# SmolLM2-135M-Instruct — GGUF and GPTQ")


def test_no_gptq_tag_without_gptq_and_no_missing_fields():
    m = mistral_manifest()
    d = ModelCard(C.render_model_card(m)).data.to_dict()
    assert "gptq" not in d["tags"] and "gguf" in d["tags"]
    assert "base_model" not in d and "license" not in d and "quantized_by" not in d  # unknown: left out, not null


def test_recommended_row_is_smallest_good_gguf():
    m = smol_manifest()
    rec = C.recommend(m)
    assert rec.type == "Q4_K_M"  # same_top 0.91 >= 90 % although KLD 0.0561 > 0.05; Q2_K fails both; F16 never
    rows = _table_rows(C.render_model_card(m))
    header, body = rows[0], rows[1:]
    notes = header.index("Notes")
    marked = [r for r in body if "★ recommended" in r[notes]]
    assert len(marked) == 1 and "Q4_K_M" in marked[0][0]
    assert "**Recommended: `SmolLM2-135M-Instruct-Q4_K_M.gguf`**" in C.render_model_card(m)


def test_recommend_rule_edges():
    m = smol_manifest()
    # nothing passes the bar: the best-quality quantized GGUF (lowest KLD), never the reference
    for a in m["artifacts"]:
        if a.get("type") in ("Q8_0", "Q4_K_M"):
            a["metrics"].update(kld_mean=0.2, same_top=0.8)
    assert C.recommend(m).type in ("Q8_0", "Q4_K_M")
    m["artifacts"][1]["metrics"]["kld_mean"] = 0.1
    assert C.recommend(m).type == "Q8_0"
    # unmeasured files are never recommended
    for a in m["artifacts"]:
        if a.get("metrics"):
            a["metrics"] = {"ppl": 13.0}
    assert C.recommend(m) is None
    assert C.recommend(mistral_manifest()) is None
    assert "★ recommended" not in C.render_model_card(m)


def test_numbers_are_the_manifests():
    m = smol_manifest()
    text = C.render_model_card(m)
    rows = _table_rows(text)
    header, body = rows[0], rows[1:]
    assert header[:7] == ["File", "Type", "Size", "Bits/weight", "PPL", "KLD mean", "Same top"]
    assert "CPU pp512 t/s" in header and "CPU tg128 t/s" in header and "GPU pp512 t/s" in header
    by_type = {r[1]: dict(zip(header, r)) for r in body}
    q4 = by_type["Q4_K_M"]
    assert q4["PPL"] == "14.1234 ± 1.2000"
    assert q4["KLD mean"] == "0.05610"
    assert q4["Same top"] == "91.0 %"
    assert q4["CPU pp512 t/s"] == "820.3" and q4["CPU tg128 t/s"] == "95.2"
    assert q4["GPU pp512 t/s"] == "—" and q4["GPU tg128 t/s"] == "—"
    assert q4["Size"] == "105.00 MB" and q4["Bits/weight"] == "6.20"
    assert by_type["Q8_0"]["KLD mean"] == "0.0005123"
    assert by_type["F16"]["KLD mean"] == "0" and "reference" in by_type["F16"]["Notes"]
    assert by_type["F16"]["PPL"] == "13.0015 ± 1.1076"
    assert by_type["Q2_K"]["Notes"] == "imatrix"
    assert "180 fallbacks" in q4["Notes"]
    assert by_type["GPTQ-4bit-64g"]["CPU pp512 t/s"] == "—"  # not measured on llama.cpp
    assert "GPU speed was not measured: no CUDA device." in text
    # order: GGUF largest first, then GPTQ
    assert [r[1] for r in body] == ["F16", "Q8_0", "Q4_K_M", "Q2_K", "GPTQ-4bit-64g"]


def test_formatters():
    assert C.fmt_sig(0.0561) == "0.05610"
    assert C.fmt_sig(1.23456) == "1.235"
    assert C.fmt_sig(0.0) == "0"
    assert C.fmt_sig(None) == "—"
    assert C.fmt_ppl(13.00154, None) == "13.0015"
    assert C.fmt_tps(float("nan")) == "—"
    assert C.fmt_pct(0.5) == "50.0 %"
    assert C.cell("a|b\nc") == "a\\|b c"


def test_pipes_escaped_and_unmeasured_rows():
    text = C.render_model_card(mistral_manifest())
    rows = _table_rows(text)
    header, body = rows[0], rows[1:]
    assert "CPU pp512 t/s" not in header  # no speed anywhere: no speed columns
    row = dict(zip(header, body[0]))
    assert row["PPL"] == "—" and row["KLD mean"] == "—" and row["Notes"] == "not measured"
    assert "# Tiny-Mistral|Instruct" in text  # the title is not a table
    assert all(len(r) == len(header) for r in body)


def test_prompt_format_and_snippets():
    m = smol_manifest()
    text = C.render_model_card(m)
    assert "```text\n" + SMOL_EXAMPLE.rstrip("\n") + "\n```" in text
    f = "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    assert f"llama-cli -m {f} -cnv" in text
    assert f"llama-server -m {f}" in text
    assert f'Llama(model_path="{f}"' in text and "create_chat_completion" in text
    assert "ollama create smollm2-135m-instruct -f Modelfile" in text
    assert 'path = "SmolLM2-135M-Instruct-GPTQ-4bit-64g"' in text and "AutoModelForCausalLM" in text
    assert "![quality and size of every file](quality.png)" in text
    assert "Fallbacks" in text and "`SmolLM2-135M-Instruct-Q4_K_M.gguf` (Q4_K_M): 180 tensors" in text
    assert "imatrix.gguf" in text
    # no GPTQ section without GPTQ artifacts
    assert "transformers (GPTQ)" not in C.render_model_card(mistral_manifest())


def test_repo_id_adds_download_commands():
    m = smol_manifest()
    m["recipe"]["card"]["repo_id"] = "me/SmolLM2-135M-Instruct-GGUF"
    text = C.render_model_card(m)
    assert 'hf download me/SmolLM2-135M-Instruct-GGUF --include "SmolLM2-135M-Instruct-Q4_K_M.gguf"' in text
    assert "llama-cli -hf me/SmolLM2-135M-Instruct-GGUF:Q4_K_M -cnv" in text
    assert "(https://huggingface.co/me/SmolLM2-135M-Instruct-GGUF/blob/main/SmolLM2-135M-Instruct-Q8_0.gguf)" in text


def test_how_it_was_made_and_reproducibility():
    m = smol_manifest()
    text = C.render_model_card(m)
    how = text.split("## How this was made", 1)[1]
    assert "edgequant 0.1.0" in how and "llama.cpp `abc123` via llama-cpp-python 0.3.36" in how
    assert "pydoc_data.topics (Python 3.11.7), ctx 512, 8 chunks, reference `SmolLM2-135M-Instruct-F16.gguf`" in how
    assert "134,515,008 parameters" in how and "imatrix cached" in how
    # the recipe is shown as TOML that loads back to the same recipe
    import tomllib

    toml_text = re.search(r"```toml\n(.*?)\n```", how, re.S).group(1)
    assert recipe_from_dict(tomllib.loads(toml_text)).to_dict() == m["recipe"]
    repro = text.split("## Reproducibility", 1)[1]
    assert f"{'q4_k_m':0<64}  SmolLM2-135M-Instruct-Q4_K_M.gguf" in repro
    assert "d" * 64 + "  imatrix.gguf" in repro
    assert "`SmolLM2-135M-Instruct-GPTQ-4bit-64g`: SHA-256 `" + "c" * 64 in repro


def test_card_is_valid_markdown_structure():
    text = C.render_model_card(smol_manifest())
    body = text.split("---\n", 2)[2]
    assert body.count("```") % 2 == 0  # fences balanced
    yaml.safe_load(text.split("---\n", 2)[1])


# -- Modelfile ------------------------------------------------------------------------------------------


def test_modelfile_chatml():
    m = smol_manifest()
    mf = M.render_modelfile(m, "SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert "FROM ./SmolLM2-135M-Instruct-Q4_K_M.gguf" in mf
    tpl = re.search(r'TEMPLATE """(.*?)"""', mf, re.S).group(1)
    assert "{{ .System }}" in tpl and "range $i, $_ := .Messages" in tpl and "<|im_start|>assistant" in tpl
    assert 'PARAMETER stop "<|im_end|>"' in mf and mf.count('PARAMETER stop "<|im_end|>"') == 1
    # SmolLM2's template inserts its own system prompt; the Modelfile carries it
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in mf
    assert render_go(tpl, system="You are a concise assistant.", messages=[
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"}]) == SMOL_EXAMPLE


def test_modelfile_mistral():
    m = mistral_manifest()
    assert M.chat_family(m["chat_template"]) == "mistral"  # family null: recognised from the Jinja source
    mf = M.render_modelfile(m, "Tiny-Mistral-Q4_K_M.gguf")
    tpl = re.search(r'TEMPLATE """(.*?)"""', mf, re.S).group(1)
    assert "[INST]" in tpl and "{{ $.System }}" in tpl
    for stop in ("[INST]", "[/INST]", "</s>"):
        assert f'PARAMETER stop "{stop}"' in mf
    assert "SYSTEM" not in mf.replace("{{ $.System }}", "")
    # BOS comes from the GGUF (Ollama adds it), the rest equals the Jinja example
    msgs = [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "What is the capital of France?"}]
    assert "<s>" + render_go(tpl, system=msgs[0]["content"], messages=msgs) == MISTRAL_EXAMPLE
    multi = render_go(tpl, system="", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "user", "content": "c"}])
    assert multi == "[INST] a [/INST]b</s>[INST] c [/INST]"
    # Mistral v3 spacing ("[/INST]" without a space) is read from the example
    v3 = copy.deepcopy(m)
    v3["chat_template"]["example"] = "<s>[INST] You are a concise assistant.\n\nWhat is the capital of France?[/INST]"
    tpl3 = re.search(r'TEMPLATE """(.*?)"""', M.render_modelfile(v3, "x.gguf"), re.S).group(1)
    assert render_go(tpl3, system="", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "user", "content": "c"}]) == "[INST] a[/INST] b</s>[INST] c[/INST]"


def test_modelfile_llama3_and_unknown_family():
    m = mistral_manifest()
    m["chat_template"] = {"template": "{{ '<|start_header_id|>' }}", "family": None, "eos_tokens": ["<|eot_id|>"], "example": ""}
    tpl = re.search(r'TEMPLATE """(.*?)"""', M.render_modelfile(m, "x.gguf"), re.S).group(1)
    assert render_go(tpl, system="S", messages=[{"role": "user", "content": "U"}]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    m["chat_template"] = {"template": "{{ '<|turn>' }}", "family": "zephyr", "eos_tokens": ["<turn|>"]}
    mf = M.render_modelfile(m, "Tiny-00001-of-00002.gguf")
    assert "TEMPLATE" not in mf.replace("No TEMPLATE", "").replace("add a TEMPLATE", "")
    assert "tokenizer.chat_template" in mf and 'PARAMETER stop "<turn|>"' in mf
    assert "llama-gguf-split --merge" in mf
    m["chat_template"] = None
    mf = M.render_modelfile(m, "x.gguf")
    assert "FROM ./x.gguf" in mf and "PARAMETER" not in mf


def test_default_system_from_manifest_wins():
    m = smol_manifest()
    m["chat_template"]["default_system"] = None
    assert "SYSTEM" not in M.render_modelfile(m, "x.gguf").replace("{{ .System }}", "").replace("if .System", "")
    m["chat_template"]["default_system"] = "Be brief."
    assert 'SYSTEM """Be brief."""' in M.render_modelfile(m, "x.gguf")


# -- the Go template evaluator (tests/go_template.py) ------------------------------------------------


def test_go_evaluator_sanity():
    assert render_go("a {{- if .System }} {{ .System }} {{- end }}\n b", system="S", messages=[]) == "a S\n b"
    assert render_go("{{ range $i, $_ := .Messages }}{{ $i }}{{ .Role }}{{ end }}", system="",
                     messages=[{"role": "u", "content": ""}, {"role": "a", "content": ""}]) == "0u1a"


@pytest.mark.parametrize("family", sorted(M.OLLAMA_FAMILIES))
def test_every_family_has_a_template(family):
    assert "{{" in M.ollama_template(family, "[INST] x [/INST]")
