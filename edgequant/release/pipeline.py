"""``edgequant release``: one recipe in, every publishable artifact out, resumable and auditable.

Stages, each content-addressed (``state.py``): the 16-bit base GGUF, the importance matrix, one
stage per GGUF type and per GPTQ variant, then one bench row per model. The template gate runs on
every GGUF as soon as it exists (a mismatch stops the release with the diff); quality gates run on
the bench numbers. Then the folder gets ``bench.json``/``bench.md``/``quality.png``, the model card
(``README.md``), the Ollama ``Modelfile`` and ``manifest.json`` (sha256 of every artifact).

Exit codes through the CLI: 0 done, 2 bad input (before any work), 3 a quality gate failed (every
artifact and the manifest are still written, with the gate results), 130 interrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from edgequant import __version__
from edgequant.atomic import atomic_outputs, check_output_folder, write_text
from edgequant.errors import EdgequantError, GateFailed
from edgequant.gguf_info import shard_name
from edgequant.naming import gptq_folder
from edgequant.release.recipe import Recipe
from edgequant.release.state import STATE_DIR, Stages, combined_sha256, stage_key

MANIFEST_SCHEMA = "edgequant.manifest/1"
# llama.cpp commit vendored by each llama-cpp-python release (from its CHANGELOG)
LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098"}


@dataclass
class ReleaseResult:
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


Log = Callable[[str], None]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tool_versions() -> dict:
    import platform

    from edgequant.env import versions

    v = versions()
    lcp = v.get("llama-cpp-python")
    return {"edgequant": __version__, "llama_cpp_python": lcp, "llama_cpp_commit": LLAMA_CPP_COMMITS.get(lcp or ""),
            "gguf": v.get("gguf"), "torch": v.get("torch"), "transformers": v.get("transformers"),
            "gptqmodel": v.get("gptqmodel"), "numpy": v.get("numpy"), "python": platform.python_version()}


class _Run:
    """One release run: the recipe, the state record, the log and the stage timings."""

    def __init__(self, recipe: Recipe, stages: Stages, log: Log):
        self.r = recipe
        self.out = stages.root
        self.st = stages
        self.log = log
        self.made: list[str] = []
        self.skipped: list[str] = []
        self.timings: dict[str, dict] = {}

    def stage(self, artifact: str, group: str, key: str, make: Callable[[], tuple[list[Path], dict]]) -> dict:
        """Skip when fresh, else remove the old files, make, hash and record."""
        rec = self.st.fresh(artifact, key)
        if rec is not None:
            self.skipped.append(artifact)
            self.log(f"[dim]unchanged[/] {escape(artifact)}")  # log lines are rich markup: names are escaped
            self._time(group, rec["result"].get("stage_seconds", 0.0), skipped=True)
            return rec
        self.st.forget(artifact)
        self.log(f"[bold]making[/] {escape(artifact)}")
        t0 = time.perf_counter()
        paths, result = make()
        result["stage_seconds"] = round(time.perf_counter() - t0, 2)
        result["made_at"] = _now()
        rec = self.st.record(artifact, key, paths, result)
        self.made.append(artifact)
        self._time(group, result["stage_seconds"], skipped=False)
        return rec

    def _time(self, group: str, seconds: float, *, skipped: bool) -> None:
        t = self.timings.setdefault(group, {"seconds": 0.0, "skipped": True})
        t["seconds"] = round(t["seconds"] + seconds, 2)
        t["skipped"] = t["skipped"] and skipped


def _guard_output(out: Path, *, source: Path | None, force: bool) -> None:
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
    manifest = out / "manifest.json"
    if entries and STATE_DIR not in entries and not _is_manifest(manifest):
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise EdgequantError(f"{out} already holds files ({shown}) and no edgequant release; choose a new or empty "
                             f"folder, or pass --force to write into it (files with the release's names are replaced)")
    if not manifest.is_file():
        return
    from edgequant.release.state import sha256_file

    try:
        recorded = {a["path"]: a.get("sha256") for a in json.loads(manifest.read_text()).get("artifacts", [])
                    if a.get("kind") in ("card", "modelfile")}
    except (ValueError, AttributeError, TypeError, KeyError):
        return
    for name, sha in recorded.items():
        p = out / name
        if p.is_file() and sha and sha256_file(p) != sha:
            raise EdgequantError(f"{p} was edited since edgequant wrote it; move it away (or pass --force to "
                                 f"replace it with the new {'model card' if name == 'README.md' else name})")


def public_path(value: str | None, out: Path, base: Path | None = None) -> str | None:
    """How a local path appears in what a release publishes (card, manifest): relative to the release
    folder when inside it, else only its name. A hub id or a bare word stays as it is."""
    if not value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        if base is None or not (base / p).exists():
            return value
        p = base / p
    p = p.resolve()
    try:
        return p.relative_to(out.resolve()).as_posix() or "."
    except ValueError:
        return p.name


def public_command(command: str | None, out: Path) -> str | None:
    """The command line with its local paths made public (``public_path``)."""
    import shlex

    if not command:
        return command
    words = []
    for w in shlex.split(command):
        if w.startswith("-") or not (os.path.isabs(w) or os.path.exists(w)):
            words.append(w)
        else:
            words.append(public_path(w, out, Path.cwd()))
    return shlex.join(words)


def _public_recipe(recipe: dict, out: Path, base: Path) -> dict:
    """The recipe as published: its paths (source, output, template, texts) without local folders."""
    d = json.loads(json.dumps(recipe))
    rel = d.get("release") or {}
    for key in ("source", "output", "chat_template"):
        if isinstance(rel.get(key), str):
            rel[key] = public_path(rel[key], out, base)
    for table in d.values():
        if isinstance(table, dict) and isinstance(table.get("text"), str):
            table["text"] = public_path(table["text"], out, base)
    return d


def _public_text(text: dict | None, out: Path) -> dict | None:
    return {**text, "name": public_path(text.get("name"), out)} if text else text


def _is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == MANIFEST_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def release(recipe: Recipe, *, log: Log | None = None, command: str | None = None, force: bool = False) -> ReleaseResult:
    """Run ``recipe`` (validated already by ``load_recipe``/``recipe_from_options``) into its output folder.

    ``force``: write into a folder that holds other files (or a hand-edited card), replacing files
    with the release's names."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = recipe.output_dir
    _guard_output(out, source=Path(recipe.source_ref) if recipe.source_is_local else None, force=force)
    out.mkdir(parents=True, exist_ok=True)
    with Stages(out).locked() as stages:
        run = _Run(recipe, stages, log)
        return _release(run, recipe, command, t0)


