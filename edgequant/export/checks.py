"""Checks of a written GGUF against the Hugging Face source, by llama.cpp itself (llama-cpp-python):

- ``token_ids``: llama.cpp tokenizes a probe text set to the HF tokenizer's ids;
- ``chat_template``: the embedded template, rendered by llama-cpp-python's Jinja formatter (what its chat
  completion uses), equals ``apply_chat_template``, and the prompt llama.cpp tokenizes has the HF ids and at
  most one BOS;
- ``end_of_generation``: every id of ``generation_config.json``'s ``eos_token_id`` ends generation in llama.cpp;
- ``logits``: a short F32/F16/BF16 comparison against transformers in float32, when transformers can run the
  model here (skipped with the reason otherwise).

A failed check raises ``EdgequantError`` with a diff; the caller removes the file. Each check returns a
``Check`` record (``ConvertResult.checks``).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path

from edgequant.checkpoint import Checkpoint
from edgequant.errors import EdgequantError

PROBE_TEXT = "Hello world. The quick brown fox jumps over 12345 lazy dogs, don't you think?\n  Indented: x = [1, 2]"
PROBE_TEXTS = (
    PROBE_TEXT,
    "Grüße aus Köln! Ça va? 日本語のテキスト, русский текст, emoji 🦙🚀 and a tab\there.",
    "def f(x):\n    return x ** 2  # 3.14159 1000000\n\n\n   trailing   spaces   ",
    "I've been 'told' he's there; 'RE you sure? 'M not sure I'll make it...!!!",
)
CONVERSATIONS = {
    "system + user": [{"role": "system", "content": "You are a concise assistant."},
                      {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "Name three primes."}],
}
# Largest difference to transformers over the largest |logit| that a file of this type may show.
LOGIT_TOLERANCE = {"F32": 1e-2, "F16": 3e-2, "BF16": 6e-2}


@dataclass
class Check:
    name: str
    status: str  # "passed", "skipped"
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _fail(files: list[Path], message: str) -> EdgequantError:
    for f in files:
        Path(f).unlink(missing_ok=True)
    return EdgequantError(message)


def _first_difference(got: list[int], want: list[int]) -> int:
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def check_token_ids(files: list[Path], reference, texts=(PROBE_TEXT,)) -> Check:
    """llama.cpp's tokenizer on the written file gives the HF tokenizer's ids for plain texts, or the file is
    removed: a vocabulary written in the wrong form (a SentencePiece tokenizer as byte-level BPE, a wrong
    --pre-tokenizer) is refused, not published."""
    if reference is None:
        return Check("token_ids", "skipped", "the HF tokenizer could not be loaded")
    from edgequant.llamacpp import open_llama

    llm = open_llama(files[0], vocab_only=True)
    try:
        for text in texts:
            want = list(reference.encode(text, add_special_tokens=False))
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            if got != want:
                i = _first_difference(got, want)
                ours = repr(llm._model.token_get_text(got[i])) if i < len(got) else "end"
                theirs = repr(reference.convert_ids_to_tokens(want[i])) if i < len(want) else "end"
                break
        else:
            return Check("token_ids", "passed", f"{len(texts)} probe texts tokenize to the HF tokenizer's ids")
    finally:
        llm.close()
    raise _fail(files, f"llama.cpp tokenizes the written file differently from the HF tokenizer ({text[:30]!r}..., "
                       f"token {i}: {ours} vs {theirs}); the file was removed. A wrong --pre-tokenizer, or a tokenizer "
                       f"the converter reads wrongly: please report it")


def check_chat_template(files: list[Path], reference, template: str | None = None) -> Check:
    """llama-cpp-python's rendering of the embedded template equals ``apply_chat_template``, token for token,
    with at most one BOS. ``template``: the one edgequant embedded instead of the source's (``--chat-template``,
    ``--template-bos add``), rendered by transformers as the reference."""
    use = {"chat_template": template} if template else {}
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from edgequant.llamacpp import open_llama

    has_source = bool(template or getattr(reference, "chat_template", None)) if reference is not None else False
    llm = open_llama(files[0], vocab_only=True)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template and not has_source:
            return Check("chat_template", "skipped", "neither the source nor the file has a chat template")
        if reference is None:
            return Check("chat_template", "skipped", "the HF tokenizer could not be loaded")
        if not template or not has_source:
            side = "the file has no chat template" if not template else "the source has no chat template"
            raise _fail(files, f"chat template: {side} but the other has one; the file was removed (pass --chat-template FILE)")
        bos_id, eos_id = llm.token_bos(), llm.token_eos()
        bos = llm._model.token_get_text(bos_id) if bos_id >= 0 else ""
        eos = llm._model.token_get_text(eos_id) if eos_id >= 0 else ""
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        compared = 0
        for name, messages in CONVERSATIONS.items():
            try:
                expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **use)
            except Exception:  # noqa: BLE001 - the source refuses this conversation (e.g. a system message)
                continue
            try:
                result = fmt(messages=messages)
            except Exception as e:  # noqa: BLE001
                raise _fail(files, f"llama-cpp-python cannot render the file's chat template for a {name} conversation "
                                   f"({type(e).__name__}: {e}); the file was removed (pass --chat-template FILE)") from None
            if result.prompt != expected:
                diff = "\n".join(difflib.unified_diff(expected.splitlines(), result.prompt.splitlines(),
                                                      "apply_chat_template", "llama-cpp-python", lineterm=""))
                raise _fail(files, f"the file's chat template renders a {name} conversation differently from the source "
                                   f"(the file was removed; pass --chat-template FILE):\n{diff}")
            ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
            want = list(reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False, **use))
            if bos_id >= 0 and ids.count(bos_id) > 1:
                raise _fail(files, f"a {name} chat prompt gets {ids.count(bos_id)} BOS tokens in llama.cpp; the file was "
                                   f"removed (the template emits BOS: use --template-bos keep, or fix the template)")
            if ids != want:
                i = _first_difference(ids, want)
                raise _fail(files, f"llama.cpp tokenizes the rendered {name} chat prompt differently from the source "
                                   f"(token {i}: {ids[i:i + 1]} vs {want[i:i + 1]}); the file was removed")
            compared += 1
    finally:
        llm.close()
    if not compared:
        return Check("chat_template", "skipped", "the source's template refuses the sample conversations")
    return Check("chat_template", "passed", f"{compared} conversations render and tokenize as apply_chat_template does")


def check_end_of_generation(files: list[Path], ckpt: Checkpoint) -> Check:
    """Each stop id of ``generation_config.json`` is in llama.cpp's end-of-generation set."""
    import llama_cpp

    from edgequant.export.vocab_eog import generation_eos_ids
    from edgequant.llamacpp import open_llama

    wanted = generation_eos_ids(ckpt)
    if not wanted:
        return Check("end_of_generation", "skipped", "generation_config.json names no eos_token_id")
    llm = open_llama(files[0], vocab_only=True)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        n = llm.n_vocab()
        missing = [(t, llm._model.token_get_text(t) if 0 <= t < n else None) for t in wanted
                   if not (0 <= t < n and llama_cpp.llama_vocab_is_eog(vocab, t))]
    finally:
        llm.close()
    if missing:
        listed = ", ".join(f"{t} ({text!r})" if text is not None else f"{t} (not in the vocabulary)" for t, text in missing)
        raise _fail(files, f"generation_config.json stops at {listed}, which llama.cpp's end-of-generation set does not "
                           f"hold (it would generate past the end of a turn); the file was removed: fix "
                           f"generation_config.json or the tokenizer's eos_token")
    return Check("end_of_generation", "passed", f"llama.cpp stops at every generation_config.json stop id {wanted}")


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_logits(files: list[Path], ckpt: Checkpoint, reference, file_type: str, *, n_params: int) -> Check:
    """llama.cpp's logits on a short probe equal transformers' (float32) within the file type's tolerance."""
    if file_type not in LOGIT_TOLERANCE:
        return Check("logits", "skipped", f"{file_type} files are compared only through edgequant bench")
    if reference is None:
        return Check("logits", "skipped", "the HF tokenizer could not be loaded")
    need = 4 * n_params + sum(Path(f).stat().st_size for f in files)
    free = _available_memory()
    if need > 0.6 * free:
        return Check("logits", "skipped", f"transformers in float32 needs about {need / 1e9:.1f} GB, "
                                          f"{free / 1e9:.1f} GB are free here (compare with edgequant bench)")
    import numpy as np
    import torch

    from edgequant.llamacpp import open_llama
    from edgequant.remote_code import load_kwargs

    ids = list(reference.encode(PROBE_TEXT))[:48]
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32, **load_kwargs(ckpt.path))
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        del model
    except Exception as e:  # noqa: BLE001 - transformers cannot run it here: say so, do not fail
        return Check("logits", "skipped", f"transformers cannot run the model here ({type(e).__name__}: {str(e)[:120]})")
    llm = open_llama(files[0], n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), logits_all=True,
                     type_k=0, type_v=0)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    if got.shape != ref.shape:
        raise _fail(files, f"llama.cpp's logits have shape {got.shape}, transformers' {ref.shape}; the file was removed")
    rel = float(np.abs(got - ref).max() / max(1e-6, float(np.abs(ref).max())))
    same = float((got.argmax(-1) == ref.argmax(-1)).mean())
    detail = f"max |llama.cpp - transformers| / max |logit| = {rel:.2e} over {len(ids)} tokens, argmax equal {same:.0%}"
    if rel > LOGIT_TOLERANCE[file_type]:
        raise _fail(files, f"the {file_type} file's logits differ from transformers' ({detail}, allowed "
                           f"{LOGIT_TOLERANCE[file_type]:.0e}); the file was removed: the converter or llama.cpp's runtime "
                           f"does not run this model as transformers does")
    return Check("logits", "passed", detail)
