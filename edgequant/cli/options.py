"""The options several commands share (``--json``, ``--repack``, ``--verbose``, ``--trust-remote-code``)
and what they set before a command's work starts."""

from __future__ import annotations

import typer

from edgequant.cli.output import fail
from edgequant.errors import EdgequantError

JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout (no progress bars).")
RepackOpt = typer.Option(None, "--repack", envvar="EDGEQUANT_REPACK", show_envvar=True,
                         help="llama.cpp weight repacking: auto (off only where ggml's AMX backend is active, "
                              "llama.cpp #20824), on, off. docs/cpu.md.")
VerboseOpt = typer.Option(False, "--verbose", help="Show llama.cpp's own log lines.")
TrustOpt = typer.Option(False, "--trust-remote-code",
                        help="Allow the model folder's own Python code (auto_map); never run without this flag.")


def trust(allowed: bool) -> None:
    """``--trust-remote-code``: whether a model folder's own Python code may run."""
    from edgequant.remote_code import set_trust_remote_code

    set_trust_remote_code(allowed)


def llama_options(repack: str | None, verbose: bool) -> None:
    """``--repack`` and ``--verbose`` for every llama.cpp model the command opens."""
    from edgequant.llamacpp import set_repack_mode, set_verbose

    try:
        set_repack_mode(repack)
    except EdgequantError as e:
        fail(str(e))
    set_verbose(verbose)
