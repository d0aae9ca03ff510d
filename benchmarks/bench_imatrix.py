#!/usr/bin/env python
"""``edgequant imatrix`` (each engine) beside llama.cpp's ``llama-imatrix``, in one run: wall time, peak RSS,
and how close each engine's matrix is to the tool's.

Sides, each a fresh process through the getrusage(RUSAGE_CHILDREN) wrapper of benchmarks/convert.py:

- ``llama-imatrix -m F16.gguf -f text.txt -c CTX --chunks N -t T --no-ppl`` (on llama-cpp-python's own
  libraries: the same ggml kernels as our llama.cpp engine);
- ``edgequant imatrix F16.gguf --engine llama.cpp`` (the same file);
- ``edgequant imatrix HF --engine llama.cpp`` (converts to a temporary F16 first: counted);
- ``edgequant imatrix HF --engine torch`` (transformers, fp32 on CPU).

The sides run interleaved, ``--rounds`` times (the machine may be shared), and the best wall time and
the lowest peak RSS of each are reported with their ratio to llama-imatrix's. Then, per side, the worst
per-tensor Pearson correlation of ``in_sum2 / counts`` against the tool's file (per expert for MoE, over
experts both saw) and whether every count is equal.

    python benchmarks/bench_imatrix.py                       # SmolLM2-135M, ctx 512, 32 chunks, 2 rounds
    python benchmarks/bench_imatrix.py --chunks 8 --rounds 1 --no-torch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from quantize import CACHE, measure, warm  # noqa: E402


def worst_correlation(ours: Path, theirs: Path) -> dict:
    """The worst tensor (and expert) correlation of ``ours`` against ``theirs``, and whether the entries and counts match."""
    from edgequant.quantize.imatrix_file import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(theirs)
    worst, name, counts_equal = 1.0, None, True
    for n in sorted(set(a.entries) & set(b.entries)):
        ea, eb = a.entries[n], b.entries[n]
        if ea.sums.shape != eb.sums.shape:
            return {"worst": float("nan"), "tensor": n, "counts_equal": False, "note": "shapes differ"}
        counts_equal &= bool(np.array_equal(ea.counts, eb.counts))
        both = (ea.counts > 0) & (eb.counts > 0)
        va, vb = ea.values()[both].astype(np.float64), eb.values()[both].astype(np.float64)
        for x, y in zip(va, vb):
            r = float(np.corrcoef(x, y)[0, 1])
            if r < worst:
                worst, name = r, n
    return {"worst": worst, "tensor": name, "counts_equal": counts_equal,
            "only_ours": sorted(set(a.entries) - set(b.entries)), "only_theirs": sorted(set(b.entries) - set(a.entries))}


def sides(args, hf: Path, f16: Path, text: Path, work: Path) -> dict[str, list[str]]:
    from edgequant.llamacpp_tools import bin_dir, repack_args

    common = ["--text", str(text), "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--force", "--json"]
    eq = [sys.executable, "-m", "edgequant", "imatrix"]
    out = {
        "llama-imatrix": [str(bin_dir() / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-c", str(args.ctx),
                          "--chunks", str(args.chunks), "-t", str(args.threads), "--no-ppl", "-o",
                          str(work / "llama-imatrix.gguf"), *repack_args("llama-imatrix")],
        "llama.cpp (GGUF)": [*eq, str(f16), "-o", str(work / "llamacpp-gguf.gguf"), "--engine", "llama.cpp",
                             "--threads", str(args.threads), *common],
        "llama.cpp (HF, converts)": [*eq, str(hf), "-o", str(work / "llamacpp-hf.gguf"), "--engine", "llama.cpp",
                                     "--threads", str(args.threads), *common],
        "torch (HF)": [*eq, str(hf), "-o", str(work / "torch-hf.gguf"), "--engine", "torch", *common],
    }
    if args.no_torch:
        out.pop("torch (HF)")
    return out


def run(args) -> dict:
    from edgequant.export.convert import convert
    from edgequant.llamacpp_tools import tool_env
    from edgequant.text import builtin_text

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import smollm2_hf

    hf = Path(args.model).expanduser() if args.model else smollm2_hf()
    work = (args.workdir / hf.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "model-F16.gguf"
    if not f16.is_file():
        convert(hf, f16, outtype="f16")
    text = work / "text.txt"
    text.write_text(builtin_text(), encoding="utf-8")
    warm(f16)
    cmds = sides(args, hf, f16, text, work)
    env_tool, env_ours = tool_env(), dict(os.environ, GPTQMODEL_CPU_WORKERS=str(args.threads))
    rows: dict[str, dict] = {k: {"seconds": [], "peak_rss_mb": [], "cpu_s": []} for k in cmds}
    torch_rounds = min(args.torch_rounds, args.rounds)
    for i in range(args.rounds):
        for name, cmd in cmds.items():
            if name.startswith("torch") and i >= torch_rounds:
                continue
            print(f"round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            os.environ.clear()
            os.environ.update(env_tool if name == "llama-imatrix" else env_ours)
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            m = measure(cmd, log=work / f"{slug}-{i}.log", cwd=REPO)
            if m["rc"] != 0:
                raise SystemExit(f"{name} failed (rc {m['rc']}); see {work}")
            for key, value in (("seconds", m["seconds"]), ("peak_rss_mb", m["maxrss_mb"]), ("cpu_s", m["user_s"] + m["sys_s"])):
                rows[name][key].append(round(value, 2))
    theirs = Path(cmds["llama-imatrix"][cmds["llama-imatrix"].index("-o") + 1])
    for name, cmd in cmds.items():
        r = rows[name]
        r["best_seconds"], r["best_peak_rss_mb"] = min(r["seconds"]), min(r["peak_rss_mb"])
        if name != "llama-imatrix":
            r["parity"] = worst_correlation(Path(cmd[cmd.index("-o") + 1]), theirs)
    base = rows["llama-imatrix"]
    for r in rows.values():
        r["time_ratio"] = round(r["best_seconds"] / base["best_seconds"], 3)
        r["rss_ratio"] = round(r["best_peak_rss_mb"] / base["best_peak_rss_mb"], 3)
    return {"model": str(hf), "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads, "rounds": args.rounds,
            "sides": rows}


def report(res: dict) -> None:
    print(f"{Path(res['model']).name}: ctx {res['ctx']}, {res['chunks']} chunks, {res['threads']} threads, "
          f"best of {res['rounds']} rounds (interleaved)")
    print(f"{'side':26} {'wall s':>8} {'x tool':>7} {'peak RSS MB':>12} {'x tool':>7} {'CPU s':>7}  worst r vs llama-imatrix")
    for name, r in res["sides"].items():
        p = r.get("parity")
        par = "-" if p is None else (f"{p['worst']:.7f} ({p['tensor']}), counts {'equal' if p['counts_equal'] else 'DIFFER'}"
                                     + (f", only ours {len(p['only_ours'])}, only theirs {len(p['only_theirs'])}"
                                        if p.get("only_ours") or p.get("only_theirs") else ""))
        print(f"{name:26} {r['best_seconds']:8.1f} {r['time_ratio']:7.3f} {r['best_peak_rss_mb']:12.0f} "
              f"{r['rss_ratio']:7.3f} {min(r['cpu_s']):7.1f}  {par}")
        print(f"{'':26} all wall: {r['seconds']}  all RSS: {[round(x) for x in r['peak_rss_mb']]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct, the test fixture)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--torch-rounds", type=int, default=1, help="rounds of the (slow) torch side (default 1)")
    ap.add_argument("--no-torch", action="store_true", help="leave the torch engine out")
    ap.add_argument("--workdir", type=Path, default=CACHE / "imatrix-engines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2)) if args.json else report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
