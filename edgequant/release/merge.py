"""``edgequant release merge``: the folders of ``release --only`` shards (a CI matrix) into one release.

Every artifact file is checked against its shard's recorded sha256 and copied (hard-linked when
possible) into the output; the bench rows, gate results and stage timings are combined; the bench
report, plot, model card, Modelfile and manifest are written anew for the whole set. Shards must
come from one source and name, and be benchmarked alike (same text, ctx, chunks, devices, threads,
flash attention and speed settings): the merged report states one set of settings, its shards' own.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from rich.markup import escape

from edgequant.atomic import atomic_outputs
from edgequant.errors import EdgequantError
from edgequant.release.manifest import MANIFEST_SCHEMA, Artifact, GateResult, Manifest, Shard, StageTime
from edgequant.release.outputs import BenchMeta, ReleaseResult, guard_output, write_outputs
from edgequant.release.public import public_command, public_path
from edgequant.release.state import sha256_file

_KIND_ORDER = {"gguf": 0, "tensor_types": 1, "imatrix": 2, "gptq": 3}  # the merged manifest's artifacts: by kind, largest first


@dataclass
class _Part:
    """One shard: its folder, manifest, bench rows (by model path) and bench settings."""

    folder: Path
    manifest: Manifest
    rows: dict[str, dict]
    bench: BenchMeta


def release_merge(manifests: list[str | Path], output: str | Path, *, log: Callable[[str], None] | None = None,
                  force: bool = False) -> ReleaseResult:
    """Combine the shards (each one's manifest.json, or its folder) into the release folder ``output``."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    if not manifests:
        raise EdgequantError("release merge: name the manifest.json of each shard (e.g. parts/*/manifest.json)")
    out = Path(output)
    guard_output(out, source=None, force=force)
    parts = [_load(m) for m in manifests]
    _check_alike(parts)
    out.mkdir(parents=True, exist_ok=True)
    artifacts, rows = _copy_artifacts(parts, out, log)
    manifest = _combine(parts, out, artifacts)
    write_outputs(out, manifest, rows, parts[0].bench)
    return ReleaseResult(folder=str(out), status=manifest.status, made=sorted(a.path for a in artifacts),
                         gates=[g.to_dict() for g in manifest.gates], card=str(out / "README.md"),
                         manifest=str(out / "manifest.json"), seconds=round(time.perf_counter() - t0, 2))


def _load(given: str | Path) -> _Part:
    """A shard's manifest (its bench settings from its bench.json, else from the manifest)."""
    p = Path(given)
    p = p / "manifest.json" if p.is_dir() else p
    if not p.is_file():
        raise EdgequantError(f"release merge: {p} does not exist; pass each shard's manifest.json (or its folder)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EdgequantError(f"release merge: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise EdgequantError(f"release merge: {p} is not an edgequant manifest ({MANIFEST_SCHEMA})")
    m = Manifest.from_dict(data)
    b = m.bench
    report = {"text": {"name": b.text, "sha256": b.text_sha256, "chars": None}, "ctx": b.ctx, "chunks": b.chunks,
              "devices": b.devices, "threads": b.threads, "speed_settings": b.speed_settings,
              "host": b.host.to_dict() if b.host else None, "notes": b.notes, "rows": []}
    bench_json = p.parent / "bench.json"
    if bench_json.is_file():
        report = json.loads(bench_json.read_text())
    flash_attn = m.recipe.setting("bench", "flash_attn")  # a bench.json says; else the recipe's (default on)
    bench = BenchMeta.from_dict(report, ctx=b.ctx, devices=b.devices, flash_attn=True if flash_attn is None else bool(flash_attn))
    return _Part(p.parent, m, {row["model"]: row for row in report.get("rows") or []}, bench)


def _check_alike(parts: list[_Part]) -> None:
    """One source, one name, one set of bench settings; else one line naming the shards that differ."""
    first = parts[0]
    for p in parts[1:]:
        if p.manifest.source.fingerprint != first.manifest.source.fingerprint or p.manifest.name != first.manifest.name:
            raise EdgequantError(f"release merge: {p.folder} was made from another source or name than {first.folder}; "
                                 f"merge only shards of one recipe")
        mine, theirs = p.bench.measurement(), first.bench.measurement()
        differ = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
        if differ:
            raise EdgequantError(f"release merge: {p.folder} was benchmarked with other settings than {first.folder} "
                                 f"({'; '.join(differ)}); the merged report has one set: merge only shards benchmarked alike")


def _copy_artifacts(parts: list[_Part], out: Path, log: Callable[[str], None]) -> tuple[list[Artifact], dict[str, dict]]:
    """Every shard's GGUF, GPTQ and imatrix files into ``out``, checked against their sha256; their bench rows."""
    artifacts: dict[str, Artifact] = {}
    rows: dict[str, dict] = {}
    for part in parts:
        for a in part.manifest.artifacts:
            if a.kind not in _KIND_ORDER:
                continue
            seen = artifacts.get(a.path)
            if seen is not None:
                if seen.sha256 != a.sha256:
                    raise EdgequantError(f"release merge: {a.path} differs between shards (sha256 {seen.sha256[:12]} vs "
                                         f"{a.sha256[:12]}); the shards were not made from the same inputs")
                continue
            _copy_files(part.folder, a, out)
            artifacts[a.path] = a
            log(f"merged {escape(a.path)}")
            if a.path in part.rows:
                rows[a.path] = part.rows[a.path]
        ref = part.manifest.bench.reference_file
        if ref in part.rows:  # the reference row (kept even when the base file is not shipped)
            rows.setdefault(ref, part.rows[ref])
    return sorted(artifacts.values(), key=lambda a: (_KIND_ORDER[a.kind], -(a.size_bytes or 0))), rows


def _copy_files(folder: Path, a: Artifact, out: Path) -> None:
    """One artifact's files, each checked against its recorded sha256, hard-linked (else copied) into ``out``."""
    hashes = a.hashes
    for rel in a.files:
        src, dst = folder / rel, out / rel
        if not src.is_file():
            raise EdgequantError(f"release merge: {src} is listed in {folder / 'manifest.json'} but missing")
        if sha256_file(src) != hashes[rel]:
            raise EdgequantError(f"release merge: {src} does not match its recorded sha256 (corrupt or changed)")
        if src.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_outputs([dst]) as (part,):
                try:
                    os.link(src, part)
                except OSError:
                    shutil.copyfile(src, part)


def _combine(parts: list[_Part], out: Path, artifacts: list[Artifact]) -> Manifest:
    """The first shard's manifest with every shard's recipe selection, artifacts, gates and stage times."""
    first = parts[0].manifest
    recipe = first.recipe
    for p in parts[1:]:  # the shards' selections together: the recipe of the whole release
        recipe = recipe.merged(p.manifest.recipe)
    gates: dict[tuple[str, str], GateResult] = {}
    stages: dict[str, StageTime] = {}
    for p in parts:
        for g in p.manifest.gates:
            gates.setdefault((g.gate, g.artifact), g)
        for k, v in p.manifest.stages.items():
            stages.setdefault(k, StageTime()).add(v.seconds, skipped=v.skipped)
    command = shlex.join(["edgequant", "release", "merge", *(str(p.folder / "manifest.json") for p in parts), "-o", str(out)])
    shards = [Shard(folder=public_path(str(p.folder), out), recipe_gguf=[g["type"] for g in p.manifest.recipe.gguf],
                    recipe_gptq=[g["bits"] for g in p.manifest.recipe.gptq], host=p.manifest.host) for p in parts]
    return replace(first, command=public_command(command, out), recipe=recipe, artifacts=list(artifacts),
                   gates=list(gates.values()), stages=stages,
                   status="gates failed" if any(not g.passed for g in gates.values()) else "ok", merged_from=shards)
