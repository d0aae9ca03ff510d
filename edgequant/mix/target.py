"""``edgequant quantize --target-size/--target-bpw/--target-kld``: the per-tensor types that give the
lowest KL divergence within a size (or the smallest file within a KLD), chosen by measurement and
written by llama.cpp's own quantizer with ``--tensor-type`` overrides.

The phases (each behind a progress bar):

1. **candidates**: llama.cpp's dry run says which tensors it quantizes; each may take the standard
   types whose blocks fill its rows (i-quants only with an importance matrix, and the types that
   need one only where the matrix has the tensor).
2. **errors**: ggml's quantizer on a sample of every tensor's rows in every candidate type gives the
   importance-weighted squared error (``cost.py``).
3. **calibration**: for each tensor role (``attn_q``, ``ffn_down``, ``token_embd``, ...) one file with
   only that role quantized is scored against the source on calibration chunks; its KLD over the
   role's summed error is the role's sensitivity, and a tensor's predicted KLD in a type is its
   error times its role's sensitivity (``probe.py``).
4. **solve**: the multiple-choice knapsack over those predictions (``solve.py``).
5. **write**: llama.cpp's quantizer with one ``^name$=type`` override per tensor; the list is saved
   beside the file (``.tensor-types.txt``, for ``edgequant quantize --tensor-type-file`` and
   ``llama-quantize --tensor-type-file``) and embedded in it (``quantize.tensor_types``).
6. **verify**: the file's real KLD on the calibration chunks beside the predicted one; for a KLD
   target the choice is tightened by the measured/predicted ratio until the bound holds.
7. **speed**: pp/tg of the mix beside the standard type nearest its size; with ``max_slowdown`` a
   type that makes the mix slower than that is left out and the choice made again.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf

from edgequant.atomic import check_output_folder, check_writable, remove_stale_temp_dirs, temp_dir, write_text
from edgequant.errors import EdgequantError
from edgequant.gguf_info import inspect_gguf
from edgequant.gguf_layout import read_layout
from edgequant.mix import solve
from edgequant.mix.cost import TensorCosts, measure_all, role_of, sized
from edgequant.progress import progress_count
from edgequant.quantize import types as qtypes
from edgequant.quantize.ggml_rows import requires_imatrix
from edgequant.quantize.gguf_quant import QuantizeOptions, dry_run, quantize
from edgequant.quantize.imatrix_file import check_matches_model, read_imatrix
from edgequant.text import load_text
from edgequant.units import human_size, parse_size

Q = gguf.GGMLQuantizationType
_FLOATS = (Q.F32, Q.F16, Q.BF16)
# standard types a mix is compared with (and whose llama_ftype it is written under)
_STANDARD = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
             "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS")
TENSOR_TYPES_SUFFIX = ".tensor-types.txt"


@dataclass(frozen=True)
class Target:
    kind: str  # size, bpw or kld
    value: float
    text: str  # as the user wrote it

    @property
    def label(self) -> str:
        """The file-name part: ``4.2G``, ``4.5bpw``, ``kld0.01``."""
        if self.kind == "size":
            return self.text.upper().removesuffix("B")
        if self.kind == "bpw":
            return f"{self.value:g}bpw"
        return f"kld{self.value:g}"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_target(size: str | None = None, bpw: float | str | None = None, kld: float | str | None = None) -> Target:
    given = [(k, v) for k, v in (("size", size), ("bpw", bpw), ("kld", kld)) if v is not None]
    if len(given) != 1:
        raise EdgequantError("pass one of --target-size (e.g. 4.2G), --target-bpw (e.g. 4.5) or --target-kld (e.g. 0.01)")
    kind, raw = given[0]
    text = str(raw).strip()
    try:
        value = float(parse_size(text)) if kind == "size" else float(text)
    except ValueError:
        example = {"size": "4.2G, 800M or a byte count", "bpw": "4.5", "kld": "0.01"}[kind]
        raise EdgequantError(f"--target-{kind} {text!r}: not a number; use e.g. {example}") from None
    if not value > 0 or math.isinf(value):
        raise EdgequantError(f"--target-{kind} {text}: use a positive value")
    return Target(kind, value, text)


@dataclass
class TargetOptions:
    imatrix: Path | None = None
    calibration: str | Path | None = None  # text; None: the built-in text (its last chunks)
    ctx: int = 512
    calibration_chunks: int = 4
    sample_elements: int = 32768  # values per tensor quantized to estimate its error in each type
    max_slowdown: float | None = 5.0  # percent; None: no speed check
    speed_reps: int = 3
    threads: int = 0
    force: bool = False
    exclude_types: tuple[str, ...] = ()  # ggml types no tensor may take (e.g. ones a runtime lacks)


@dataclass
class RoleCalibration:
    role: str
    tensors: int
    probe_type: str
    error: float
    kld: float
    sensitivity: float  # predicted KLD per unit of weighted squared error


@dataclass
class TargetResult:
    target: Target
    file: str
    tensor_types_file: str
    file_type: str  # the llama_ftype the file is written under (general.file_type)
    size_bytes: int
    bits_per_weight: float
    budget_bytes: int | None
    predicted_kld: float
    measured: dict  # bench's KLD summary of the file on the calibration chunks
    met: bool
    type_counts: dict[str, int]
    tensor_types: dict[str, str]  # tensor -> ggml type, every tensor the choice covered
    roles: dict[str, dict[str, int]]  # role -> {type: tensors}
    calibration: dict
    standard: dict | None  # the standard type nearest in size: type, size, KLD on the same chunks
    speed: dict | None
    excluded_types: dict[str, str]  # type -> why it was left out
    seconds: dict[str, float]
    reproduce: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = self.target.to_dict()
        return d


# -- helpers --------------------------------------------------------------------------------------------


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def mix_name(src: Path, target: Target) -> str:
    """``Model-F16.gguf`` + 4.2G -> ``Model-4.2G-mix.gguf``."""
    from edgequant.quantize.gguf_quant import output_name

    return output_name(src, f"{target.label}-mix")


def tensor_type_lines(picks: dict[str, str]) -> list[str]:
    """One anchored override per tensor, in file order: ``^blk\\.0\\.attn_q\\.weight$=q4_k``."""
    return [f"^{re.escape(name)}$={t.lower()}" for name, t in picks.items()]


class _Session:
    """Everything one ``quantize_target`` call has measured, and the scratch folder its probe files go to."""

    def __init__(self, src: Path, target: Target, out_dir: Path, opts: TargetOptions):
        self.src, self.target, self.opts = src, target, opts
        self.info = inspect_gguf(src)
        self.tmp = temp_dir(out_dir)
        self.seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self.standards: dict[str, tuple[dict, Path]] = {}  # standard type -> (its record, its file in tmp)
        self.standard_sizes: dict[str, int] = {}  # standard type -> file size llama.cpp would write (dry runs)

    def timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - t0, 2)

    def quantize_to(self, name: str, ftype: str, entries: list[str]) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        dest = self.tmp / name
        quantize(self.src, [ftype], dest, QuantizeOptions(imatrix=self.opts.imatrix, tensor_types=entries,
                                                           threads=self.opts.threads, force=True, check_load=False))
        return dest


def quantize_target(source: str | Path, target: Target, output: str | Path | None = None,
                    options: TargetOptions | None = None) -> TargetResult:
    """The best mix for ``target`` (see the module docstring); returns what was chosen and measured."""
    opts = options or TargetOptions()
    for t in opts.exclude_types:
        if t.upper() not in Q.__members__ or Q[t.upper()] in (Q.F32,):
            raise EdgequantError(f"--exclude-type {t}: not a ggml tensor type such as q4_1, iq2_xs or f16")
    t_start = time.perf_counter()
    src = Path(source)
    s = _check_source(src)
    out_dir = Path(output) if output is not None else src.parent
    final = out_dir if out_dir.suffix == ".gguf" else out_dir / mix_name(src, target)
    out_dir = final.parent
    sidecar = final.with_name(final.name.removesuffix(".gguf") + TENSOR_TYPES_SUFFIX)
    check_writable([final, sidecar], force=opts.force)
    check_output_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    sess = _Session(src, target, out_dir, opts)
    try:
        return _run(sess, s, final, sidecar, t_start)
    finally:
        shutil.rmtree(sess.tmp, ignore_errors=True)


def _check_source(src: Path):
    info = inspect_gguf(src)
    if len(info.files) > 1:
        raise EdgequantError(f"{src.name} is split in {len(info.files)} shards; merge it first (llama-gguf-split --merge) "
                             f"or convert without --split-max-size: choosing per-tensor types reads one file")
    quantized = sorted(t for t in info.type_counts if t not in ("F32", "F16", "BF16"))
    if quantized:
        raise EdgequantError(f"{src.name} holds quantized tensors ({', '.join(quantized)}); choosing a mix needs the "
                             f"F16/BF16/F32 GGUF it was made from")
    return info


def _run(sess: _Session, info, final: Path, sidecar: Path, t_start: float) -> TargetResult:
    opts, target, src = sess.opts, sess.target, sess.src
    imatrix = None
    if opts.imatrix is not None:
        imatrix = read_imatrix(Path(opts.imatrix))
        check_matches_model(imatrix, {t.name: t.shape for t in info.tensors}, path=Path(opts.imatrix))
    layout = read_layout(src)
    text = load_text(opts.calibration)  # a bad text path is one line before any work

    # 1. candidates
    t0 = time.perf_counter()
    with progress_count("candidates (llama.cpp dry run)", 1) as bar:
        planned = dry_run(src, "Q8_0")
        bar.advance(1)
    own = {t.name: t.type.lower() for t in info.tensors}
    choosable = [n for n in own if planned[n] != own[n]]
    if not choosable:
        raise EdgequantError(f"{src.name}: llama.cpp quantizes none of its tensors (no row length is a multiple of 32); "
                             f"there is nothing to choose")
    candidates = {n: _candidates(layout.tensors[n].shape[0], layout.tensors[n].type, n, imatrix) for n in choosable}
    sess.timed("candidates", t0)

    # sizes: tensors llama.cpp leaves alone, and the header (the source's, plus the keys a mix adds);
    # an impossible target is refused here, before any measuring
    fixed_bytes = sum(_aligned(t.n_bytes, layout.alignment) for t in info.tensors if t.name not in candidates)
    header_bytes = layout.data_start + 1024 + sum(len(e) + 8 for e in tensor_type_lines({n: "iq3_xxs" for n in candidates}))
    sizes = {n: sized(layout, n, qs) for n, qs in candidates.items()}
    budget = _budget(target, info, fixed_bytes, header_bytes, sizes, layout.alignment)

    # 2. errors
    t0 = time.perf_counter()
    with progress_count("tensor errors (ggml quantizer)", len(choosable)) as bar:
        costs = measure_all(layout, candidates, imatrix, elements=opts.sample_elements,
                            threads=opts.threads or None, on_done=lambda n: bar.advance(1))
    sess.timed("errors", t0)

    # 3. calibration
    t0 = time.perf_counter()
    from edgequant.mix.probe import KldProbe

    with progress_count("calibration: source logits", 1) as bar:
        probe = KldProbe(src, text, ctx=opts.ctx, chunks=opts.calibration_chunks, threads=opts.threads or None)
        bar.advance(1)
    excluded: dict[str, str] = {t.upper(): "left out by the caller (--exclude-type)" for t in opts.exclude_types}
    probe_bpw = _probe_bpw(budget, costs)
    sens, roles_cal = _calibrate(sess, probe, costs, probe_bpw, excluded)
    sess.timed("calibration", t0)

    standard: dict | None = None
    speed: dict | None = None
    for attempt in range(3):
        picks, predicted, ftype, written, measured, met = _choose_write_verify(
            sess, costs, sens, budget, excluded, probe, layout.alignment, final)
        if opts.max_slowdown is None:
            break
        t0 = time.perf_counter()
        standard, speed, slow = _speed_check(sess, written, probe, picks)
        sess.timed("speed", t0)
        if not slow or attempt == 2:
            if slow:
                sess.notes.append(f"still {speed['slowdown_percent']:.1f} % slower than {standard['type']} after leaving "
                                  f"out {', '.join(excluded)}")
            break
        excluded.update(slow)
    if standard is None:
        standard = _standard_nearest(sess, written.stat().st_size)
    os.replace(written, final)
    write_text(sidecar, "\n".join(tensor_type_lines(picks)) + "\n")
    written = final
    out_info = inspect_gguf(written)
    role_types: dict[str, dict[str, int]] = {}
    for n, t in picks.items():
        role_types.setdefault(role_of(n), {}).setdefault(t, 0)
        role_types[role_of(n)][t] += 1
    sess.seconds["total"] = round(time.perf_counter() - t_start, 2)
    imx = f" --imatrix {Path(opts.imatrix).name}" if opts.imatrix else ""
    return TargetResult(
        target=target, file=str(written), tensor_types_file=str(sidecar), file_type=ftype,
        size_bytes=out_info.size_bytes, bits_per_weight=out_info.bits_per_weight,
        budget_bytes=None if budget is None else int(target.value) if target.kind == "size" else int(budget + fixed_bytes),
        predicted_kld=predicted, measured=measured, met=met, type_counts=out_info.type_counts,
        tensor_types={n: t for n, t in picks.items()}, roles=role_types,
        calibration={"text": text.name, "chunks": len(probe.batches), "ctx": opts.ctx, "tokens": probe.tokens,
                     "sample_elements": opts.sample_elements, "roles": [asdict(r) for r in roles_cal]},
        standard=standard, speed=speed, excluded_types=excluded, seconds=sess.seconds,
        reproduce=(f"edgequant quantize {src.name} {ftype} --tensor-type-file {sidecar.name}{imx} -o {written.name}"),
        notes=sess.notes,
    )


def _candidates(row_length: int, own: Q, name: str, imatrix) -> list[Q]:
    has_entry = imatrix is not None and name in imatrix.entries
    top = own if own != Q.F32 else Q.F16
    out = [top]
    for q in qtypes.mix_candidates(with_imatrix=imatrix is not None):
        if row_length % gguf.GGML_QUANT_SIZES[q][0]:
            continue
        if (q in qtypes.NEEDS_IMATRIX_DATA or requires_imatrix(int(q))) and not has_entry:
            continue
        out.append(q)
    return out


def _budget(target: Target, info, fixed_bytes: int, header_bytes: int, costs: dict[str, TensorCosts],
            alignment: int) -> int | None:
    """Bytes the choosable tensors may take (None for a KLD target); one line for an impossible target."""
    if target.kind == "kld":
        return None
    smallest = sum(min(_aligned(b, alignment) for b in c.bytes.values()) for c in costs.values())
    largest = sum(_aligned(c.bytes[_top(c)], alignment) for c in costs.values())
    if target.kind == "size":
        budget = int(target.value) - fixed_bytes - header_bytes
        floor, ceiling = smallest + fixed_bytes + header_bytes, largest + fixed_bytes + header_bytes
        what = f"--target-size {target.text}"
    else:
        budget = int(target.value * info.n_params / 8) - fixed_bytes
        floor = 8 * (smallest + fixed_bytes) / info.n_params
        ceiling = 8 * (largest + fixed_bytes) / info.n_params
        what = f"--target-bpw {target.text}"
    fmt = human_size if target.kind == "size" else (lambda v: f"{v:.3f} bpw")
    if budget < smallest:
        raise EdgequantError(f"{what} is below the smallest file these candidates make ({fmt(floor)}, every tensor in its "
                             f"smallest type that fits); ask for at least that, or pass --imatrix to allow i-quants")
    if budget >= largest:
        raise EdgequantError(f"{what} is not below the source's own size ({fmt(ceiling)}): nothing to choose; use the "
                             f"source file or a smaller target")
    return budget


def _probe_bpw(budget: int | None, costs: dict[str, TensorCosts]) -> float:
    """The bits/weight the probes quantize at: about where the target will put the tensors."""
    if budget is None:
        return 4.5
    n = sum(math.prod(c.shape) for c in costs.values())
    return min(max(8 * budget / n, 2.5), 6.0)


def _role_probe_type(members: list[TensorCosts], bpw: float, excluded) -> Q | None:
    """The type a role is probed in: one every tensor of the role can take, near ``bpw`` (from 1.2 below
    to 0.6 above), the one with the largest error there, so that the probe's KLD stands well above
    noise (a type whose grid the weights already lie on, Q4_1 for a model rebuilt from Q4_1, would
    give a ratio of two near-zeros); else the nearest in bits/weight."""
    common = set.intersection(*(set(c.bytes) for c in members)) - set(_FLOATS)
    common = {q for q in common if q.name not in excluded} or common
    if not common:
        return None
    near = [q for q in common if bpw - 1.2 <= qtypes.nominal_bpw(q) <= bpw + 0.6]
    if near:
        return max(near, key=lambda q: sum(c.error[q] for c in members))
    return min(common, key=lambda q: (abs(qtypes.nominal_bpw(q) - bpw), -qtypes.nominal_bpw(q)))


def _calibrate(sess: _Session, probe, costs: dict[str, TensorCosts], bpw: float, excluded: dict[str, str]):
    """Per role: a file with only that role quantized; its KLD over the role's error is the sensitivity."""
    by_role: dict[str, list[TensorCosts]] = {}
    for c in costs.values():
        by_role.setdefault(c.role, []).append(c)
    sens: dict[str, float] = {}
    out: list[RoleCalibration] = []
    base = "Q8_0"  # the llama_ftype of the probe files; every tensor is overridden anyway
    with progress_count("calibration: one role at a time", len(by_role)) as bar:
        for role, members in sorted(by_role.items()):
            bar.describe(f"calibration: {role}")
            q = _role_probe_type(members, bpw, excluded)
            if q is None:
                sens[role] = 0.0
                bar.advance(1)
                continue
            picks = {c.name: (q.name if c.role == role else _top(c).name) for c in costs.values()}
            path = sess.quantize_to(f"probe-{role}.gguf", base, tensor_type_lines(picks))
            kld = probe.kld(path)["kld_mean"]
            path.unlink()
            err = sum(c.error[q] for c in members)
            sens[role] = kld / err if err > 0 else 0.0
            out.append(RoleCalibration(role, len(members), q.name, err, kld, sens[role]))
            bar.advance(1)
    return sens, out


