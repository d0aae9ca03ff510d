"""Releases of the MoE families beyond Mixtral: Qwen3-MoE (Q8_0, an imatrix Q4_K_M and GPTQ 4-bit) and GPT-OSS
(its GPTQ folder loads through GPTQModel.load, see docs/gptq.md). Each produces the card, the Modelfile
of its chat format and the manifest, with a bench row for every model file."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures_gpt_oss
import fixtures_qwen_moe
from edgequant.release import modelfile as M

GPTQ = "[[gptq]]\nbits = 4\ngroup_size = 32\nsamples = 8\nseq_len = 64\n"
IMATRIX = "\n[imatrix]\nctx = 64\nchunks = 2\n"
NO_SPEED = ("repetitions = 1", "repetitions = 1\nspeed = false")  # quality rows only: speed is tested on tiny_mistral

# HF class -> (fixture, Modelfile family, marker of the chat format in the card's prompt section, GPTQ made)
RELEASES = {
    "Qwen3MoeForCausalLM": (lambda: fixtures_qwen_moe.tiny_qwen3_moe("per_expert"), "chatml-think", "<|im_start|>user", True),
    "GptOssForCausalLM": (fixtures_gpt_oss.tiny_gpt_oss, "harmony", "<|start|>user", True),
}


@pytest.mark.parametrize("hf_class", sorted(RELEASES))
def test_release_of_moe_family(hf_class, tmp_path):
    from edgequant.release.pipeline import release
    from edgequant.release.recipe import load_recipe
    from llama_helpers import llama
    from test_release import check_manifest, recipe_text, write_recipe

    build, family, marker, with_gptq = RELEASES[hf_class]
    out = tmp_path / "dist"
    text = recipe_text(build(), out, gguf='["Q8_0", {type = "Q4_K_M", imatrix = true}]', gptq=GPTQ)
    lines: list[str] = []
    result = release(load_recipe(write_recipe(tmp_path, text.replace("\n[bench]", IMATRIX + "\n[bench]").replace(*NO_SPEED))),
                     log=lines.append)
    assert result.status == "ok"
    gptq = ["GPTQ-4bit-32g"] if with_gptq else []
    if not with_gptq:  # skipped, saying why, and the rest of the release goes on
        assert result.skipped == ["GPTQ-4bit-32g"]
        assert any("skipped" in ln and "does not quantize GptOssForCausalLM" in ln for ln in lines), lines
    assert set(result.made) == {"base", "imatrix", "Q8_0", "Q4_K_M", "bench", *gptq}
    m = check_manifest(out)  # every artifact present with its sha256
    models = [a for a in m["artifacts"] if a["kind"] in ("gguf", "gptq")]
    assert {a["type"] for a in models} == {"BF16", "Q8_0", "Q4_K_M", *gptq}
    assert m["source"]["architecture"] == hf_class
    assert next(a for a in models if a["type"] == "Q4_K_M")["imatrix"] and (out / "imatrix.gguf").is_file()
    report = json.loads((out / "bench.json").read_text())
    assert len(report["rows"]) == len(models)
    for a in models:  # a bench row for every artifact
        assert a["metrics"]["ppl"] > 0, a["path"]
        if a["kind"] == "gguf":
            with llama(out / a["path"], n_ctx=64) as llm:
                llm.eval(llm.tokenize(b"Hello there, how are you?"))
                assert np.isfinite(np.asarray(llm.scores[:4])).all()
    card = (out / "README.md").read_text()
    assert hf_class in card and marker in card.split("## Prompt format", 1)[1].split("##", 1)[0]
    assert ("### transformers (GPTQ)" in card) == with_gptq
    mf = (out / "Modelfile").read_text()
    assert mf.startswith("FROM ") or "\nFROM " in mf
    if family not in M.OLLAMA_FAMILIES:  # Harmony: no Go translation; Ollama renders the GGUF's own template
        assert "# No TEMPLATE" in mf and 'TEMPLATE """' not in mf
    else:
        assert f"Chat template ({family})" in mf and f'TEMPLATE """{M.ollama_template(family, m["chat_template"]["example"])}"""' in mf
        for stop in M.OLLAMA_FAMILIES[family]:
            assert f"PARAMETER stop {json.dumps(stop)}" in mf
    if with_gptq:  # the card loads the per-expert folder through defuser (its block run as written: test_gptq_card_load)
        gptq_art = next(a for a in models if a["kind"] == "gptq")
        if hf_class == "GptOssForCausalLM":  # per-expert Linears with biases: GPTQModel.load builds them
            assert gptq_art["gptq_loader"] == "gptqmodel" and "defuser_model_type" not in gptq_art
            assert "model = GPTQModel.load(path, dtype=torch.float16)" in card and "defuser" not in card
        else:
            assert gptq_art["defuser_model_type"] == "qwen3_moe" and 'defuser.replace_fused_blocks("qwen3_moe")' in card
