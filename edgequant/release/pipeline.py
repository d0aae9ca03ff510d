"""``edgequant release``: one recipe in, every publishable artifact out, resumable and auditable.

Stages, each content-addressed (``state.py``) and each one function below: the 16-bit base GGUF,
the importance matrix, one stage per GGUF type and per GPTQ variant, what ``--only`` left out,
then one bench row per model. The template gate runs on every GGUF as soon as it exists (a mismatch
stops the release with the diff); quality gates run on the bench numbers. Then the folder gets
``bench.json``/``bench.md``/``quality.png``, the model card (``README.md``), the Ollama ``Modelfile``
and ``manifest.json`` (sha256 of every artifact; ``outputs.py``, ``manifest.py``).

Exit codes through the CLI: 0 done, 2 bad input (before any work), 3 a quality gate failed (every
artifact and the manifest are still written, with the gate results), 130 interrupted.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from rich.markup import escape

from edgequant.env import tool_versions
from edgequant.errors import EdgequantError, GateFailed
from edgequant.naming import gptq_folder
from edgequant.release.manifest import (Artifact, BenchInfo, ChatTemplate, GGUFArtifact, GPTQArtifact, Host,
                                        ImatrixArtifact, Manifest, Metrics, RecipeRecord, Source, StageTime, fallback_list)
from edgequant.release.merge import release_merge
from edgequant.release.outputs import BenchMeta, ReleaseResult, evaluate_gates, guard_output, write_outputs
from edgequant.release.public import public_command, public_path, public_recipe
from edgequant.release.recipe import GGUFVariant, GPTQVariant, Recipe
from edgequant.release.state import STATE_DIR, Stages, combined_sha256, sha256_file, stage_key

__all__ = ["ReleaseResult", "public_command", "release", "release_merge"]

Log = Callable[[str], None]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Run:
    """One release run: the recipe, its inputs, the state record, the log, and each stage's key and time."""

    def __init__(self, recipe: Recipe, stages: Stages, log: Log):
        self.r = recipe
        self.out = stages.root
        self.st = stages
        self.log = log
        self.versions = tool_versions()
        self.made: list[str] = []
        self.skipped: list[str] = []
        self.timings: dict[str, StageTime] = {}
        self.template_checks: dict[str, list[dict]] = {}
        self.base_key = ""
        self.base_files: list[Path] = []
        self.im_key: str | None = None
        self.gguf_keys: dict[str, str] = {}
        self.gptq_keys: dict[str, str] = {}
        self.gptq_device = "cuda" if "cuda" in recipe.devices else "cpu"
        # set by open_source
        self.ckpt = self.tokenizer = self.fingerprint = None
        self.cal_text = self.im_text = self.bench_text = None

    def open_source(self) -> None:
        """The checkpoint, its fingerprint and tokenizer, and every text the stages read (a bad text fails here)."""
        from edgequant.progress import quiet_libraries

        quiet_libraries()
        from transformers import AutoTokenizer

        from edgequant.checkpoint import open_checkpoint
        from edgequant.remote_code import load_kwargs, refused
        from edgequant.text import load_text

        r = self.r
        self.ckpt = open_checkpoint(r.source_ref)
        self.fingerprint = self.ckpt.fingerprint()
        (self.out / "manifest.json").unlink(missing_ok=True)  # written last: never describes a half-made release
        with refused(self.ckpt.path):
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.ckpt.path), **load_kwargs(self.ckpt.path))
        self.cal_text = load_text(r.text_source("calibration")) if r.gptq or r.has_mix else None
        self.im_text = load_text(r.text_source("imatrix")) if r.needs_imatrix else None
        self.bench_text = load_text(r.text_source("bench"))

    def stage(self, artifact: str, group: str, key: str, make: Callable[[], tuple[list[Path], dict]]) -> dict:
        """Skip when fresh, else remove the old files, make, hash and record."""
        rec = self.st.fresh(artifact, key)
        if rec is not None:
            self.skipped.append(artifact)
            self.log(f"[dim]unchanged[/] {escape(artifact)}")  # log lines are rich markup: names are escaped
            self.add_time(group, rec["result"].get("stage_seconds", 0.0), skipped=True)
            return rec
        self.st.forget(artifact)
        self.log(f"[bold]making[/] {escape(artifact)}")
        t0 = time.perf_counter()
        paths, result = make()
        result["stage_seconds"] = round(time.perf_counter() - t0, 2)
        result["made_at"] = _now()
        rec = self.st.record(artifact, key, paths, result)
        self.made.append(artifact)
        self.add_time(group, result["stage_seconds"], skipped=False)
        return rec

    def add_time(self, group: str, seconds: float, *, skipped: bool) -> None:
        self.timings.setdefault(group, StageTime()).add(seconds, skipped=skipped)

    def check_template(self, gguf: Path) -> None:
        """The template gate on one GGUF (raises on a mismatch), when the recipe asks for it."""
        if self.r.template_gate:
            from edgequant.release.template_gate import check_template

            self.template_checks[gguf.name] = check_template(gguf, self.tokenizer)

    # -- stage keys: everything that changes what a stage makes --

    def imatrix_engine(self) -> str:
        from edgequant.quantize.imatrix_llamacpp import resolve_engine

        return resolve_engine(self.r.imatrix.engine, self.ckpt.path, self.r.imatrix_device)

    def imatrix_key(self, text_sha256: str) -> str:
        r, engine = self.r, self.imatrix_engine()
        on = (self.base_key, self.versions.llama_cpp_python) if engine == "llama.cpp" else (self.fingerprint,)
        # the policy for MoE experts no token reached changes the file (expert_coverage.py)
        return stage_key("imatrix", *on, engine, text_sha256, r.imatrix.ctx, r.imatrix.chunks, self.versions.edgequant,
                         r.imatrix.unseen_experts)

    def gguf_key(self, v: GGUFVariant, im_key: str | None) -> str:
        # a target entry's choice also depends on the calibration text it probes with and on edgequant's chooser
        mix = (self.cal_sha256(), self.r.bench.ctx, self.r.bench.threads, self.versions.edgequant) if v.target else ()
        return stage_key("gguf", v.to_dict(), self.base_key, im_key if v.imatrix else None, self.versions.llama_cpp_python,
                         *mix)

    def cal_sha256(self) -> str:
        """The calibration text's sha256 (read on first use: only GPTQ and target entries need it)."""
        if self.cal_text is None:
            from edgequant.text import load_text

            self.cal_text = load_text(self.r.text_source("calibration"))
        return self.cal_text.sha256

    def gptq_key(self, v: GPTQVariant, cal_sha256: str) -> str:
        return stage_key("gptq", v.to_dict(), self.fingerprint, cal_sha256, self.r.name, self.gptq_device,
                         self.versions.gptqmodel, self.versions.edgequant)


