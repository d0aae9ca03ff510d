"""Content-addressed stage records for ``edgequant release``: what to skip, what to redo.

Each artifact is made by one stage whose inputs are hashed into a key (the source fingerprint, the
options, the keys of the artifacts it is made from, the text it reads, the tool versions). The
record in ``<output>/.edgequant/state.json`` keeps, per artifact, that key and the size, mtime and
sha256 of every file it wrote. A stage is skipped when its key is unchanged and its files are as
recorded (size, mtime, ctime and inode, else a fresh sha256: a file rewritten in place with its
mtime set back still has a new ctime, which no user can set back); anything else — a changed option, an input made
anew, a deleted or edited file — redoes it, and everything downstream whose key includes it.

A lock (flock on ``.edgequant/lock``) keeps two releases out of one folder; ``*.part`` files and folders left by a run that
was killed outright (SIGKILL, power loss) are removed when the next run takes the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from edgequant.atomic import PART_SUFFIX, TMP_PREFIX, atomic_outputs
from edgequant.errors import EdgequantError

STATE_DIR = ".edgequant"


def stage_key(*parts: Any) -> str:
    """A stable hash of JSON-able inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_files(path: Path) -> list[Path]:
    """A file is itself; a folder (GPTQ) is every file under it, sorted."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def combined_sha256(file_hashes: dict[str, str]) -> str:
    """One hash for a multi-file artifact: sha256 of its sorted ``relpath  sha256`` lines."""
    lines = "".join(f"{k}  {v}\n" for k, v in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


_SIGNATURE = ("mtime_ns", "ctime_ns", "ino")


def _signature(st: os.stat_result) -> dict:
    """What changes whenever a file's content may have: mtime can be set back, ctime and the inode cannot."""
    return {"mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


class Stages:
    def __init__(self, root: Path):
        self.root = root
        self.dir = root / STATE_DIR
        self.path = self.dir / "state.json"
        self.data: dict[str, Any] = {"artifacts": {}, "bench": {}, "bench_meta": {}}

    # -- lock and cleanup ------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator["Stages"]:
        """One writer per output folder: an flock the kernel drops when the process dies."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_CREAT | os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EdgequantError(f"another edgequant release is writing {self.root}; wait for it or choose another output") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._remove_partials()
            self._load()
            yield self
        finally:
            os.close(fd)  # releases the lock

    def _remove_partials(self) -> None:
        """``*.part`` files and folders a killed run left (only where edgequant writes them)."""
        for p in [*self.root.glob(f"*{PART_SUFFIX}"), *self.dir.rglob(f"*{PART_SUFFIX}")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self) -> None:
        """Read the stage record (none, or a damaged one: start afresh)."""
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self.data = {"artifacts": data.get("artifacts") or {}, "bench": data.get("bench") or {},
                                 "bench_meta": data.get("bench_meta") or {}}
            except json.JSONDecodeError:
                pass  # a damaged record only costs a rebuild

    def save(self) -> None:
        with atomic_outputs([self.path]) as (part,):
            part.write_text(json.dumps(self.data, indent=1))

    # -- artifacts ---------------------------------------------------------------------------------

    def fresh(self, artifact: str, key: str) -> dict | None:
        """The record when ``artifact`` was made with ``key`` and its files are unchanged, else None."""
        rec = self.data["artifacts"].get(artifact)
        if not rec or rec.get("key") != key:
            return None
        for rel, meta in rec["files"].items():
            p = self.root / rel
            try:
                st = p.stat()
            except FileNotFoundError:
                return None
            if st.st_size != meta["size"]:
                return None
            if _signature(st) != {k: meta.get(k) for k in _SIGNATURE}:
                if sha256_file(p) != meta["sha256"]:
                    return None
                meta.update(_signature(st))  # touched, not changed: remember, so it is hashed once
                self.save()
        return rec

    def forget(self, artifact: str) -> None:
        """Drop an artifact's record and delete the files it recorded (before remaking it)."""
        rec = self.data["artifacts"].pop(artifact, None)
        if rec:
            for rel in rec["files"]:
                p = self.root / rel
                if p.is_file():
                    p.unlink()
            for top in {Path(rel).parts[0] for rel in rec["files"]}:
                d = self.root / top
                if d.is_dir() and d != self.dir:
                    shutil.rmtree(d, ignore_errors=True)
        self.data["bench"].pop(artifact, None)
        self.save()

    def record(self, artifact: str, key: str, paths: list[Path], result: dict) -> dict:
        """Remember what ``artifact`` was made with (``key``), the size, signature and sha256 of its files, its result."""
        files = {}
        for top in paths:
            for f in artifact_files(top):
                st = f.stat()
                files[str(f.relative_to(self.root))] = {"size": st.st_size, **_signature(st), "sha256": sha256_file(f)}
        rec = {"key": key, "paths": [str(p.relative_to(self.root)) for p in paths], "files": files, "result": result}
        self.data["artifacts"][artifact] = rec
        self.save()
        return rec

    # -- bench rows --------------------------------------------------------------------------------

    def bench_row(self, artifact: str, key: str) -> dict | None:
        rec = self.data["bench"].get(artifact)
        return rec["row"] if rec and rec.get("key") == key else None

    def record_bench(self, artifact: str, key: str, row: dict) -> None:
        self.data["bench"][artifact] = {"key": key, "row": row}
        self.save()

