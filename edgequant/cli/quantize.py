"""``edgequant quantize``: a 16/32-bit GGUF to k-/i-quants with llama.cpp's quantizer, and ``--list``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt
from edgequant.cli.output import Table, fail, out, print_fallbacks, run, show
from edgequant.units import human_size


def quantize(
    source: Optional[Path] = typer.Argument(None, help="A F16/BF16/F32 GGUF (any shard of a split file)."),
    types: Optional[list[str]] = typer.Argument(None, help="Quant types, e.g. Q4_K_M Q5_K_M Q8_0 (see --list)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (or a .gguf path for one type). Default: next to the input."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (GGUF) from edgequant imatrix or llama-imatrix."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type of output.weight, e.g. q8_0."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type of token_embd.weight."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="PATTERN=TYPE override (regex on tensor names); repeatable."),
    pure: bool = typer.Option(False, "--pure", help="Every matrix in the base type: no k-quant mixes."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Do not quantize output.weight."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Accept an already quantized input (quality loss)."),
    keep_split: bool = typer.Option(False, "--keep-split", help="Write as many shards as the input has."),
    threads: int = typer.Option(0, "--threads", help="Threads (0: all cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    list_types: bool = typer.Option(False, "--list", help="Print the catalogue of quant types and exit."),
    as_json: bool = JsonOpt,
) -> None:
    """Quantize a GGUF to k-/i-quants with llama.cpp's own quantizer (several types in one call)."""
    from edgequant.quantize import types as qtypes

    if list_types:
        return show(qtypes.CATALOGUE, as_json, _render_catalogue)
    if source is None or not types:
        fail("usage: edgequant quantize MODEL.gguf TYPE [TYPE ...] (or --list to see the types)")
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize as do_quantize

    opts = QuantizeOptions(
        imatrix=imatrix, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        tensor_types=list(tensor_type), pure=pure, leave_output_tensor=leave_output_tensor,
        allow_requantize=allow_requantize, keep_split=keep_split, threads=threads, force=force,
    )
    results = run(lambda: do_quantize(source, list(types), output, opts), as_json)
    show(results, as_json, _render)


def _render_catalogue(catalogue) -> None:
    """``--list``: every quant type with its bits/weight, family, imatrix need and advice."""
    table = Table("type", "bits/weight", "family", "imatrix", "advice", "llama-quantize reference")
    for t in catalogue:
        table.add_row(t.name, f"{t.bpw:.2f}", t.family, "required" if t.needs_imatrix else "", t.advice, t.reference)
    out.print(table)


def _render(results) -> None:
    """One row per type written; the fallbacks of each on stderr."""
    table = Table("type", "file", "size", "bits/weight", "time", "fallbacks")
    for r in results:
        table.add_row(r.type, r.files[0] + (f" (+{len(r.files) - 1} shards)" if len(r.files) > 1 else ""),
                      human_size(r.size_bytes), f"{r.bits_per_weight:.2f}", f"{r.seconds:.1f} s", str(len(r.fallbacks)))
    out.print(table)
    for r in results:
        print_fallbacks(r.type, [str(f) for f in r.fallbacks], r.type_counts)
