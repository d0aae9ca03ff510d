"""``edgequant gptq``: GPTQ checkpoints of an HF model, one folder per bit width.

The defaults are ``GPTQOptions``'s (torch-free): each is written once, in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgequant.cli.options import JsonOpt, TrustOpt, trust
from edgequant.cli.output import Table, err, out, run, say, show
from edgequant.quantize.gptq_options import GPTQOptions
from edgequant.units import human_size

D = GPTQOptions()  # the library's defaults, shown in --help


def gptq(
    source: str = typer.Argument(..., help="HF model folder (bf16/f16/f32 safetensors)."),
    bits: str = typer.Option("4", "--bits", help="Bit widths, a comma list of 2, 3, 4, 8 (one folder each)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder to write the <Name>-GPTQ-<b>bit-<g>g folders into. Default: current folder."),
    group_size: Optional[int] = typer.Option(D.group_size, "--group-size", help="Columns per scale/zero group, or -1 for one per row. Default: 128, else 64/32 when 128 does not divide every input dimension."),
    desc_act: bool = typer.Option(D.desc_act, "--desc-act/--no-desc-act", help="Act-order: quantize columns by decreasing activation (better, slower kernels)."),
    sym: bool = typer.Option(D.sym, "--sym/--asym", help="Symmetric grid (zero point fixed; what most kernels expect)."),
    damp_percent: float = typer.Option(D.damp_percent, "--damp-percent", help="Hessian dampening, a fraction of its mean diagonal."),
    true_sequential: bool = typer.Option(D.true_sequential, "--true-sequential/--no-true-sequential", help="Quantize a layer's modules in order, each on the outputs of the already quantized ones."),
    calibration: Optional[str] = typer.Option(None, "--calibration", "--text", help="Calibration text file; default: the built-in Python docs corpus."),
    samples: int = typer.Option(D.samples, "--samples", help="Calibration samples (token windows)."),
    seq_len: int = typer.Option(D.seq_len, "--seq-len", help="Tokens per calibration sample."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed for the calibration windows and the quantizer."),
    device: str = typer.Option(D.device, "--device", help="cpu or cuda."),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Calibration samples per forward pass."),
    moe_routing: str = typer.Option(D.moe_routing, "--moe-routing", help="MoE: auto (the router's top-k when every expert gets enough calibration tokens, else every token to every expert), native (an expert short of tokens is an error) or all."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output folders."),
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """GPTQ-quantize an HF model (GPTQModel backend) into v1 GPTQ checkpoints that transformers and vLLM load."""
    trust(trust_remote_code)
    from edgequant.quantize.gptq import gptq as do_gptq

    opts = GPTQOptions(group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                       true_sequential=true_sequential, calibration=calibration, samples=samples, seq_len=seq_len,
                       seed=seed, device=device, batch_size=batch_size, force=force,
                       moe_routing=moe_routing)
    results = run(lambda: do_gptq(source, bits, output, opts), as_json)
    show(results, as_json, _render)


def _render(results) -> None:
    """One row per bit width, titled with the calibration; each distinct note once on stderr."""
    first = results[0]
    moe = first.experts is not None
    title = f"GPTQ on {first.samples} x {first.seq_len} tokens of {first.calibration}"
    if moe:
        how = "every token to every expert" if first.experts.routing == "all" else "the router's top-k"
        title += f"; tokens per expert from its router {first.experts.summary()} (needs {first.experts.min_tokens}), quantized with {how}"
    headers = ["bits", "group", "folder", "size", "bits/weight", "max layer loss", "time"]
    table = Table(*headers, *(["expert tokens (GPTQ min)", "experts rounded"] if moe else []), title=title)
    for r in results:
        row = [str(r.bits), str(r.group_size), r.folder, human_size(r.size_bytes), f"{r.bits_per_weight:.2f}",
               f"{r.max_loss:.3g}", f"{r.seconds:.1f} s"]
        if moe:
            row += [str(r.experts.gptq_min_samples), str(len(r.experts.rtn_modules))]
        table.add_row(*row)
    out.print(table)
    for n in dict.fromkeys(n for r in results for n in r.notes):
        say(err, "note", n)
    for w in dict.fromkeys(w for r in results for w in r.warnings):
        say(err, "warning", w, style="bold red")
