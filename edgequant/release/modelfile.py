"""The release's Ollama ``Modelfile``, rendered from its manifest.

The Modelfile points ``FROM`` at one GGUF of the release and carries a ``TEMPLATE`` in Ollama's Go
template syntax for the chat families in ``OLLAMA_FAMILIES`` (ChatML, ChatML with Qwen3's ``<think>``
switch, Mistral ``[INST]``, Llama 3, Gemma turns, Phi-3 ``<|user|>``), their stop tokens, and the
system prompt the chat template inserts when a conversation has none.
For any other template it leaves the template out, and Ollama derives one from the GGUF's
``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from edgequant.errors import EdgequantError
from edgequant.gguf_info import parse_shard_name
from edgequant.release.manifest import ChatTemplate, GGUFArtifact, Manifest, as_manifest
from edgequant.release.template_gate import CONVERSATIONS

# Go templates for Ollama. The system prompt comes from .System (Ollama also fills it from SYSTEM and from
# system messages), so system messages in .Messages are skipped; a last assistant message stays open so
# Ollama can continue it. BOS is not written: Ollama adds it from the GGUF's tokenizer settings.
_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

# Mistral [INST]: the system prompt goes in front of the last user message (Mistral's v3 templates; the
# older ones reject system messages). CLOSE is " [/INST]" (v1/v2) or "[/INST]" (v3), read from the example.
_MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }}CLOSE
{{- else if eq .Role "assistant" }}SPACE{{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}"""

_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

