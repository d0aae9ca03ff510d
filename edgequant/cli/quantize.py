"""``edgequant quantize``: a 16/32-bit GGUF to k-/i-quants with llama.cpp's quantizer, and ``--list``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, RepackOpt, llama_options
from edgequant.cli.output import Table, err, fail, out, print_fallbacks, run, say, show
from edgequant.units import human_size


def quantize(
    source: Optional[Path] = typer.Argument(None, help="A F16/BF16/F32 GGUF (any shard of a split file)."),
    types: Optional[list[str]] = typer.Argument(None, help="Quant types, e.g. Q4_K_M Q5_K_M Q8_0 (see --list)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (or a .gguf path for one type). Default: next to the input."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (GGUF) from edgequant imatrix or llama-imatrix."),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type of output.weight, e.g. q8_0."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type of token_embd.weight."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="PATTERN=TYPE override (regex on tensor names); repeatable."),
    tensor_type_file: Optional[Path] = typer.Option(None, "--tensor-type-file", help="PATTERN=TYPE entries from a file (the .tensor-types.txt a --target-* run saves; llama-quantize reads it too)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Choose per-tensor types: the lowest-KLD file of at most this size (e.g. 4.2G). No TYPE then."),
    target_bpw: Optional[str] = typer.Option(None, "--target-bpw", help="Choose per-tensor types: the lowest-KLD file of at most this many bits/weight."),
    target_kld: Optional[str] = typer.Option(None, "--target-kld", help="Choose per-tensor types: the smallest file whose mean KLD stays within this bound."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Text for choosing (file, 'pydoc' or a dataset name); its last chunks are used. Default: the built-in text."),
    calibration_chunks: int = typer.Option(4, "--calibration-chunks", help="Chunks of --ctx tokens the choice is calibrated and verified on."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per calibration chunk."),
    exclude_type: list[str] = typer.Option([], "--exclude-type", help="With --target-*: a tensor type no tensor may take (e.g. one your runtime lacks); repeatable."),
    max_slowdown: str = typer.Option("5", "--max-slowdown", help="Percent the mix may be slower (pp or tg) than the standard type of its size; 'off' skips the speed check."),
    repack: Optional[str] = RepackOpt,
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
    targets = [v for v in (target_size, target_bpw, target_kld) if v is not None]
    if source is None or (not types and not targets):
        fail("usage: edgequant quantize MODEL.gguf TYPE [TYPE ...], or MODEL.gguf --target-size 4.2G "
             "(or --list to see the types)")
    if targets:
        if types:
            fail(f"--target-* chooses the types itself; drop {' '.join(types)} (or drop the target)")
        return _target(source, output, imatrix, target_size, target_bpw, target_kld, calibration, calibration_chunks,
                       ctx, max_slowdown, exclude_type, threads, force, repack, as_json)
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize as do_quantize, read_tensor_type_file

    entries = list(tensor_type)
    if tensor_type_file is not None:
        entries += run(lambda: read_tensor_type_file(tensor_type_file), as_json)
    opts = QuantizeOptions(
        imatrix=imatrix, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        tensor_types=entries, pure=pure, leave_output_tensor=leave_output_tensor,
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


def _target(source, output, imatrix, size, bpw, kld, calibration, chunks, ctx, max_slowdown, exclude, threads, force,
            repack, as_json) -> None:
    """``--target-size/--target-bpw/--target-kld``: measure, choose, write, verify (edgequant.mix)."""
    llama_options(repack, False)
    from edgequant.mix.target import TargetOptions, parse_target, quantize_target

    slow = max_slowdown.strip().lower().removesuffix("%")
    if slow in ("off", "none", "no"):
        limit = None
    else:
        try:
            limit = float(slow)
        except ValueError:
            fail(f"--max-slowdown {max_slowdown!r}: a percentage such as 5, or 'off'")
    opts = TargetOptions(imatrix=imatrix, calibration=calibration, ctx=ctx, calibration_chunks=chunks,
                         max_slowdown=limit, exclude_types=tuple(exclude), threads=threads, force=force)
    result = run(lambda: quantize_target(source, parse_target(size, bpw, kld), output, opts), as_json)
    show(result, as_json, _render_target)
    if not result.met:
        raise typer.Exit(3)


def _render_target(r) -> None:
    """The file, its size beside the target, predicted vs measured KLD, the standard type beside it, speed."""
    t = r.target
    table = Table("", "mix", r.standard["type"] if r.standard and "kld" in r.standard else "")
    std = r.standard if r.standard and "kld" in r.standard else None
    table.add_row("file", Path(r.file).name, "(standard type, same run)" if std else "")
    table.add_row("size", human_size(r.size_bytes), human_size(std["size_bytes"]) if std else "")
    table.add_row("bits/weight", f"{r.bits_per_weight:.3f}", f"{std['bits_per_weight']:.3f}" if std else "")
    table.add_row("KLD predicted", f"{r.predicted_kld:.5f}", "")
    table.add_row("KLD measured", f"{r.measured['kld_mean']:.5f}", f"{std['kld']['kld_mean']:.5f}" if std else "")
    table.add_row("KLD 99th pct", f"{r.measured['kld_p99']:.5f}", f"{std['kld']['kld_p99']:.5f}" if std else "")
    table.add_row("same top token", f"{100 * r.measured['same_top']:.2f} %", f"{100 * std['kld']['same_top']:.2f} %" if std else "")
    if r.speed:
        mine, theirs = r.speed["mix"], r.speed["standard"]
        table.add_row(f"pp{mine['pp']} t/s", f"{mine['pp_tps'] or 0:.1f}", f"{theirs['pp_tps'] or 0:.1f}")
        table.add_row(f"tg{mine['tg']} t/s", f"{mine['tg_tps'] or 0:.1f}", f"{theirs['tg_tps'] or 0:.1f}")
    out.print(table)
    types = ", ".join(f"{k}: {v}" for k, v in sorted(r.type_counts.items()))
    say(out, "target", f"{t.kind} {t.text}: {'met' if r.met else 'NOT met'}; tensor types {types}", "green" if r.met else "red")
    say(out, "recipe", f"{r.tensor_types_file} (reproduce: {r.reproduce})", "cyan")
    for k, v in r.excluded_types.items():
        say(err, "left out", f"{k}: {v}")
    for n in r.notes:
        say(err, "note", n)
