"""``edgequant inspect``: a GGUF's metadata, chat template, tensor types and size."""

from __future__ import annotations

from pathlib import Path

import typer

from edgequant.cli.options import JsonOpt
from edgequant.cli.output import Table, out, run, show
from edgequant.units import human_size


def inspect(
    path: Path = typer.Argument(..., help="A .gguf file (any shard of a split file)."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = JsonOpt,
) -> None:
    """Show a GGUF's metadata, chat template, tensor types, size and bits/weight."""
    from edgequant.gguf_info import inspect_gguf

    info = run(lambda: inspect_gguf(path), as_json)
    data = info.to_dict(with_tensors=tensors) if as_json else None
    show(info, as_json, lambda i: _render(i, path, tensors), data)


def _render(info, path: Path, tensors: bool) -> None:
    """The summary and metadata (other keys first, then the architecture's and ``general.*``), the chat
    template, and with ``--tensors`` every tensor."""
    table = Table(title=str(path), show_header=False)
    table.add_row("architecture", str(info.architecture))
    table.add_row("name", str(info.name))
    table.add_row("file type", str(info.file_type))
    if info.sliding_window:
        table.add_row("sliding window", info.sliding_window)
    table.add_row("parameters", f"{info.n_params:,}")
    table.add_row("size", f"{human_size(info.size_bytes)} in {len(info.files)} file(s), {info.bits_per_weight:.2f} bits/weight")
    table.add_row("tensor types", ", ".join(f"{k}: {v}" for k, v in sorted(info.type_counts.items())))
    arch = f"{info.architecture}."
    for k, v in info.metadata.items():
        if not k.startswith(("general.", "tokenizer.chat_template", arch)):
            table.add_row(k, str(v))
    for k, v in info.metadata.items():
        if k.startswith(arch) or (k.startswith("general.") and k != "general.architecture"):
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
