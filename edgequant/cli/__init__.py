"""The ``edgequant`` command line: a thin layer over the library functions.

Every command calls one library function and formats what it returns; ``--json`` prints that
result as JSON on stdout (and silences progress bars) for CI. Errors a user can fix print one
line on stderr and exit with status 2; Ctrl-C exits with 130 and leaves no partial file.

Each command is a module here (``convert.py`` ... ``demo.py``: parse, call the library, present);
``output.py`` holds the consoles, the error path and ``show``; ``options.py`` the shared options.
"""

from __future__ import annotations

import os

import typer

from edgequant.cli import bench, convert, demo, gptq, imatrix, inspect, quantize, release

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ship Hugging Face causal LMs to the edge: GGUF, GPTQ, llama.cpp-exact benchmarks.")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", envvar="EDGEQUANT_DEBUG",
                                     help="Show the traceback of an unexpected error (a bug: please report it).")) -> None:
    """Ship Hugging Face causal LMs to the edge: GGUF, GPTQ, llama.cpp-exact benchmarks."""
    if debug:
        os.environ["EDGEQUANT_DEBUG"] = "1"


# the order of --help
app.command()(convert.convert)
app.command()(quantize.quantize)
app.command()(imatrix.imatrix)
app.command()(bench.bench)
app.command()(gptq.gptq)
app.command()(inspect.inspect)
app.command(context_settings=release.CONTEXT)(release.release)
app.command()(demo.demo)


def main() -> None:
    """The ``edgequant`` console script and ``python -m edgequant``."""
    app()


__all__ = ["app", "main"]