def release(recipe: Recipe, *, log: Log | None = None, command: str | None = None, force: bool = False) -> ReleaseResult:
    """Run ``recipe`` (validated already by ``load_recipe``/``recipe_from_options``) into its output folder.

    ``force``: write into a folder that holds other files (or a hand-edited card), replacing files
    with the release's names."""
    t0 = time.perf_counter()
    out = recipe.output_dir
    guard_output(out, source=Path(recipe.source_ref) if recipe.source_is_local else None, force=force)
    out.mkdir(parents=True, exist_ok=True)
    with Stages(out).locked() as stages:
        run = _Run(recipe, stages, log or (lambda msg: None))
        run.open_source()
        recipe = run.r = _without_refused_gptq(run)
        _base_stage(run)
        if recipe.needs_imatrix:
            _imatrix_stage(run)
        for v in recipe.gguf:
            _gguf_stage(run, v)
        for v in recipe.gptq:
            _gptq_stage(run, v)
        r = _with_left_out(run) if recipe.left_out else recipe
        rows, meta = _bench_stage(run, r)
        manifest = _build_manifest(run, r, rows, meta, command)
        return _finish(run, r, manifest, rows, meta, t0)


# -- the stages ------------------------------------------------------------------------------------------


def _base_stage(run: _Run) -> None:
    """The 16-bit GGUF every quant is made from and measured against (in ``.edgequant/work`` unless kept)."""
    r, out = run.r, run.out
    base_t = r.base_type.upper()
    if base_t == "AUTO":
        import torch

        base_t = "BF16" if run.ckpt.source_dtype() == torch.bfloat16 else "F16"
    base_path = (out if r.keep_base else out / STATE_DIR / "work") / f"{r.name}-{base_t}.gguf"
    template_file = r.resolve(r.chat_template) if r.chat_template else None
    run.base_key = stage_key("base", run.fingerprint, base_t, r.split_max_size, r.name, r.keep_base,
                             template_file.read_text() if template_file else None, r.sliding_window,
                             run.versions.edgequant, *([r.converter] if r.converter != "auto" else []))

    def make():
        from edgequant.export.convert import convert

        res = convert(run.ckpt.path, base_path, outtype=base_t.lower(), chat_template=template_file,
                      split_max_size=r.split_max_size, model_name=r.name, force=True, sliding_window=r.sliding_window,
                      converter=r.converter)
        files = [Path(f) for f in res.files]
        return files, {"type": base_t, "files": [f.name for f in files], "fallbacks": list(res.fallbacks),
                       "notes": res.notes, "size_bytes": res.size_bytes, "bits_per_weight": res.bits_per_weight,
                       "architecture": res.architecture, "sliding_window": res.sliding_window,
                       "converter": res.converter}

    rec = run.stage("base", "convert", run.base_key, make)
    run.base_files = [out / p for p in rec["paths"]]
    run.check_template(run.base_files[0])


