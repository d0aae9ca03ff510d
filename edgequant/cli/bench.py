"""``edgequant bench``: perplexity, KLD and speed of GGUF files and HF/GPTQ folders, as a table, JSON, CSV
or Markdown, optionally written to a file and plotted.

The defaults are ``BenchOptions``'s: each is written once, in the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edgequant.atomic import check_output_folder, check_writable, write_text
from edgequant.bench.options import BenchOptions
from edgequant.cli.options import JsonOpt, RepackOpt, TrustOpt, VerboseOpt, llama_options, trust
from edgequant.cli.output import Table, err, fail, out, run, say
from edgequant.errors import EdgequantError

D = BenchOptions()  # the library's defaults, shown in --help
FORMATS = ("table", "json", "csv", "md")


def bench(
    models: Optional[list[str]] = typer.Argument(None, help="GGUF files and HF/GPTQ folders to measure."),
    reference: Optional[str] = typer.Option(None, "--reference", help="KLD reference: a F16/BF16 GGUF or the HF checkpoint (default: the highest-precision GGUF given)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text file; default: the built-in Python docs corpus; wikitext-2 when online."),
    ctx: int = typer.Option(D.ctx, "--ctx", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(D.chunks, "--chunks", help="At most this many chunks (default: all; the text must hold 2)."),
    device: str = typer.Option(D.devices, "--device", help="cpu, cuda or cpu,cuda. Quality runs on the CPU when listed; speed on each."),
    threads: Optional[int] = typer.Option(D.threads, "--threads", help="CPU threads (default: physical cores, as llama.cpp's tools)."),
    no_flash_attn: bool = typer.Option(False, "--no-flash-attn", help="Disable flash attention (llama.cpp's tools use it)."),
    speed_only: bool = typer.Option(False, "--speed-only", help="Only tokens/sec (no text needed)."),
    quality_only: bool = typer.Option(False, "--quality-only", help="Only perplexity/KLD."),
    pp: int = typer.Option(D.pp, "--pp", help="Prompt tokens for the pp test (llama-bench -p)."),
    tg: int = typer.Option(D.tg, "--tg", help="Generated tokens for the tg test (llama-bench -n)."),
    reps: int = typer.Option(D.reps, "--reps", help="Repetitions after the warm-up (llama-bench -r)."),
    batch_size: int = typer.Option(D.n_batch, "--batch-size", help="Logical batch for pp (llama-bench -b)."),
    ubatch_size: int = typer.Option(D.n_ubatch, "--ubatch-size", help="Physical batch for pp (llama-bench -ub)."),
    fmt: str = typer.Option("table", "--format", help="table, json, csv or md."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the report to this file (format from --format, else from the suffix)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of size against PPL/KLD with the Pareto front."),
    json_schema: bool = typer.Option(False, "--json-schema", help="Print the JSON schema of the --json report and exit."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o report or --plot image."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Perplexity, KL divergence and tokens/sec of GGUF files and HF/GPTQ folders, as llama.cpp's tools measure them."""
    trust(trust_remote_code)
    llama_options(repack, verbose)

    if json_schema:
        from edgequant.bench.report import JSON_SCHEMA

        print(json.dumps(JSON_SCHEMA, indent=2))
        return
    fmt = "json" if as_json else fmt.lower()
    if fmt not in FORMATS:
        fail(f"--format {fmt}: use table, json, csv or md")
    opts = BenchOptions(
        reference=reference, text=text, ctx=ctx, chunks=chunks, devices=device, threads=threads,
        flash_attn=not no_flash_attn, speed=not quality_only, quality=not speed_only, pp=pp, tg=tg, reps=reps,
        n_batch=batch_size, n_ubatch=ubatch_size,
    )

    def work():
        """Check the output files, then measure."""
        from edgequant.bench.run import run_bench

        _check_targets([output, plot], force)  # before the measuring, not after
        return run_bench(list(models or []), opts)

    report = run(work, fmt == "json")
    _write_files(report, fmt, output, plot)
    if fmt != "table":
        sys.stdout.write(_renderers(report)[fmt]())
        return
    _render(report)


def _check_targets(targets: list[Optional[Path]], force: bool) -> None:
    """Each ``-o`` / ``--plot`` file can be written: its folder exists, it is not a folder, it is new or ``--force``."""
    for target in targets:
        if target is not None:
            check_output_folder(target.parent if str(target.parent) else Path("."))
            if target.is_dir():
                raise EdgequantError(f"{target} is a folder; name a file")
            check_writable([target], force=force)


def _renderers(report) -> dict:
    """The report as text in each file format."""
    from edgequant.bench import report as rep

    return {"json": lambda: report.to_json() + "\n", "csv": lambda: rep.to_csv(report),
            "md": lambda: rep.to_markdown(report)}


def _write_files(report, fmt: str, output: Optional[Path], plot: Optional[Path]) -> None:
    """``-o``: the report in ``--format`` (for ``table``: by the file's suffix, else Markdown); ``--plot``: the PNG."""
    from edgequant.bench import report as rep

    quiet = fmt == "json"
    if output is not None:
        kind = fmt if fmt != "table" else {".json": "json", ".csv": "csv", ".md": "md"}.get(output.suffix.lower(), "md")
        run(lambda: write_text(output, _renderers(report)[kind]()), quiet)
    if plot is not None:
        if not any(r.quality for r in report.rows):
            err.print("[yellow]note:[/] --plot needs perplexity numbers; nothing plotted with --speed-only")
        else:
            run(lambda: rep.plot(report, plot), quiet)


def _render(report) -> None:
    """The table (wide when piped), the settings line, then absent rows and notes on stderr."""
    from edgequant.bench import report as rep

    header, cells = rep.display_rows(report)
    table = Table(*header, title="edgequant bench")
    for row in cells:
        table.add_row(*row)
    out.print(table, width=None if out.is_terminal else 250)  # wide: a pipe or CI log should not squeeze it
    out.print(rep.describe_settings(report), markup=False, highlight=False)
    for row in rep.flat_rows(report):
        if row.get("absent"):
            say(err, "absent", f"{row['name']} on {row['device']}: {row['absent']}")
    for n in report.notes:
        say(err, "note", n)
