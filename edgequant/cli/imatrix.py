"""``edgequant imatrix``: an importance matrix from running the HF model on calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, TrustOpt, trust
from edgequant.cli.output import out, run, show


def imatrix(
    source: str = typer.Argument(..., help="HF model folder (the model you will quantize)."),
    output: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="Output imatrix file (GGUF)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", "--text", help="Calibration text file; default: the built-in Python docs corpus."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-imatrix's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use at most this many chunks (default: all)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output."),
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Compute an importance matrix (llama.cpp's GGUF format) by running the model on calibration text."""
    trust(trust_remote_code)
    from edgequant.quantize.imatrix import compute_imatrix

    r = run(lambda: compute_imatrix(source, output, text=calibration, ctx=ctx, chunks=chunks, device=device, force=force), as_json)
    show(r, as_json, _render)


def _render(r) -> None:
    """One line: the file, its matrices and what they were computed on."""
    out.print(f"{r.path}: {r.entries} matrices, {r.chunks} chunks x {r.chunk_size} tokens of {r.dataset} on {r.device}, "
              f"{r.seconds:.1f} s", markup=False, highlight=False)