def _imatrix_stage(run: _Run) -> None:
    """The importance matrix the imatrix GGUF types are quantized with."""
    r, im_path = run.r, run.out / "imatrix.gguf"
    run.im_key = run.imatrix_key(run.im_text.sha256)

    engine = run.imatrix_engine()

    def make():
        from edgequant.quantize.imatrix_llamacpp import compute

        # llama.cpp runs the base GGUF made just before (a split base loads from its first shard)
        source = run.base_files[0] if engine == "llama.cpp" else run.ckpt.path
        res = compute(source, im_path, engine=engine, text=run.im_text, ctx=r.imatrix.ctx, chunks=r.imatrix.chunks,
                      device=r.imatrix_device, unseen_experts=r.imatrix.unseen_experts, force=True)
        for w in res.warnings:  # unseen MoE experts: said in the log, and the coverage goes into the manifest and card
            run.log(f"[yellow]warning[/] {escape(w)}")
        return [im_path], {"text": res.dataset, "ctx": res.chunk_size, "chunks": res.chunks, "entries": res.entries,
                           "engine": res.engine, "coverage": None if res.coverage is None else res.coverage.to_dict()}

    run.stage("imatrix", "imatrix", run.im_key, make)


def _imatrix_coverage(run: _Run, rec: dict):
    """The expert coverage of the imatrix stage (None for a dense model); a record made before there was
    coverage has none: it is read from the file it recorded."""
    from edgequant.quantize.expert_coverage import ExpertCoverage

    if "coverage" in rec["result"]:
        return ExpertCoverage.from_dict(rec["result"]["coverage"])
    from edgequant.quantize.imatrix_file import read_imatrix

    return read_imatrix(run.out / rec["paths"][0]).coverage


def _gguf_stage(run: _Run, v: GGUFVariant) -> None:
    """One GGUF type, quantized from the base file, then through the template gate."""
    key = run.gguf_key(v, run.im_key)
    run.gguf_keys[v.artifact] = key
    make = (lambda: _mix(run, v)) if v.target is not None else (lambda: _quantize(run, v))
    rec = run.stage(v.artifact, "quantize", key, make)
    run.check_template(run.out / rec["paths"][0])


def _quantize(run: _Run, v: GGUFVariant) -> tuple[list[Path], dict]:
    """Quantize the base into ``Name-TYPE.gguf`` (a split base gives shards named after the artifact)."""
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

    out, name = run.out, f"{run.r.name}-{v.artifact}"
    split = len(run.base_files) > 1
    opts = QuantizeOptions(imatrix=out / "imatrix.gguf" if v.imatrix else None, output_tensor_type=v.output_tensor_type,
                           token_embedding_type=v.token_embedding_type, tensor_types=list(v.tensor_types),
                           pure=v.pure, leave_output_tensor=v.leave_output_tensor, keep_split=split, force=True)
    (res,) = quantize(run.base_files[0], [v.type], out / f"{name}.gguf", opts)  # split: Name-TYPE-0000i-of-0000n
    files = [Path(f) for f in res.files]
    return files, {"type": v.type, "files": [f.name for f in files], "fallbacks": [str(x) for x in res.fallbacks],
                   "type_counts": res.type_counts, "size_bytes": res.size_bytes,
                   "bits_per_weight": res.bits_per_weight, "imatrix": v.imatrix}