def _release(run: _Run, r: Recipe, command: str | None, t0: float) -> ReleaseResult:
    from edgequant.progress import quiet_libraries

    quiet_libraries()
    from transformers import AutoTokenizer

    from edgequant.text import load_text
    from edgequant.checkpoint import open_checkpoint

    ckpt = open_checkpoint(r.source_ref)
    fingerprint = ckpt.fingerprint()
    out = run.out
    (out / "manifest.json").unlink(missing_ok=True)  # written last: never describes a half-made release
    versions = tool_versions()
    from edgequant.remote_code import load_kwargs, refused

    with refused(ckpt.path):
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
    cal_text = load_text(r.text_source("calibration")) if r.gptq else None
    im_text = load_text(r.text_source("imatrix")) if r.needs_imatrix else None
    bench_text = load_text(r.text_source("bench"))

    # -- the 16-bit base GGUF ---------------------------------------------------------------------
    base_t = r.base_type.upper()
    if base_t == "AUTO":
        import torch

        base_t = "BF16" if ckpt.source_dtype() == torch.bfloat16 else "F16"
    base_dir = out if r.keep_base else out / STATE_DIR / "work"
    base_path = base_dir / f"{r.name}-{base_t}.gguf"
    template_file = r.resolve(r.chat_template) if r.chat_template else None
    base_key = stage_key("base", fingerprint, base_t, r.split_max_size, r.name, r.keep_base,
                         template_file.read_text() if template_file else None, versions["edgequant"])

    def make_base():
        from edgequant.export.convert import convert

        res = convert(ckpt.path, base_path, outtype=base_t.lower(), chat_template=template_file,
                      split_max_size=r.split_max_size, model_name=r.name, force=True)
        return [Path(f) for f in res.files], {"type": base_t, "files": [Path(f).name for f in res.files],
                                               "fallbacks": len(res.fallbacks), "notes": res.notes,
                                               "size_bytes": res.size_bytes, "bits_per_weight": res.bits_per_weight}

    base = run.stage("base", "convert", base_key, make_base)
    base_files = [out / p for p in base["paths"]]
    template_checks = {}
    if r.template_gate:
        from edgequant.release.template_gate import check_template

        template_checks[base_files[0].name] = check_template(base_files[0], tokenizer)

    # -- importance matrix --------------------------------------------------------------------------
    im_path, im_key = out / "imatrix.gguf", None
    if r.needs_imatrix:
        im_key = stage_key("imatrix", fingerprint, im_text.sha256, r.imatrix.ctx, r.imatrix.chunks, versions["edgequant"])

        def make_imatrix():
            from edgequant.quantize.imatrix import compute_imatrix

            res = compute_imatrix(ckpt.path, im_path, text=im_text, ctx=r.imatrix.ctx, chunks=r.imatrix.chunks,
                                  device=r.imatrix_device, force=True)
            return [im_path], {"text": res.dataset, "ctx": res.chunk_size, "chunks": res.chunks, "entries": res.entries}

        run.stage("imatrix", "imatrix", im_key, make_imatrix)

    # -- GGUF types -----------------------------------------------------------------------------------
    gguf_keys: dict[str, str] = {}

    def gguf_key(v, im: str | None) -> str:
        return stage_key("gguf", v.to_dict(), base_key, im if v.imatrix else None, versions["llama_cpp_python"])

    for v in r.gguf:
        key = gguf_key(v, im_key)
        gguf_keys[v.artifact] = key
        target = out / f"{r.name}-{v.artifact}.gguf"

        def make_quant(v=v, target=target):
            from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

            split = len(base_files) > 1
            opts = QuantizeOptions(imatrix=im_path if v.imatrix else None, output_tensor_type=v.output_tensor_type,
                                   token_embedding_type=v.token_embedding_type, tensor_types=list(v.tensor_types),
                                   pure=v.pure, leave_output_tensor=v.leave_output_tensor, keep_split=split, force=True)
            dest = out / STATE_DIR / f"split-{v.artifact}" if split else target
            (res,) = quantize(base_files[0], [v.type], dest, opts)
            files = [Path(f) for f in res.files]
            if split:  # shards named after the artifact, in the release folder
                n = len(files)
                moved = []
                for i, f in enumerate(sorted(files), 1):
                    final = out / shard_name(f"{r.name}-{v.artifact}", i, n)
                    os.replace(f, final)
                    moved.append(final)
                shutil.rmtree(dest, ignore_errors=True)
                files = moved
            return files, {"type": v.type, "files": [f.name for f in files], "fallbacks": [str(x) for x in res.fallbacks],
                           "type_counts": res.type_counts, "size_bytes": res.size_bytes,
                           "bits_per_weight": res.bits_per_weight, "imatrix": v.imatrix}

        rec = run.stage(v.artifact, "quantize", key, make_quant)
        if r.template_gate:
            first = out / rec["paths"][0]
            template_checks[first.name] = check_template(first, tokenizer)

    # -- GPTQ -------------------------------------------------------------------------------------------
    gptq_keys: dict[str, str] = {}
    gptq_device = "cuda" if "cuda" in r.devices else "cpu"

    def gptq_key(v, cal_sha: str) -> str:
        return stage_key("gptq", v.to_dict(), fingerprint, cal_sha, r.name, gptq_device, versions["gptqmodel"],
                         versions["edgequant"])

    for v in r.gptq:
        key = gptq_key(v, cal_text.sha256)
        gptq_keys[v.artifact] = key
        target = out / gptq_folder(r.name, v.artifact)

        def make_gptq(v=v, target=target):
            from edgequant.quantize.gptq import GPTQOptions, gptq

            staging = out / STATE_DIR / "gptq"
            shutil.rmtree(staging, ignore_errors=True)
            opts = GPTQOptions(group_size=v.group_size, desc_act=v.desc_act, sym=v.sym, damp_percent=v.damp_percent,
                               calibration=r.text_source("calibration"), samples=v.samples, seq_len=v.seq_len,
                               seed=v.seed, device=gptq_device, force=True)
            (res,) = gptq(ckpt.path, [v.bits], staging, opts)
            shutil.rmtree(target, ignore_errors=True)  # left by a run killed before it recorded the stage
            os.replace(res.folder, target)
            shutil.rmtree(staging, ignore_errors=True)
            return [target], {"bits": res.bits, "group_size": res.group_size, "size_bytes": res.size_bytes,
                              "bits_per_weight": res.bits_per_weight, "samples": res.samples, "seq_len": res.seq_len,
                              "calibration": res.calibration, "max_loss": res.max_loss, "notes": res.notes,
                              "desc_act": res.desc_act, "sym": res.sym}

        run.stage(v.artifact, "gptq", key, make_gptq)

    # -- what --only left out: published as they are when this folder holds them, fresh -------------------
    if r.left_out:
        from edgequant.release.recipe import GGUFVariant

        kept = {v.artifact for v in (*r.gguf, *r.gptq)}
        im_fresh = im_key if im_key is not None else stage_key(
            "imatrix", fingerprint, load_text(r.text_source("imatrix")).sha256, r.imatrix.ctx, r.imatrix.chunks,
            versions["edgequant"])
        cal_sha = cal_text.sha256 if cal_text is not None else None
        more_gguf, more_gptq = [], []
        for v in r.left_out:
            if v.artifact in kept:
                continue
            if isinstance(v, GGUFVariant):
                if v.imatrix and run.st.fresh("imatrix", im_fresh) is None:
                    continue
                key = gguf_key(v, im_fresh)
                if run.st.fresh(v.artifact, key) is not None:
                    gguf_keys[v.artifact] = key
                    more_gguf.append(v)
            else:
                cal_sha = cal_sha or load_text(r.text_source("calibration")).sha256
                key = gptq_key(v, cal_sha)
                if run.st.fresh(v.artifact, key) is not None:
                    gptq_keys[v.artifact] = key
                    more_gptq.append(v)
        if more_gguf or more_gptq:
            run.log(f"[dim]kept as they are[/] {escape(', '.join(v.artifact for v in (*more_gguf, *more_gptq)))}")
        from dataclasses import replace

        r = replace(r, gguf=r.gguf + tuple(more_gguf), gptq=r.gptq + tuple(more_gptq))

    # -- bench ------------------------------------------------------------------------------------------
    rows, bench_meta = _bench(run, r, base_files[0], base_key, gguf_keys, gptq_keys, bench_text, versions)

    # -- gates, outputs ---------------------------------------------------------------------------------
    manifest = _manifest(run, r, ckpt, fingerprint, versions, rows, bench_meta, tokenizer, template_checks, command)
    gate_results = _gates(r, manifest)
    manifest["gates"] = gate_results
    failed = [g for g in gate_results if not g["passed"]]
    manifest["status"] = "gates failed" if failed else "ok"
    _write_outputs(out, manifest, rows, bench_meta)
    result = ReleaseResult(folder=str(out), status=manifest["status"], made=run.made, skipped=run.skipped,
                           gates=gate_results, card=str(out / "README.md"), manifest=str(out / "manifest.json"),
                           seconds=round(time.perf_counter() - t0, 2))
    if failed:
        lines = "; ".join(f"{g['gate']}: {g['artifact']} measured {g['value']}" for g in failed)
        e = GateFailed(f"quality gate failed ({lines}); artifacts and manifest.json are in {out} with status 'gates failed'")
        e.result = result
        raise e
    return result


