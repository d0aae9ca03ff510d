"""What a release writes around its artifacts: the output-folder guard, the quality gates, the bench
report (``bench.json``/``bench.md``/``quality.png``), the Modelfile, the model card and, last,
``manifest.json``. Shared by ``release`` and ``release merge``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgequant.atomic import check_output_folder, write_text
from edgequant.errors import EdgequantError
from edgequant.release.manifest import Artifact, GateResult, Manifest, read_manifest
from edgequant.release.public import public_text
from edgequant.release.recipe import Recipe
from edgequant.release.state import STATE_DIR, sha256_file


@dataclass
class ReleaseResult:
    """What ``release``/``release merge`` return (the CLI's ``--json`` summary)."""

    folder: str
    status: str  # ok, gates failed
    made: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)
    card: str = ""
    manifest: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchMeta:
    """How the bench rows were measured: the header of ``bench.json`` (kept in the stage record)."""

    text: dict | None  # name, sha256, chars
    ctx: int
    chunks: int | None
    devices: list[str]
    threads: int
    flash_attn: bool
    speed_settings: dict | None = None
    host: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, ctx: int, devices: list[str], flash_attn: bool) -> BenchMeta:
        """From a stage record or a bench report; ``ctx``/``devices``/``flash_attn`` where it does not say."""
        return cls(text=d.get("text"), ctx=d.get("ctx") or ctx, chunks=d.get("chunks"), devices=d.get("devices") or devices,
                   threads=d.get("threads") or 0, flash_attn=bool(d.get("flash_attn", flash_attn)),
                   speed_settings=d.get("speed_settings"), host=d.get("host"), notes=list(d.get("notes") or []),
                   seconds=d.get("seconds") or 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    def measurement(self) -> dict:
        """The settings that change the numbers: rows measured under other ones do not belong in one report."""
        return {"text": (self.text or {}).get("sha256"), "ctx": self.ctx, "chunks": self.chunks, "devices": self.devices,
                "threads": self.threads, "flash_attn": self.flash_attn, "speed_settings": self.speed_settings}


# -- the output folder --------------------------------------------------------------------------------------


def guard_output(out: Path, *, source: Path | None, force: bool) -> None:
    """Never write a release where it would replace what the user has: the source folder (its
    README.md would become the card), a folder of other files, or a card/Modelfile edited by hand.
    A folder that holds an edgequant release (its ``.edgequant`` state) is the release's to update."""
    check_output_folder(out)
    target = out.resolve()
    if source is not None and source.is_dir():
        src = source.resolve()
        if target == src or src in target.parents:
            raise EdgequantError(f"output {out} is {'the source folder' if target == src else 'inside the source folder'} "
                                 f"{source}: the release would write its README.md and model files among the source's; "
                                 f"choose another output folder")
    if force or not out.is_dir():
        return
    entries = [p.name for p in out.iterdir()]
    manifest = read_manifest(out / "manifest.json")
    if entries and STATE_DIR not in entries and manifest is None:
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise EdgequantError(f"{out} already holds files ({shown}) and no edgequant release; choose a new or empty "
                             f"folder, or pass --force to write into it (files with the release's names are replaced)")
    if manifest is not None:
        _check_not_edited(out, manifest)


def _check_not_edited(out: Path, manifest: Manifest) -> None:
    """The card and the Modelfile are as the last release wrote them (their recorded sha256)."""
    for a in manifest.artifacts:
        p = out / a.path
        if a.kind in ("card", "modelfile") and p.is_file() and a.sha256 and sha256_file(p) != a.sha256:
            raise EdgequantError(f"{p} was edited since edgequant wrote it; move it away (or pass --force to "
                                 f"replace it with the new {'model card' if a.path == 'README.md' else a.path})")


# -- gates -------------------------------------------------------------------------------------------------


def evaluate_gates(r: Recipe, manifest: Manifest) -> list[GateResult]:
    """Each ``[[gates]]`` entry on the artifacts it names (``*``: every quantized one; ``base``, ``F16``,
    ``BF16``: the 16-bit file, shipped or not)."""
    metrics = {a.type: a.metrics for a in manifest.models}
    base_types = {t.upper() for t in r.base_artifact_names}
    results = []
    for g in r.gates:
        if g.artifact == "*":
            names = [n for n in metrics if n.upper() not in base_types]
        else:
            names = [g.artifact]
            if g.artifact.upper() in base_types:
                metrics = {**metrics, g.artifact: manifest.base_metrics}
        device = r.gate_device(g)
        gate = g if device is None or g.device else type(g)(**{**g.to_dict(), "device": device})
        for n in names:
            m = metrics.get(n)
            value = gate.value(m.to_dict() if m is not None else None)
            results.append(GateResult(gate=gate.describe(), artifact=n, metric=g.metric, value=value, max=g.max, min=g.min,
                                      passed=gate.passes(value)))
    return results


# -- the files around the artifacts -------------------------------------------------------------------------


def _bench_report(out: Path, manifest: Manifest, rows: dict[str, dict | None], meta: BenchMeta):
    """The release's bench report: every row, under the settings they were measured with."""
    from edgequant.bench.run import BenchReport, ModelRow
    from edgequant.bench.speed import SpeedResult

    model_rows = [ModelRow(**{**row, "speed": [SpeedResult(**s) for s in row.get("speed") or []]})
                  for row in rows.values() if row is not None]
    bench_time = manifest.stages.get("bench")
    return BenchReport(
        text=public_text(meta.text, out), ctx=meta.ctx, chunks=meta.chunks, reference=manifest.bench.reference_file,
        devices=meta.devices, quality_device=None if not model_rows else (model_rows[0].quality or {}).get("device"),
        threads=meta.threads, flash_attn=meta.flash_attn, speed_settings=meta.speed_settings, rows=model_rows,
        notes=meta.notes, host=meta.host or {}, versions=manifest.versions.to_dict(),
        seconds=bench_time.seconds if bench_time else 0.0)


def write_outputs(out: Path, manifest: Manifest, rows: dict[str, dict | None], meta: BenchMeta) -> None:
    """bench.json/bench.md/quality.png, Modelfile, README.md, then manifest.json listing them all."""
    from edgequant.bench import report
    from edgequant.release.card import recommend, render_model_card
    from edgequant.release.modelfile import render_modelfile

    bench_report = _bench_report(out, manifest, rows, meta)
    write_text(out / "bench.json", bench_report.to_json() + "\n")
    write_text(out / "bench.md", report.to_markdown(bench_report))
    outputs = [("bench.json", "bench"), ("bench.md", "bench")]
    if any(r.quality for r in bench_report.rows):
        report.plot(bench_report, out / "quality.png")
        outputs.append(("quality.png", "plot"))
    ggufs = manifest.of_kind("gguf")
    if ggufs:
        rec = recommend(manifest)
        write_text(out / "Modelfile", render_modelfile(manifest, rec.path if rec else ggufs[0].path))
        outputs.append(("Modelfile", "modelfile"))
    for name, kind in outputs:  # before the card, which links the plot and lists what the release holds
        _publish(manifest, out, name, kind)
    write_text(out / "README.md", render_model_card(manifest))
    _publish(manifest, out, "README.md", "card")
    write_text(out / "manifest.json", manifest.to_json())


def _publish(manifest: Manifest, out: Path, name: str, kind: str) -> None:
    """List a written output file in the manifest, with its sha256 and size."""
    p = out / name
    manifest.artifacts.append(Artifact(path=name, files=[name], kind=kind, sha256=sha256_file(p), size_bytes=p.stat().st_size))
