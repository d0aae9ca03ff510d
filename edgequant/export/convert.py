"""``edgequant convert``: a Hugging Face folder to a GGUF file, as a library function."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

import edgequant
from edgequant.atomic import check_output_folder, check_writable
from edgequant.checkpoint import Checkpoint, open_checkpoint
from edgequant.errors import EdgequantError
from edgequant.gguf_info import KEY_SLIDING_WINDOW
from edgequant.export.archs import Architecture, architecture_for
from edgequant.export.checks import check_token_ids
from edgequant.export.options import CONVERTERS, DEFAULT_CONVERTER, DEFAULT_SLIDING_WINDOW, SLIDING_WINDOW_MODES
from edgequant.export.gguf_file import OUTTYPES, TensorChoice, choose_types, ftype_label, tensor_nbytes, write_gguf
from edgequant.export.template import ChatTemplates, check_templates, find_templates
from edgequant.export.vocab import Vocab, build_vocab

# Our own provenance keys, beside llama.cpp's.
KEY_VERSION = "edgequant.version"
KEY_FINGERPRINT = "edgequant.source.fingerprint"
KEY_SOURCE_ARCH = "edgequant.source.architecture"
KEY_BOS_POLICY = "edgequant.chat_template.bos"


@dataclass
class ConvertResult:
    """What ``convert`` wrote (``--json`` prints it)."""

    files: list[str]
    outtype: str
    architecture: str
    hf_architecture: str
    n_params: int
    size_bytes: int
    bits_per_weight: float
    seconds: float
    tokenizer: str
    pre_tokenizer: str
    chat_template_source: str | None
    bos_policy: str | None
    fingerprint: str
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sliding_window: str | None = None  # "exact", "ignored" (the runtime attends to everything), None: no window
    converter: str = "native"  # "native" (edgequant's own) or "llama.cpp" (its convert_hf_to_gguf.py)
    checks: list[dict] = field(default_factory=list)  # export.checks records: name, status, detail

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_outtype(outtype: str, source_dtype: torch.dtype | None) -> gguf.LlamaFileType:
    """``--outtype`` as llama.cpp's file type (``auto``: BF16 for a bf16 checkpoint, else F16)."""
    key = outtype.lower()
    if key == "auto":  # llama.cpp's rule: the first matrix's dtype, F16 otherwise
        return OUTTYPES["bf16"] if source_dtype == torch.bfloat16 else OUTTYPES["f16"]
    if key not in OUTTYPES:
        raise EdgequantError(f"--outtype {outtype!r} is not a converter type; use one of {', '.join([*OUTTYPES, 'auto'])} (k-quants: edgequant quantize)")
    return OUTTYPES[key]


def convert(
    source: str | Path,
    output: str | Path | None = None,
    *,
    outtype: str = "auto",
    chat_template: str | Path | None = None,
    template_bos: str = "keep",
    pre_tokenizer: str | None = None,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
    model_name: str | None = None,
    force: bool = False,
    sliding_window: str = DEFAULT_SLIDING_WINDOW,
    converter: str = DEFAULT_CONVERTER,
) -> ConvertResult:
    """Convert ``source`` (an HF folder or hub id) into GGUF under ``output`` (a folder or a ``.gguf`` path).

    ``converter``: ``auto`` (edgequant's own where it has the architecture, else llama.cpp's
    ``convert_hf_to_gguf.py`` of the installed llama-cpp-python), ``native`` or ``llama.cpp``."""
    t0 = time.perf_counter()
    _check_arguments(output, outtype, template_bos, split_max_size, split_max_tensors, converter)
    if sliding_window not in SLIDING_WINDOW_MODES:  # before reading any weights
        raise EdgequantError(f"--sliding-window {sliding_window!r}: use {' or '.join(SLIDING_WINDOW_MODES)}")
    ckpt = open_checkpoint(source)
    if uses_llama_cpp(ckpt.hf_architecture, converter):
        from edgequant.export.delegate import convert_with_llama_cpp

        return convert_with_llama_cpp(ckpt, output, outtype=outtype, chat_template=chat_template,
                                      template_bos=template_bos, pre_tokenizer=pre_tokenizer,
                                      split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                                      model_name=model_name, force=force, t0=t0, asked=converter)
    try:
        src = _read_source(ckpt, outtype, chat_template, template_bos, pre_tokenizer, sliding_window)
    except EdgequantError as e:
        if converter == "native" and str(e).startswith("unsupported architecture"):
            raise EdgequantError(f"{e}; --converter auto or llama.cpp converts it with llama.cpp's converter") from None
        raise
    final, meta = _final_path(src.ckpt, src.arch, src.choices, src.ftype, output, model_name)
    files = write_gguf(final, src.arch.arch_name, src.choices, _metadata_writer(src, meta),
                       split_max_tensors=split_max_tensors, split_max_size=split_max_size, force=force,
                       description=f"{src.ckpt.path.name} -> {ftype_label(src.ftype)}")
    from edgequant.llamacpp import verify_written

    verify_written(files)  # llama.cpp loads it (hparams, vocabulary, every tensor's shape), or it is removed
    tokens = check_token_ids(files, src.vocab.reference)
    result = _result(src, files, time.perf_counter() - t0)
    result.checks = [tokens.to_dict()]
    return result