# ChatML with a thinking switch (Qwen3): the generation prompt is ChatML's; Ollama's think=false adds the
# empty <think></think> block enable_thinking=false renders. History keeps only the answers (.Content; Ollama
# parses the thinking into .Thinking), as the Jinja template strips it before the last user message; a
# last assistant message being continued gets its thinking block, as in the Jinja template. Mentioning
# .Thinking between <think> and </think> is what makes Ollama treat the model as a thinking one.
_CHATML_THINK = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if $last }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"""

# Gemma: no system turn; the system prompt opens the first user turn, followed by a blank line (Gemma 3's
# templates; Gemma 2's refuse a system message, so this is the nearest prompt). The assistant is "model".
# The Jinja templates trim each message; Go templates cannot, so the content goes in as Ollama has it.
_GEMMA = """{{- $system := .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# Phi-3: <|system|>, <|user|>, <|assistant|> turns closed by <|end|>. NL is the newline after each role tag
# and after <|end|> (Phi-3 and 3.5 write it; Phi-4-mini does not), read from the example. No trimming action
# ({{-) follows an NL: it would eat the newline.
_PHI3 = """{{- if .System }}<|system|>NL{{ .System }}<|end|>NL{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|user|>NL{{ .Content }}<|end|>NL{{ else if eq .Role "assistant" }}<|assistant|>NL{{ .Content }}
{{- if not $last }}<|end|>NL{{ end }}{{ end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>NL{{ end }}
{{- end }}"""

OLLAMA_FAMILIES = {  # family -> its stop tokens
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "chatml-think": ["<|im_end|>", "<|im_start|>"],
    "mistral": ["[INST]", "[/INST]", "</s>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>"],
}


def ollama_name(name: str) -> str:
    """The model name for ``ollama create``: lower case, only ``[a-z0-9._-]``."""
    n = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return n or "model"


def _chat(chat_template: ChatTemplate | Mapping[str, Any] | None) -> ChatTemplate | None:
    return ChatTemplate.from_dict(chat_template) if isinstance(chat_template, Mapping) else chat_template


def chat_family(chat_template: ChatTemplate | Mapping[str, Any] | None) -> str | None:
    """The manifest's family when we know it, else one recognised from the Jinja source; None otherwise,
    and None when the source's rendered example is not the family's prompt (a variant we do not translate)."""
    ct = _chat(chat_template)
    if ct is None:
        return None
    family = ct.family.lower() if ct.family else family_of(ct.template or "")
    if family not in OLLAMA_FAMILIES:
        return None
    return family if not ct.example or renders_example(family, ct.example, ct.bos) else None


def family_prompt(family: str, system: str | None, user: str, example: str = "") -> str:
    """What the family's Ollama template renders for one user message (after a system prompt, if any),
    BOS aside; ``example`` decides the spacing variants, as in :func:`ollama_template`."""
    sys_first = f"{system}\n\n" if system else ""
    if family in ("chatml", "chatml-think"):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if family == "llama3":
        def h(role: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        return (f"{h('system')}{system}<|eot_id|>" if system else "") + f"{h('user')}{user}<|eot_id|>{h('assistant')}"
    if family == "mistral":
        return f"[INST] {sys_first}{user}{' [/INST]' if ' [/INST]' in example or not example else '[/INST]'}"
    if family == "gemma":
        return f"<start_of_turn>user\n{sys_first}{user}<end_of_turn>\n<start_of_turn>model\n"
    nl = "\n" if "<|end|>\n" in example or not example else ""
    return (f"<|system|>{nl}{system}<|end|>{nl}" if system else "") + f"<|user|>{nl}{user}<|end|>{nl}<|assistant|>{nl}"


def renders_example(family: str, example: str, bos: str | None = None) -> bool:
    """Whether the source template's rendering of the example conversation (system + user, or the user
    message alone when the template refuses a system message) is the family's prompt, BOS aside."""
    system, user = (m["content"] for m in CONVERSATIONS["system + user"])
    expected = family_prompt(family, system if system in example else None, user, example)
    return example.endswith(expected) and example[:-len(expected)] in ("", bos or "")


def family_of(template: str) -> str | None:
    """The family a Jinja chat template belongs to, recognised from its markers; None for any other."""
    if "<|im_start|>" in template:  # Qwen3's switch: enable_thinking false renders an empty <think></think>
        return "chatml-think" if "enable_thinking" in template and "</think>" in template else "chatml"
    if "<start_of_turn>" in template and "<end_of_turn>" in template:
        return "gemma"
    if all(tag in template for tag in ("<|user|>", "<|assistant|>", "<|end|>")) or (
            "'<|' + message['role'] + '|>'" in template and "<|end|>" in template):  # Phi-4-mini builds the tag
        return "phi3"
    if "<|start_header_id|>" in template and "Cutting Knowledge" not in template:  # 3.1+ add a dated system header
        return "llama3"
    if "[INST]" in template and "<<SYS>>" not in template:  # Llama 2's [INST] <<SYS>> is another format
        return "mistral"
    return None


def ollama_template(family: str, example: str | None = None) -> str:
    """The Go template for a family in ``OLLAMA_FAMILIES``."""
    if family == "chatml":
        return _CHATML
    if family == "chatml-think":
        return _CHATML_THINK
    if family == "gemma":
        return _GEMMA
    if family == "phi3":
        return _PHI3.replace("NL", "\n" if example is None or "<|end|>\n" in example else "")
    if family == "llama3":
        return _LLAMA3
    if family == "mistral":
        spaced = example is None or " [/INST]" in example
        return _MISTRAL.replace("CLOSE", " [/INST]" if spaced else "[/INST]").replace("SPACE", "" if spaced else " ")
    raise ValueError(f"no Ollama template for {family!r}")


def default_system_prompt(chat_template: ChatTemplate | None) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2 does), or None.

    ``default_system`` when the manifest has it; else, for ChatML, read from the template rendered
    with a lone user message."""
    ct = chat_template
    if ct is None:
        return None
    if ct.default_system is not None:
        return ct.default_system or None
    if chat_family(ct) not in ("chatml", "chatml-think") or not ct.template:
        return None
    try:
        from edgequant.export.template import render

        eos = (ct.eos_tokens or ["<|im_end|>"])[0]
        text = render(ct.template, CONVERSATIONS["system + user"][1:], bos_token=ct.bos or "", eos_token=eos)
    except Exception:  # a template that cannot render alone: no default system prompt to report
        return None
    mt = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return mt.group(1) if mt else None


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render_modelfile(manifest: Manifest | Mapping[str, Any], gguf_file: str) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a file name in the release folder)."""
    m = as_manifest(manifest)
    name = m.name or "model"
    ct = m.chat_template
    on = ollama_name(name)
    lines = [f"# Ollama Modelfile for {name}, written by edgequant {m.versions.edgequant or '?'}.",
             f"#   ollama create {on} -f Modelfile && ollama run {on}"]
    if parse_shard_name(gguf_file):
        lines.append("# This GGUF is split in parts; if Ollama refuses it, merge the parts with llama-gguf-split --merge "
                     "and point FROM at the merged file.")
    gguf = next((a for a in m.models if isinstance(a, GGUFArtifact) and a.path == gguf_file), None)
    if gguf is not None and gguf.notes:  # the converter's word on the file: which runtimes load it, what differs
        lines.append("# Conversion notes:")
        lines += ["# - " + " ".join(n.split()) for n in gguf.notes]
    lines.append(f"FROM ./{gguf_file}")
    lines += _template_lines(ct)
    family = chat_family(ct)
    stops = list(OLLAMA_FAMILIES.get(family or "", [])) + [t for t in (ct.eos_tokens if ct else []) if t]
    if stops:
        lines.append("")
        lines += [f"PARAMETER stop {_quote(s)}" for s in dict.fromkeys(stops)]
    system = default_system_prompt(ct)
    if system:
        lines.append("")
        if '"""' in system:
            lines.append("# The model's default system prompt contains triple quotes and is left out; set one with /set system.")
        else:
            lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def _template_lines(ct: ChatTemplate | None) -> list[str]:
    """The ``TEMPLATE`` for a known family, else a comment saying why there is none."""
    family = chat_family(ct)
    if not family:
        return ["", "# No TEMPLATE: this chat template is not one edgequant translates (" + ", ".join(OLLAMA_FAMILIES) + ");",
                "# Ollama derives a template from the GGUF's tokenizer.chat_template metadata. If chat replies look",
                "# wrong, add a TEMPLATE in Go template syntax (https://docs.ollama.com/template)."]
    tpl = ollama_template(family, ct.example)
    if '"""' in tpl:  # cannot happen with our templates; guard the quoting anyway
        raise EdgequantError("internal: Ollama template contains triple quotes")
    return ["", f"# Chat template ({family}), in Ollama's Go template syntax.", f'TEMPLATE """{tpl}"""']