def _top(c: TensorCosts) -> Q:
    return c.source_type if c.source_type in c.bytes else Q.F16


def _choices(costs: dict[str, TensorCosts], sens: dict[str, float], excluded: dict[str, str],
             alignment: int, scale: float = 1.0) -> list[solve.Choice]:
    choices = []
    for c in costs.values():
        opts = [solve.Option(q.name, _aligned(b, alignment), scale * sens.get(c.role, 0.0) * c.error[q])
                for q, b in c.bytes.items()]
        kept = [o for o in opts if o.type not in excluded]
        choices.append(solve.Choice(c.name, kept or opts))  # a tensor keeps its types when all are left out
    return choices


def _choose_write_verify(sess: _Session, costs, sens, budget, excluded, probe, alignment, final: Path):
    """Solve, write, measure; for a KLD target, tighten by the measured/predicted ratio until it holds."""
    target = sess.target
    scale, met = 1.0, True
    for attempt in range(4):
        t0 = time.perf_counter()
        choices = _choices(costs, sens, excluded, alignment, scale)
        sol = solve.within_cost(choices, target.value) if target.kind == "kld" else solve.within_bytes(choices, budget)
        if sol is None:
            raise EdgequantError(f"--target-{target.kind} {target.text}: no choice of the remaining types reaches it "
                                 f"(left out: {', '.join(excluded) or 'none'})")
        picks = {n: sol.picks[n].type for n in costs}
        predicted = scale * sum(sens.get(costs[n].role, 0.0) * costs[n].error[Q[t]] for n, t in picks.items())
        sess.timed("solve", t0)
        t0 = time.perf_counter()
        ftype = _ftype_for(sess, picks, costs)
        written = _write(sess, picks, ftype, final)
        sess.timed("write", t0)
        over = _overshoot(target, written)
        if over > 0:  # the header estimate was short: take the excess off the budget and choose again
            budget -= over + alignment
            sess.notes.append(f"the first choice was {over} bytes over the target; chose again with less")
            continue
        t0 = time.perf_counter()
        measured = probe.kld(written)
        sess.timed("verify", t0)
        if target.kind != "kld":
            return picks, predicted, ftype, written, measured, True
        met = measured["kld_mean"] <= target.value
        if met or predicted <= 0:
            break
        scale *= max(measured["kld_mean"] / predicted, 1.05)  # predictions were low by this much: ask the solver for less
    else:
        if target.kind != "kld":
            raise EdgequantError(f"--target-{target.kind} {target.text}: the written file stayed over the target after "
                                 f"4 choices (an edgequant bug: please report it with --json output)")
    if not met:
        sess.notes.append(f"the measured KLD {measured['kld_mean']:.5f} is above --target-kld {target.text} after 4 "
                          f"choices; use a larger bound or the source file")
    return picks, predicted, ftype, written, measured, met