def _mix(run: _Run, v: GGUFVariant) -> tuple[list[Path], dict]:
    """A target entry: ``edgequant quantize --target-*`` on the base into ``Name-<target>-mix.gguf``, its
    per-tensor list beside it (``.tensor-types.txt``, published with it). Probes run on the calibration text
    at the bench's ctx and threads."""
    from edgequant.mix.target import TargetOptions, quantize_target, tensor_type_lines

    r, out = run.r, run.out
    opts = TargetOptions(imatrix=out / "imatrix.gguf" if v.imatrix else None, calibration=r.text_source("calibration"),
                         ctx=r.bench.ctx, calibration_chunks=v.calibration_chunks,
                         max_slowdown=v.max_slowdown if v.speed_check else None, threads=r.bench.threads or 0,
                         exclude_types=v.exclude_types, force=True)
    try:
        res = quantize_target(run.base_files[0], v.target, out / f"{r.name}-{v.artifact}.gguf", opts)
    except EdgequantError as e:  # an impossible target for this model: say which entry
        raise EdgequantError(f"gguf entry {v.artifact}: {e}") from None
    if not res.met:
        run.log(f"[yellow]{escape(v.artifact)}: the target was not met[/] (measured KLD "
                f"{res.measured.get('kld_mean'):.4g} on the calibration chunks); the card and manifest say so")
    path = Path(res.file)
    summary = {"target": res.target.to_dict(), "file_type": res.file_type, "budget_bytes": res.budget_bytes,
               "predicted_kld": res.predicted_kld, "calibration_kld": res.measured.get("kld_mean"), "met": res.met,
               "calibration": {k: res.calibration[k] for k in ("text", "chunks", "ctx", "tokens")},
               "standard": res.standard, "speed": res.speed, "excluded_types": res.excluded_types,
               "type_counts": res.type_counts, "roles": res.roles,
               "tensor_types_file": Path(res.tensor_types_file).name, "seconds": res.seconds,
               "reproduce": res.reproduce, "notes": res.notes}
    return [path], {"type": v.artifact, "files": [path.name], "fallbacks": [], "type_counts": res.type_counts,
                    "size_bytes": res.size_bytes, "bits_per_weight": res.bits_per_weight, "imatrix": v.imatrix,
                    "mix": summary, "tensor_types": tensor_type_lines(res.tensor_types)}


def _without_refused_gptq(run: _Run) -> Recipe:
    """The recipe without its GPTQ checkpoints when ``edgequant gptq`` refuses the family (GPT-OSS): they are
    skipped with the refusal as the log line, the rest of the release goes on."""
    import dataclasses

    from edgequant.quantize.gptq import gptq_refusal

    r = run.r
    why = gptq_refusal(run.ckpt) if r.gptq else None
    if why is None:
        return r
    for v in r.gptq:
        run.skipped.append(v.artifact)
        run.log(f"[bold]skipped[/] {escape(v.artifact)}: {escape(why)}")
    return dataclasses.replace(r, gptq=())


def _gptq_stage(run: _Run, v: GPTQVariant) -> None:
    """One GPTQ checkpoint folder, made in ``.edgequant/gptq`` and moved into place when complete."""
    key = run.gptq_key(v, run.cal_text.sha256)
    run.gptq_keys[v.artifact] = key
    run.stage(v.artifact, "gptq", key, lambda: _make_gptq(run, v, run.out / gptq_folder(run.r.name, v.artifact)))


