"""``edgequant convert``: a Hugging Face checkpoint to GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, TrustOpt, trust
from edgequant.cli.output import Table, err, out, print_fallbacks, run, say, show
from edgequant.errors import EdgequantError
from edgequant.export.options import DEFAULT_CONVERTER, DEFAULT_SLIDING_WINDOW
from edgequant.units import human_size


def convert(
    source: str = typer.Argument(..., help="HF model folder (or hub id org/name when online)."),
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0, auto (the source's 16-bit type), or a k-/i-quant such as Q4_K_M (through a temporary F16 file)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder, or a .gguf file path. Default: current folder."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="Embed this template (.jinja, or .json with chat_template) instead of the model's."),
    template_bos: str = typer.Option("keep", "--template-bos", help="keep, or add: prepend {{ bos_token }} when the template lacks it but the model adds BOS."),
    pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer", help="llama.cpp BPE pre-tokenizer name, when it cannot be identified."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Split into shards of at most this size (e.g. 50G)."),
    split_max_tensors: int = typer.Option(0, "--split-max-tensors", help="Split into shards of at most this many tensors."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name for metadata and the file name."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    sliding_window: str = typer.Option(DEFAULT_SLIDING_WINDOW, "--sliding-window", help="ignore: Mistral-family files as llama.cpp's llama architecture (attends to the whole context, loads everywhere); exact: granite_swa, equal to transformers past the window (llama.cpp from July 2026). docs/convert.md."),
    converter: str = typer.Option(DEFAULT_CONVERTER, "--converter", help="auto: edgequant's own converter where it has the architecture, else llama.cpp's convert_hf_to_gguf.py of the installed llama-cpp-python; native; llama.cpp. docs/convert.md."),
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Convert a Hugging Face checkpoint into GGUF (tokenizer and chat template embedded)."""
    trust(trust_remote_code)
    from edgequant.quantize.to_quant import convert as do_convert  # every --outtype, k-quants included

    result = run(
        lambda: do_convert(
            source, output, outtype=outtype, chat_template=chat_template, template_bos=template_bos,
            pre_tokenizer=pre_tokenizer, split_max_size=parse_size(split_max_size) if split_max_size else 0,
            split_max_tensors=split_max_tensors, model_name=name, force=force,
            sliding_window=sliding_window.lower(), converter=converter.lower(),
        ),
        as_json,
    )
    show(result, as_json, _render)


def parse_size(text: str) -> int:
    """``50G``, ``500M``, ``2K`` or a byte count; decimal units, like llama.cpp's --split-max-size."""
    from edgequant.units import parse_size as parse

    try:
        return parse(text)
    except ValueError:
        raise EdgequantError(f"--split-max-size {text!r}: use a size like 50G, 500M or a byte count") from None


def _render(result) -> None:
    """The converted file(s), size, tokenizer and template in one table; fallbacks and notes on stderr."""
    table = Table(title=f"{result.hf_architecture} -> GGUF {result.outtype}", show_header=False)
    for f in result.files:
        table.add_row("file", f)
    table.add_row("converter", "edgequant" if result.converter == "native" else "llama.cpp convert_hf_to_gguf.py")
    table.add_row("parameters", f"{result.n_params:,}")
    table.add_row("size", f"{human_size(result.size_bytes)} ({result.bits_per_weight:.2f} bits/weight)")
    table.add_row("tokenizer", f"{result.tokenizer} (pre: {result.pre_tokenizer})")
    table.add_row("chat template", f"{result.chat_template_source or 'none'} (BOS: {result.bos_policy or '-'})")
    if result.sliding_window:
        table.add_row("sliding window", f"{result.sliding_window} ({result.architecture})")
    for c in result.checks:
        table.add_row(f"check {c['name']}", f"{c['status']}: {c['detail']}" if c.get("detail") else c["status"])
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)
    print_fallbacks(result.outtype, result.fallbacks)
    for n in result.notes:
        say(err, "note", n)
