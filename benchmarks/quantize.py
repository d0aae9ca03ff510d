#!/usr/bin/env python
"""Benchmark ``edgequant quantize`` against llama.cpp's ``llama-quantize``.

Both quantize the same F16 GGUF into each type, with the same thread count and (for the types
that take one) the same importance matrix file, each run in a fresh process: edgequant as the
library call its CLI makes (``quantize()``), llama.cpp as ``llama-quantize IN OUT TYPE NTHREADS``.
Per type we report wall time of the process (best of ``--repeat``), the kernel time
(``llama-quantize`` prints its ``quantize time``; for edgequant, ``quantize()`` minus the two
``inspect_gguf`` header reads it makes, which are reported separately), peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small wrapper process, as in
``benchmarks/convert.py``), the output size, the number of fallbacks each tool reported, and
whether the two outputs hold byte-identical tensor data (names, types, shapes, raw bytes per
tensor, compared with ``gguf.GGUFReader``) and the same metadata.

    python benchmarks/quantize.py                                   # SmolLM2-135M, default types
    python benchmarks/quantize.py --llama-cpp-bin /tmp/llamacpp-build/bin --repeat 3
    python benchmarks/quantize.py --gguf model-F16.gguf --imatrix imatrix.gguf --type Q4_K_M --imatrix-type IQ2_XS

``llama-quantize`` is found through ``--llama-cpp-bin DIR`` or ``$LLAMA_CPP_BIN``; without it that
column is skipped and the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from convert import _WRAPPER, _tail, compare_gguf  # noqa: E402  (the same wrapper and comparison as the convert bench)

CACHE = Path(os.environ.get("EDGEQUANT_BENCH_CACHE", Path.home() / ".cache" / "edgequant" / "bench"))
DEFAULT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"]
DEFAULT_IMATRIX_TYPES = ["IQ3_XXS", "IQ2_XS"]
_LQ_TIME = re.compile(r"quantize time =\s*([\d.]+) ms")
_FALLBACK = re.compile(r"not divisible by .*falling back to")


# -- one measured subprocess -------------------------------------------------------------------


def measure(cmd: list[str], *, log: Path, cwd: Path, interval: float = 0.05) -> dict[str, Any]:
    """Run ``cmd`` through convert.py's wrapper (fresh process; getrusage(RUSAGE_CHILDREN) and
    sampled RssAnon/RssFile). stdout goes to ``log.out``, stderr to ``log.err``."""
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    with open(log.with_suffix(".out"), "wb") as fo, open(log.with_suffix(".err"), "wb") as fe:
        rc = subprocess.call([sys.executable, "-c", _WRAPPER, str(result), str(interval), *cmd],
                             stdout=fo, stderr=fe, cwd=str(cwd))
    if not result.is_file():
        return {"rc": rc or -1, "seconds": 0.0, "maxrss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}
    r = json.loads(result.read_text())
    result.unlink()
    return {"rc": r["rc"], "seconds": r["seconds"], "maxrss_mb": r["maxrss_kb"] / 1024,
            "anon_mb": r["anon_kb"] / 1024, "file_mb": r["file_kb"] / 1024, "user_s": r["user_s"], "sys_s": r["sys_s"]}


def warm(path: Path) -> None:
    """Read the input once so every run starts with it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(64 * 1024 * 1024):
            pass


@dataclass
class Run:
    tool: str
    ok: bool
    seconds: float | None = None  # best wall time of the process
    tool_seconds: float | None = None  # the quantizer's own time (see module doc)
    inspect_seconds: float | None = None  # edgequant: its two inspect_gguf calls (last run)
    cpu_seconds: float | None = None  # user + sys of the best run (the machine may be shared: CPU time is steadier)
    peak_rss_mb: float | None = None
    peak_anon_mb: float | None = None
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    fallbacks: int | None = None
    type_counts: dict[str, int] | None = None
    output: str | None = None
    error: str | None = None
    skipped: str | None = None
    all_seconds: list[float] = field(default_factory=list)