def _make_gptq(run: _Run, v: GPTQVariant, target: Path) -> tuple[list[Path], dict]:
    """Quantize with GPTQModel into a staging folder, then move it to ``target``."""
    from edgequant.quantize.gptq import GPTQOptions, gptq

    staging = run.out / STATE_DIR / "gptq"
    shutil.rmtree(staging, ignore_errors=True)
    opts = GPTQOptions(group_size=v.group_size, desc_act=v.desc_act, sym=v.sym, damp_percent=v.damp_percent,
                       calibration=run.r.text_source("calibration"), samples=v.samples, seq_len=v.seq_len,
                       seed=v.seed, moe_routing=v.moe_routing, device=run.gptq_device, force=True)
    (res,) = gptq(run.ckpt.path, [v.bits], staging, opts)
    shutil.rmtree(target, ignore_errors=True)  # left by a run killed before it recorded the stage
    os.replace(res.folder, target)
    shutil.rmtree(staging, ignore_errors=True)
    return [target], {"bits": res.bits, "group_size": res.group_size, "size_bytes": res.size_bytes,
                      "bits_per_weight": res.bits_per_weight, "samples": res.samples, "seq_len": res.seq_len,
                      "calibration": res.calibration, "max_loss": res.max_loss, "notes": res.notes,
                      "desc_act": res.desc_act, "sym": res.sym, "defuser_model_type": res.defuser_model_type,
                      "gptq_loader": res.gptq_loader,
                      "experts": res.experts.to_dict() if res.experts else None, "warnings": list(res.warnings)}


def _with_left_out(run: _Run) -> Recipe:
    """What ``--only`` left out, published as it is when this folder holds it fresh: the recipe with those added."""
    from edgequant.text import load_text

    r = run.r
    kept = {v.artifact for v in (*r.gguf, *r.gptq)}
    im_fresh = run.im_key or run.imatrix_key(load_text(r.text_source("imatrix")).sha256)
    cal_sha = run.cal_text.sha256 if run.cal_text is not None else None
    more_gguf, more_gptq = [], []
    for v in r.left_out:
        if v.artifact in kept:
            continue
        if isinstance(v, GGUFVariant):
            if v.imatrix and run.st.fresh("imatrix", im_fresh) is None:
                continue
            key = run.gguf_key(v, im_fresh)
            if run.st.fresh(v.artifact, key) is not None:
                run.gguf_keys[v.artifact] = key
                more_gguf.append(v)
        else:
            cal_sha = cal_sha or load_text(r.text_source("calibration")).sha256
            key = run.gptq_key(v, cal_sha)
            if run.st.fresh(v.artifact, key) is not None:
                run.gptq_keys[v.artifact] = key
                more_gptq.append(v)
    if more_gguf or more_gptq:
        run.log(f"[dim]kept as they are[/] {escape(', '.join(v.artifact for v in (*more_gguf, *more_gptq)))}")
    return replace(r, gguf=r.gguf + tuple(more_gguf), gptq=r.gptq + tuple(more_gptq))


def _bench_stage(run: _Run, r: Recipe) -> tuple[dict[str, dict | None], BenchMeta]:
    """One bench row per model, remade only for models (or settings) that changed."""
    from edgequant.bench.run import BenchOptions, run_bench
    from edgequant.llamacpp import repack_policy

    out, b, base_file = run.out, r.bench, run.base_files[0]
    # the kernels (weight repacking on or off, docs/cpu.md) change the numbers: a bench made under the other policy is redone
    settings = {**b.to_dict(), "devices": list(r.devices), "text_sha256": run.bench_text.sha256,
                **({} if repack_policy().repack else {"repack": False})}
    models = {"base": (base_file, run.base_key)}
    for art, key in (*run.gguf_keys.items(), *run.gptq_keys.items()):
        models[art] = (out / run.st.data["artifacts"][art]["paths"][0], key)
    keys = {art: stage_key("bench", key, run.base_key, settings, run.versions.edgequant) for art, (_, key) in models.items()}
    rows = {art: run.st.bench_row(art, keys[art]) for art in models}
    stale = [art for art, row in rows.items() if row is None]
    meta = run.st.data.get("bench_meta") or {}
    if stale:
        run.log(f"[bold]benchmarking[/] {escape(', '.join(stale))}")
        t0 = time.perf_counter()
        rep = run_bench([str(models[a][0]) for a in stale if a != "base"], BenchOptions(
            reference=str(base_file), text=run.bench_text, ctx=b.ctx, chunks=b.chunks, devices=list(r.devices),
            threads=b.threads, flash_attn=b.flash_attn, speed=b.speed, quality=True, pp=b.pp_tokens, tg=b.tg_tokens,
            reps=b.repetitions))
        by_path = {row.model: row.to_dict() for row in rep.rows}
        for art, (path, _) in models.items():
            row = by_path.get(str(path))
            if row is not None:
                row["model"] = base_file.name if art == "base" else str(Path(row["model"]).relative_to(out))
                rows[art] = row
                run.st.record_bench(art, keys[art], row)
        meta = BenchMeta(text=rep.text, ctx=rep.ctx, chunks=rep.chunks, devices=rep.devices, threads=rep.threads,
                         flash_attn=rep.flash_attn, speed_settings=rep.speed_settings, host=rep.host, notes=rep.notes,
                         seconds=round(time.perf_counter() - t0, 2)).to_dict()
        run.st.data["bench_meta"] = meta
        run.st.save()
        run.made.append("bench")
    else:
        run.skipped.append("bench")
    run.add_time("bench", meta.get("seconds", 0.0), skipped=not stale)
    return rows, BenchMeta.from_dict(meta, ctx=b.ctx, devices=list(r.devices), flash_attn=b.flash_attn)


