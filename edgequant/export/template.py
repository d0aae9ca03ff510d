"""Chat templates: find them, render them once in a sandbox, embed them, and tell the BOS story.

Sources, first found wins for the default template: ``--chat-template FILE`` (``.jinja`` text or a
JSON file with ``chat_template``), ``chat_template.jinja``, ``chat_template.json``,
``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}``; named ones are kept as
``tokenizer.chat_template.<name>``).

BOS: llama-cpp-python's Jinja chat formatter tokenizes the rendered prompt with ``add_bos=False``
(it trusts the template), llama.cpp's server strips a leading BOS text when the vocabulary adds
BOS and then adds one. So a template that emits ``bos_token`` gets exactly one BOS in both; a
template without it, on a vocabulary that adds BOS, gets none through llama-cpp-python. We
render, detect which case the model is in and report it; ``--template-bos add`` prepends
``{{ bos_token }}`` when the template lacks it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgequant.checkpoint import Checkpoint
from edgequant.errors import EdgequantError

SAMPLE_SYSTEM = {"role": "system", "content": "You are a concise assistant."}
SAMPLE_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


class TemplateRaised(Exception):
    """The template itself called raise_exception (e.g. it rejects a system message)."""


@dataclass
class ChatTemplates:
    default: str | None
    named: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    sample: str | None = None
    bos_policy: str | None = None
    notes: list[str] = field(default_factory=list)

    def gguf_value(self) -> str | list[dict[str, str]] | None:
        if not self.named:
            return self.default
        value = [{"name": n, "template": t} for n, t in self.named.items()]
        if self.default is not None:
            value.insert(0, {"name": "default", "template": self.default})
        return value


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

    def raise_exception(message: str) -> None:
        raise TemplateRaised(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: str, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True, source: str = "chat template") -> str:
    """Render like transformers' apply_chat_template, sandboxed; syntax errors name line and fix."""
    env = _environment()
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise EdgequantError(
            f"{source} has a Jinja syntax error at line {e.lineno}: {e.message}; fix it or pass --chat-template FILE"
        ) from None
    return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt)


def render_sample(template: str, *, bos_token: str, eos_token: str, source: str) -> str:
    """The sample conversation, with a system message if the template accepts one."""
    last: Exception | None = None
    for messages in ([SAMPLE_SYSTEM, *SAMPLE_TURNS], SAMPLE_TURNS):
        try:
            return render(template, messages, bos_token=bos_token, eos_token=eos_token, source=source)
        except EdgequantError:
            raise
        except TemplateRaised as e:
            last = e
        except Exception as e:  # a runtime error inside the template
            raise EdgequantError(f"{source} fails to render a sample conversation ({type(e).__name__}: {e}); fix it or pass --chat-template FILE") from None
    raise EdgequantError(f"{source} rejects a plain user/assistant conversation ({last}); fix it or pass --chat-template FILE")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgequantError(f"{path} is not UTF-8 text (byte {e.start}); a chat template must be UTF-8: fix the file") from None


def _from_file(path: Path) -> str:
    if path.is_dir():
        raise EdgequantError(f"--chat-template {path} is a folder; pass a .jinja or .json file")
    if not path.is_file():
        raise EdgequantError(f"--chat-template {path}: no such file")
    text = _text(path)
    if path.suffix == ".json":
        try:
            value = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EdgequantError(f"{path} is not a JSON file with a chat_template key; pass a .jinja file or fix it") from None
        return value
    return text


def find_templates(ckpt: Checkpoint, override: Path | None = None) -> ChatTemplates:
    named: dict[str, str] = {}
    default: str | None = None
    source: str | None = None
    tok_cfg = ckpt.read_json("tokenizer_config.json") or {}
    value = tok_cfg.get("chat_template")
    if ckpt.file("chat_template.jinja"):
        value, source = _text(ckpt.file("chat_template.jinja")), "chat_template.jinja"
    elif ckpt.file("chat_template.json"):
        value, source = (ckpt.read_json("chat_template.json") or {}).get("chat_template"), "chat_template.json"
    elif value is not None:
        source = "tokenizer_config.json"
    if isinstance(value, list):
        for item in value:
            if item.get("name") == "default":
                default = item.get("template")
            elif item.get("name") and item.get("template"):
                named[item["name"]] = item["template"]
    elif isinstance(value, str):
        default = value
    if override is not None:
        default, source = _from_file(Path(override)), str(override)
    return ChatTemplates(default=default, named=named, source=source)


