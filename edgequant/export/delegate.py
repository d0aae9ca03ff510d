"""Architectures edgequant does not convert itself, through llama.cpp's own ``convert_hf_to_gguf.py``.

The converter is the one the installed llama-cpp-python vendors (its sdist, unpacked once into the
cache by ``llamacpp_tools.converter_dir``): exactly the llama.cpp commit of the runtime that loads the
file. It runs in a subprocess (``delegate_runner.py``) with its own ``gguf-py``, like llama.cpp's
quantizer runs in process: edgequant copies none of its code. Around it edgequant does what it does for
its own files: the output name, a temporary folder and the ``*.part`` rename (nothing half-written under
a final name, Ctrl-C included), splitting, provenance keys, ``--chat-template`` / ``--template-bos`` as
metadata edits, its progress bar, one-line errors, and the checks of ``export.checks``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gguf

import edgequant
from edgequant.atomic import atomic_outputs, check_free_space, check_writable, remove_stale_temp_dirs, temp_dir
from edgequant.checkpoint import Checkpoint
from edgequant.errors import EdgequantError
from edgequant.export.delegate_runner import EVENT_PREFIX, EXIT_REPORTED
from edgequant.export.gguf_file import ftype_label
from edgequant.progress import progress_bytes, progress_count

CONVERTER_NAME = "llama.cpp"
KEY_CONVERTER = "edgequant.converter"  # "native", or "llama.cpp convert_hf_to_gguf.py (llama-cpp-python X)"
RUNNER = Path(__file__).with_name("delegate_runner.py")

# Python modules the converter may import whose pip package has another name.
_PIP_NAMES = {"google": "protobuf", "mistral_common": "mistral-common", "sentencepiece": "sentencepiece",
              "yaml": "pyyaml", "PIL": "pillow", "tiktoken": "tiktoken", "safetensors": "safetensors"}


@dataclass
class Delegated:
    """What llama.cpp's converter wrote (in the temporary folder) and what it said on the way."""

    files: list[Path]
    log: list[str]
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    events: list[dict] = field(default_factory=list)

    def notes(self) -> list[str]:
        out = []
        for ev in self.events:
            if ev["event"] == "eog_added":
                out.append(f"generation_config.json stops at {ev['text']!r} ({ev['id']}), which llama.cpp would not: "
                           f"written as tokenizer.ggml.{ev['slot']}_token_id so that llama.cpp stops there too")
            elif ev["event"] == "eog_unplaced":
                out.append(f"generation_config.json stops at {ev['text']!r} ({ev['id']}) but llama.cpp's "
                           f"end-of-generation keys are taken")
        return out


def converter_label() -> str:
    from edgequant.llamacpp_tools import installed_version

    return f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {installed_version()})"


