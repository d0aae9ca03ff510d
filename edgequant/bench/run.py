"""``edgequant bench``: perplexity, KL divergence and speed for GGUF files and HF/GPTQ folders in one run.

The flow:
1. Every input is checked before any work: paths, kinds (GGUF, HF, GPTQ), devices, text length.
2. Quality (unless ``speed_only``): the text is tokenized once with the reference's tokenizer (or
   the first model's when there is no reference); every model's own tokenizer must produce the
   same ids, else the run stops — rows are only comparable on the same tokens. All models are
   loaded at once and the chunks are evaluated as llama-perplexity evaluates them, several per
   decode (its ``n_seq``), logits only for the scored halves: the reference's logits for a chunk
   become llama-perplexity's compressed log-probs, each model is scored against them, and they are
   dropped before the next decode.
3. Speed (unless ``quality_only``): each model alone, on each requested device, like llama-bench.

Quality runs on the CPU when it is among the devices (else on CUDA); speed on every device. A device
a model cannot use gives a row that says why (``absent``), never CPU numbers under a GPU label.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgequant.bench.backends import chunks_per_decode, cuda_absent_reason, gguf_header, model_kind, open_backend
from edgequant.bench.options import BenchOptions  # noqa: F401 (re-exported)
from edgequant.devices import default_threads, parse_devices
from edgequant.env import host_info, versions
from edgequant.bench.quality import CompressedReference, QualityAccumulator
from edgequant.bench.speed import SpeedResult, measure_speed
from edgequant.text import Text, chunk_ids, load_text
from edgequant.errors import EdgequantError
from edgequant.gguf_info import KEY_TENSOR_TYPES
from edgequant.naming import gptq_label_from_config
from edgequant.progress import progress_count

SCHEMA = "edgequant.bench/1"


@dataclass
class ModelRow:
    model: str
    name: str
    kind: str  # gguf, hf, gptq
    type: str | None  # Q4_K_M, F16, bf16, GPTQ-4bit-64g ...
    size_bytes: int
    bits_per_weight: float | None
    n_params: int | None
    is_reference: bool = False
    quality: dict | None = None
    speed: list[SpeedResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speed"] = [s.to_dict() for s in self.speed]
        return d


@dataclass
class BenchReport:
    text: dict
    ctx: int
    chunks: int | None
    reference: str | None
    devices: list[str]
    quality_device: str | None
    threads: int
    flash_attn: bool
    speed_settings: dict | None
    rows: list[ModelRow]
    notes: list[str]
    host: dict
    versions: dict
    seconds: float
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def describe_model(path: str | Path, kind: str) -> ModelRow:
    """Size, type and bits/weight of a GGUF or an HF/GPTQ folder, from headers only."""
    p = Path(path)
    if kind == "gguf":
        info = gguf_header(p)
        label = info.file_type
        if KEY_TENSOR_TYPES in info.metadata:  # per-tensor overrides (quantize --target-*, --tensor-type)
            label = f"{label} mix" if label else "mix"
        return ModelRow(str(p), p.name, kind, label, info.size_bytes, info.bits_per_weight, info.n_params)
    from edgequant.checkpoint import open_checkpoint

    ckpt = open_checkpoint(p)
    size = sum(f.stat().st_size for f in ckpt.files)
    config = ckpt.config
    if kind == "gptq":
        q = config.get("quantization_config") or {}
        bits = q.get("bits")
        n_params = 0
        for name, ref in ckpt.tensors.items():
            numel = int(np.prod(ref.shape)) if ref.shape else 1
            if name.endswith(".qweight"):
                n_params += numel * 32 // int(bits)
            elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                n_params += numel
        label = gptq_label_from_config(q)
    else:
        n_params = sum(int(np.prod(r.shape)) if r.shape else 1 for r in ckpt.tensors.values())
        label = str(ckpt.source_dtype() or config.get("torch_dtype") or config.get("dtype") or "hf").replace("torch.", "")
    name = p.name or str(p)
    return ModelRow(str(p), name, kind, label, size, round(8 * size / n_params, 4) if n_params else None, n_params)


def _pick_reference(rows: list[ModelRow]) -> ModelRow | None:
    """Without --reference: the highest-precision GGUF when it is 16 or 32 bits (F32 > BF16 > F16)."""
    for t in ("F32", "BF16", "F16"):
        for r in rows:
            if r.kind == "gguf" and r.type == t:
                return r
    return None


def _check_devices(devices: list[str], kinds: set[str], quality: bool) -> str | None:
    """Fail before any work when CUDA is asked for and nothing here can use it; return the quality device."""
    if "cuda" in devices:
        reasons = {k: cuda_absent_reason(k) for k in sorted(kinds)}
        if all(reasons.values()):
            why = "; ".join(sorted(set(reasons.values())))
            raise EdgequantError(f"--device cuda asked for, but CUDA is not available here ({why}); use --device cpu")
    qdev = "cpu" if "cpu" in devices else "cuda"
    if quality and qdev == "cuda":
        blocked = sorted(k for k in kinds if cuda_absent_reason(k))
        if blocked:
            raise EdgequantError(
                f"quality needs every model on one device, and {', '.join(blocked)} models cannot use CUDA here "
                f"({cuda_absent_reason(blocked[0])}); add cpu to --device"
            )
    return qdev if quality else None


def _token_mismatch(name: str, ref_name: str, ids: list[int], ref_ids: list[int]) -> EdgequantError:
    i = next((k for k, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    return EdgequantError(
        f"{name} tokenizes the text differently from {ref_name} (first difference at token {i}: "
        f"{ids[i] if i < len(ids) else 'end'} vs {ref_ids[i] if i < len(ref_ids) else 'end'}); rows are only comparable "
        f"on the same token ids: bench models with another vocabulary in a separate run"
    )


def run_bench(models: list[str | Path], options: BenchOptions | None = None) -> BenchReport:
    """Measure every model (and the reference) on the same tokens; see the module docstring."""
    o = options or BenchOptions()
    t_start = time.perf_counter()
    _check_options(models, o)
    devices = parse_devices(o.devices)
    threads = o.threads or default_threads()
    notes: list[str] = []
    rows, ref_row = _rows(models, o, notes)
    qdev = _check_devices(devices, {r.kind for r in rows}, o.quality)
    corpus = _corpus(o)
    n_chunks = _quality(rows, ref_row, corpus, o, qdev, threads) if o.quality else None
    speed_settings = _speed(rows, devices, threads, o) if o.speed else None
    text_info = None
    if corpus is not None:
        text_info = {"name": corpus.name, "sha256": corpus.sha256, "chars": len(corpus.text)}
    return BenchReport(
        text=text_info, ctx=o.ctx, chunks=n_chunks, reference=ref_row.model if ref_row else None, devices=devices,
        quality_device=qdev, threads=threads, flash_attn=o.flash_attn, speed_settings=speed_settings, rows=rows,
        notes=notes, host=host_info(), versions=versions(), seconds=round(time.perf_counter() - t_start, 2),
    )


def _check_options(models: list[str | Path], o: BenchOptions) -> None:
    """Refuse a run that has nothing to measure or impossible settings, before any work."""
    if not models and o.reference is None:
        raise EdgequantError("name at least one .gguf file or HF/GPTQ folder to measure")
    if not o.speed and not o.quality:
        raise EdgequantError("--speed-only and --quality-only together leave nothing to measure; pass one of them")
    if o.ctx < 16 or o.ctx % 2:
        raise EdgequantError(f"--ctx {o.ctx}: use an even context of at least 16 tokens (512 is llama-perplexity's usual)")
    if o.speed and (o.pp < 0 or o.tg < 0 or o.pp + o.tg == 0 or o.reps < 1 or o.n_batch < 1 or o.n_ubatch < 1):
        raise EdgequantError("speed settings: --pp and --tg must be >= 0 (not both 0), --reps, --batch-size and --ubatch-size >= 1")


def _rows(models: list[str | Path], o: BenchOptions, notes: list[str]) -> tuple[list[ModelRow], ModelRow | None]:
    """One row per distinct model, the reference first when it was not among them; the reference row
    (``--reference``, else for quality the highest-precision GGUF), marked as such."""
    paths = list(dict.fromkeys(str(m) for m in models))
    rows = [describe_model(p, model_kind(p)) for p in paths]
    ref_row: ModelRow | None = None
    if o.reference is not None:
        ref_path = str(o.reference)
        ref_row = next((r for r in rows if r.model == ref_path), None)
        if ref_row is None:
            ref_row = describe_model(ref_path, model_kind(ref_path))
            rows.insert(0, ref_row)
    elif o.quality:
        ref_row = _pick_reference(rows)
        if ref_row is not None and len(rows) > 1:
            notes.append(f"KL divergence against {ref_row.name} (the highest-precision GGUF given); pass --reference to choose")
    if ref_row is not None:
        ref_row.is_reference = True
    return rows, ref_row


def _corpus(o: BenchOptions) -> Text | None:
    """The evaluation text (None for a speed-only run), refused when it cannot fill two chunks."""
    corpus = o.text if isinstance(o.text, Text) else load_text(o.text) if o.quality else None
    if corpus is not None:
        most = len(corpus.text.encode("utf-8")) + 1  # no tokenizer makes more tokens than bytes (+ BOS)
        if most < 2 * o.ctx:
            raise EdgequantError(f"the text ({corpus.name}) holds at most {most} tokens, fewer than 2 chunks of {o.ctx} "
                                 f"(perplexity needs 2 x --ctx); pass a longer text or a smaller --ctx")
    return corpus


def _speed(rows: list[ModelRow], devices: list[str], threads: int, o: BenchOptions) -> dict:
    """Each model alone on each device, like llama-bench; returns the settings used."""
    with progress_count("speed", len(rows) * len(devices)) as bar:
        for r in rows:
            for d in devices:
                bar.describe(f"speed {r.name} ({d})")
                r.speed.append(measure_speed(r.model, device=d, threads=threads, pp=o.pp, tg=o.tg, reps=o.reps,
                                             n_batch=o.n_batch, n_ubatch=o.n_ubatch, flash_attn=o.flash_attn,
                                             isolated=o.isolated_speed))
                bar.advance(1)
    return {"pp": o.pp, "tg": o.tg, "reps": o.reps, "n_batch": o.n_batch, "n_ubatch": o.n_ubatch}


def _quality(rows: list[ModelRow], ref_row: ModelRow | None, corpus: Text, o: BenchOptions, device: str,
             threads: int) -> int:
    """Load every model, check the token ids, then score chunk by chunk. Returns the chunk count."""
    first_row = ref_row or rows[0]
    order = [first_row] + [r for r in rows if r is not first_row]
    backends = {}
    n_seq = chunks_per_decode(o.ctx, o.chunks)
    try:
        with progress_count("loading models", len(order)) as bar:
            for r in order:
                bar.describe(f"loading {r.name}")
                backends[r.model] = open_backend(r.model, device=device, threads=threads, ctx=o.ctx,
                                                 flash_attn=o.flash_attn, n_seq=n_seq, kind=r.kind)
                bar.advance(1)
        batches, n_vocab = _same_tokens(order, backends, corpus, o)
        # a lone file picked as its own reference gets PPL only (llama-perplexity's default mode)
        kld_ref = ref_row if len(order) > 1 or o.reference is not None else None
        accs, seconds = _score(order, backends, batches, kld_ref, o.ctx // 2, n_seq, n_vocab)
    finally:
        for b in backends.values():
            b.close()
    for r in order:
        acc = accs[r.model]
        ppl, err = acc.ppl()
        r.quality = {"device": device, "ppl": ppl, "ppl_error": err, "running_ppl": acc.running_ppl,
                     "chunks": len(batches), "scored_tokens": acc.count, "seconds": round(seconds[r.model], 2)}
        kld = acc.kld()
        if kld is not None:
            r.quality.update(kld)
    return len(batches)


def _same_tokens(order: list[ModelRow], backends: dict, corpus: Text, o: BenchOptions) -> tuple[list[list[int]], int]:
    """The chunks of the text as the first model tokenizes it, and the vocabulary the rows are compared on:
    every model must give the same ids (and BOS policy) on the part that is scored. A model with more
    output rows than another (an HF checkpoint whose embedding is padded past its tokenizer, a GGUF the
    converter trimmed, as Gemma 3's) is compared on the tokens both have, when the text uses no other."""
    first_row = order[0]
    lead = backends[first_row.model]
    ids = lead.tokenize(corpus.text)
    batches = chunk_ids(ids, o.ctx, o.chunks, lead.info.bos_id, minimum=2)
    used = len(batches) * o.ctx
    n_vocab = min(backends[r.model].info.n_vocab for r in order)
    for r in order[1:]:
        b = backends[r.model]
        if b.info.n_vocab != lead.info.n_vocab and max(ids[:used]) >= n_vocab:
            raise EdgequantError(
                f"{r.name} has a vocabulary of {b.info.n_vocab} tokens and {first_row.name} of {lead.info.n_vocab}; "
                f"rows are only comparable on one vocabulary: bench them in separate runs"
            )
        own = b.tokenize(corpus.text)
        if own[:used] != ids[:used] or b.info.add_bos != lead.info.add_bos:
            raise _token_mismatch(r.name, first_row.name, own[:used], ids[:used])
    return batches, n_vocab


def _score(order: list[ModelRow], backends: dict, batches: list[list[int]], ref_row: ModelRow | None,
           first: int, n_seq: int, n_vocab: int) -> tuple[dict[str, QualityAccumulator], dict[str, float]]:
    """Every chunk through every model, ``n_seq`` chunks per decode as llama-perplexity packs them:
    the reference's logits become the tool's compressed log-probs, each model is scored against
    them; the accumulators and seconds per model."""
    accs = {r.model: QualityAccumulator(with_kld=ref_row is not None) for r in order}
    seconds = {r.model: 0.0 for r in order}
    with progress_count("perplexity/KLD chunks", len(batches)) as bar:
        for i in range(0, len(batches), n_seq):
            group = batches[i:i + n_seq]
            nxt = [np.asarray(chunk[first + 1:], dtype=np.int64) for chunk in group]
            refs: list[CompressedReference | None] = [None] * len(group)
            for r in order:
                t = time.perf_counter()
                for k, logits in enumerate(backends[r.model].logits_of(group, first)):
                    logits = logits[:, :n_vocab]  # a view; the whole row when the vocabularies agree
                    if r is ref_row:
                        refs[k] = CompressedReference.from_logits(logits)
                    accs[r.model].add(logits, nxt[k], refs[k])
                seconds[r.model] += time.perf_counter() - t
            bar.advance(len(group))
    return accs, seconds