def check_templates(t: ChatTemplates, *, bos_token: str | None, eos_token: str | None, add_bos: bool,
                    template_bos: str = "keep") -> ChatTemplates:
    """Render every template once; settle and report the BOS policy. Raises on a broken template."""
    bos, eos = bos_token or "", eos_token or ""
    for name, tmpl in t.named.items():
        render_sample(tmpl, bos_token=bos, eos_token=eos, source=f"chat template {name!r} from {t.source}")
    if t.default is None:
        t.notes.append("no chat template found: the GGUF has none (pass --chat-template FILE to embed one)")
        return t
    sample = render_sample(t.default, bos_token=bos, eos_token=eos, source=f"chat template from {t.source}")
    emits_bos = bool(bos) and sample.startswith(bos)
    if emits_bos and sample[len(bos):].startswith(bos):
        raise EdgequantError(f"the chat template from {t.source} emits BOS twice at the start; fix it or pass --chat-template FILE")
    if emits_bos:
        t.bos_policy = "template"
        if add_bos:
            t.notes.append(
                "the template emits BOS and the vocabulary adds BOS: chat through llama-cpp-python or llama.cpp's server "
                "gets exactly one BOS (the former tokenizes chat prompts with add_bos=False, the latter strips the "
                "template's); if you tokenize a rendered prompt yourself, pass add_bos=False or you get two"
            )
    elif add_bos and bos:
        if template_bos == "add":
            t.default = "{{ bos_token }}" + t.default
            sample = bos + sample
            t.bos_policy = "template (added by --template-bos add)"
            t.notes.append("the template did not emit BOS although the model adds one; --template-bos add prepended {{ bos_token }}")
        else:
            t.bos_policy = "runtime"
            t.notes.append(
                "the template does not emit BOS although the vocabulary adds one: llama.cpp's server adds it, "
                "llama-cpp-python's chat formatter does not (prompts get no BOS there); pass --template-bos add to embed it"
            )
    else:
        t.bos_policy = "none"
    t.sample = sample
    _check_llama_cpp_python_substitution(t, bos, eos)
    return t


def _check_llama_cpp_python_substitution(t: ChatTemplates, bos: str, eos: str) -> None:
    """llama-cpp-python swaps a template equal to one it knows (ChatML, Mistral, Llama 3) for a
    hand-written formatter; say so when that formatter renders the sample differently."""
    try:
        from llama_cpp import llama_chat_format as lcf
    except ImportError:  # the runtime is optional for conversion
        return
    name = lcf.guess_chat_format_from_gguf_metadata({"tokenizer.chat_template": t.default})
    if name is None:
        return
    handler_fmt = {"chatml": lcf.format_chatml, "mistral-instruct": lcf.format_mistral_instruct,
                   "llama-3": lcf.format_llama3}.get(name)
    for messages in ([SAMPLE_SYSTEM, *SAMPLE_TURNS], SAMPLE_TURNS):
        try:
            ours = render(t.default, messages, bos_token=bos, eos_token=eos)
        except TemplateRaised:
            continue
        theirs = handler_fmt(messages=messages).prompt if handler_fmt else None
        if theirs is not None and theirs.removeprefix(bos) != ours.removeprefix(bos):
            t.notes.append(
                f"llama-cpp-python recognises this exact template and uses its built-in {name!r} formatter instead, "
                f"which renders differently ({theirs!r} vs the template's {ours!r}); its users should pass "
                f"chat_format='chat_template.default' (llama.cpp's server and Ollama are not affected)"
            )
        return