def _overshoot(target: Target, written: Path) -> int:
    """Bytes by which a written file exceeds a size or bits/weight target (0 when within it)."""
    if target.kind == "size":
        return max(0, written.stat().st_size - int(target.value))
    if target.kind == "bpw":
        info = inspect_gguf(written)
        return max(0, info.tensor_bytes - int(target.value * info.n_params / 8))
    return 0


def _ftype_for(sess: _Session, picks: dict[str, str], costs) -> str:
    """The standard type whose nominal bits/weight is nearest the mix's (its llama_ftype goes into
    general.file_type; every quantizable tensor has an override, so it decides nothing else)."""
    n = sum(math.prod(costs[k].shape) for k in picks)
    bits = sum(8 * costs[k].bytes[Q[t]] for k, t in picks.items()) / n
    allowed = [qtypes.get(t) for t in _STANDARD if sess.opts.imatrix is not None or not qtypes.get(t).needs_imatrix]
    return min(allowed, key=lambda t: abs(t.bpw - bits)).name


def _write(sess: _Session, picks: dict[str, str], ftype: str, final: Path) -> Path:
    """A candidate file in the scratch folder; the last one is moved to its final name."""
    return sess.quantize_to(final.name, ftype, tensor_type_lines(picks))


def _standard_sizes(sess: _Session) -> dict[str, int]:
    """The file size llama.cpp's standard types would give (from dry runs: nothing is written)."""
    from edgequant.quantize.ggml_rows import row_bytes

    if sess.standard_sizes:
        return sess.standard_sizes
    shapes = {t.name: t.shape for t in sess.info.tensors}
    header = read_layout(sess.src).data_start
    sizes = sess.standard_sizes
    for name in _STANDARD:
        t = qtypes.get(name)
        if t.needs_imatrix and sess.opts.imatrix is None:
            continue
        planned = dry_run(sess.src, name)
        total = header
        for tensor, tname in planned.items():
            shape = shapes[tensor]
            q = Q[tname.upper()]
            total += _aligned(row_bytes(q, shape[0]) * math.prod(shape[1:]), 32)
        sizes[name] = total
    return sizes


