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
7. **speed**: with ``max_slowdown``, before choosing, ggml's kernels on this machine time a matrix
   multiplication in every candidate type (``kernels.py``); the choice then keeps the mix's
   predicted multiplication time within ``max_slowdown`` of the standard type nearest the target's
   size, tensor by tensor through a speed penalty on each option (``speed.py``). After writing, pp/tg
   of the mix and of that standard file are measured; a mix still slower than allowed (beyond the
   measurements' noise) is chosen again with the shortfall taken off the allowance.
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
TRUST_BITS = 1.5  # candidates go down to this many bits/weight below the calibration's point


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
        self.standard_plans: dict[str, dict[str, str]] = {}  # standard type -> tensor -> its type (dry runs)

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
    # the sensitivities were measured near probe_bpw; far below it the additive prediction is an extrapolation
    # that underestimates (a few Q2_K ffn_down tensors cost far more than predicted), so such types stay out
    floor = probe_bpw - TRUST_BITS
    for q in sorted({q for c in costs.values() for q in c.bytes if q not in _FLOATS}, key=int):
        if qtypes.nominal_bpw(q) < floor and q.name not in excluded:
            excluded[q.name] = (f"{qtypes.nominal_bpw(q):g} bits/weight, more than {TRUST_BITS:g} below the "
                                f"{probe_bpw:.2f} the calibration measured at")

    standard: dict | None = None
    speed: dict | None = None
    model = None
    if opts.max_slowdown is not None:
        t0 = time.perf_counter()
        model = _speed_model(sess, costs, sens, budget, excluded, layout.alignment, fixed_bytes + header_bytes, probe)
        sess.timed("speed model", t0)
    limit = opts.max_slowdown
    for attempt in range(3):
        picks, predicted, ftype, written, measured, met = _choose_write_verify(
            sess, costs, sens, budget, excluded, probe, layout.alignment, final, model, limit)
        if model is None:
            break
        t0 = time.perf_counter()
        standard, speed, excess = _speed_check(sess, written, probe, model.standard)
        speed["model"] = {"standard": model.standard, "limit_percent": round(limit, 2),
                          "pp_scale": round(model.pp_scale, 3), "tg_scale": round(model.tg_scale, 3),
                          **dict(zip(("pp_ratio", "tg_ratio"), (round(r, 4) for r in model.ratios(picks))))}
        sess.timed("speed", t0)
        if excess <= 0 or attempt == 2 or limit <= 0:
            if excess > 0:
                sess.notes.append(f"measured {speed['slowdown_percent']:.1f} % slower than {standard['type']} (noise "
                                  f"{speed['noise_percent']:.1f} %) after {attempt + 1} choices, the last predicted no "
                                  f"slower than {limit:g} % by this machine's kernels")
            break
        # the kernels' prediction was short of the whole model's slowdown: ask it for that much more, down to
        # "predicted no slower than the standard file" (a measured excess beyond that is noise or overhead)
        limit = max(0.0, limit - (excess + 1.0))
        sess.notes.append(f"the mix measured {speed['slowdown_percent']:.1f} % slower than {standard['type']}; chose "
                          f"again with {limit:.1f} % allowed on the kernels' prediction")
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
             alignment: int, scale: float = 1.0, model=None, lam: float = 0.0, into: str = "cost") -> list[solve.Choice]:
    """Each tensor's options; with a speed ``model`` and ``lam`` > 0 each option also pays ``lam`` times its
    share of the standard file's time, added to its cost (a size target) or to its bytes (a KLD target)."""
    choices = []
    for c in costs.values():
        opts = []
        for q, b in c.bytes.items():
            size, cost = _aligned(b, alignment), scale * sens.get(c.role, 0.0) * c.error[q]
            if model is not None and lam > 0:
                extra = lam * model.penalty(c.name, q.name)
                size, cost = (size + int(round(extra)), cost) if into == "bytes" else (size, cost + extra)
            opts.append(solve.Option(q.name, size, cost))
        kept = [o for o in opts if o.type not in excluded]
        choices.append(solve.Choice(c.name, kept or opts))  # a tensor keeps its types when all are left out
    return choices


def _solve(costs, sens, excluded, alignment, scale, budget, target: Target, model=None, limit: float | None = None):
    """The knapsack; with a speed model, the smallest speed multiplier whose choice the model predicts
    within ``limit`` percent of the standard file's pp and tg (the fastest it can when none is)."""
    kld = target.kind == "kld"

    def at(lam: float):
        choices = _choices(costs, sens, excluded, alignment, scale, model, lam, "bytes" if kld else "cost")
        return solve.within_cost(choices, target.value) if kld else solve.within_bytes(choices, budget)

    def fits(sol) -> bool:
        return model.within({n: o.type for n, o in sol.picks.items()}, limit)

    sol = at(0.0)
    if model is None or limit is None or sol is None or fits(sol):
        return sol
    # the penalty of a whole file is about 2 (its share of pp plus of tg): start where it weighs as much as
    # the whole choice's cost (or bytes), and grow until the model says the choice is fast enough
    unit = (sol.bytes if kld else sol.cost) or 1e-12
    lo, hi = 0.0, unit
    best = at(hi)
    while best is not None and not fits(best) and hi < unit * 1e6:
        lo, hi = hi, hi * 4
        best = at(hi)
    if best is None or not fits(best):
        return best
    for _ in range(14):
        mid = (lo + hi) / 2
        cand = at(mid)
        if cand is not None and fits(cand):
            hi, best = mid, cand
        else:
            lo = mid
    return best