# -- the manifest -----------------------------------------------------------------------------------------


def _build_manifest(run: _Run, r: Recipe, rows: dict, meta: BenchMeta, command: str | None) -> Manifest:
    """Everything the release made and measured (gates and status are added by ``_finish``)."""
    recs = run.st.data["artifacts"]
    made_at = max((rec["result"].get("made_at", "") for rec in recs.values()), default="") or _now()
    base_name = Path(recs["base"]["paths"][0]).name
    text = meta.text or {}
    bench = BenchInfo(text=public_path(text.get("name"), run.out, Path(r.base_dir)), text_sha256=text.get("sha256"),
                      ctx=meta.ctx, chunks=meta.chunks, reference=base_name if r.keep_base else None,
                      reference_file=base_name, devices=meta.devices, threads=meta.threads,
                      speed_settings=meta.speed_settings, host=Host.from_dict(meta.host), notes=meta.notes)
    from edgequant.env import host_info

    return Manifest(name=r.name, created=made_at, command=public_command(command, run.out),
                    recipe=RecipeRecord(public_recipe(r.to_dict(), run.out, Path(r.base_dir))), source=_source(run, r),
                    versions=run.versions, host=Host.from_dict(host_info()), chat_template=_chat_template(run),
                    bench=bench, stages=run.timings, artifacts=_artifacts(run, r, rows),
                    base_metrics=Metrics.from_bench_row(rows.get("base"), reference=True))


def _source(run: _Run, r: Recipe) -> Source:
    """The source as published, with the license and base model its README's front matter names."""
    readme = _source_card_meta(run.ckpt.path)
    return Source(path=public_path(r.source, run.out, Path(r.base_dir)), fingerprint=run.fingerprint,
                  architecture=run.ckpt.hf_architecture,
                  n_params=sum(int(math.prod(t.shape)) for t in run.ckpt.tensors.values()), license=readme.get("license"),
                  base_model=readme.get("base_model") or (r.source if not r.source_is_local else None))


def _chat_template(run: _Run) -> ChatTemplate:
    """The source tokenizer's chat template, a rendered example, its stop tokens and the template gate's records."""
    from edgequant.release.modelfile import chat_family
    from edgequant.release.template_gate import example_prompt

    tok = run.tokenizer
    template = getattr(tok, "chat_template", None)
    ct = ChatTemplate(template=template, example=example_prompt(tok) if template else None,
                      eos_tokens=[tok.eos_token] if tok.eos_token else [], bos=tok.bos_token, checks=run.template_checks)
    ct.family = chat_family(ct)  # recognised from the markers and confirmed on the example
    return ct


def _files(run: _Run, art: str) -> dict:
    """An artifact's path, files, sha256 (combined over several files) and size, from its stage record."""
    rec = run.st.data["artifacts"][art]
    files = {rel: meta["sha256"] for rel, meta in rec["files"].items()}
    path = rec["paths"][0]
    return {"path": path, "files": sorted(files), "sha256": files[path] if len(files) == 1 else combined_sha256(files),
            "size_bytes": sum(meta["size"] for meta in rec["files"].values()),
            "file_sha256": files if len(files) > 1 else None}


