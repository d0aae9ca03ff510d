"""What every command shares on the way out: the two consoles, a plain-text ``Table``, the one error path
(exit status 2 for a fixable error, 3 for a failed gate, 1 for a bug, 130 for Ctrl-C) and ``show``, which
prints a result as JSON for ``--json`` or renders it for the terminal."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table as _RichTable
from rich.text import Text

from edgequant import progress
from edgequant.errors import EdgequantError

out = Console()
err = Console(stderr=True)


class Table(_RichTable):
    """A rich table whose title and cells are plain text: strings that come from a model (names,
    template text, token strings such as ``[INST]`` or ``[/]``) are never read as rich markup."""

    def __init__(self, *headers, title: str | None = None, **kw):
        super().__init__(*headers, title=Text(title) if isinstance(title, str) else title, **kw)

    def add_row(self, *cells, **kw) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kw)


def say(console: Console, label: str, text: str, style: str = "yellow") -> None:
    """``label: text`` with the label styled and the text (which may quote a model) printed literally."""
    console.print(f"[{style}]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """One ``error:`` line on stderr, then exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def debug_on() -> bool:
    """Whether ``--debug`` (or ``EDGEQUANT_DEBUG``) asks for tracebacks."""
    return os.environ.get("EDGEQUANT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run(fn: Callable[[], Any], as_json: bool) -> Any:
    """Every command's work: a fixable error is one line and exit 2 (a failed gate 3), a file-system error one
    line naming the path, an unexpected error (a bug) one line and exit 1, its traceback with --debug."""
    import click

    from edgequant.errors import os_error_line

    progress.set_quiet(as_json)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except EdgequantError as e:
        fail(str(e), getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted: partial outputs were removed")
        raise typer.Exit(130)
    except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except OSError as e:
        if debug_on():
            raise
        fail(os_error_line(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug_on():
            raise
        fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
             f"(an edgequant bug: rerun with --debug for the traceback and report it)", 1)


def show(result: Any, as_json: bool, render: Callable[[Any], None], data: Any = None) -> None:
    """``--json``: ``data`` (default: the result's ``to_dict()``, or each item's for a list or tuple) as JSON on
    stdout; otherwise ``render(result)`` for the terminal."""
    if not as_json:
        render(result)
        return
    if data is None:
        data = [r.to_dict() for r in result] if isinstance(result, (list, tuple)) else result.to_dict()
    print(json.dumps(data, indent=2, default=str))


def log_for(as_json: bool) -> Callable[[str], None]:
    """A pipeline's progress lines go to stderr, and nowhere with ``--json``."""
    if as_json:
        return lambda msg: None
    return lambda msg: err.print(msg, highlight=False)


def print_fallbacks(type_name: str, fallbacks: list[str], type_counts: dict[str, int] | None = None) -> None:
    """Every fallback is in --json; on the terminal a few, then a count."""
    if not fallbacks:
        return
    for f in fallbacks[:3]:
        say(err, "fallback", f"{type_name}: {f}")
    if len(fallbacks) > 3:
        used = f"; tensor types now {', '.join(f'{k}: {v}' for k, v in sorted(type_counts.items()))}" if type_counts else ""
        say(err, "fallback", f"{type_name}: ... {len(fallbacks)} tensors in all (--json lists them){used}")