def _bench(run: _Run, r: Recipe, base_file: Path, base_key: str, gguf_keys: dict, gptq_keys: dict, text, versions) -> tuple[dict, dict]:
    """One bench row per model, remade only for models (or settings) that changed."""
    from edgequant.bench.run import BenchOptions, run_bench

    out = run.out
    b = r.bench
    from edgequant.llamacpp import repack_policy

    # the kernels (weight repacking on or off, docs/cpu.md) change the numbers: a bench made under the other policy is redone
    settings = {**b.to_dict(), "devices": list(r.devices), "text_sha256": text.sha256,
                **({} if repack_policy().repack else {"repack": False})}
    models = {"base": (base_file, base_key)}
    for art, key in gguf_keys.items():
        models[art] = (out / run.st.data["artifacts"][art]["paths"][0], key)
    for art, key in gptq_keys.items():
        models[art] = (out / run.st.data["artifacts"][art]["paths"][0], key)
    keys = {art: stage_key("bench", key, base_key, settings, versions["edgequant"]) for art, (_, key) in models.items()}
    rows = {art: run.st.bench_row(art, keys[art]) for art in models}
    stale = [art for art, row in rows.items() if row is None]
    meta = run.st.data.get("bench_meta") or {}
    if stale:
        paths = [str(models[a][0]) for a in stale if a != "base"]
        run.log(f"[bold]benchmarking[/] {escape(', '.join(stale))}")
        t0 = time.perf_counter()
        rep = run_bench(paths, BenchOptions(
            reference=str(base_file), text=text, ctx=b.ctx, chunks=b.chunks, devices=list(r.devices), threads=b.threads,
            flash_attn=b.flash_attn, speed=b.speed, quality=True, pp=b.pp_tokens, tg=b.tg_tokens, reps=b.repetitions))
        by_path = {row.model: row.to_dict() for row in rep.rows}
        for art in models:
            row = by_path.get(str(models[art][0]))
            if row is not None:
                row["model"] = base_file.name if art == "base" else str(Path(row["model"]).relative_to(out))
                rows[art] = row
                run.st.record_bench(art, keys[art], row)
        seconds = round(time.perf_counter() - t0, 2)
        meta = {"text": rep.text, "ctx": rep.ctx, "chunks": rep.chunks, "devices": rep.devices, "threads": rep.threads,
                "flash_attn": rep.flash_attn, "speed_settings": rep.speed_settings, "host": rep.host, "notes": rep.notes,
                "seconds": seconds}
        run.st.data["bench_meta"] = meta
        run.st.save()
        run._time("bench", seconds, skipped=False)
        run.made.append("bench")
    else:
        run._time("bench", meta.get("seconds", 0.0), skipped=True)
        run.skipped.append("bench")
    return rows, meta