def _standard_nearest(sess: _Session, size: int) -> dict:
    sizes = _standard_sizes(sess)
    name = min(sizes, key=lambda k: abs(sizes[k] - size))
    return {"type": name, "size_bytes_estimate": sizes[name]}


def _standard_file(sess: _Session, size: int, probe) -> tuple[dict, Path]:
    """The standard type nearest ``size``, written once per session (with its KLD and speed)."""
    from edgequant.bench.speed import measure_speed

    std = _standard_nearest(sess, size)
    cache = sess.standards
    if std["type"] not in cache:
        path = sess.quantize_to(f"standard-{std['type']}.gguf", std["type"], [])
        info = inspect_gguf(path)
        with progress_count(f"speed: {std['type']}", 1) as bar:
            speed = measure_speed(path, threads=sess.opts.threads or None, reps=sess.opts.speed_reps)
            bar.advance(1)
        std.update(size_bytes=info.size_bytes, bits_per_weight=info.bits_per_weight, kld=probe.kld(path),
                   tensor_types={t.name: t.type for t in info.tensors}, speed=speed)
        cache[std["type"]] = (std, path)
    return cache[std["type"]]


def _slowdown(mine, theirs) -> tuple[float, float, float, float]:
    """Percent by which ``mine`` is slower than ``theirs`` in pp and in tg (negative: faster), and the
    noise of each (two standard deviations of the ratio, from the repetitions)."""
    def slower(a, b):
        return 100.0 * (1.0 - a / b) if a and b else 0.0

    def noise(a, sa, b, sb):
        return 200.0 * math.hypot((sa or 0) / a, (sb or 0) / b) if a and b else 0.0

    return (slower(mine.pp_tps, theirs.pp_tps), slower(mine.tg_tps, theirs.tg_tps),
            noise(mine.pp_tps, mine.pp_std, theirs.pp_tps, theirs.pp_std),
            noise(mine.tg_tps, mine.tg_std, theirs.tg_tps, theirs.tg_std))


