"""The release's template gate: each GGUF's embedded chat template must render, through
llama-cpp-python's Jinja formatter (what its chat completion uses when no chat_format is given),
exactly the prompt the source tokenizer's ``apply_chat_template`` renders, for a few conversations.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from edgequant.errors import EdgequantError, GateFailed

CONVERSATIONS = {
    "system + user": [{"role": "system", "content": "You are a concise assistant."},
                      {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Name three primes."}],
}


def _gguf_formatter(path: Path):
    """The formatter llama-cpp-python builds from a GGUF's metadata when no chat_format is given."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from edgequant.llamacpp import open_llama

    llm = open_llama(path, vocab_only=True)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
    finally:
        llm.close()
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)


def example_prompt(tokenizer) -> str | None:
    """The source's rendering of a system + user turn (user only when the template refuses a system message)."""
    for messages in (CONVERSATIONS["system + user"], CONVERSATIONS["system + user"][1:]):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template may raise on a system message
            continue
    return None


def check_template(gguf_path: Path, tokenizer) -> list[dict]:
    """Compare renderings; return one record per conversation; raise with a diff on any mismatch."""
    fmt = _gguf_formatter(gguf_path)
    has_source = bool(getattr(tokenizer, "chat_template", None))
    if fmt is None and not has_source:
        return []
    if fmt is None or not has_source:
        side = "the GGUF has no chat template" if fmt is None else "the source tokenizer has no chat template"
        raise GateFailed(f"template gate: {Path(gguf_path).name}: {side}; the other has one")
    records = []
    for name, messages in CONVERSATIONS.items():
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - the source refuses this conversation: nothing to compare
            records.append({"conversation": name, "status": "skipped (the source template refuses it)"})
            continue
        try:
            got = fmt(messages=messages).prompt
        except Exception as e:  # noqa: BLE001
            raise EdgequantError(f"template gate: {Path(gguf_path).name}: llama-cpp-python cannot render the embedded "
                                 f"template for a {name} conversation ({e})") from None
        if got != expected:
            diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(), "source (apply_chat_template)",
                                                  f"{Path(gguf_path).name} (llama-cpp-python)", lineterm=""))
            raise GateFailed(
                f"template gate: {Path(gguf_path).name} renders a {name} conversation differently from the source "
                f"tokenizer's template:\n{diff}\nfix the template (or set template_gate = false to ship it anyway)"
            )
        records.append({"conversation": name, "status": "identical"})
    return records