_KLD_KEYS = ("kld_mean", "kld_p99", "kld_max", "delta_p_mean", "delta_p_rms", "same_top", "ln_ppl_ratio", "ppl_ratio")


def _metrics(row: dict | None, *, reference: bool = False) -> dict | None:
    """A bench row as manifest metrics; the reference's KLD columns are left empty (it is what the others are compared with)."""
    if not row:
        return None
    q = row.get("quality") or {}
    m = {k: q.get(k) for k in ("ppl", "ppl_error", *_KLD_KEYS)}
    if reference:
        m.update({k: None for k in _KLD_KEYS})
    speed = {}
    for s in row.get("speed") or []:
        if s.get("absent"):
            speed[s["device"]] = {"absent": s["absent"]}
        else:
            speed[s["device"]] = {k: s.get(k) for k in ("pp_tps", "pp_std", "tg_tps", "tg_std", "load_seconds",
                                                          "peak_rss_bytes", "peak_vram_bytes", "threads", "pp", "tg")}
    m["speed"] = speed
    return m


def _artifact_entry(run: _Run, art: str, kind: str, extra: dict) -> dict:
    rec = run.st.data["artifacts"][art]
    files = {rel: meta["sha256"] for rel, meta in rec["files"].items()}
    size = sum(meta["size"] for meta in rec["files"].values())
    paths = rec["paths"]
    sha = files[paths[0]] if len(files) == 1 else combined_sha256(files)
    entry = {"path": paths[0], "files": sorted(files), "kind": kind, "sha256": sha, "size_bytes": size}
    if len(files) > 1:
        entry["file_sha256"] = files
    entry.update(extra)
    return entry


