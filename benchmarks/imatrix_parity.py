#!/usr/bin/env python
"""Compare ``edgequant imatrix`` with llama.cpp's ``llama-imatrix`` on the same model and text.

For each model (default: SmolLM2-135M-Instruct, then the tiny random Mixtral of the test suite):

1. convert the HF folder to an F16 GGUF (cached in the workdir) and write the built-in
   calibration text (Python's documentation, ``edgequant.text.builtin_text()``) to a file;
2. compute an imatrix with ``edgequant imatrix --engine ENGINE`` (default auto: llama.cpp on CPU; torch:
   transformers, fp32 on CPU) and one with
   ``llama-imatrix -m F16.gguf -f text.txt -c CTX --chunks N -t THREADS --no-ppl -o theirs.gguf``
   (F16 weights, llama.cpp's CPU kernels), each in a fresh process (wall time, peak RSS);
3. check that both tokenizers produce the same token ids for the chunks used;
4. per tensor present in both files: Pearson correlation of ``in_sum2 / counts`` (the value per
   input column that the quantizer uses; per expert for MoE, over experts seen by both), the ratio
   of the means, and the ratio of the token counts; min/median correlation, the tensors below the
   threshold, and the entries present in one file only;
5. check that ``llama-quantize --imatrix ours.gguf`` accepts our file, that its output is
   byte-identical (tensor data) to ``edgequant quantize`` with the same imatrix, and the same the
   other way round with llama-imatrix's file.

    python benchmarks/imatrix_parity.py --llama-cpp-bin /tmp/llamacpp-build/bin
    python benchmarks/imatrix_parity.py --model ~/models/Qwen2.5-0.5B --chunks 10 --no-mixtral --json

``llama-imatrix`` and ``llama-quantize`` are found through ``--llama-cpp-bin DIR`` or
``$LLAMA_CPP_BIN``; without them only our imatrix is computed and the reason is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from convert import compare_gguf  # noqa: E402
from quantize import CACHE, measure  # noqa: E402  (fresh process through the RUSAGE_CHILDREN wrapper)


@dataclass
class TensorParity:
    name: str
    n_mat: int
    correlation: float  # Pearson r of in_sum2/counts over columns (and experts seen by both)
    min_expert_correlation: float | None  # MoE: the worst expert seen by both
    mean_ratio: float  # mean(ours) / mean(theirs)
    median_rel_diff: float  # median over columns of |ours - theirs| / theirs
    count_ratio_min: float | None  # ours / theirs, over matrices both saw
    count_ratio_max: float | None
    counts_equal: bool
    experts_seen_ours: int
    experts_seen_theirs: int


@dataclass
class ModelParity:
    model: str
    f16: str
    chunks: int
    ctx: int
    ours: dict[str, Any] = field(default_factory=dict)  # path, seconds, peak RSS
    theirs: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    tokens_identical: bool | None = None
    token_note: str | None = None
    tensors: list[TensorParity] = field(default_factory=list)
    only_ours: list[str] = field(default_factory=list)
    only_theirs: list[str] = field(default_factory=list)
    quantize_checks: list[dict[str, Any]] = field(default_factory=list)


def find_bins(arg: str | None) -> tuple[Path | None, str | None]:
    raw = arg or os.environ.get("LLAMA_CPP_BIN")
    if not raw:
        return None, "no --llama-cpp-bin and LLAMA_CPP_BIN is unset"
    d = Path(raw).expanduser()
    for tool in ("llama-imatrix", "llama-quantize"):
        if not os.access(d / tool, os.X_OK):
            return None, f"{d / tool} is missing or not executable"
    return d, None


def f16_for(model: Path, workdir: Path) -> Path:
    from edgequant.export.convert import convert

    out = workdir / "f16"
    found = sorted(out.glob("*-F16.gguf"))
    if found and found[0].stat().st_mtime > max(p.stat().st_mtime for p in model.iterdir()):
        return found[0]
    print(f"converting {model.name} to F16 ...", file=sys.stderr)
    return Path(convert(model, out, outtype="f16", force=True).files[0])


def check_tokens(model: Path, f16: Path, text: str, ctx: int, chunks: int) -> tuple[bool, str]:
    """Do transformers and llama.cpp cut the text into the same token ids (the chunks used)?"""
    from edgequant.llamacpp import open_llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model))(text, add_special_tokens=True, verbose=False).input_ids
    llm = open_llama(f16, vocab_only=True)
    # llama-imatrix: common_tokenize(prompt, add_special=true, parse_special=false); -f drops one trailing '\n'
    lc = llm.tokenize(text.removesuffix("\n").encode(), add_bos=True, special=False)
    n = ctx * chunks
    same = hf[:n] == lc[:n]
    if same:
        return True, f"first {n} token ids identical (transformers {len(hf)}, llama.cpp {len(lc)} tokens in all)"
    i = next(i for i, (a, b) in enumerate(zip(hf, lc)) if a != b) if any(a != b for a, b in zip(hf[:n], lc[:n])) else min(len(hf), len(lc))
    return False, f"token ids differ from position {i} (transformers {hf[i:i + 5]}, llama.cpp {lc[i:i + 5]})"


def _values(e) -> np.ndarray:
    return e.values().astype(np.float64)


def compare_imatrix(ours_path: Path, theirs_path: Path) -> tuple[list[TensorParity], list[str], list[str]]:
    from edgequant.quantize.imatrix_file import read_imatrix

    ours, theirs = read_imatrix(ours_path), read_imatrix(theirs_path)
    rows = []
    for name in sorted(set(ours.entries) & set(theirs.entries)):
        a, b = ours.entries[name], theirs.entries[name]
        if a.sums.shape != b.sums.shape:
            rows.append(TensorParity(name, a.sums.shape[0], float("nan"), None, float("nan"), float("nan"), None, None, False, 0, 0))
            continue
        both = (a.counts > 0) & (b.counts > 0)
        va, vb = _values(a)[both], _values(b)[both]
        r = float(np.corrcoef(va.reshape(-1), vb.reshape(-1))[0, 1]) if both.any() else float("nan")
        per_expert = None
        if a.sums.shape[0] > 1 and both.any():
            per_expert = float(min(np.corrcoef(x, y)[0, 1] for x, y in zip(va, vb)))
        ratio = a.counts[both] / b.counts[both]
        rows.append(TensorParity(
            name=name, n_mat=int(a.sums.shape[0]), correlation=r, min_expert_correlation=per_expert,
            mean_ratio=float(va.mean() / vb.mean()) if both.any() else float("nan"),
            median_rel_diff=float(np.median(np.abs(va - vb) / np.maximum(np.abs(vb), 1e-30))) if both.any() else float("nan"),
            count_ratio_min=float(ratio.min()) if ratio.size else None, count_ratio_max=float(ratio.max()) if ratio.size else None,
            counts_equal=bool(np.array_equal(a.counts, b.counts)),
            experts_seen_ours=int((a.counts > 0).sum()), experts_seen_theirs=int((b.counts > 0).sum()),
        ))
    return rows, sorted(set(ours.entries) - set(theirs.entries)), sorted(set(theirs.entries) - set(ours.entries))


def quantize_check(bins: Path, f16: Path, imatrix: Path, qtype: str, workdir: Path, threads: int, label: str) -> dict[str, Any]:
    """llama-quantize and edgequant quantize with the same imatrix file: both succeed, same tensor bytes?"""
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

    lq_out, eq_out = workdir / f"lq-{qtype}-{label}.gguf", workdir / f"eq-{qtype}-{label}.gguf"
    lq_out.unlink(missing_ok=True)
    # bare file name from the imatrix's folder: quantize.imatrix.file then matches edgequant's
    m = measure([str(bins / "llama-quantize"), "--imatrix", imatrix.name, str(f16), str(lq_out), qtype, str(threads)],
                log=workdir / f"lq-{qtype}-{label}.log", cwd=imatrix.parent)
    res: dict[str, Any] = {"imatrix": label, "type": qtype, "llama_quantize_rc": m["rc"]}
    if m["rc"] != 0 or not lq_out.is_file():
        res["llama_quantize_error"] = (workdir / f"lq-{qtype}-{label}.err").read_text(errors="replace")[-2000:]
        return res
    r = quantize(f16, [qtype], eq_out, QuantizeOptions(imatrix=imatrix, threads=threads, force=True))[0]
    c = compare_gguf(eq_out, lq_out)
    res.update(identical_tensor_data=c["identical_tensor_data"], tensors=c["tensors_a"], tensors_differing=c["tensors_differing"],
               metadata_differences=c["keys_only_in_a"] + c["keys_only_in_b"] + c["key_values_differing"],
               fallbacks=len(r.fallbacks), bits_per_weight=r.bits_per_weight)
    lq_out.unlink()
    eq_out.unlink()
    return res


def run_model(model: Path, workdir: Path, bins: Path | None, why: str | None, ctx: int, chunks: int,
              threads: int, qtype: str, engine: str = "auto") -> ModelParity:
    from edgequant.text import builtin_text

    workdir.mkdir(parents=True, exist_ok=True)
    f16 = f16_for(model, workdir)
    text = builtin_text()
    text_path = workdir / "text.txt"
    text_path.write_text(text, encoding="utf-8")
    res = ModelParity(str(model), str(f16), chunks, ctx)

    ours = workdir / "ours.gguf"
    print(f"{model.name}: edgequant imatrix, {chunks} chunks of {ctx} ...", file=sys.stderr)
    m = measure([sys.executable, "-m", "edgequant", "imatrix", str(model), "-o", str(ours), "--text", str(text_path),
                 "--ctx", str(ctx), "--chunks", str(chunks), "--engine", engine, "--force", "--json"], log=workdir / "ours.log", cwd=REPO)
    if m["rc"] != 0:
        raise SystemExit(f"edgequant imatrix failed:\n{(workdir / 'ours.err').read_text()[-3000:]}")
    res.ours = {"path": str(ours), "seconds": round(m["seconds"], 1), "cpu_s": round(m["user_s"] + m["sys_s"], 1), "peak_rss_mb": round(m["maxrss_mb"]),
                **json.loads((workdir / "ours.out").read_text())}
    if bins is None:
        res.skipped = why
        return res

    theirs = workdir / "theirs.gguf"
    theirs.unlink(missing_ok=True)
    print(f"{model.name}: llama-imatrix, {chunks} chunks of {ctx} ...", file=sys.stderr)
    # run from the workdir with the bare text name: imatrix.datasets then reads "text.txt" in both files
    m = measure([str(bins / "llama-imatrix"), "-m", str(f16), "-f", text_path.name, "-c", str(ctx), "--chunks", str(chunks),
                 "-t", str(threads), "--no-ppl", "--output-format", "gguf", "-o", str(theirs)], log=workdir / "theirs.log", cwd=workdir)
    if m["rc"] != 0 or not theirs.is_file():
        raise SystemExit(f"llama-imatrix failed:\n{(workdir / 'theirs.err').read_text()[-3000:]}")
    res.theirs = {"path": str(theirs), "seconds": round(m["seconds"], 1), "cpu_s": round(m["user_s"] + m["sys_s"], 1), "peak_rss_mb": round(m["maxrss_mb"])}

    res.tokens_identical, res.token_note = check_tokens(model, f16, text, ctx, chunks)
    res.tensors, res.only_ours, res.only_theirs = compare_imatrix(ours, theirs)
    res.quantize_checks = [quantize_check(bins, f16, ours, qtype, workdir, threads, "ours"),
                           quantize_check(bins, f16, theirs, qtype, workdir, threads, "theirs")]
    return res


def print_report(results: list[ModelParity], threshold: float) -> None:
    for r in results:
        print(f"\n== {Path(r.model).name}: {r.chunks} chunks x {r.ctx} tokens")
        o = r.ours
        print(f"   edgequant imatrix ({o.get('engine', '?')}): {o['seconds']:.1f} s wall, {o['cpu_s']:.1f} s CPU, peak RSS {o['peak_rss_mb']:,} MB, {o['entries']} entries, {o['tokens']} tokens")
        if r.skipped:
            print(f"   llama-imatrix skipped: {r.skipped}")
            continue
        t = r.theirs
        print(f"   llama-imatrix:     {t['seconds']:.1f} s wall, {t['cpu_s']:.1f} s CPU, peak RSS {t['peak_rss_mb']:,} MB")
        print(f"   tokens: {r.token_note}")
        cors = [x.correlation for x in r.tensors if not np.isnan(x.correlation)]
        if cors:
            worst = min(r.tensors, key=lambda x: x.correlation if not np.isnan(x.correlation) else -2)
            print(f"   correlation of in_sum2/counts over {len(cors)} tensors in both: min {min(cors):.7f} "
                  f"(1-r = {1 - min(cors):.1e}, {worst.name}), median {statistics.median(cors):.7f} (1-r = {1 - statistics.median(cors):.1e})")
            rd = [x.median_rel_diff for x in r.tensors if not np.isnan(x.median_rel_diff)]
            print(f"   median relative difference per column: {statistics.median(rd):.1e} (median tensor), {max(rd):.1e} (worst tensor)")
        ratios = [x.mean_ratio for x in r.tensors if not np.isnan(x.mean_ratio)]
        if ratios:
            print(f"   mean(ours)/mean(theirs): {min(ratios):.4f} .. {max(ratios):.4f}")
        eq_counts = sum(x.counts_equal for x in r.tensors)
        cr = [(x.count_ratio_min, x.count_ratio_max) for x in r.tensors if x.count_ratio_min is not None]
        if cr:
            print(f"   counts: equal in {eq_counts}/{len(r.tensors)} tensors; ours/theirs {min(a for a, _ in cr):.4f} .. {max(b for _, b in cr):.4f}")
        moe = [x for x in r.tensors if x.n_mat > 1]
        if moe:
            pe = [x.min_expert_correlation for x in moe if x.min_expert_correlation is not None]
            print(f"   experts: {len(moe)} expert tensors; experts seen ours/theirs per tensor: "
                  f"{sorted({(x.experts_seen_ours, x.experts_seen_theirs) for x in moe})}; worst per-expert correlation "
                  f"{min(pe):.6f}" if pe else "")
        low = [x for x in r.tensors if np.isnan(x.correlation) or x.correlation < threshold]
        print(f"   below {threshold}: " + (", ".join(f"{x.name} ({x.correlation:.4f})" for x in low) if low else "none"))
        print(f"   only in ours: {', '.join(r.only_ours) or 'none'}")
        print(f"   only in llama-imatrix's: {', '.join(r.only_theirs) or 'none'}")
        for q in r.quantize_checks:
            if q["llama_quantize_rc"] != 0:
                print(f"   llama-quantize --imatrix {q['imatrix']} {q['type']}: FAILED (rc {q['llama_quantize_rc']}): {q.get('llama_quantize_error', '')[-300:]}")
                continue
            same = "identical" if q["identical_tensor_data"] else f"DIFFERENT ({q['tensors_differing']}/{q['tensors']} tensors)"
            meta = "same metadata" if not q["metadata_differences"] else "metadata differs: " + "; ".join(map(str, q["metadata_differences"]))
            print(f"   {q['type']} with {q['imatrix']} imatrix: llama-quantize accepts it; edgequant quantize vs llama-quantize "
                  f"tensor data {same} ({q['tensors']} tensors, {q['fallbacks']} fallbacks, {q['bits_per_weight']:.2f} bpw); {meta}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="HF model folder (repeatable; default: SmolLM2-135M-Instruct and the tiny Mixtral)")
    ap.add_argument("--no-mixtral", action="store_true", help="with the default models, skip the tiny Mixtral")
    ap.add_argument("--chunks", type=int, default=8, help="chunks (default 8)")
    ap.add_argument("--mixtral-chunks", type=int, default=16, help="chunks for the tiny Mixtral (default 16)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="auto", help="edgequant imatrix --engine: auto, llama.cpp or torch "
                    "(benchmarks/bench_imatrix.py times every engine)")
    ap.add_argument("--quant-type", default="IQ2_XS", help="type for the llama-quantize --imatrix check (default IQ2_XS)")
    ap.add_argument("--threshold", type=float, default=0.99, help="report tensors correlating below this (default 0.99)")
    ap.add_argument("--llama-cpp-bin", help="folder with llama-imatrix and llama-quantize (default: $LLAMA_CPP_BIN)")
    ap.add_argument("--workdir", type=Path, default=CACHE / "imatrix")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bins, why = find_bins(args.llama_cpp_bin)
    if bins is None:
        print(f"llama.cpp comparison skipped: {why}", file=sys.stderr)
    jobs: list[tuple[Path, int]] = [(Path(m).expanduser(), args.chunks) for m in args.model]
    if not jobs:
        sys.path.insert(0, str(REPO / "tests"))
        from fixtures import smollm2_hf, tiny_mixtral

        jobs = [(smollm2_hf(), args.chunks)] + ([] if args.no_mixtral else [(tiny_mixtral(), args.mixtral_chunks)])
    workdir = args.workdir.expanduser().resolve()
    results = [run_model(m, workdir / m.name, bins, why, args.ctx, n, args.threads, args.quant_type, args.engine) for m, n in jobs]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2, default=float))
    else:
        print_report(results, args.threshold)
    ok = all(x.correlation >= args.threshold for r in results for x in r.tensors)
    ok = ok and all(q.get("identical_tensor_data") for r in results for q in r.quantize_checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