@dataclass
class Result:
    type: str
    imatrix: str | None
    edgequant: Run
    llama_cpp: Run
    comparison: dict[str, Any] | None = None
    wall_ratio: float | None = None  # edgequant / llama-quantize, process wall time
    tool_ratio: float | None = None  # edgequant seconds / llama-quantize's quantize time


# -- the two tools -----------------------------------------------------------------------------


# edgequant runs as the library call the CLI makes (``quantize()``, progress bars off as with
# --json), in a fresh interpreter. It times the two inspect_gguf calls quantize() makes (input
# header before, output header after) so that the report can separate them from the kernel.
_EQ_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from edgequant import progress
import edgequant.quantize.gguf_quant as gq
t_import = time.perf_counter() - t0
progress.set_quiet(True)
spent = []
_inspect = gq.inspect_gguf
def timed_inspect(path):
    t = time.perf_counter()
    try:
        return _inspect(path)
    finally:
        spent.append(time.perf_counter() - t)
gq.inspect_gguf = timed_inspect
src, qtype, out, imatrix, threads = sys.argv[1:6]
opts = gq.QuantizeOptions(imatrix=Path(imatrix) if imatrix else None, threads=int(threads), force=True)
t1 = time.perf_counter()
r = gq.quantize(src, [qtype], out, opts)[0]
total = time.perf_counter() - t1
d = r.to_dict()
d.update(import_s=t_import, quantize_s=total, inspect_s=spent, kernel_s=total - sum(spent))
print(json.dumps(d))
"""


def edgequant_cmd(f16: Path, qtype: str, out: Path, imatrix: Path | None, threads: int) -> list[str]:
    return [sys.executable, "-c", _EQ_DRIVER, str(f16), qtype, str(out), str(imatrix or ""), str(threads)]


def llama_cmd(binary: Path, f16: Path, qtype: str, out: Path, imatrix: Path | None, threads: int) -> list[str]:
    # Run in the imatrix's folder and pass its bare name: llama-quantize records the path it was
    # given in quantize.imatrix.file, edgequant records the file name; this keeps the keys equal.
    cmd = [str(binary)]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix.name]
    return cmd + [str(f16), str(out), qtype, str(threads)]


def _summarize(tool: str, runs: list[dict[str, Any]], out: Path, log: Path) -> Run:
    bad = next((m for m in runs if m["rc"] != 0), None)
    if bad is not None:
        tail = _tail(log.with_suffix(".err")) + "\n" + _tail(log.with_suffix(".out"))
        return Run(tool, False, error=f"exit {bad['rc']}:\n{tail.strip()}")
    if not out.is_file():
        return Run(tool, False, error=f"{tool} exited 0 but wrote no {out}")
    best = min(runs, key=lambda m: m["seconds"])
    return Run(tool, True, seconds=round(best["seconds"], 2), cpu_seconds=round(best["user_s"] + best["sys_s"], 2), peak_rss_mb=round(max(m["maxrss_mb"] for m in runs), 1),
               peak_anon_mb=round(max(m["anon_mb"] for m in runs), 1), size_bytes=out.stat().st_size,
               output=str(out), all_seconds=[round(m["seconds"], 2) for m in runs])


def bench_type(f16: Path, qtype: str, imatrix: Path | None, binary: Path | None, why: str | None,
               workdir: Path, threads: int, repeat: int, keep: bool) -> Result:
    tag = qtype + ("-imat" if imatrix is not None else "")
    jobs: dict[str, tuple[list[str], Path, Path, Path]] = {}
    eq_out = workdir / f"edgequant-{tag}.gguf"
    jobs["edgequant"] = (edgequant_cmd(f16, qtype, eq_out, imatrix, threads), eq_out, workdir / f"edgequant-{tag}.log", REPO)
    if binary is not None:
        lq_out = workdir / f"llama-quantize-{tag}.gguf"
        cwd = imatrix.parent if imatrix is not None else workdir
        jobs["llama.cpp"] = (llama_cmd(binary, f16, qtype, lq_out, imatrix, threads), lq_out, workdir / f"llama-quantize-{tag}.log", cwd)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    tool_secs: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeat):  # interleaved, so that drifting machine state hits both tools alike
        for tool, (cmd, out, log, cwd) in jobs.items():
            out.unlink(missing_ok=True)
            os.sync()  # the previous output's writeback must not land on this run's clock
            warm(f16)
            m = measure(cmd, log=log, cwd=cwd)
            runs[tool].append(m)
            stdout = log.with_suffix(".out").read_text(errors="replace")
            if m["rc"] == 0 and tool == "edgequant":
                tool_secs[tool].append(json.loads(stdout)["kernel_s"])
            elif m["rc"] == 0 and (t := _LQ_TIME.search(stdout)):
                tool_secs[tool].append(float(t.group(1)) / 1000)
            print(f"  {qtype:8} {tool:10} {m['seconds']:6.2f} s, peak RSS {m['maxrss_mb']:,.0f} MB (rc {m['rc']})", file=sys.stderr)
    eq = _summarize("edgequant", runs["edgequant"], *jobs["edgequant"][1:3])
    if eq.ok:
        r = json.loads(Path(jobs["edgequant"][2]).with_suffix(".out").read_text())
        eq.tool_seconds = min(tool_secs["edgequant"])
        eq.inspect_seconds = round(sum(r["inspect_s"]), 2)
        eq.bits_per_weight, eq.fallbacks, eq.type_counts = r["bits_per_weight"], len(r["fallbacks"]), r["type_counts"]
    if binary is None:
        lc = Run("llama.cpp", False, skipped=why)
    else:
        lc = _summarize("llama.cpp", runs["llama.cpp"], *jobs["llama.cpp"][1:3])
        if lc.ok:
            lc.tool_seconds = min(tool_secs["llama.cpp"]) if tool_secs["llama.cpp"] else None
            log = jobs["llama.cpp"][2]
            text = log.with_suffix(".out").read_text(errors="replace") + log.with_suffix(".err").read_text(errors="replace")
            lc.fallbacks = len(_FALLBACK.findall(text))
    res = Result(qtype, str(imatrix) if imatrix is not None else None, eq, lc)
    if eq.ok and lc.ok:
        res.comparison = compare_gguf(Path(eq.output), Path(lc.output))
        res.wall_ratio = round(eq.seconds / lc.seconds, 3)
        if eq.tool_seconds and lc.tool_seconds:
            res.tool_ratio = round(eq.tool_seconds / lc.tool_seconds, 3)
    if not keep:
        for run in (eq, lc):
            if run.output and Path(run.output).exists():
                Path(run.output).unlink()
                run.output = None
    return res


# -- setup ---------------------------------------------------------------------------------------


def find_llama_quantize(arg: str | None) -> tuple[Path | None, str | None]:
    raw = arg or os.environ.get("LLAMA_CPP_BIN")
    if not raw:
        return None, "no --llama-cpp-bin and LLAMA_CPP_BIN is unset"
    b = Path(raw).expanduser() / "llama-quantize"
    if not (b.is_file() and os.access(b, os.X_OK)):
        return None, f"{b} is missing or not executable"
    return b, None


def default_model() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import smollm2_hf  # the SmolLM2-135M-Instruct checkpoint the test suite uses

    return smollm2_hf()


def prepare_inputs(args) -> tuple[Path, Path | None]:
    """The F16 GGUF (converted once, cached) and, when a type needs one, the imatrix."""
    from edgequant.export.convert import convert

    model = Path(args.model).expanduser() if args.model else None
    if args.gguf:
        f16 = Path(args.gguf).expanduser().resolve()
    else:
        model = model or default_model()
        out = args.workdir / "f16"
        found = sorted(out.glob("*-F16.gguf"))
        if found and found[0].stat().st_mtime > max(p.stat().st_mtime for p in model.iterdir()):
            f16 = found[0]
        else:
            print(f"converting {model.name} to F16 ...", file=sys.stderr)
            f16 = Path(convert(model, out, outtype="f16", force=True).files[0])
    imatrix = None
    if args.imatrix_type:
        if args.imatrix:
            imatrix = Path(args.imatrix).expanduser().resolve()
        else:
            if model is None:
                raise SystemExit("--imatrix-type needs --imatrix FILE, or --model DIR to compute one")
            from edgequant.quantize.imatrix import compute_imatrix

            imatrix = args.workdir / f"imatrix-{model.name}-c{args.imatrix_chunks}.gguf"
            if not imatrix.is_file():
                print(f"computing an imatrix ({args.imatrix_chunks} chunks of 512 tokens) ...", file=sys.stderr)
                compute_imatrix(model, imatrix, ctx=512, chunks=args.imatrix_chunks, force=True)
    return f16, imatrix


# -- report --------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_report(f16: Path, imatrix: Path | None, results: list[Result], threads: int, repeat: int,
                 loadavg: list[float] | None) -> None:
    print(f"input: {f16} ({f16.stat().st_size / 1e6:,.1f} MB); imatrix: {imatrix or '-'}; {threads} threads; best of {repeat}; "
          f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print("wall: the whole process. kernel: edgequant's quantize() minus its two inspect_gguf calls, and "
          "llama-quantize's printed quantize time. inspect: edgequant's inspect_gguf of the input and the output. "
          "CPU: user + sys of the process (steadier than wall time when the machine is shared).")
    if loadavg:
        print(f"load average (1/5/15 min) when the runs ended: {' '.join(f'{x:.2f}' for x in loadavg)} "
              f"(the runs themselves keep about {threads} cores busy; more means other processes competed)")
    print()
    hdr = ("| type | imatrix | wall s edgequant | wall s llama-quantize | wall ratio | kernel s edgequant | "
           "kernel s llama-quantize | kernel ratio | inspect s edgequant | CPU s edgequant | CPU s llama-quantize | peak RSS MB edgequant | peak RSS MB llama-quantize | "
           "size MB | bpw | fallbacks eq/lq | tensor data |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        eq, lc, c = r.edgequant, r.llama_cpp, r.comparison
        if not eq.ok:
            print(f"| {r.type} | {'yes' if r.imatrix else ''} | FAILED: {eq.error.splitlines()[-1] if eq.error else ''} |")
            continue
        ident = "-" if c is None else ("identical" if c["identical_tensor_data"] else f"DIFFERENT ({c['tensors_differing']})")
        lq_fb = "-" if lc.fallbacks is None else str(lc.fallbacks)
        print(f"| {r.type} | {'yes' if r.imatrix else ''} | {_f(eq.seconds)} | {_f(lc.seconds)} | {_f(r.wall_ratio)} | "
              f"{_f(eq.tool_seconds)} | {_f(lc.tool_seconds)} | {_f(r.tool_ratio)} | {_f(eq.inspect_seconds)} | "
              f"{_f(eq.cpu_seconds)} | {_f(lc.cpu_seconds)} | "
              f"{_f(eq.peak_rss_mb, '{:,.0f}')} | {_f(lc.peak_rss_mb, '{:,.0f}')} | "
              f"{eq.size_bytes / 1e6:,.1f} | {eq.bits_per_weight:.2f} | {eq.fallbacks}/{lq_fb} | {ident} |")
    print()
    for r in results:
        lc, c = r.llama_cpp, r.comparison
        if lc.skipped:
            print(f"{r.type}: llama-quantize skipped: {lc.skipped}")
        elif not lc.ok:
            print(f"{r.type}: llama-quantize FAILED: {lc.error}")
        if c is None:
            continue
        for d in c["first_differing"]:
            print(f"{r.type}: tensor {d['tensor']}: {d['why']}")
        for label, key in (("only in edgequant", "tensors_only_in_a"), ("only in llama-quantize", "tensors_only_in_b")):
            if c[key]:
                print(f"{r.type}: tensors {label}: {', '.join(c[key][:10])}")
        for label, key in (("only in edgequant", "keys_only_in_a"), ("only in llama-quantize", "keys_only_in_b")):
            if c[key]:
                print(f"{r.type}: metadata keys {label}: {', '.join(c[key])}")
        for line in c["key_values_differing"]:
            print(f"{r.type}: metadata value differs: {line}")
    same_meta = [r.type for r in results if r.comparison and not any(
        r.comparison[k] for k in ("keys_only_in_a", "keys_only_in_b", "key_values_differing"))]
    if same_meta:
        print(f"metadata identical (every key and value) for: {', '.join(same_meta)}")
    for r in results:
        if r.edgequant.ok and r.edgequant.type_counts:
            tc = ", ".join(f"{k} {v}" for k, v in sorted(r.edgequant.type_counts.items(), key=lambda kv: -kv[1]))
            print(f"{r.type}: tensor types {tc}")
    timed = [r for r in results if r.wall_ratio is not None]
    if timed:
        ok = [r.type for r in timed if r.wall_ratio <= 1.05]
        print(f"\ntarget wall time within 5 % of llama-quantize: met for {len(ok)}/{len(timed)} types"
              + (f" ({', '.join(ok)})" if ok else ""))
        kt = [r for r in timed if r.tool_ratio is not None]
        ok = [r.type for r in kt if r.tool_ratio <= 1.05]
        print(f"kernel time within 5 % of llama-quantize's: {len(ok)}/{len(kt)} types")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: the SmolLM2-135M-Instruct test fixture)")
    ap.add_argument("--gguf", help="an existing F16/BF16/F32 GGUF to quantize (skips the conversion)")
    ap.add_argument("--type", action="append", default=[], help=f"quant type without imatrix (repeatable; default {' '.join(DEFAULT_TYPES)})")
    ap.add_argument("--imatrix-type", action="append", default=None,
                    help=f"quant type run with the imatrix (repeatable; default {' '.join(DEFAULT_IMATRIX_TYPES)}; 'none' for none)")
    ap.add_argument("--imatrix", help="imatrix GGUF (default: computed with edgequant imatrix, cached in the workdir)")
    ap.add_argument("--imatrix-chunks", type=int, default=8, help="chunks of 512 tokens for the computed imatrix (default 8)")
    ap.add_argument("--llama-cpp-bin", help="folder with llama-quantize (default: $LLAMA_CPP_BIN)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both tools (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and type, interleaved; best wall time, highest RSS")
    ap.add_argument("--workdir", type=Path, default=CACHE / "quantize", help="outputs, logs, the cached F16 and imatrix")
    ap.add_argument("--keep", action="store_true", help="keep the quantized outputs (default: delete after comparing)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="print the table of a saved --json run (runs nothing)")
    args = ap.parse_args(argv)
    if args.from_json:
        d = json.loads(args.from_json.read_text())
        results = [Result(r["type"], r["imatrix"], Run(**r["edgequant"]), Run(**r["llama_cpp"]), r["comparison"],
                          r["wall_ratio"], r["tool_ratio"]) for r in d["results"]]
        print_report(Path(d["input"]), Path(d["imatrix"]) if d["imatrix"] else None, results, d["threads"], d["repeat"],
                     d.get("loadavg"))
        return 0
    args.workdir = args.workdir.expanduser().resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    types = args.type or DEFAULT_TYPES
    args.imatrix_type = [t for t in (DEFAULT_IMATRIX_TYPES if args.imatrix_type is None else args.imatrix_type) if t.lower() != "none"]

    binary, why = find_llama_quantize(args.llama_cpp_bin)
    if binary is None:
        print(f"llama-quantize column skipped: {why}", file=sys.stderr)
    f16, imatrix = prepare_inputs(args)
    results = [bench_type(f16, t, None, binary, why, args.workdir, args.threads, args.repeat, args.keep) for t in types]
    results += [bench_type(f16, t, imatrix, binary, why, args.workdir, args.threads, args.repeat, args.keep) for t in args.imatrix_type]
    loadavg = list(os.getloadavg())
    if args.json:
        print(json.dumps({"input": str(f16), "imatrix": str(imatrix) if imatrix else None, "threads": args.threads,
                          "repeat": args.repeat, "loadavg": loadavg, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print_report(f16, imatrix, results, args.threads, args.repeat, loadavg)
    return 0 if all(r.edgequant.ok and (r.llama_cpp.ok or r.llama_cpp.skipped) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
