"""The one way edgequant writes files: into ``*.part``, then a rename.

A crash, a full disk or Ctrl-C never leaves a half-written file under a final
name: the ``.part`` files are removed on any exception (KeyboardInterrupt
included) and only renamed once everything was written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from edgequant.errors import EdgequantError

PART_SUFFIX = ".part"


def part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def check_writable(finals: Sequence[Path], *, force: bool) -> None:
    """Refuse to overwrite existing outputs unless ``force``."""
    existing = [p for p in finals if p.exists()]
    if existing and not force:
        raise EdgequantError(f"output exists: {existing[0]} (pass --force to overwrite, or choose another -o)")


def check_output_folder(folder: Path) -> None:
    """``-o`` must name a folder (or a .gguf path, handled by the caller), not an existing file."""
    if folder.exists() and not folder.is_dir():
        raise EdgequantError(f"-o {folder} is an existing file; pass a folder or a .gguf path")


def check_free_space(directory: Path, needed_bytes: int, *, margin: float = 1.02) -> None:
    """Fail early, naming the numbers, when the output disk cannot hold the result."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed_bytes * margin > free:
        raise EdgequantError(
            f"not enough disk space in {directory}: need {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (free some space or choose another -o)"
        )


@contextlib.contextmanager
def atomic_outputs(finals: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield ``.part`` paths for ``finals``; rename them all on success, delete them on failure."""
    parts = [part_path(p) for p in finals]
    for p in parts:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield parts
    except BaseException:
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    for p, final in zip(parts, finals):
        if not p.exists():
            raise RuntimeError(f"internal error: {p} was not written")
        os.replace(p, final)



def write_text(path: Path, text: str) -> Path:
    """A small text output (report, card, manifest) written through ``atomic_outputs``."""
    with atomic_outputs([path]) as (part,):
        part.write_text(text, encoding="utf-8")
    return path