def _manifest(run: _Run, r: Recipe, ckpt, fingerprint: str, versions: dict, rows: dict, bench_meta: dict,
              tokenizer, template_checks: dict, command: str | None) -> dict:
    from edgequant.env import host_info
    from edgequant.release.template_gate import example_prompt

    recs = run.st.data["artifacts"]
    artifacts = []
    if r.keep_base:
        res = recs["base"]["result"]
        artifacts.append(_artifact_entry(run, "base", "gguf", {
            "type": res["type"], "bits_per_weight": res["bits_per_weight"], "imatrix": False,
            "fallbacks": res["fallbacks"], "options": {"outtype": res["type"].lower()},
            "metrics": _metrics(rows.get("base"), reference=True)}))
    if "imatrix" in recs and r.needs_imatrix:
        res = recs["imatrix"]["result"]
        artifacts.append(_artifact_entry(run, "imatrix", "imatrix", {"type": "imatrix", "text": res["text"], "ctx": res["ctx"],
                                                                     "chunks": res["chunks"]}))
    for v in r.gguf:
        res = recs[v.artifact]["result"]
        artifacts.append(_artifact_entry(run, v.artifact, "gguf", {
            "type": v.artifact, "quant_type": v.type, "bits_per_weight": res["bits_per_weight"], "imatrix": v.imatrix,
            "fallbacks": res["fallbacks"], "options": v.to_dict(), "metrics": _metrics(rows.get(v.artifact))}))
    for v in r.gptq:
        res = recs[v.artifact]["result"]
        artifacts.append(_artifact_entry(run, v.artifact, "gptq", {
            "type": v.artifact, "bits": res["bits"], "group_size": res["group_size"], "bits_per_weight": res["bits_per_weight"],
            "options": v.to_dict(), "notes": res.get("notes", []), "metrics": _metrics(rows.get(v.artifact))}))
    eos = tokenizer.eos_token
    template = getattr(tokenizer, "chat_template", None)
    from edgequant.release.card import chat_family

    chat = {"template": template, "example": example_prompt(tokenizer) if template else None, "eos_tokens": [eos] if eos else [],
            "bos": tokenizer.bos_token, "checks": template_checks}
    chat["family"] = chat_family({"template": template or ""})
    readme_meta = _source_card_meta(ckpt.path)
    made_at = max((rec["result"].get("made_at", "") for rec in recs.values()), default="") or _now()
    base_name = Path(recs["base"]["paths"][0]).name
    return {
        "schema": MANIFEST_SCHEMA,
        "name": r.name,
        "created": made_at,
        "command": public_command(command, run.out),
        "recipe": _public_recipe(r.to_dict(), run.out, Path(r.base_dir)),
        "source": {"path": public_path(r.source, run.out, Path(r.base_dir)), "fingerprint": fingerprint, "architecture": ckpt.hf_architecture,
                   "n_params": sum(int(math.prod(t.shape)) for t in ckpt.tensors.values()),
                   "license": readme_meta.get("license"), "base_model": readme_meta.get("base_model") or (
                       r.source if not r.source_is_local else None)},
        "versions": versions,
        "host": host_info(),
        "chat_template": chat,
        "bench": {"text": public_path((bench_meta.get("text") or {}).get("name"), run.out, Path(r.base_dir)), "text_sha256": (bench_meta.get("text") or {}).get("sha256"),
                  "ctx": bench_meta.get("ctx"), "chunks": bench_meta.get("chunks"), "reference": base_name if r.keep_base else None,
                  "reference_file": base_name, "devices": bench_meta.get("devices"), "threads": bench_meta.get("threads"),
                  "speed_settings": bench_meta.get("speed_settings"), "host": bench_meta.get("host"),
                  "notes": bench_meta.get("notes", [])},
        "stages": run.timings,
        "artifacts": artifacts,
        "base_metrics": _metrics(rows.get("base"), reference=True),
    }


