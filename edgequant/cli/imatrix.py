"""``edgequant imatrix``: an importance matrix from running the model (a 16-bit GGUF or an HF folder) on calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, RepackOpt, TrustOpt, VerboseOpt, llama_options, trust
from edgequant.cli.output import Table, err, out, run, say, show

ALL_LAYERS_UP_TO = 8  # more MoE layers than this: the table lists only those with unseen experts


def imatrix(
    source: str = typer.Argument(..., help="16-bit GGUF (F16/BF16/F32) or HF model folder (the model you will quantize)."),
    output: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="Output imatrix file (GGUF)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", "--text", help="Calibration text file; default: the built-in Python docs corpus."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-imatrix's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use at most this many chunks (default: all)."),
    engine: str = typer.Option("auto", "--engine", help="llama.cpp (a GGUF, or an HF folder converted to F16 first), "
                               "torch (an HF folder through transformers) or auto: llama.cpp for a GGUF and on CPU, "
                               "torch for an HF folder on CUDA."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp engine: CPU threads (default: physical cores)."),
    unseen_experts: str = typer.Option("fill", "--unseen-experts",
                                       help="MoE experts no calibration token reached: fill (their slots get the mean of "
                                            "their layer's seen experts, recorded in the file), uniform (count 0: "
                                            "llama-quantize weighs them by 1) or error (stop)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Compute an importance matrix (llama.cpp's GGUF format) by running the model on calibration text."""
    trust(trust_remote_code)
    llama_options(repack, verbose)
    from edgequant.quantize.imatrix_llamacpp import compute

    r = run(lambda: compute(source, output, engine=engine, text=calibration, ctx=ctx, chunks=chunks, device=device,
                            threads=threads, force=force, unseen_experts=unseen_experts), as_json)
    for w in r.warnings:  # never silent, also with --json (stderr; the JSON has them too)
        say(err, "warning", w)
    show(r, as_json, _render)


def _render(r) -> None:
    """One line: the file, its matrices and what they were computed on, by which engine; for a MoE model the
    expert coverage (a summary line and, per layer, the experts reached and their token counts)."""
    out.print(f"{r.path}: {r.entries} matrices, {r.chunks} chunks x {r.chunk_size} tokens of {r.dataset} on {r.device} "
              f"({r.engine}), {r.seconds:.1f} s", markup=False, highlight=False)
    cov = r.coverage
    if cov is None:
        return
    from edgequant.quantize.expert_coverage import format_ids

    out.print(f"experts: {cov.summary()}", markup=False, highlight=False)
    rows = cov.layers if len(cov.layers) <= ALL_LAYERS_UP_TO else cov.with_unseen
    if not rows:
        return
    title = None if rows is cov.layers else f"{len(rows)} of {len(cov.layers)} MoE layers with unseen experts"
    t = Table("layer", "reached", "min", "median", "max", "unseen experts", title=title)
    for lc in rows:
        unseen = format_ids(lc.unseen) if lc.unseen else ""
        if lc.filled:
            unseen += " (filled)" if lc.filled == lc.unseen else f" (filled: {format_ids(lc.filled)})"
        t.add_row(str(lc.layer), f"{lc.reached}/{lc.n_expert}", str(lc.min), f"{lc.median:g}", str(lc.max), unseen)
    out.print(t)
