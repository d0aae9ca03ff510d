"""Releases of the dense families (Qwen2, Qwen3, Gemma 2, Gemma 3 and its multimodal class, Phi-3, the llama-path
relatives SmolLM3, Granite, Ministral 3 and its multimodal class), and their
Ollama Modelfiles checked against the real chat templates (llama.cpp's models/templates/) rendered by Jinja.

The Go templates are evaluated by tests/go_template.py with the values Ollama passes (system messages stay
in .Messages and are joined into .System; a Modelfile SYSTEM is prepended as a system message when the
conversation has none); BOS is Ollama's to add, so a template's leading bos_token is left out of the
comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

import fixtures_gemma
import fixtures_phi
import fixtures_qwen
import fixtures_relatives
from edgequant.llamacpp_tools import vendored
from edgequant.release import modelfile as M
from edgequant.release.manifest import ChatTemplate
from edgequant.release.template_gate import CONVERSATIONS as GATE_CONVERSATIONS
from go_template import render_go

SYS = {"role": "system", "content": "You are a concise assistant."}
U1, A1, U2 = ({"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
              {"role": "user", "content": "Name three primes."})
CONVERSATIONS = {
    "system + user": [SYS, U2],
    "user": [U2],
    "multi-turn": [U1, A1, U2],
    "system + multi-turn": [SYS, U1, A1, U2],
}

# (template source, BOS its bos_token renders, the family, its default system prompt)
TEMPLATES = {
    "qwen2.5": (fixtures_qwen.QWEN2_TEMPLATE, "", "chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": (fixtures_qwen.QWEN3_TEMPLATE, "", "chatml-think", None),
    "gemma2": ("models/templates/google-gemma-2-2b-it.jinja", "<bos>", "gemma", None),
    "gemma3": (fixtures_gemma.GEMMA3_CHAT_TEMPLATE, "<bos>", "gemma", None),
    "phi3.5": ("models/templates/microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "phi3", None),
    "phi4-mini": (fixtures_phi.PHI4_MINI_TEMPLATE, "", "phi3", None),
}


def _template(source: str) -> str:
    return vendored(source).read_text(encoding="utf-8") if source.startswith("models/") else source


def jinja(template: str, messages: list[dict], bos: str, strip_bos: bool = True, **kw) -> str:
    """The Jinja render (transformers' renderer), without the leading BOS Ollama adds itself."""
    kw.setdefault("add_generation_prompt", not kw.get("continue_final_message"))
    text = render_jinja_template(conversations=[messages], chat_template=template, bos_token=bos,
                                 eos_token="<|endoftext|>", **kw)[0][0]
    return text[len(bos):] if strip_bos and bos and text.startswith(bos) else text


def example(template: str, bos: str) -> str:
    """The manifest's example, as the release renders it (template_gate.example_prompt)."""
    messages = GATE_CONVERSATIONS["system + user"]
    try:
        return jinja(template, messages, bos, strip_bos=False)
    except Exception:  # noqa: BLE001 - the template refuses a system message
        return jinja(template, messages[1:], bos, strip_bos=False)


def ollama(tpl: str, messages: list[dict], default_system: str | None, **kw) -> str:
    """The Go template rendered with what Ollama passes for this conversation."""
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go(tpl, system=system, messages=messages, **kw)


def _go_template(name: str) -> tuple[str, str, str | None]:
    source, bos, family, default = TEMPLATES[name]
    template = _template(source)
    shown = example(template, bos)
    ct = ChatTemplate(template=template, example=shown, bos=bos or None, eos_tokens=["<|im_end|>"] if "chatml" in family else [])
    assert M.family_of(template) == family and M.chat_family(ct) == family
    assert M.default_system_prompt(ct) == default
    return template, M.ollama_template(family, shown), default


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_template_renders_as_the_jinja_template(name):
    template, tpl, default = _go_template(name)
    bos = TEMPLATES[name][1]
    for conv, messages in CONVERSATIONS.items():
        try:
            expected = jinja(template, messages, bos)
        except Exception:  # noqa: BLE001 - Gemma 2 refuses a system message: compared with Gemma 3's below
            assert name == "gemma2" and messages[0]["role"] == "system", conv
            continue
        assert ollama(tpl, messages, default) == expected, conv
    # a last assistant message stays open for Ollama to continue it
    continued = [U1, A1, U2, {"role": "assistant", "content": "Two,"}]
    assert ollama(tpl, continued, default) == jinja(template, continued, bos, continue_final_message=True)


def test_gemma2_gets_gemma3s_system_prompt():
    """Gemma 2's template refuses a system message; the Modelfile folds it into the first user turn as Gemma 3 does."""
    _, tpl2, _ = _go_template("gemma2")
    gemma3 = _template(TEMPLATES["gemma3"][0])
    for messages in (CONVERSATIONS["system + user"], CONVERSATIONS["system + multi-turn"]):
        assert ollama(tpl2, messages, None) == jinja(gemma3, messages, "<bos>")


def test_qwen3_thinking():
    """Ollama's think switch renders as enable_thinking; history answers come without their thinking."""
    template, tpl, _ = _go_template("qwen3")
    for think in (True, False):
        assert ollama(tpl, CONVERSATIONS["multi-turn"], None, think=think) == jinja(
            template, CONVERSATIONS["multi-turn"], "", enable_thinking=think)
    # Jinja strips the thinking from earlier answers; Ollama has parsed it into .Thinking
    thought = {"role": "assistant", "content": "<think>\nHe greets me.\n</think>\n\nHello. How can I help?"}
    go_msg = {"role": "assistant", "content": "Hello. How can I help?", "thinking": "He greets me."}
    assert ollama(tpl, [U1, go_msg, U2], None) == jinja(template, [U1, thought, U2], "")
    # a continued last answer keeps its thinking block
    last = {"role": "assistant", "content": "<think>\nSmall ones.\n</think>\n\nTwo,"}
    go_last = {"role": "assistant", "content": "Two,", "thinking": "Small ones."}
    assert ollama(tpl, [U1, A1, U2, go_last], None) == jinja(template, [U1, A1, U2, last], "",
                                                             continue_final_message=True)


@pytest.mark.parametrize("family", ["chatml-think", "gemma", "phi3"])
def test_modelfile_stops_and_template(family):
    name = {"chatml-think": "qwen3", "gemma": "gemma3", "phi3": "phi3.5"}[family]
    template, tpl, _ = _go_template(name)
    ct = {"template": template, "family": None, "eos_tokens": ["<eos>"], "example": None}
    mf = M.render_modelfile({"name": "Tiny", "chat_template": ct, "artifacts": []}, "Tiny-Q4_K_M.gguf")
    assert f'TEMPLATE """{tpl}"""' in mf and f"Chat template ({family})" in mf
    for stop in [*M.OLLAMA_FAMILIES[family], "<eos>"]:
        assert f'PARAMETER stop {json.dumps(stop)}' in mf


def test_go_evaluator_assignment_persists_across_range():
    tpl = '{{- $s := .System }}{{ range $i, $_ := .Messages }}{{ if $s }}[{{ $s }}]{{ $s = "" }}{{ end }}{{ .Content }}{{ end }}'
    assert render_go(tpl, system="S", messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[S]ab"


# -- a release of each family --------------------------------------------------------------------------------

# HF class -> (fixture builder, Modelfile family, a marker of the chat format in the card's example, with GPTQ,
# what the GGUF does with the sliding window).
RELEASES = {
    "Qwen2ForCausalLM": (fixtures_qwen.tiny_qwen2, "chatml", "<|im_start|>system", True, None),
    "Qwen3ForCausalLM": (fixtures_qwen.tiny_qwen3, "chatml-think", "<|im_start|>user", True, None),
    "Gemma2ForCausalLM": (fixtures_gemma.tiny_gemma2, "gemma", "<start_of_turn>user", True, "exact"),
    "Gemma3ForCausalLM": (fixtures_gemma.tiny_gemma3, "gemma", "<start_of_turn>user", True, "exact"),
    "Gemma3ForConditionalGeneration": (fixtures_gemma.tiny_gemma3_vlm, "gemma", "<start_of_turn>user", True, "exact"),
    "Phi3ForCausalLM": (fixtures_phi.tiny_phi3, "phi3", "<|user|>", True, "ignored"),
    # the llama-path relatives (the tiny Llama's tokenizer and Llama 3 template)
    "SmolLM3ForCausalLM": (fixtures_relatives.tiny_smollm3, "llama3", "<|start_header_id|>user", True, None),
    "GraniteForCausalLM": (fixtures_relatives.tiny_granite, "llama3", "<|start_header_id|>user", True, None),
    "Ministral3ForCausalLM": (fixtures_relatives.tiny_ministral3, "llama3", "<|start_header_id|>user", True, None),
    "Mistral3ForConditionalGeneration": (fixtures_relatives.tiny_mistral3_vlm, "llama3", "<|start_header_id|>user", False, None),
}
GPTQ = "[[gptq]]\nbits = 4\ngroup_size = 32\nsamples = 8\nseq_len = 64\n"
IMATRIX = "\n[imatrix]\nctx = 64\nchunks = 2\n"
NO_SPEED = ("repetitions = 1", "repetitions = 1\nspeed = false")  # quality rows only: speed is tested on tiny_mistral


@pytest.mark.parametrize("hf_class", sorted(RELEASES))
def test_release_of_family(hf_class, tmp_path):
    from edgequant.gptq_load import load_gptq_model
    from edgequant.release.pipeline import release
    from edgequant.release.recipe import load_recipe
    from llama_helpers import llama
    from test_release import check_manifest, recipe_text, write_recipe

    build, family, marker, with_gptq, window = RELEASES[hf_class]
    out = tmp_path / "dist"
    text = recipe_text(build(), out, gguf='["Q8_0", {type = "Q4_K_M", imatrix = true}]', gptq=GPTQ if with_gptq else "")
    result = release(load_recipe(write_recipe(tmp_path, text.replace("\n[bench]", IMATRIX + "\n[bench]").replace(*NO_SPEED))))
    assert result.status == "ok"
    assert set(result.made) == {"base", "imatrix", "Q8_0", "Q4_K_M", "bench", *(["GPTQ-4bit-32g"] if with_gptq else [])}
    m = check_manifest(out)  # every artifact present with its sha256
    models = [a for a in m["artifacts"] if a["kind"] in ("gguf", "gptq")]
    assert {a["type"] for a in models} == {"BF16", "Q8_0", "Q4_K_M", *(["GPTQ-4bit-32g"] if with_gptq else [])}
    assert m["source"]["architecture"] == hf_class
    assert next(a for a in models if a["type"] == "Q4_K_M")["imatrix"] and (out / "imatrix.gguf").is_file()
    for a in models:  # a bench row for every artifact
        assert a["metrics"]["ppl"] > 0, a["path"]
        if a["kind"] == "gguf":  # llama.cpp loads and runs each GGUF
            with llama(out / a["path"], n_ctx=64) as llm:
                llm.eval(llm.tokenize(b"Hello there, how are you?"))
                assert np.isfinite(np.asarray(llm.scores[:4])).all()
                assert a.get("architecture") == llm.metadata["general.architecture"] and a.get("sliding_window") == window
        else:  # the GPTQ folder reloads in transformers
            import torch

            model = load_gptq_model(out / a["path"])
            with torch.no_grad():
                assert torch.isfinite(model(torch.tensor([[2, 3, 4, 5]])).logits).all()
    report = json.loads((out / "bench.json").read_text())
    assert len(report["rows"]) == len(models)
    card = (out / "README.md").read_text()
    assert hf_class in card and marker in card.split("## Prompt format", 1)[1].split("##", 1)[0]
    base = next(a for a in models if a["kind"] == "gguf")
    arch = base["architecture"]  # the sliding-window facts come from the converter, named by the GGUF's architecture
    does = {"exact": "honours the model's sliding window", "ignored": "attends to the whole context", None: None}[window]
    assert (f"llama.cpp's `{arch}` architecture, which {does}" in card) if does else "### Sliding window" not in card
    assert all(n in card for n in base.get("notes", []))
    mf = (out / "Modelfile").read_text()
    assert f"Chat template ({family})" in mf and f'TEMPLATE """{M.ollama_template(family, m["chat_template"]["example"])}"""' in mf
    for stop in M.OLLAMA_FAMILIES[family]:
        assert f"PARAMETER stop {json.dumps(stop)}" in mf
    assert ("# Conversion notes:" in mf) == bool(base.get("notes"))


@pytest.mark.parametrize("source", ["HuggingFaceTB-SmolLM3-3B", "Qwen3.5-4B", "Qwen-QwQ-32B", "mistralai-Mistral-Nemo-Instruct-2407"])
def test_variants_we_do_not_translate_get_no_template(source):
    """Their markers look like a family's, their prompts are not (a metadata system block, an opened <think>,
    no space after [INST]): the example check keeps the wrong TEMPLATE out and Ollama uses the GGUF's own."""
    template = _template(f"models/templates/{source}.jinja")
    ct = {"template": template, "family": M.family_of(template), "example": example(template, "<s>"), "bos": "<s>"}
    assert ct["family"] is not None and M.chat_family(ct) is None
    mf = M.render_modelfile({"name": "Tiny", "chat_template": ct, "artifacts": []}, "x.gguf")
    assert "# No TEMPLATE" in mf and 'TEMPLATE """' not in mf


@pytest.mark.parametrize("family", sorted(M.OLLAMA_FAMILIES))
def test_family_prompt_is_what_the_go_template_renders(family):
    for ex in ("", "[INST] S\n\nU[/INST]", "<|user|>U<|end|><|assistant|>"):
        tpl = M.ollama_template(family, ex or None)
        for system in ("S", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "U"}]
            assert render_go(tpl, system=system or "", messages=messages) == M.family_prompt(family, system, "U", ex)