def uses_llama_cpp(hf_architecture: str, converter: str = DEFAULT_CONVERTER) -> bool:
    """Whether ``converter`` means llama.cpp's converter for this architecture (``auto``: where edgequant has none)."""
    from edgequant.export.archs import supported

    if converter == "llama.cpp":
        return True
    if converter == "native" or hf_architecture in supported():
        return False
    return True


def _check_arguments(output, outtype: str, template_bos: str, split_max_size: int, split_max_tensors: int,
                     converter: str = DEFAULT_CONVERTER) -> None:
    """Refuse bad options before reading the checkpoint."""
    if converter not in CONVERTERS:
        raise EdgequantError(f"--converter {converter!r}: use {', '.join(CONVERTERS)}")
    if split_max_size < 0 or split_max_tensors < 0:
        raise EdgequantError("--split-max-size and --split-max-tensors must be positive (or 0 for no split)")
    if output is not None and Path(output).suffix != ".gguf":
        check_output_folder(Path(output))
    if outtype.lower() not in (*OUTTYPES, "auto"):
        raise EdgequantError(f"--outtype {outtype}: this converter writes {', '.join(OUTTYPES)} or auto; llama.cpp's "
                             f"quant types go through edgequant.quantize.to_quant.convert (what `edgequant convert` calls)")
    if template_bos not in ("keep", "add"):
        raise EdgequantError(f"--template-bos {template_bos!r}: use keep or add")


@dataclass
class _Source:
    """Everything convert reads from the checkpoint before writing: architecture, types, vocabulary, template."""

    ckpt: Checkpoint
    arch: Architecture
    ftype: gguf.LlamaFileType
    vocab: Vocab
    templates: ChatTemplates
    choices: list[TensorChoice]
    fingerprint: str


def _read_source(ckpt: Checkpoint, outtype: str, chat_template, template_bos: str, pre_tokenizer: str | None,
                 sliding_window: str = DEFAULT_SLIDING_WINDOW) -> _Source:
    """Check what llama.cpp will need from the opened checkpoint: the vocabulary, the chat template
    (its BOS policy) and embedding rows that match the token count."""
    arch = architecture_for(ckpt.hf_architecture)(ckpt, sliding_window=sliding_window)
    ftype = resolve_outtype(outtype, ckpt.source_dtype())
    vocab = build_vocab(ckpt, pre_tokenizer)
    templates = find_templates(ckpt, Path(chat_template) if chat_template else None)
    check_templates(templates, bos_token=vocab.token_text("bos"), eos_token=vocab.token_text("eos"),
                    add_bos=vocab.add_bos, template_bos=template_bos)
    vocab.resolve_end_of_generation(ckpt, templates.default)
    plan = arch.plan()
    _check_vocab_rows(plan, len(vocab.tokens), ckpt.config.get("vocab_size"))
    return _Source(ckpt, arch, ftype, vocab, templates, choose_types(plan, ftype), ckpt.fingerprint())


