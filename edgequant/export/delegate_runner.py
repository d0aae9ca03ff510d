"""Runs llama.cpp's own ``convert_hf_to_gguf.py`` in a subprocess, with three hooks (``edgequant.export.delegate``
starts it; nothing here is llama.cpp's code, and nothing of llama.cpp's is copied):

- progress: the converter's tqdm bars (``Writing``) are silenced and reported as events instead;
- the pre-tokenizer: a name from ``--pre-tokenizer`` replaces llama.cpp's hash lookup (which knows only
  the tokenizers listed in its ``get_vocab_base_pre``);
- model-folder code runs only with ``--trust-remote-code`` (the converter asks transformers for it everywhere);
- metadata edits: keys edgequant adds or replaces (provenance, ``--chat-template``, ``--template-bos``,
  ``generation_config.json`` stop ids llama.cpp would not stop at, into a free ``eot``/``eom`` key as
  edgequant's own converter does) are set on the converter's ``GGUFWriter`` just before it writes the header, so the
  file is written once, never rewritten.

Usage (internal): ``python -P delegate_runner.py SPEC.json``; the spec names the unpacked converter folder,
its command line and the edits. Events go to stderr as lines starting with ``EVENT_PREFIX`` followed by
JSON; everything else on stderr is the converter's own log. This file imports nothing of edgequant: it
runs against the converter's own ``gguf-py``.
"""

from __future__ import annotations

import json
import sys

EVENT_PREFIX = "\x1eedgequant-event "
EXIT_REPORTED = 3  # the failure was reported as an event


def emit(kind: str, **fields) -> None:
    sys.stderr.write(EVENT_PREFIX + json.dumps({"event": kind, **fields}) + "\n")
    sys.stderr.flush()


def _hook_progress() -> None:
    import tqdm

    init, update = tqdm.tqdm.__init__, tqdm.tqdm.update

    def __init__(self, *args, **kwargs):
        desc, total = kwargs.get("desc"), kwargs.get("total")
        kwargs["disable"] = True  # edgequant draws the bar
        init(self, *args, **kwargs)
        self._edgequant_desc = desc
        if desc == "Writing":
            emit("bar", desc=desc, total=total)

    def update_(self, n=1):
        if getattr(self, "_edgequant_desc", None) == "Writing":
            emit("advance", n=n)
        return update(self, n)

    tqdm.tqdm.__init__, tqdm.tqdm.update = __init__, update_


def _hook_tensors(gguf) -> None:
    add = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, *args, **kwargs):
        emit("tensor", name=name)
        return add(self, name, *args, **kwargs)

    gguf.GGUFWriter.add_tensor = add_tensor


def _hook_pre_tokenizer(name: str | None) -> None:
    from conversion import base

    lookup = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        if name:
            return name
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:
            emit("unknown_pre_tokenizer")
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def _hook_remote_code(trust: bool) -> None:
    """edgequant's rule for model-folder code (never run unless --trust-remote-code) over the converter's
    own ``trust_remote_code=True``."""
    import transformers

    for name in ("AutoTokenizer", "AutoConfig", "AutoProcessor"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        load = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, _load=load, **kwargs):
            kwargs["trust_remote_code"] = trust
            return _load(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(from_pretrained)


def _value(gguf, spec: dict):
    vtype = gguf.GGUFValueType[spec["type"]]
    sub = gguf.GGUFValueType[spec["sub_type"]] if spec.get("sub_type") else None
    return spec["value"], vtype, sub


def _end_of_generation(writer, gguf, kv: dict, eog: dict) -> None:
    """Stop ids of generation_config.json that llama.cpp would not stop at (by its eos/eot/eom keys or the
    token texts edgequant passes, which llama.cpp knows) go into a free eot or eom key."""
    T = gguf.Keys.Tokenizer
    field = kv.get(T.LIST)
    if field is None:
        return
    tokens, texts = field.value, set(eog["texts"])
    slots = {"eot": T.EOT_ID, "eom": T.EOM_ID}
    ids = {k: kv[key].value for k, key in (("eos", T.EOS_ID), *slots.items()) if key in kv}
    stops = {i for i, t in enumerate(tokens) if t in texts} | set(ids.values())
    for tid in eog["wanted"]:
        if not 0 <= tid < len(tokens) or tid in stops:
            continue
        slot = next((s for s in slots if s not in ids), None)
        if slot is None:
            emit("eog_unplaced", id=tid, text=tokens[tid])
            continue
        writer.add_uint32(slots[slot], tid)
        ids[slot] = tid
        stops.add(tid)
        emit("eog_added", id=tid, text=tokens[tid], slot=slot)


def _hook_metadata(gguf, edits: dict) -> None:
    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_to_file(self, *args, **kwargs):
        kv = self.kv_data[0] if self.kv_data else {}
        if "chat_template" in edits:  # replace every template key the converter wrote
            for key in [k for k in kv if k.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE)]:
                del kv[key]
            if edits["chat_template"] is not None:
                self.add_chat_template(edits["chat_template"])
        for key, spec in edits.get("set", {}).items():
            value, vtype, sub = _value(gguf, spec)
            kv.pop(key, None)
            self.add_key_value(key, value, vtype, sub_type=sub)
        if edits.get("eog"):
            _end_of_generation(self, gguf, kv, edits["eog"])
        tokens = kv.get(gguf.Keys.Tokenizer.LIST)
        emit("header", n_tokens=len(tokens.value) if tokens is not None else None)
        return write_header(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_to_file


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    converter = spec["converter"]
    sys.path[:0] = [converter, f"{converter}/gguf-py"]  # its own gguf-py, as the converter itself would
    try:
        import gguf

        _hook_progress()
        _hook_tensors(gguf)
        _hook_metadata(gguf, spec.get("edits", {}))
        import convert_hf_to_gguf

        _hook_pre_tokenizer(spec.get("pre_tokenizer"))
        _hook_remote_code(bool(spec.get("trust_remote_code")))
        sys.argv = ["convert_hf_to_gguf.py", *spec["argv"]]
        convert_hf_to_gguf.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ModuleNotFoundError as e:
        emit("missing_module", module=e.name or str(e))
        return EXIT_REPORTED
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - reported in one line by edgequant; the traceback is in the log
        import traceback

        traceback.print_exc()
        emit("error", type=type(e).__name__, message=str(e).strip().splitlines()[0] if str(e).strip() else "")
        return EXIT_REPORTED
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(code)  # the converter closed its files; skip torch's seconds-long interpreter teardown