def _choose_write_verify(sess: _Session, costs, sens, budget, excluded, probe, alignment, final: Path,
                         model=None, limit: float | None = None):
    """Solve, write, measure; for a KLD target, tighten by the measured/predicted ratio until it holds."""
    target = sess.target
    scale, met = 1.0, True
    for attempt in range(4):
        t0 = time.perf_counter()
        sol = _solve(costs, sens, excluded, alignment, scale, budget, target, model, limit)
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
        sess.standard_plans[name] = planned
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


def _standard_file(sess: _Session, name: str, probe) -> tuple[dict, Path]:
    """The standard type ``name``, written once per session (with its KLD and speed)."""
    from edgequant.bench.speed import measure_speed

    cache = sess.standards
    if name not in cache:
        std = {"type": name, "size_bytes_estimate": _standard_sizes(sess)[name]}
        path = sess.quantize_to(f"standard-{name}.gguf", name, [])
        info = inspect_gguf(path)
        with progress_count(f"speed: {name}", 1) as bar:
            speed = measure_speed(path, threads=sess.opts.threads or None, reps=sess.opts.speed_reps)
            bar.advance(1)
        std.update(size_bytes=info.size_bytes, bits_per_weight=info.bits_per_weight, kld=probe.kld(path), speed=speed)
        cache[name] = (std, path)
    return cache[name]


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


def _speed_check(sess: _Session, written: Path, probe, standard: str):
    """pp/tg of the mix and of the standard type, on the same machine in the same run; the percent by
    which the mix is slower than ``max_slowdown`` allows beyond the measurements' noise (<= 0: within)."""
    from edgequant.bench.speed import measure_speed

    std, _ = _standard_file(sess, standard, probe)
    theirs = std["speed"]
    with progress_count("speed: the mix", 1) as bar:
        mine = measure_speed(written, threads=sess.opts.threads or None, reps=sess.opts.speed_reps)
        bar.advance(1)
    slow_pp, slow_tg, noise_pp, noise_tg = _slowdown(mine, theirs)
    limit = sess.opts.max_slowdown
    speed = {"mix": mine.to_dict(), "standard": theirs.to_dict(), "pp_slowdown_percent": round(slow_pp, 2),
             "tg_slowdown_percent": round(slow_tg, 2), "slowdown_percent": round(max(slow_pp, slow_tg), 2),
             "noise_percent": round(max(noise_pp, noise_tg), 2), "max_slowdown_percent": limit}
    public = {k: v for k, v in std.items() if k != "speed"}
    return public, speed, max(slow_pp - noise_pp, slow_tg - noise_tg) - limit


def _speed_model(sess: _Session, costs: dict[str, TensorCosts], sens, budget, excluded, alignment: int,
                 overhead: int, probe):
    """This machine's kernel speeds for every candidate type, and the model of the mix's time beside the
    standard type nearest the target's size (for a KLD target: nearest the choice made without speed),
    calibrated on that standard file's measured speed."""
    from edgequant.mix.kernels import measure_kernels
    from edgequant.mix.speed import build_model

    sizes = _standard_sizes(sess)
    if budget is None:
        sol = _solve(costs, sens, excluded, alignment, 1.0, budget, sess.target)
        size = (sol.bytes if sol is not None else sum(c.bytes[_top(c)] for c in costs.values())) + overhead
    else:
        size = budget + overhead
    standard = min(sizes, key=lambda k: abs(sizes[k] - size))
    plan = sess.standard_plans[standard]
    types = {q for c in costs.values() for q in c.bytes} | {Q[plan[n].upper()] for n in costs if n in plan}
    with progress_count("speed: this machine's kernels", 1) as bar:
        try:
            kernels = measure_kernels(sorted(types), [c.shape[0] for c in costs.values()],
                                      threads=sess.opts.threads or None)
        except (OSError, AttributeError, MemoryError) as e:  # a libggml without these symbols, or no memory
            sess.notes.append(f"this machine's kernel speeds could not be measured ({e}); chose without the "
                              f"speed model and measured no speed")
            return None
        bar.advance(1)
    md = sess.info.metadata
    arch = md.get("general.architecture")
    used, total = md.get(f"{arch}.expert_used_count"), md.get(f"{arch}.expert_count")
    share = used / total if isinstance(used, int) and isinstance(total, int) and total else 1.0
    has_output = any(t.name == "output.weight" for t in sess.info.tensors)
    model = build_model(costs, plan, kernels, standard, has_output=has_output, expert_share=share)
    std, _ = _standard_file(sess, standard, probe)
    sp = std["speed"]
    model.calibrate(sp.pp / sp.pp_tps if sp.pp_tps else None, 1.0 / sp.tg_tps if sp.tg_tps else None)
    return model