def _metadata_writer(src: _Source, meta: gguf.Metadata) -> Callable[[gguf.GGUFWriter], None]:
    """The function that writes the file's key/values: llama.cpp's, then our provenance keys."""

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(w)
        src.arch.write_hparams(w)
        w.add_file_type(src.ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        src.vocab.write(w)
        value = src.templates.gguf_value()
        if value is not None:
            w.add_chat_template(value)
        w.add_string(KEY_VERSION, edgequant.__version__)
        w.add_string(KEY_FINGERPRINT, src.fingerprint)
        w.add_string(KEY_SOURCE_ARCH, src.ckpt.hf_architecture)
        if src.templates.bos_policy:
            w.add_string(KEY_BOS_POLICY, src.templates.bos_policy)
        if src.arch.window:
            w.add_string(KEY_SLIDING_WINDOW, src.arch.window)

    return add_metadata


def _result(src: _Source, files: list[Path], seconds: float) -> ConvertResult:
    """What was written: files, sizes, bits per weight, and what was decided on the way."""
    size = sum(f.stat().st_size for f in files)
    data_bytes = sum(tensor_nbytes(c.planned.shape, c.qtype) for c in src.choices)
    n_params = sum(c.planned.n_elements for c in src.choices)
    return ConvertResult(
        files=[str(f) for f in files],
        outtype=ftype_label(src.ftype),
        architecture=src.arch.arch_name,
        hf_architecture=src.ckpt.hf_architecture,
        n_params=n_params,
        size_bytes=size,
        bits_per_weight=round(8 * data_bytes / n_params, 4),
        seconds=round(seconds, 3),
        tokenizer=src.vocab.model,
        pre_tokenizer=src.vocab.pre,
        chat_template_source=src.templates.source,
        bos_policy=src.templates.bos_policy,
        fingerprint=src.fingerprint,
        fallbacks=[c.fallback for c in src.choices if c.fallback],
        notes=src.arch.notes + src.vocab.notes + src.templates.notes,
        sliding_window=src.arch.window,
    )


def _final_path(ckpt, arch, choices, ftype, output, model_name):
    """The output path (llama.cpp's naming convention, or ``<--name>-<TYPE>.gguf``) and the metadata it came from."""
    # Parameter counts for the size label, as gguf-py's writer counts them (experts apart).
    counter = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    for c in choices:
        counter.add_tensor_info(c.planned.name, c.planned.shape, np.dtype(np.float32), 0, raw_dtype=c.qtype)
    total, shared, expert, n_expert = counter.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.path, model_name, total)
    if meta.name is None:
        meta.name = ckpt.path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    out = Path(output) if output is not None else Path.cwd()
    if out.suffix == ".gguf":
        return out, meta
    if model_name:  # --name names the file too: <name>-<TYPE>.gguf
        stem = gguf.naming_convention(model_name, None, None, None, None, ftype_label(ftype))
    else:
        stem = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label,
                                      ftype_label(ftype))
    return out / f"{stem}.gguf", meta


def planned_path(source, output, model_name=None) -> Path:
    """Where ``convert(source, output, outtype="auto")`` would write, without converting anything."""
    ckpt = open_checkpoint(source)
    ftype = resolve_outtype("auto", ckpt.source_dtype())
    if uses_llama_cpp(ckpt.hf_architecture):
        from edgequant.export.delegate import planned_name

        return planned_name(ckpt, ftype, output, model_name)
    arch = architecture_for(ckpt.hf_architecture)(ckpt)
    return _final_path(ckpt, arch, choose_types(arch.plan(), ftype), ftype, output, model_name)[0]


def _check_vocab_rows(plan, n_tokens: int, config_vocab) -> None:
    """llama.cpp refuses a file whose embedding (and output) rows differ from its token count."""
    for t in plan:
        if t.name in ("token_embd.weight", "output.weight") and t.shape and t.shape[0] != n_tokens:
            raise EdgequantError(
                f"{t.sources[0] if t.sources else t.name} has {t.shape[0]} rows but the vocabulary has {n_tokens} tokens "
                f"(config.json vocab_size {config_vocab}); the checkpoint is inconsistent: fix vocab_size or the weights"
            )
