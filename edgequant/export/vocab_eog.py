"""End of generation: make llama.cpp stop where the HF model's ``generation_config.json`` stops.

llama.cpp (src/llama-vocab.cpp) builds its end-of-generation (EOG) set when it loads a vocabulary from
the ids in ``tokenizer.ggml.eos_token_id``, ``eot_token_id`` and ``eom_token_id``, and from tokens whose
text it knows (``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ``<|eot_id|>``, ...). It has no key for
a list of stop ids, while transformers stops at every id of ``generation_config.json``'s
``eos_token_id``. So:

- ``eos`` stays the tokenizer's EOS token (what the chat template calls ``eos_token``);
- ``eot`` is the chat template's end-of-turn token: the special token the template writes right after
  an assistant message (``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ``<|eot_id|>``, Mistral's ``</s>``),
  even where it is EOS; llama.cpp's own converter mostly leaves it to llama.cpp's token-text guess, which
  takes whichever of ``<|im_end|>`` and ``<|endoftext|>`` its hash map yields first in a Qwen vocabulary;
- an id of ``generation_config.json`` that none of these covers takes the free ``eot`` or ``eom`` key
  (``eom`` means nothing else to llama.cpp than "also end of generation"); one that still cannot be
  made EOG is reported in a note.
"""

from __future__ import annotations

from typing import Any

from edgequant.checkpoint import Checkpoint

# Token texts llama.cpp makes EOG on their own (src/llama-vocab.cpp, vendored in llama-cpp-python 0.3.36).
LLAMACPP_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))
_MARK = "EDGEQUANT-ASSISTANT-MESSAGE"
_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]


def generation_eos_ids(ckpt: Checkpoint) -> list[int]:
    """The ids transformers stops at: generation_config.json's eos_token_id (int or list), else config.json's."""
    gen = ckpt.read_json("generation_config.json") or {}
    value: Any = gen.get("eos_token_id", ckpt.config.get("eos_token_id"))
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def template_end_of_turn(template: str | None, tokens: list[str], special: set[int], *, bos: str, eos: str) -> int | None:
    """The special token the chat template writes right after an assistant message, or None."""
    if not template:
        return None
    from edgequant.export.template import render

    try:
        text = render(template, _TURN, bos_token=bos, eos_token=eos, add_generation_prompt=False)
    except Exception:  # a template that wants other roles or variables: no guess
        return None
    at = text.find(_MARK)
    if at < 0:
        return None
    rest = text[at + len(_MARK):].lstrip()  # Llama 2: "{{ ' ' + content + ' ' + eos_token }}"
    found = [i for i in special if tokens[i] and rest.startswith(tokens[i])]
    return max(found, key=lambda i: len(tokens[i])) if found else None


def llamacpp_eog(tokens: list[str], special_ids: dict[str, int]) -> set[int]:
    """The EOG set llama.cpp will build for this vocabulary (the by-text part and the eos/eot/eom keys)."""
    eog = {i for i, t in enumerate(tokens) if t in LLAMACPP_EOG_TEXTS}
    eog |= {special_ids[r] for r in ("eos", "eot", "eom") if r in special_ids}
    texts = {tokens[i] for i in eog}
    if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts):
        eog -= {i for i in eog if tokens[i] == "<|end|>"}  # llama.cpp's gpt-oss / solar-open rule
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog -= {i for i in eog if tokens[i] == "</s>"}
    return eog


def resolve_end_of_generation(ckpt: Checkpoint, tokens: list[str], types: list[int], special_ids: dict[str, int],
                              template: str | None) -> list[str]:
    """Set ``special_ids['eot']`` / ``['eom']`` so that llama.cpp's EOG set holds every stop id; the notes."""
    import gguf

    special = {i for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)}
    bos = tokens[special_ids["bos"]] if "bos" in special_ids else ""
    eos = tokens[special_ids["eos"]] if "eos" in special_ids else ""
    eot = template_end_of_turn(template, tokens, special, bos=bos, eos=eos)
    if eot is not None:
        special_ids["eot"] = eot
    notes = []
    wanted = generation_eos_ids(ckpt)
    for tid in wanted:
        if not 0 <= tid < len(tokens):
            notes.append(f"generation_config.json stops at token id {tid}, which the {len(tokens)}-token vocabulary does not have")
            continue
        if tid in llamacpp_eog(tokens, special_ids):
            continue
        slot = next((r for r in ("eot", "eom") if r not in special_ids), None)
        if slot is None:
            notes.append(f"generation_config.json stops at {tokens[tid]!r} ({tid}) but llama.cpp's end-of-generation "
                         f"keys are taken: llama.cpp will not stop there (stop on that text in your runtime)")
            continue
        special_ids[slot] = tid
        notes.append(f"generation_config.json stops at {tokens[tid]!r} ({tid}), which llama.cpp would not: written as "
                     f"tokenizer.ggml.{slot}_token_id so that llama.cpp stops there too")
    return notes
