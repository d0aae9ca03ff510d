#!/usr/bin/env python
"""Benchmark ``edgequant convert`` against llama.cpp's ``convert_hf_to_gguf.py``.

For every input model and outtype both converters run in a fresh subprocess on the same input.
We report wall time, peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small wrapper
process that starts the converter) plus the peak anonymous and file-backed
RSS sampled from ``/proc/<pid>/status`` (memory-mapped checkpoint pages count toward RSS but the
kernel can drop them; anonymous memory it cannot), the output sizes, and how the two GGUF files
compare: tensor by tensor (name, type, shape, bytes) and key by key.

    python benchmarks/convert.py --synthetic-1b --outtype f16 --outtype bf16
    python benchmarks/convert.py --model ~/models/SmolLM2-135M-Instruct --llama-cpp-dir /path/to/llama.cpp --json

llama.cpp's converter is found through ``--llama-cpp-dir`` or ``$LLAMA_CPP_DIR`` (a llama.cpp
source tree holding ``convert_hf_to_gguf.py`` and ``gguf-py/``); without it that column is
skipped and the reason printed.

``--synthetic-1b``, ``--synthetic-qwen3-1b`` and ``--synthetic-qwen3-moe`` build (once, cached under
``~/.cache/edgequant/bench/``) a ~1.03B-parameter Mistral-shaped and a ~1.3B-parameter Qwen3-shaped
checkpoint, and two Qwen3-30B-A3B layers at real width (128 experts), with random bf16 weights (see
``benchmarks/synthetic.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import CACHE, synthetic_1b, synthetic_qwen3_1b, synthetic_qwen3_moe_2l  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# -- measuring one subprocess ----------------------------------------------------------------


@dataclass
class Run:
    tool: str
    ok: bool
    seconds: float | None = None
    peak_rss_mb: float | None = None  # ru_maxrss of the child
    peak_anon_mb: float | None = None  # sampled RssAnon high-water mark
    peak_file_mb: float | None = None  # sampled RssFile high-water mark (mmap'ed checkpoint pages)
    user_s: float | None = None
    sys_s: float | None = None
    output: str | None = None
    size_bytes: int | None = None
    error: str | None = None
    skipped: str | None = None
    log: str | None = None


# The measured command is started by this small wrapper, never forked from the benchmark itself:
# on Linux a child's ru_maxrss starts at its parent's RSS at fork time, and the benchmark holds
# memory-mapped GGUF files while it compares them. The wrapper (about 10 MB) runs the command,
# samples its RssAnon/RssFile, and reports getrusage(RUSAGE_CHILDREN) as JSON.
_WRAPPER = r"""
import json, resource, subprocess, sys, threading, time
result, interval, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
peaks = {"RssAnon:": 0, "RssFile:": 0}
t0 = time.perf_counter()
proc = subprocess.Popen(cmd)
stop = threading.Event()
def sample():
    while not stop.is_set():
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for ln in fh:
                    k = ln.split(":")[0] + ":"
                    if k in peaks:
                        peaks[k] = max(peaks[k], int(ln.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        stop.wait(interval)
th = threading.Thread(target=sample, daemon=True)
th.start()
rc = proc.wait()
seconds = time.perf_counter() - t0
stop.set()
th.join()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(result, "w") as fh:
    json.dump({"rc": rc, "seconds": seconds, "maxrss_kb": ru.ru_maxrss, "anon_kb": peaks["RssAnon:"],
               "file_kb": peaks["RssFile:"], "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, fh)
"""


def measure(cmd: list[str], *, env: dict[str, str] | None, log: Path, interval: float = 0.05) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process (through the wrapper); wall time, rusage and sampled RSS peaks."""
    result = log.with_suffix(".rusage.json")
    if result.exists():
        result.unlink()
    with open(log, "wb") as logf:
        rc = subprocess.call([sys.executable, "-c", _WRAPPER, str(result), str(interval), *cmd],
                             stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if not result.is_file():
        return {"rc": rc if rc else -1, "seconds": 0.0, "maxrss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0, "user_s": 0.0, "sys_s": 0.0}
    r = json.loads(result.read_text())
    result.unlink()
    return {
        "rc": r["rc"],
        "seconds": r["seconds"],
        "maxrss_mb": r["maxrss_kb"] / 1024,  # Linux reports KiB
        "anon_mb": r["anon_kb"] / 1024,
        "file_mb": r["file_kb"] / 1024,
        "user_s": r["user_s"],
        "sys_s": r["sys_s"],
    }


def warm_cache(model: Path) -> None:
    """Read the weights once so that every run starts with the checkpoint in the page cache
    (skipped when they would not fit in half the RAM: then both tools read from disk alike)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if _input_bytes(model) > ram // 2:
        return
    for f in sorted(model.iterdir()):
        if f.suffix in (".safetensors", ".bin"):
            with open(f, "rb") as fh:
                while fh.read(64 * 1024 * 1024):
                    pass


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def edgequant_cmd(model: Path, outtype: str, out: Path) -> tuple[list[str], dict[str, str] | None]:
    return [sys.executable, "-m", "edgequant", "convert", str(model), "-o", str(out), "--outtype", outtype, "--force", "--json"], None


def llama_cmd(llama_dir: Path, model: Path, outtype: str, out: Path) -> tuple[list[str], dict[str, str] | None]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(llama_dir / "gguf-py"), env.get("PYTHONPATH")]))
    return [sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype, "--outfile", str(out)], env


def run_once(cmd: list[str], env: dict[str, str] | None, out: Path, model: Path) -> dict[str, Any]:
    """One fresh-process run, after flushing the previous run's writes and warming the checkpoint."""
    if out.exists():
        out.unlink()
    os.sync()  # the previous output's writeback must not land on this run's clock
    warm_cache(model)
    return measure(cmd, env=env, log=out.with_suffix(".log"))


def summarize(tool: str, runs: list[dict[str, Any]], out: Path) -> Run:
    """Best wall time and highest memory over the runs."""
    log = str(out.with_suffix(".log"))
    bad = next((m for m in runs if m["rc"] != 0), None)
    if bad is not None:
        return Run(tool, False, error=f"exit {bad['rc']}:\n{_tail(Path(log))}", log=log)
    if not out.is_file():
        return Run(tool, False, error=f"{tool} exited 0 but wrote no {out}", log=log)
    best = min(runs, key=lambda m: m["seconds"])
    return Run(tool, True, seconds=round(best["seconds"], 2),
               peak_rss_mb=round(max(m["maxrss_mb"] for m in runs), 1),
               peak_anon_mb=round(max(m["anon_mb"] for m in runs), 1),
               peak_file_mb=round(max(m["file_mb"] for m in runs), 1),
               user_s=round(best["user_s"], 1), sys_s=round(best["sys_s"], 1),
               output=str(out), size_bytes=out.stat().st_size, log=log)


# -- comparing the two GGUF files ------------------------------------------------------------


def _field_value(f) -> Any:
    try:
        return f.contents()
    except Exception as e:  # a type the reader cannot decode
        return f"<unreadable: {e}>"


def _short(v: Any, n: int = 80) -> str:
    if isinstance(v, list):
        return f"[{len(v)} items]"
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _as_float(t) -> np.ndarray | None:
    import gguf

    raw = np.asarray(t.data)
    Q = gguf.GGMLQuantizationType
    if t.tensor_type == Q.F32:
        return raw.astype(np.float32, copy=False).reshape(-1)
    if t.tensor_type == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1)
    if t.tensor_type == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1)
    return None


def _bytes_equal(a: np.ndarray, b: np.ndarray, step: int = 64 * 1024 * 1024) -> bool:
    a = a.reshape(-1).view(np.uint8)
    b = b.reshape(-1).view(np.uint8)
    if a.size != b.size:
        return False
    return all(np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, a.size, step))


def compare_gguf(path_a: Path, path_b: Path, first: int = 5) -> dict[str, Any]:
    """Tensor names, types, shapes and bytes; metadata keys present in one file only, and keys whose values differ."""
    import gguf

    ra, rb = gguf.GGUFReader(path_a), gguf.GGUFReader(path_b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    only_a = sorted(set(ta) - set(tb))
    only_b = sorted(set(tb) - set(ta))
    differing: list[dict[str, Any]] = []
    n_diff = 0
    for name in [t.name for t in ra.tensors if t.name in tb]:
        a, b = ta[name], tb[name]
        why = []
        if a.tensor_type != b.tensor_type:
            why.append(f"type {a.tensor_type.name} vs {b.tensor_type.name}")
        if list(a.shape) != list(b.shape):
            why.append(f"shape {list(a.shape)} vs {list(b.shape)}")
        if not why and not _bytes_equal(np.asarray(a.data), np.asarray(b.data)):
            why.append("bytes differ")
        if why:
            n_diff += 1
            if len(differing) < first:
                d: dict[str, Any] = {"tensor": name, "why": "; ".join(why)}
                fa, fb = _as_float(a), _as_float(b)
                if fa is not None and fb is not None and fa.size == fb.size:
                    ne = fa != fb
                    d["elements_differing"] = int(ne.sum())
                    d["max_abs_diff"] = float(np.abs(fa - fb).max())
                differing.append(d)
    keys_a = {k: v for k, v in ra.fields.items() if not k.startswith("GGUF.")}
    keys_b = {k: v for k, v in rb.fields.items() if not k.startswith("GGUF.")}
    value_diffs = []
    for k in sorted(set(keys_a) & set(keys_b)):
        va, vb = _field_value(keys_a[k]), _field_value(keys_b[k])
        if va != vb:
            if isinstance(va, list) and isinstance(vb, list):
                idx = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
                value_diffs.append(f"{k}: {len(va)} vs {len(vb)} items, first difference at [{idx}]: "
                                   f"{_short(va[idx] if idx < len(va) else None)} vs {_short(vb[idx] if idx < len(vb) else None)}")
            else:
                value_diffs.append(f"{k}: {_short(va)} vs {_short(vb)}")
    return {
        "tensors_a": len(ta),
        "tensors_b": len(tb),
        "tensors_only_in_a": only_a,
        "tensors_only_in_b": only_b,
        "tensors_differing": n_diff,
        "first_differing": differing,
        "identical_tensor_data": not only_a and not only_b and n_diff == 0,
        "keys_only_in_a": sorted(set(keys_a) - set(keys_b)),
        "keys_only_in_b": sorted(set(keys_b) - set(keys_a)),
        "key_values_differing": value_diffs,
    }


# -- driver ----------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    outtype: str
    input_bytes: int
    edgequant: Run
    llama_cpp: Run
    comparison: dict[str, Any] | None = None
    verdict: dict[str, Any] = field(default_factory=dict)


def find_llama_cpp(arg: str | None) -> tuple[Path | None, str | None]:
    raw = arg or os.environ.get("LLAMA_CPP_DIR")
    if not raw:
        return None, "no --llama-cpp-dir and LLAMA_CPP_DIR is unset"
    d = Path(raw).expanduser()
    if not (d / "convert_hf_to_gguf.py").is_file():
        return None, f"{d} has no convert_hf_to_gguf.py"
    if not (d / "gguf-py" / "gguf").is_dir():
        return None, f"{d} has no gguf-py/gguf (llama.cpp's converter needs its own gguf-py)"
    return d, None


def _input_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.iterdir() if f.suffix in (".safetensors", ".bin"))


def bench_one(model: Path, outtype: str, llama_dir: Path | None, llama_why: str | None, workdir: Path,
              repeat: int, keep: bool) -> Result:
    tag = hashlib.sha1(str(model.resolve()).encode()).hexdigest()[:8]
    out = workdir / f"{model.name}-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    jobs = {"edgequant": (*edgequant_cmd(model, outtype, out / f"edgequant-{outtype}.gguf"), out / f"edgequant-{outtype}.gguf")}
    if llama_dir is not None:
        path = out / f"llama-cpp-{outtype}.gguf"
        jobs["llama.cpp"] = (*llama_cmd(llama_dir, model, outtype, path), path)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    for _ in range(repeat):  # interleaved, so that drifting machine state hits both tools alike
        for tool, (cmd, env, path) in jobs.items():
            m = run_once(cmd, env, path, model)
            runs[tool].append(m)
            print(f"  {tool}: {m['seconds']:.1f} s, peak RSS {m['maxrss_mb']:,.0f} MB (rc {m['rc']})", file=sys.stderr)
    eq = summarize("edgequant", runs["edgequant"], jobs["edgequant"][2])
    if llama_dir is None:
        lc = Run("llama.cpp", False, skipped=llama_why)
    else:
        lc = summarize("llama.cpp", runs["llama.cpp"], jobs["llama.cpp"][2])
    res = Result(str(model), outtype, _input_bytes(model), eq, lc)
    if eq.ok and lc.ok:
        res.comparison = compare_gguf(Path(eq.output), Path(lc.output))
    if eq.ok:
        v: dict[str, Any] = {"rss_below_1.5GB": eq.peak_rss_mb < 1536}
        if lc.ok:
            v["rss_at_most_half_of_llama_cpp"] = eq.peak_rss_mb <= lc.peak_rss_mb / 2
            v["wall_not_worse_than_llama_cpp"] = eq.seconds <= lc.seconds
        res.verdict = v
    if not keep:
        for r in (eq, lc):
            if r.output and Path(r.output).exists():
                Path(r.output).unlink()
                r.output = None  # deleted; --keep keeps it
    return res


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def print_report(results: list[Result]) -> None:
    for r in results:
        print(f"\n== {r.model}  outtype={r.outtype}  input={r.input_bytes / 1e9:.2f} GB")
        print(f"   {'tool':<10} {'wall s':>8} {'peak RSS MB':>12} {'anon MB':>9} {'file MB':>9} {'user s':>7} {'sys s':>6} {'output MB':>10}")
        for run in (r.edgequant, r.llama_cpp):
            if run.skipped:
                print(f"   {run.tool:<10} skipped: {run.skipped}")
            elif not run.ok:
                print(f"   {run.tool:<10} FAILED: {run.error}")
            else:
                print(f"   {run.tool:<10} {run.seconds:>8.1f} {_mb(run.peak_rss_mb):>12} {_mb(run.peak_anon_mb):>9} "
                      f"{_mb(run.peak_file_mb):>9} {run.user_s:>7.1f} {run.sys_s:>6.1f} {run.size_bytes / 1e6:>10,.1f}")
        c = r.comparison
        if c is not None:
            same = "identical" if c["identical_tensor_data"] else "DIFFERENT"
            print(f"   tensor data: {same} ({c['tensors_a']} vs {c['tensors_b']} tensors, {c['tensors_differing']} differing)")
            for d in c["first_differing"]:
                extra = f", {d['elements_differing']} elements, max |diff| {d['max_abs_diff']:.3g}" if "max_abs_diff" in d else ""
                print(f"     {d['tensor']}: {d['why']}{extra}")
            for label, key in (("only in edgequant", "tensors_only_in_a"), ("only in llama.cpp", "tensors_only_in_b")):
                if c[key]:
                    print(f"   tensors {label}: {', '.join(c[key][:10])}")
            for label, key in (("only in edgequant", "keys_only_in_a"), ("only in llama.cpp", "keys_only_in_b")):
                if c[key]:
                    print(f"   keys {label}: {', '.join(c[key])}")
            for line in c["key_values_differing"]:
                print(f"   value differs: {line}")
        if r.verdict:
            print("   targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in r.verdict.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="DIR", help="an HF model folder (repeatable)")
    ap.add_argument("--synthetic-1b", action="store_true", help="benchmark the cached synthetic ~1B Mistral (built on first use)")
    ap.add_argument("--synthetic-qwen3-1b", action="store_true", help="benchmark the cached synthetic ~1.3B Qwen3 (built on first use)")
    ap.add_argument("--synthetic-qwen3-moe", action="store_true",
                    help="benchmark two Qwen3-30B-A3B layers at real width, 128 experts (~4 GB, built on first use)")
    ap.add_argument("--outtype", action="append", default=[], choices=["f16", "bf16", "f32", "q8_0"],
                    help="output type (repeatable; default f16)")
    ap.add_argument("--llama-cpp-dir", help="llama.cpp source tree with convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR)")
    ap.add_argument("--workdir", type=Path, default=CACHE / "out", help="where the GGUF outputs and logs go")
    ap.add_argument("--repeat", type=int, default=1, help="runs per converter; the best wall time and the highest RSS are kept")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs (default: delete them after comparing)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    models = [Path(m).expanduser() for m in args.model]
    if args.synthetic_qwen3_moe:
        models.insert(0, synthetic_qwen3_moe_2l())
    if args.synthetic_qwen3_1b:
        models.insert(0, synthetic_qwen3_1b())
    if args.synthetic_1b:
        models.insert(0, synthetic_1b())
    if not models:
        ap.error("nothing to benchmark: give --synthetic-1b, --synthetic-qwen3-1b, --synthetic-qwen3-moe and/or --model DIR")
    for m in models:
        if not (m / "config.json").is_file():
            ap.error(f"{m} is not a Hugging Face model folder (no config.json)")
    outtypes = args.outtype or ["f16"]
    llama_dir, why = find_llama_cpp(args.llama_cpp_dir)
    if llama_dir is None:
        print(f"llama.cpp column skipped: {why}", file=sys.stderr)
    args.workdir.mkdir(parents=True, exist_ok=True)

    results = []
    for m in models:
        for ot in outtypes:
            print(f"benchmarking {m.name} {ot} ...", file=sys.stderr)
            results.append(bench_one(m, ot, llama_dir, why, args.workdir, args.repeat, args.keep))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
        print_report(results)
    return 0 if all(r.edgequant.ok and (r.llama_cpp.ok or r.llama_cpp.skipped) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
