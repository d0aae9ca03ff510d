"""The one way edgequant writes files: into ``*.part``, then a rename.

A crash, a full disk or Ctrl-C never leaves a half-written file under a final
name: the ``.part`` files are removed on any exception (KeyboardInterrupt
included) and only renamed once everything was written.

Each write has ``.part`` names of its own (``NAME.<pid>-<random>.part``) and holds a lock on the
output folder (an ``flock`` on the folder itself, dropped by the kernel if the process dies), so
two edgequant processes writing into one folder never mix their files: the second is told so.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from edgequant.errors import EdgequantError

PART_SUFFIX = ".part"


def part_path(final: Path) -> Path:
    """A temporary name beside ``final`` that no other write (this process or another) uses."""
    return final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}")


_held: dict[str, list] = {}  # folder -> [fd, depth]: this process's folder locks (re-entrant)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One edgequant process writing into ``folder`` at a time (re-entrant within a process)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgequantError(f"another edgequant process is writing into {folder}; wait for it to finish "
                                 f"or choose another -o") from None
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)


def check_writable(finals: Sequence[Path], *, force: bool, folders_ok: bool = False) -> None:
    """Refuse to overwrite existing outputs unless ``force``; a file output never replaces a folder
    (``folders_ok`` for outputs that are folders themselves, as GPTQ checkpoints)."""
    folders = [] if folders_ok else [p for p in finals if p.is_dir()]
    if folders:  # --force replaces a file, never a folder
        raise EdgequantError(f"output {folders[0]} is a folder; name a file, or pass the folder itself as -o")
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
    if not os.access(directory, os.W_OK):
        raise EdgequantError(f"{directory} is not writable (a read-only file system or no permission); choose another -o")
    free = shutil.disk_usage(directory).free
    if needed_bytes * margin > free:
        raise EdgequantError(
            f"not enough disk space in {directory}: need {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (free some space or choose another -o)"
        )


@contextlib.contextmanager
def atomic_outputs(finals: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield ``.part`` paths for ``finals`` (unique to this write, under the folder's lock); rename
    them all on success, delete them on failure."""
    parts = [part_path(p) for p in finals]
    with contextlib.ExitStack() as locks:
        for folder in dict.fromkeys(p.parent for p in parts):
            locks.enter_context(folder_lock(folder))
        for final in finals:  # under the lock no other process writes here: what is left is a killed run's
            for stale in final.parent.glob(f"{glob.escape(final.name)}.*{PART_SUFFIX}"):
                _remove(stale)  # a file, or a staging folder (quantize --keep-split)
        try:
            yield parts
            for p, final in zip(parts, finals):
                if not p.exists():
                    raise RuntimeError(f"internal error: {p} was not written")
                os.replace(p, final)
        except BaseException:  # the write or a rename failed: no .part is left behind
            for p in parts:
                with contextlib.suppress(OSError):  # a read-only folder fails again here: report the first error
                    p.unlink()
            raise


@contextlib.contextmanager
def atomic_folder(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final`` (a ``.part`` name unique to this write, under the
    parent folder's lock); on success it is renamed to ``final`` (an existing ``final`` is removed first
    when ``replace``), on any failure it is removed. For outputs that are folders (GPTQ checkpoints)."""
    part = part_path(final)
    with folder_lock(final.parent):
        for stale in final.parent.glob(f"{glob.escape(final.name)}.*{PART_SUFFIX}"):  # a killed run's
            _remove(stale)
        part.mkdir()
        try:
            yield part
            if replace:
                _remove(final)
            os.replace(part, final)
        except BaseException:
            _remove(part)
            raise


def _remove(path: Path) -> None:
    """A file or a folder, gone (nothing when it does not exist)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text(path: Path, text: str) -> Path:
    """A small text output (report, card, manifest) written through ``atomic_outputs``."""
    with atomic_outputs([path]) as (part,):
        part.write_text(text, encoding="utf-8")
    return path


TMP_PREFIX = ".edgequant-tmp-"  # a temporary folder of one process: <folder>/.edgequant-tmp-<pid>


def temp_dir(parent: Path) -> Path:
    """This process's temporary folder inside ``parent`` (same file system: files move out by rename)."""
    return parent / f"{TMP_PREFIX}{os.getpid()}"


def remove_stale_temp_dirs(parent: Path) -> None:
    """A run killed outright (SIGKILL, power loss) cannot clean up its temporary folder; the next run
    in the same folder removes the folders whose process is gone."""
    if not parent.is_dir():
        return
    for d in parent.glob(f"{TMP_PREFIX}*"):
        pid = d.name[len(TMP_PREFIX):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
