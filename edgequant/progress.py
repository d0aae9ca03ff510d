"""One progress helper for every long loop: a rich bar on a terminal, silent with --json."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class Task:
    def __init__(self, progress: Progress | None, task_id):
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, amount)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, description=text)


@contextlib.contextmanager
def _bar(description: str, total: int, columns: tuple) -> Iterator[Task]:
    console = Console(stderr=True)
    if _quiet or not console.is_terminal:
        yield Task(None, None)
        return
    with Progress(*columns, console=console, transient=False) as progress:
        yield Task(progress, progress.add_task(description, total=total))


def progress_bytes(description: str, total: int):
    """A byte-counting bar (size, speed, ETA) on stderr; a no-op when quiet or not a terminal."""
    return _bar(description, total, (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn()))


def progress_count(description: str, total: int):
    """A bar counting items (tensors, chunks, layers)."""
    return _bar(description, total, (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn()))


def quiet_libraries() -> None:
    """Silence what transformers, torch and torchao print on their own (weight-loading bars, kernel
    warnings): progress is ours, and --json output must stay clean. EDGEQUANT_VERBOSE=1 keeps it."""
    import logging
    import os
    import warnings

    if os.environ.get("EDGEQUANT_VERBOSE"):
        return
    for name in ("torchao", "torch.utils._pytree", "transformers", "accelerate", "gptqmodel", "tokenicer", "defuser"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