def run_converter(ckpt: Checkpoint, out_dir: Path, *, outtype: str, pre_tokenizer: str | None, edits: dict,
                  split_max_size: int = 0, split_max_tensors: int = 0, model_name: str | None = None,
                  description: str = "") -> Delegated:
    """Run llama.cpp's converter on ``ckpt`` into ``out_dir`` (a fresh temporary folder); its errors
    become one line naming the fix, and ``out_dir`` keeps whatever it wrote for the caller to remove."""
    from edgequant.llamacpp_tools import converter_dir
    from edgequant.remote_code import trusted

    t0 = time.perf_counter()
    converter = converter_dir()
    argv = [str(ckpt.path), "--outfile", str(out_dir / "model.gguf"), "--outtype", outtype]
    if split_max_size:
        argv += ["--split-max-size", str(split_max_size)]
    if split_max_tensors:
        argv += ["--split-max-tensors", str(split_max_tensors)]
    if model_name:
        argv += ["--model-name", model_name]
    spec = {"converter": str(converter), "argv": argv, "pre_tokenizer": pre_tokenizer, "edits": edits,
            "trust_remote_code": trusted()}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cmd = [sys.executable, "-P", str(RUNNER), str(spec_path)]
    log: list[str] = []
    events: list[dict] = []
    echo = bool(os.environ.get("EDGEQUANT_VERBOSE"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", env=env, cwd=out_dir)
    try:
        with contextlib.ExitStack() as bars:
            reading = contextlib.ExitStack()  # one live bar at a time (rich allows no more): reading, then writing
            bars.enter_context(reading)
            tensors = reading.enter_context(progress_count(f"{description}: reading tensors", len(ckpt.tensors)))
            writing = None
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith(EVENT_PREFIX):
                    ev = json.loads(line[len(EVENT_PREFIX):])
                    events.append(ev)
                    if ev["event"] == "tensor":
                        tensors.advance(1)
                    elif ev["event"] == "bar" and ev.get("total"):
                        reading.close()
                        writing = bars.enter_context(progress_bytes(f"{description}: writing", int(ev["total"])))
                    elif ev["event"] == "advance" and writing is not None:
                        writing.advance(ev["n"])
                    continue
                log.append(line.rstrip("\n"))
                if echo:
                    sys.stderr.write(line)
        code = proc.wait()
    except BaseException:  # Ctrl-C or an error of ours: the converter goes too
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise EdgequantError(_error_line(code, events, log, ckpt))
    files = sorted(p for p in out_dir.glob("*.gguf"))
    if not files:
        raise EdgequantError(f"llama.cpp's converter exited without writing a file ({_last(log)}); "
                             f"run with EDGEQUANT_VERBOSE=1 to see its output")
    # logging's default format, LEVEL:logger:message
    fallbacks = [ln.split(":", 2)[-1].strip() for ln in log if "falling back to F16" in ln]
    return Delegated(files, log, fallbacks, time.perf_counter() - t0, events)


def _last(log: list[str]) -> str:
    useful = [ln.strip() for ln in log if ln.strip() and not ln.lstrip().startswith(("File ", "^", "~"))]
    return (useful[-1] if useful else "no output")[-300:]


def _error_line(code: int, events: list[dict], log: list[str], ckpt: Checkpoint) -> str:
    """One line naming the fix for what llama.cpp's converter reported."""
    kinds = {ev["event"]: ev for ev in events}
    if code in (130, -2):
        raise KeyboardInterrupt
    if "unknown_pre_tokenizer" in kinds:
        chkhsh = next((ln.split("chkhsh:", 1)[1].strip() for ln in log if "chkhsh:" in ln), "?")
        return (f"llama.cpp's converter does not recognise this BPE tokenizer (its hash {chkhsh[:12]}... is not in "
                f"get_vocab_base_pre); {_pre_tokenizer_hint(ckpt)}")
    if "missing_module" in kinds:
        module = kinds["missing_module"]["module"].split(".")[0]
        package = _PIP_NAMES.get(module, module)
        return f"llama.cpp's converter needs the Python module {module!r}: pip install {package}"
    tail = _last(log)
    if "is not supported" in tail or "not supported!" in tail:
        return (f"llama.cpp's converter of llama-cpp-python {_version()} does not convert {ckpt.hf_architecture} "
                f"either ({tail}); a newer llama-cpp-python may (pip install -U llama-cpp-python)")
    if "error" in kinds:
        ev = kinds["error"]
        what = f"{ev['type']}: {ev['message']}" if ev.get("message") else ev["type"]
        return (f"llama.cpp's converter failed on {ckpt.path.name} ({what[:300]}); the checkpoint may be incomplete "
                f"or a kind this llama.cpp cannot read (EDGEQUANT_VERBOSE=1 shows its log)")
    return f"llama.cpp's converter exited with status {code} ({tail}); EDGEQUANT_VERBOSE=1 shows its log"


def _version() -> str:
    from edgequant.llamacpp_tools import installed_version

    return installed_version()


def _pre_tokenizer_hint(ckpt: Checkpoint) -> str:
    """``--pre-tokenizer NAME``, with the name edgequant reads from tokenizer.json when it can."""
    from edgequant.export.pretokenizer import identify

    tj = ckpt.read_json("tokenizer.json")
    try:
        name = identify(tj, ckpt.read_json("tokenizer_config.json")) if tj else None
    except EdgequantError:
        name = None
    if name:
        return f"its tokenizer.json declares llama.cpp's {name!r} regexes: pass --pre-tokenizer {name} if that is right"
    return "pass --pre-tokenizer NAME with the llama.cpp name of its pre-tokenizer (gpt-2, llama-bpe, qwen2, ...)"


def kv(value, vtype: str, sub_type: str | None = None) -> dict:
    """A metadata edit for the runner: value and gguf-py value type names."""
    return {"value": value, "type": vtype, **({"sub_type": sub_type} if sub_type else {})}


def final_stem(first: Path, model_name: str | None) -> str:
    """edgequant's file name for a converted file: ``<--name>-<TYPE>`` or llama.cpp's naming convention
    (the same rule as native conversions) from the file's own metadata."""
    from edgequant.gguf_info import read_header

    md, _ = read_header(first)
    G = gguf.Keys.General
    label = ftype_label(gguf.LlamaFileType(md[G.FILE_TYPE]))
    if model_name:
        return gguf.naming_convention(model_name, None, None, None, None, label)
    return gguf.naming_convention(md.get(G.NAME), md.get(G.BASENAME), md.get(G.FINETUNE), md.get(G.VERSION),
                                  md.get(G.SIZE_LABEL), label)


def place(files: list[Path], output: Path, model_name: str | None, *, force: bool) -> list[Path]:
    """Move the checked files from the temporary folder to their final names (``.part`` then rename)."""
    from edgequant.gguf_info import shard_name

    if output.suffix == ".gguf":
        stem, folder = output.name.removesuffix(".gguf"), output.parent
    else:
        stem, folder = final_stem(files[0], model_name), output
    n = len(files)
    finals = [folder / f"{stem}.gguf"] if n == 1 else [folder / shard_name(stem, i, n) for i in range(1, n + 1)]
    check_writable(finals, force=force)
    with atomic_outputs(finals) as parts:
        for src, part in zip(files, parts):
            os.replace(src, part)
    return finals


@contextlib.contextmanager
def work_folder(folder: Path):
    """A fresh folder for the converter inside this process's temporary folder of ``folder`` (same file
    system: the files move out by rename), removed afterwards whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(folder)
    parent = temp_dir(folder)
    made = not parent.exists()
    work = parent / f"llama.cpp-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made:
            shutil.rmtree(parent, ignore_errors=True)


def estimate_bytes(ckpt: Checkpoint, outtype: str) -> int:
    """Disk the converted file needs, from the checkpoint's tensors (for the free-space check)."""
    per = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}[outtype]
    n = sum(t.nbytes // max(1, t.dtype.itemsize) for t in ckpt.tensors.values())
    return int(n * per) + 64 * 1024 * 1024


def provenance_edits(ckpt: Checkpoint, fingerprint: str) -> dict:
    from edgequant.export.convert import KEY_FINGERPRINT, KEY_SOURCE_ARCH, KEY_VERSION

    return {KEY_VERSION: kv(edgequant.__version__, "STRING"), KEY_FINGERPRINT: kv(fingerprint, "STRING"),
            KEY_SOURCE_ARCH: kv(ckpt.hf_architecture, "STRING"), KEY_CONVERTER: kv(converter_label(), "STRING")}


def planned_name(ckpt: Checkpoint, ftype: gguf.LlamaFileType, output, model_name: str | None) -> Path:
    """Where a delegated conversion will likely write (the size label from the checkpoint's own tensor
    count, which llama.cpp's may differ from slightly): for early checks only."""
    out = Path(output) if output is not None else Path.cwd()
    if out.suffix == ".gguf":
        return out
    label = ftype_label(ftype)
    if model_name:
        return out / f"{gguf.naming_convention(model_name, None, None, None, None, label)}.gguf"
    total = sum(t.nbytes // max(1, t.dtype.itemsize) for t in ckpt.tensors.values())
    meta = gguf.Metadata.load(None, ckpt.path, None, total)
    size = meta.size_label or (gguf.size_label(total, total, 0, 0) if total else None)
    stem = gguf.naming_convention(meta.name or ckpt.path.name, meta.basename, meta.finetune, meta.version, size, label)
    return out / f"{stem}.gguf"


def _hf_tokenizer(ckpt: Checkpoint, notes: list[str]):
    """The source's HF tokenizer (the checks' reference), or None with a note."""
    try:
        from transformers import AutoTokenizer

        from edgequant.remote_code import load_kwargs, refused

        with refused(ckpt.path):
            return AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
    except EdgequantError:
        raise
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not load the HF tokenizer ({type(e).__name__}: {str(e)[:160]}); the token and template "
                     f"checks were skipped")
        return None


def _template_edits(ckpt: Checkpoint, reference, chat_template, template_bos: str):
    """The chat template edgequant checks (and, with --chat-template or --template-bos add, embeds)."""
    from edgequant.export.template import check_templates, find_templates

    templates = find_templates(ckpt, Path(chat_template) if chat_template else None)
    bos = getattr(reference, "bos_token", None) if reference is not None else None
    eos = getattr(reference, "eos_token", None) if reference is not None else None
    add_bos = False
    if reference is not None and bos is not None:
        full = reference.encode("Hello world", add_special_tokens=True)
        add_bos = bool(full) and full[0] == reference.bos_token_id
    before = templates.default
    check_templates(templates, bos_token=bos, eos_token=eos, add_bos=add_bos, template_bos=template_bos)
    replace = chat_template is not None or templates.default != before
    return templates, replace


def convert_with_llama_cpp(ckpt: Checkpoint, output, *, outtype: str, chat_template, template_bos: str,
                           pre_tokenizer: str | None, split_max_size: int, split_max_tensors: int,
                           model_name: str | None, force: bool, t0: float, asked: str = "auto"):
    """``convert`` through llama.cpp's converter: edgequant's options, naming, checks and atomic output around it."""
    from edgequant.export.checks import (PROBE_TEXTS, check_chat_template, check_end_of_generation, check_logits,
                                         check_token_ids)
    from edgequant.export.convert import KEY_BOS_POLICY, ConvertResult, resolve_outtype
    from edgequant.export.pretokenizer import validate
    from edgequant.gguf_info import inspect_gguf
    from edgequant.llamacpp import verify_written

    ftype = resolve_outtype(outtype, ckpt.source_dtype())
    label = ftype_label(ftype)
    if pre_tokenizer:
        validate(pre_tokenizer)
    out = Path(output) if output is not None else Path.cwd()
    folder = out.parent if out.suffix == ".gguf" else out
    if not (split_max_size or split_max_tensors):  # before minutes of conversion (the final names are checked again)
        check_writable([planned_name(ckpt, ftype, out, model_name)], force=force)
    why = "--converter llama.cpp" if asked == "llama.cpp" else f"edgequant has no converter of its own for {ckpt.hf_architecture}"
    notes = [f"converted by {converter_label()} ({why}); edgequant's checks ran on its file"]
    reference = _hf_tokenizer(ckpt, notes)
    templates, replace = _template_edits(ckpt, reference, chat_template, template_bos)
    fingerprint = ckpt.fingerprint()
    from edgequant.export.vocab_eog import LLAMACPP_EOG_TEXTS, generation_eos_ids

    edits: dict = {"set": provenance_edits(ckpt, fingerprint),
                   "eog": {"wanted": generation_eos_ids(ckpt), "texts": sorted(LLAMACPP_EOG_TEXTS)}}
    if replace:
        edits["chat_template"] = templates.gguf_value()
    if templates.bos_policy:
        edits["set"][KEY_BOS_POLICY] = kv(templates.bos_policy, "STRING")
    check_free_space(folder, estimate_bytes(ckpt, label.lower()))
    with work_folder(folder) as work:
        done = run_converter(ckpt, work, outtype=label.lower(), pre_tokenizer=pre_tokenizer, edits=edits,
                             split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                             model_name=model_name, description=f"{ckpt.path.name} -> {label} (llama.cpp)")
        files = done.files
        verify_written(files)
        info = inspect_gguf(files[0])
        checks = [check_token_ids(files, reference, PROBE_TEXTS), check_chat_template(files, reference, templates.default if replace else None),
                  check_end_of_generation(files, ckpt),
                  check_logits(files, ckpt, reference, info.file_type or label, n_params=info.n_params)]
        finals = place(files, out, model_name, force=force)
    md = info.metadata
    T = gguf.Keys.Tokenizer
    return ConvertResult(
        files=[str(f) for f in finals],
        outtype=info.file_type or label,
        architecture=info.architecture or "?",
        hf_architecture=ckpt.hf_architecture,
        n_params=info.n_params,
        size_bytes=info.size_bytes,
        bits_per_weight=info.bits_per_weight,
        seconds=round(time.perf_counter() - t0, 3),
        tokenizer=md.get(T.MODEL, "?"),
        pre_tokenizer=md.get(T.PRE, "-"),
        chat_template_source=templates.source if md.get(T.CHAT_TEMPLATE) else None,
        bos_policy=templates.bos_policy,
        fingerprint=fingerprint,
        fallbacks=done.fallbacks,
        notes=notes + templates.notes + done.notes(),
        converter=CONVERTER_NAME,
        checks=[c.to_dict() for c in checks],
    )