def _artifacts(run: _Run, r: Recipe, rows: dict) -> list:
    """The base (when kept), the imatrix, each GGUF and each GPTQ artifact, with their measured metrics."""
    recs = run.st.data["artifacts"]
    arts: list = []
    base = recs["base"]["result"]  # every GGUF is quantized from the base: its converter facts are theirs
    conv = {"sliding_window": base.get("sliding_window"), "architecture": base.get("architecture"),
            "notes": list(base.get("notes") or [])}
    if r.keep_base:
        res = recs["base"]["result"]
        arts.append(GGUFArtifact(**_files(run, "base"), type=res["type"], bits_per_weight=res["bits_per_weight"],
                                 fallbacks=fallback_list(res["fallbacks"]), options={"outtype": res["type"].lower()},
                                 metrics=Metrics.from_bench_row(rows.get("base"), reference=True), **conv))
    if "imatrix" in recs and r.needs_imatrix:
        res = recs["imatrix"]["result"]
        arts.append(ImatrixArtifact(**_files(run, "imatrix"), text=res["text"], ctx=res["ctx"], chunks=res["chunks"],
                                    engine=res.get("engine", "torch"), coverage=_imatrix_coverage(run, recs["imatrix"])))
    for v in r.gguf:
        res = recs[v.artifact]["result"]
        arts.append(GGUFArtifact(**_files(run, v.artifact), type=v.artifact, quant_type=v.type or "mix",
                                 bits_per_weight=res["bits_per_weight"], imatrix=v.imatrix,
                                 fallbacks=fallback_list(res["fallbacks"]), options=v.to_dict(),
                                 metrics=Metrics.from_bench_row(rows.get(v.artifact)), mix=res.get("mix"), **conv))
        if res.get("mix"):
            arts.append(_tensor_types_artifact(run, res))
    for v in r.gptq:
        res = recs[v.artifact]["result"]
        arts.append(GPTQArtifact(**_files(run, v.artifact), type=v.artifact, bits=res["bits"], group_size=res["group_size"],
                                 bits_per_weight=res["bits_per_weight"], options=v.to_dict(), notes=res.get("notes", []),
                                 defuser_model_type=_defuser_type(run, v, res),
                                 gptq_loader=res["gptq_loader"] if "gptq_loader" in res else _loader(run, v),
                                 metrics=Metrics.from_bench_row(rows.get(v.artifact))))
    return arts


def _tensor_types_artifact(run: _Run, res: dict) -> Artifact:
    """A mix's ``.tensor-types.txt`` (for ``--tensor-type-file``), written again from the stage record when missing."""
    from edgequant.atomic import write_text

    name = res["mix"]["tensor_types_file"]
    p = run.out / name
    text = "\n".join(res["tensor_types"]) + "\n"
    if not p.is_file() or p.read_text() != text:
        write_text(p, text)
    return Artifact(path=name, files=[name], kind="tensor_types", sha256=sha256_file(p), size_bytes=p.stat().st_size)


def _loader(run: _Run, v: GPTQVariant) -> str | None:
    """How the folder loads (``gptq_load.gptq_loader``), for stage records made before the GPTQ stage kept it."""
    from edgequant.gptq_load import gptq_loader

    return gptq_loader(run.out / gptq_folder(run.r.name, v.artifact))


def _defuser_type(run: _Run, v: GPTQVariant, res: dict) -> str | None:
    """What the card's loading snippet hands defuser; read from the folder for stage records made before
    the GPTQ stage kept it."""
    if "defuser_model_type" in res:
        return res["defuser_model_type"]
    from edgequant.gptq_load import defuser_model_type

    return defuser_model_type(run.out / gptq_folder(run.r.name, v.artifact))


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


def _finish(run: _Run, r: Recipe, manifest: Manifest, rows: dict, meta: BenchMeta, t0: float) -> ReleaseResult:
    """Gates, then every output file; raise ``GateFailed`` (with the result) when a gate failed."""
    manifest.gates = evaluate_gates(r, manifest)
    failed = [g for g in manifest.gates if not g.passed]
    manifest.status = "gates failed" if failed else "ok"
    write_outputs(run.out, manifest, rows, meta)
    result = ReleaseResult(folder=str(run.out), status=manifest.status, made=run.made, skipped=run.skipped,
                           gates=[g.to_dict() for g in manifest.gates], card=str(run.out / "README.md"),
                           manifest=str(run.out / "manifest.json"), seconds=round(time.perf_counter() - t0, 2))
    if failed:
        lines = "; ".join(f"{g.gate}: {g.artifact} measured {g.value}" for g in failed)
        e = GateFailed(f"quality gate failed ({lines}); artifacts and manifest.json are in {run.out} with status 'gates failed'")
        e.result = result
        raise e
    return result
