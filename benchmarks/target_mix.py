#!/usr/bin/env python
"""Benchmark ``edgequant quantize --target-size`` against llama.cpp's fixed mixes at the same size.

For each standard type (default Q4_K_M, Q3_K_M, Q2_K) llama.cpp's quantizer writes the type with an
importance matrix; edgequant then chooses a mix with ``--target-size`` equal to that file's size and the
same importance matrix. Both files are scored against the F16 source by ``edgequant bench`` (KLD equal to
llama-perplexity's) on evaluation text that neither the imatrix nor the choice read:

    the built-in text (Python's docs) is cut in three: the first third is the evaluation text, the
    second the imatrix calibration, the third the text the mix is chosen on.

Reported per size: file sizes, mean/99th-percentile KLD, same-top rate, the ratio of the mix's mean KLD
to llama.cpp's (goal <= 0.8), pp512/tg128 of both (same run, same machine), and the time to choose
beside the time of quantizing plus benchmarking one type (goal <= 3x).

    python benchmarks/target_mix.py                                  # SmolLM2-135M-Instruct (real)
    python benchmarks/target_mix.py --model tiny-kquant              # the tiny k-quant fixture of the tests
    python benchmarks/target_mix.py --gguf model-F16.gguf --type Q4_K_M --chunks 40 --json

With ``--llama-cpp-bin DIR`` (or ``$LLAMA_CPP_BIN``) the KLD of both files is also computed by
``llama-perplexity --kl-divergence`` on the same text, as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _thirds(workdir: Path) -> tuple[Path, Path, Path]:
    from edgequant.text import builtin_text

    text = builtin_text()
    n = len(text) // 3
    parts = (text[:n], text[n:2 * n], text[2 * n:])
    paths = tuple(workdir / f"text-{k}.txt" for k in ("eval", "imatrix", "choose"))
    for p, t in zip(paths, parts):
        if not p.exists() or p.read_text(encoding="utf-8") != t:
            p.write_text(t, encoding="utf-8")
    return paths


def _source(args, workdir: Path) -> Path:
    from edgequant.export.convert import convert

    if args.gguf:
        return Path(args.gguf)
    if args.model == "tiny-kquant":
        sys.path.insert(0, str(ROOT / "tests"))
        from fixtures_mix import tiny_kquant_llama

        folder = tiny_kquant_llama()
    else:
        from edgequant.smollm2 import default_cache_dir, find_or_fetch_smollm2_gguf, rebuild_smollm2_hf

        folder = rebuild_smollm2_hf(default_cache_dir() / "hf", find_or_fetch_smollm2_gguf())
    found = sorted(workdir.glob("*-F16.gguf"))
    if found:
        return found[0]
    return Path(convert(folder, workdir, outtype="f16").files[0])


def _llama_kld(bin_dir: Path, base: Path, files: list[Path], text: Path, ctx: int, chunks: int, workdir: Path) -> dict:
    """KLD mean per file from llama-perplexity (base logits saved once)."""
    import re

    logits = workdir / "base-logits.bin"
    common = ["-c", str(ctx), "--chunks", str(chunks), "-t", str(os.cpu_count() or 1)]
    subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(base), "-f", str(text), "--kl-divergence-base",
                    str(logits), *common], check=True, capture_output=True)
    out = {}
    for f in files:
        p = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(f), "--kl-divergence-base", str(logits),
                            "--kl-divergence", *common], check=True, capture_output=True, text=True)
        m = re.search(r"Mean\s+KLD:\s+([\d.]+)", p.stdout + p.stderr)
        out[f.name] = float(m.group(1)) if m else None
    logits.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-kquant"])
    ap.add_argument("--gguf", help="an F16/BF16 GGUF instead of --model")
    ap.add_argument("--type", action="append", help="standard types to match (default Q4_K_M, Q3_K_M, Q2_K)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20, help="evaluation chunks")
    ap.add_argument("--imatrix-chunks", type=int, default=40)
    ap.add_argument("--calibration-chunks", type=int, default=4)
    ap.add_argument("--exclude-type", action="append", default=[],
                    help="types the mix may not use (SmolLM2's fixture is rebuilt from Q4_1: --exclude-type q4_1 "
                         "keeps the mix from exploiting that grid)")
    ap.add_argument("--max-slowdown", default="5", help="passed to the mix (5, the CLI's default; 'off': no speed check)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "edgequant" / "bench" / "target_mix"))
    ap.add_argument("--llama-cpp-bin", default=os.environ.get("LLAMA_CPP_BIN"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    types = args.type or ["Q4_K_M", "Q3_K_M", "Q2_K"]

    from edgequant.bench.run import BenchOptions, run_bench
    from edgequant.mix.target import TargetOptions, parse_target, quantize_target
    from edgequant.progress import set_quiet
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
    from edgequant.quantize.imatrix import compute_imatrix

    set_quiet(args.json)
    workdir = Path(args.workdir) / (Path(args.gguf).stem if args.gguf else args.model)
    workdir.mkdir(parents=True, exist_ok=True)
    eval_text, imatrix_text, choose_text = _thirds(workdir)
    src = _source(args, workdir)
    imx = workdir / "imatrix.gguf"
    if not imx.exists():
        compute_imatrix(src, imx, text=imatrix_text, ctx=args.ctx, chunks=args.imatrix_chunks)
    rows = []
    for t in types:
        std_dir = workdir / "std"
        t0 = time.perf_counter()
        (q,) = quantize(src, [t], std_dir, QuantizeOptions(imatrix=imx, force=True))
        t_quant = time.perf_counter() - t0
        std = Path(q.files[0])
        size = std.stat().st_size
        t0 = time.perf_counter()
        slow = None if args.max_slowdown == "off" else float(args.max_slowdown)
        mix = quantize_target(src, parse_target(size=str(size)), workdir / "mix",
                              TargetOptions(imatrix=imx, calibration=choose_text, ctx=args.ctx,
                                            calibration_chunks=args.calibration_chunks, max_slowdown=slow,
                                            exclude_types=tuple(args.exclude_type), force=True))
        t_choose = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = run_bench([src, std, mix.file], BenchOptions(reference=src, text=eval_text, ctx=args.ctx,
                                                              chunks=args.chunks, reps=3))
        t_bench = time.perf_counter() - t0
        by = {Path(r.model).name: r for r in report.rows}
        s, m = by[std.name], by[Path(mix.file).name]
        row = {
            "type": t, "std_size": s.size_bytes, "mix_size": m.size_bytes,
            "std_kld": s.quality["kld_mean"], "mix_kld": m.quality["kld_mean"],
            "ratio": m.quality["kld_mean"] / s.quality["kld_mean"],
            "std_p99": s.quality["kld_p99"], "mix_p99": m.quality["kld_p99"],
            "std_same_top": s.quality["same_top"], "mix_same_top": m.quality["same_top"],
            "std_pp": s.speed[0].pp_tps, "mix_pp": m.speed[0].pp_tps,
            "std_tg": s.speed[0].tg_tps, "mix_tg": m.speed[0].tg_tps,
            "predicted_kld_choose_text": mix.predicted_kld, "measured_kld_choose_text": mix.measured["kld_mean"],
            "excluded": mix.excluded_types, "choose_s": round(t_choose, 1), "quantize_s": round(t_quant, 1),
            # benchmarking one type: its share of the bench run (three models: source, standard, mix)
            "bench_one_s": round(t_bench / 3, 1), "mix_types": mix.type_counts, "seconds": mix.seconds,
        }
        row["choose_vs_one_type"] = row["choose_s"] / (row["quantize_s"] + row["bench_one_s"])
        if args.llama_cpp_bin:
            row["llama_perplexity_kld"] = _llama_kld(Path(args.llama_cpp_bin), src, [std, Path(mix.file)], eval_text,
                                                     args.ctx, args.chunks, workdir)
        rows.append(row)
    if args.json:
        print(json.dumps({"source": str(src), "eval_chunks": args.chunks, "ctx": args.ctx, "rows": rows}, indent=2))
        return 0
    print(f"source {src.name}; evaluation: first third of the built-in text, {args.chunks} chunks of {args.ctx}")
    head = (f"{'size of':8} {'bytes':>10} {'mix bytes':>10} {'KLD llama.cpp':>13} {'KLD mix':>9} {'ratio':>6} "
            f"{'p99 l.cpp':>9} {'p99 mix':>8} {'top l.cpp':>9} {'top mix':>8} {'pp l.cpp':>8} {'pp mix':>7} "
            f"{'tg l.cpp':>8} {'tg mix':>7} {'choose s':>8} {'x one':>6}")
    print(head)
    for r in rows:
        print(f"{r['type']:8} {r['std_size']:>10} {r['mix_size']:>10} {r['std_kld']:>13.5f} {r['mix_kld']:>9.5f} "
              f"{r['ratio']:>6.2f} {r['std_p99']:>9.4f} {r['mix_p99']:>8.4f} {100 * r['std_same_top']:>8.2f}% "
              f"{100 * r['mix_same_top']:>7.2f}% {r['std_pp']:>8.1f} {r['mix_pp']:>7.1f} {r['std_tg']:>8.1f} "
              f"{r['mix_tg']:>7.1f} {r['choose_s']:>8.1f} {r['choose_vs_one_type']:>6.2f}")
        print(f"         mix types: {', '.join(f'{k} {v}' for k, v in sorted(r['mix_types'].items()))}; predicted/measured "
              f"KLD on the choosing text {r['predicted_kld_choose_text']:.5f}/{r['measured_kld_choose_text']:.5f}")
        if "llama_perplexity_kld" in r:
            print(f"         llama-perplexity KLD: {r['llama_perplexity_kld']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