def _source_card_meta(folder: Path) -> dict:
    """license / base_model from the source README's YAML front matter, when it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a README without valid front matter: nothing to take
        return {}
    base = data.get("base_model")
    return {"license": data.get("license"), "base_model": base[0] if isinstance(base, list) and base else base}


def _gates(r: Recipe, manifest: dict) -> list[dict]:
    results = []
    arts = {a["type"]: a for a in manifest["artifacts"] if a["kind"] in ("gguf", "gptq")}
    base_types = {t.upper() for t in r.base_artifact_names}
    base_entry = {"metrics": manifest.get("base_metrics")}
    for g in r.gates:
        names = [n for n, a in arts.items() if n.upper() not in base_types] if g.artifact == "*" else [g.artifact]
        if g.artifact != "*" and g.artifact.upper() in base_types:  # base, F16, BF16: the 16-bit file, shipped or not
            names = [g.artifact]
            arts = {**arts, g.artifact: base_entry}
        device = r.gate_device(g)
        gate = g if device is None or g.device else type(g)(**{**g.to_dict(), "device": device})
        for n in names:
            a = arts.get(n)
            value = gate.value(a.get("metrics") if a else None)
            results.append({"gate": gate.describe(), "artifact": n, "metric": g.metric, "value": value,
                            "max": g.max, "min": g.min, "passed": gate.passes(value)})
    return results


def _write_outputs(out: Path, manifest: dict, rows: dict, bench_meta: dict) -> None:
    """bench.json/bench.md/quality.png, Modelfile, README.md, then manifest.json listing them all."""
    from edgequant.bench import report
    from edgequant.bench.run import BenchReport, ModelRow
    from edgequant.bench.speed import SpeedResult
    from edgequant.release.card import recommend, render_model_card, render_modelfile
    from edgequant.release.state import sha256_file

    recipe_bench = manifest["recipe"]["bench"]
    model_rows = []
    for art, row in rows.items():
        if row is None:
            continue
        d = dict(row)
        d["speed"] = [SpeedResult(**s) for s in d.get("speed") or []]
        model_rows.append(ModelRow(**d))
    bench_report = BenchReport(
        text=_public_text(bench_meta.get("text"), out), ctx=bench_meta.get("ctx") or recipe_bench["ctx"], chunks=bench_meta.get("chunks"),
        reference=manifest["bench"]["reference_file"], devices=bench_meta.get("devices") or manifest["recipe"]["release"]["devices"],
        quality_device=None if not model_rows else (model_rows[0].quality or {}).get("device"),
        threads=bench_meta.get("threads") or 0, flash_attn=bool(bench_meta.get("flash_attn", True)),
        speed_settings=bench_meta.get("speed_settings"), rows=model_rows, notes=bench_meta.get("notes", []),
        host=bench_meta.get("host") or {}, versions=manifest["versions"], seconds=manifest["stages"].get("bench", {}).get("seconds", 0.0))
    write_text(out / "bench.json", bench_report.to_json() + "\n")
    write_text(out / "bench.md", report.to_markdown(bench_report))
    outputs = [("bench.json", "bench"), ("bench.md", "bench")]
    if any(r.quality for r in model_rows):
        report.plot(bench_report, out / "quality.png")
        outputs.append(("quality.png", "plot"))
    rec = recommend(manifest)
    ggufs = [a for a in manifest["artifacts"] if a["kind"] == "gguf"]
    if ggufs:
        target = rec["path"] if rec else ggufs[0]["path"]
        write_text(out / "Modelfile", render_modelfile(manifest, target))
        outputs.append(("Modelfile", "modelfile"))
    write_text(out / "README.md", render_model_card(manifest))
    outputs.append(("README.md", "card"))
    for name, kind in outputs:
        p = out / name
        manifest["artifacts"].append({"path": name, "files": [name], "kind": kind, "sha256": sha256_file(p),
                                      "size_bytes": p.stat().st_size})
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")


# -- merging the manifests of a CI matrix -----------------------------------------------------------------


def release_merge(manifests: list[str | Path], output: str | Path, *, log: Log | None = None,
                  force: bool = False) -> ReleaseResult:
    """Combine the folders of ``release --only`` shards (each with its manifest.json) into one release.

    Every artifact file is checked against its shard's recorded sha256 and copied (hard-linked when
    possible) into ``output``; the bench rows, gate results and stage timings are combined; the bench
    report, plot, model card, Modelfile and manifest are written anew for the whole set."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    if not manifests:
        raise EdgequantError("release merge: name the manifest.json of each shard (e.g. parts/*/manifest.json)")
    out = Path(output)
    _guard_output(out, source=None, force=force)
    loaded = []
    for m in manifests:
        p = Path(m)
        p = p / "manifest.json" if p.is_dir() else p
        if not p.is_file():
            raise EdgequantError(f"release merge: {p} does not exist; pass each shard's manifest.json (or its folder)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise EdgequantError(f"release merge: {p} is not valid JSON ({e})") from None
        if data.get("schema") != MANIFEST_SCHEMA:
            raise EdgequantError(f"release merge: {p} is not an edgequant manifest ({MANIFEST_SCHEMA})")
        loaded.append((p.parent, data))
    first = loaded[0][1]
    for folder, data in loaded[1:]:
        if data["source"]["fingerprint"] != first["source"]["fingerprint"] or data["name"] != first["name"]:
            raise EdgequantError(f"release merge: {folder} was made from another source or name than {loaded[0][0]}; "
                                 f"merge only shards of one recipe")
    from edgequant.release.state import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    gates: list[dict] = []
    stages: dict[str, dict] = {}
    for folder, data in loaded:
        bench_rows = {}
        bj = folder / "bench.json"
        if bj.is_file():
            bench_rows = {row["model"]: row for row in json.loads(bj.read_text()).get("rows", [])}
        for a in data["artifacts"]:
            if a["kind"] not in ("gguf", "gptq", "imatrix"):
                continue
            seen = artifacts.get(a["path"])
            if seen is not None:
                if seen["sha256"] != a["sha256"]:
                    raise EdgequantError(f"release merge: {a['path']} differs between shards (sha256 {seen['sha256'][:12]} vs "
                                         f"{a['sha256'][:12]}); the shards were not made from the same inputs")
                continue
            hashes = a.get("file_sha256") or {a["files"][0]: a["sha256"]}
            for rel in a["files"]:
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
            artifacts[a["path"]] = a
            log(f"merged {escape(a['path'])}")
            if a["path"] in bench_rows:
                rows[a["path"]] = bench_rows[a["path"]]
        ref = data["bench"].get("reference_file")
        if ref in bench_rows:  # the reference row (kept even when the base file is not shipped)
            rows.setdefault(ref, bench_rows[ref])
        gates += data.get("gates", [])
        for k, v in (data.get("stages") or {}).items():
            t = stages.setdefault(k, {"seconds": 0.0, "skipped": True})
            t["seconds"] = round(t["seconds"] + v.get("seconds", 0.0), 2)
            t["skipped"] = t["skipped"] and v.get("skipped", False)
    manifest = dict(first)
    import shlex

    manifest["command"] = public_command(shlex.join(["edgequant", "release", "merge", *(str(f / "manifest.json") for f, _ in loaded),
                                                     "-o", str(out)]), out)
    recipe = json.loads(json.dumps(first["recipe"]))
    for _, data in loaded[1:]:  # the shards' selections together: the recipe of the whole release
        for table, items in (("gguf", data["recipe"]["release"]["gguf"]), ("gptq", data["recipe"]["gptq"])):
            target = recipe["release"]["gguf"] if table == "gguf" else recipe["gptq"]
            for item in items:
                if item not in target:
                    target.append(item)
        for gate in data["recipe"].get("gates", []):
            if gate not in recipe["gates"]:
                recipe["gates"].append(gate)
    manifest["recipe"] = recipe
    seen_gates = set()
    gates = [g for g in gates if (g["gate"], g["artifact"]) not in seen_gates and not seen_gates.add((g["gate"], g["artifact"]))]
    order = {"gguf": 0, "imatrix": 1, "gptq": 2}
    manifest["artifacts"] = sorted(artifacts.values(), key=lambda a: (order[a["kind"]], -(a.get("size_bytes") or 0)))
    manifest["gates"] = gates
    manifest["stages"] = stages
    manifest["status"] = "gates failed" if any(not g["passed"] for g in gates) else "ok"
    manifest["merged_from"] = [{"folder": public_path(str(f), out), "recipe_gguf": [g["type"] for g in d["recipe"]["release"]["gguf"]],
                                "recipe_gptq": [g["bits"] for g in d["recipe"]["gptq"]], "host": d.get("host")} for f, d in loaded]
    bench_meta = {"text": {"name": first["bench"]["text"], "sha256": first["bench"].get("text_sha256"), "chars": 0},
                  "ctx": first["bench"]["ctx"], "chunks": first["bench"]["chunks"], "devices": first["bench"]["devices"],
                  "threads": first["bench"]["threads"], "speed_settings": first["bench"].get("speed_settings"),
                  "host": first["bench"].get("host"), "notes": first["bench"].get("notes", []), "flash_attn": True}
    _write_outputs(out, manifest, rows, bench_meta)
    return ReleaseResult(folder=str(out), status=manifest["status"], made=sorted(artifacts), gates=gates,
                         card=str(out / "README.md"), manifest=str(out / "manifest.json"),
                         seconds=round(time.perf_counter() - t0, 2))