def _speed_check(sess: _Session, written: Path, probe, picks: dict[str, str]):
    """pp/tg of the mix and of the standard type nearest its size, on the same machine in the same run.
    When the mix is clearly slower than ``max_slowdown`` (beyond the measurements' noise), the types to
    leave out, with why: each type the standard file does not use is put back to the standard file's
    type in a variant of the mix, measured on this model; the ones whose removal clearly speeds it up go."""
    from edgequant.bench.speed import measure_speed

    std, _ = _standard_file(sess, written.stat().st_size, probe)
    theirs = std["speed"]
    with progress_count("speed: the mix", 1) as bar:
        mine = measure_speed(written, threads=sess.opts.threads or None, reps=sess.opts.speed_reps)
        bar.advance(1)
    slow_pp, slow_tg, noise_pp, noise_tg = _slowdown(mine, theirs)
    speed = {"mix": mine.to_dict(), "standard": theirs.to_dict(), "pp_slowdown_percent": round(slow_pp, 2),
             "tg_slowdown_percent": round(slow_tg, 2), "slowdown_percent": round(max(slow_pp, slow_tg), 2),
             "noise_percent": round(max(noise_pp, noise_tg), 2), "max_slowdown_percent": sess.opts.max_slowdown}
    public = {k: v for k, v in std.items() if k not in ("speed", "tensor_types")}
    limit = sess.opts.max_slowdown
    if slow_pp - noise_pp <= limit and slow_tg - noise_tg <= limit:
        return public, speed, {}
    std_types = {t.upper() for t in std["tensor_types"].values()}
    # the types the standard file does not use, the one holding most weights first: once putting one back
    # brings the mix within the limit, the rest are not measured
    weights = {t.name: math.prod(t.shape) for t in sess.info.tensors}
    share: dict[str, int] = {}
    for n, t in picks.items():
        if t not in std_types:
            share[t] = share.get(t, 0) + weights[n]
    suspects = sorted(share, key=lambda t: -share[t])
    gains = {}
    with progress_count("speed: which types slow the mix", len(suspects)) as bar:
        for t in suspects:
            variant = {n: (std["tensor_types"][n].upper() if p == t else p) for n, p in picks.items()}
            path = sess.quantize_to(f"speed-{t}.gguf", std["type"], tensor_type_lines(variant))
            r = measure_speed(path, threads=sess.opts.threads or None, reps=sess.opts.speed_reps)
            path.unlink()
            g_pp, g_tg, n_pp, n_tg = _slowdown(mine, r)  # how much slower the mix is than the variant
            gains[t] = (g_pp - n_pp, g_tg - n_tg, g_pp, g_tg)
            bar.advance(1)
            v_pp, v_tg, vn_pp, vn_tg = _slowdown(r, theirs)  # the variant against the standard file
            if max(g_pp - n_pp, g_tg - n_tg) > 0 and v_pp - vn_pp <= limit and v_tg - vn_tg <= limit:
                break  # this type explains the slowdown
    out = {}
    for t, (c_pp, c_tg, g_pp, g_tg) in gains.items():
        if max(c_pp, c_tg) > 0:
            out[t] = (f"the mix was {max(slow_pp, slow_tg):.1f} % slower than {std['type']} (pp {slow_pp:+.1f} %, tg "
                      f"{slow_tg:+.1f} %; limit {limit:g} %); with {t} put back to {std['type']}'s types it was "
                      f"{g_pp:.1f} % faster in pp, {g_tg:.1f} % in tg")
    if not out and gains:  # none clearly: the one with the largest gain
        t = max(gains, key=lambda k: max(gains[k][2], gains[k][3]))
        out[t] = f"the mix was {max(slow_pp, slow_tg):.1f} % slower than {std['type']}; {t} cost it the most speed"
    return public, speed, out
