#!/usr/bin/env python
"""Wall time of ``edgequant bench --quality-only`` beside ``llama-perplexity`` on the same file and settings.

Both run as fresh processes, back to back in each round (the order alternates between rounds so
that neither always runs on a warmer machine), import time and model load included:

    PPL mode:  edgequant bench F16.gguf --quality-only --ctx C --chunks N --threads T --text pydoc.txt
               llama-perplexity -m F16.gguf -f pydoc.txt -c C --chunks N -t T
    KLD mode:  edgequant bench F16.gguf Q4_K_M.gguf --quality-only ...      (one run, both models)
               llama-perplexity -m F16.gguf ... --kl-divergence-base base.kld  (pass 1)
               llama-perplexity -m Q4_K_M.gguf --kl-divergence-base base.kld --kl-divergence  (pass 2)

The KLD comparison is edgequant's one run against the sum of the tool's two passes (the same
numbers need both). Every round also checks that the two sides print the same final PPL (and, in
KLD mode, the same mean KLD). The table gives each side's median, min and max seconds, wall and
CPU (user + system), the ratio of the medians, the ratio of the minima (the least disturbed run
of each side: the steadier estimate on a shared machine, where ggml's spinning threads inflate
both wall and CPU time) and the spread of the per-round ratios.

    python benchmarks/bench_quality_speed.py                      # SmolLM2-135M F16 (+ Q4_K_M), ctx 512, 20 chunks
    python benchmarks/bench_quality_speed.py --rounds 5 --no-kld --threads 2
    python benchmarks/bench_quality_speed.py --gguf F16.gguf --quant Q4_K_M.gguf --json

llama-perplexity is the build of ``python -m edgequant.llamacpp_tools`` (or ``$LLAMA_CPP_BIN``), run
on llama-cpp-python's own libraries with edgequant's weight-buffer policy (the same kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEQUANT_BENCH_CACHE", Path.home() / ".cache" / "edgequant" / "bench"))


def default_files() -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct F16 and Q4_K_M, made from the test fixture once and cached."""
    sys.path.insert(0, str(REPO / "tests"))
    import fixtures

    from edgequant.export.convert import convert
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

    out = CACHE / "speed"
    f16 = out / "SmolLM2-135M-Instruct-F16.gguf"
    if not f16.is_file():
        convert(fixtures.smollm2_hf(), f16, outtype="f16")
    q4 = out / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    if not q4.is_file():
        quantize(f16, ["Q4_K_M"], out, QuantizeOptions())
    return f16, q4


def timed(cmd: list[str], env: dict | None = None) -> tuple[tuple[float, float], str, str]:
    """(wall, user + system CPU) seconds of one process, its stdout and its stderr; a failure stops
    the benchmark with its last line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed ({code}): "
                         f"{((stdout + stderr).strip().splitlines() or [''])[-1]}")
    return (wall, usage.ru_utime + usage.ru_stime), stdout, stderr


def edgequant_side(models: list[Path], a, text: Path) -> tuple[tuple[float, float], dict]:
    cmd = [sys.executable, "-m", "edgequant", "bench", *map(str, models), "--quality-only", "--ctx", str(a.ctx),
           "--chunks", str(a.chunks), "--threads", str(a.threads), "--text", str(text), "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    seconds, out, _ = timed(cmd, env)
    rows = json.loads(out)["rows"]
    return seconds, {"ppl": rows[0]["quality"]["ppl"], "kld_mean": rows[-1]["quality"].get("kld_mean")}


def tool_side(f16: Path, quant: Path | None, a, text: Path, tmp: Path) -> tuple[tuple[float, float], dict]:
    from edgequant.llamacpp_tools import bin_dir, parse_perplexity, repack_args, tool_env

    tool = str(bin_dir() / "llama-perplexity")
    env = tool_env()
    common = ["-c", str(a.ctx), "-t", str(a.threads), *repack_args("llama-perplexity")]
    base = ["-m", str(f16), "-f", str(text), "--chunks", str(a.chunks), *common]
    if quant is None:
        seconds, out, err = timed([tool, *base], env)
        return seconds, {"ppl": parse_perplexity(out + err)["ppl"]}
    kld = tmp / "base.kld"
    s1, out1, err1 = timed([tool, *base, "--kl-divergence-base", str(kld)], env)
    s2, out2, err2 = timed([tool, "-m", str(quant), *common, "--kl-divergence-base", str(kld), "--kl-divergence"], env)
    kld.unlink()
    return (s1[0] + s2[0], s1[1] + s2[1]), {"ppl": parse_perplexity(out1 + err1)["ppl"],
                                             "kld_mean": parse_perplexity(out2 + err2).get("kld_mean")}


def compare(mode: str, f16: Path, quant: Path | None, a, text: Path, tmp: Path) -> dict:
    """Alternating rounds of both sides; wall and CPU seconds, per-round ratios, and a check that
    the two sides print the same numbers."""
    models = [f16] if quant is None else [f16, quant]
    runs: dict[str, list[tuple[float, float]]] = {"edgequant": [], "tool": []}
    for r in range(a.rounds):
        sides = [("edgequant", lambda: edgequant_side(models, a, text)), ("tool", lambda: tool_side(f16, quant, a, text, tmp))]
        got = {name: fn() for name, fn in (sides if r % 2 == 0 else sides[::-1])}
        (es, ev), (ts, tv) = got["edgequant"], got["tool"]
        if round(ev["ppl"], 4) != tv["ppl"] or (quant is not None and abs(ev["kld_mean"] - tv["kld_mean"]) > 1.01e-6):
            print(f"warning: {mode} numbers differ: edgequant {ev} vs llama-perplexity {tv}", file=sys.stderr)
        runs["edgequant"].append(es)
        runs["tool"].append(ts)
        print(f"  {mode} round {r + 1}: wall {es[0]:.2f} s vs {ts[0]:.2f} s (ratio {es[0] / ts[0]:.3f}), "
              f"CPU {es[1]:.2f} s vs {ts[1]:.2f} s (ratio {es[1] / ts[1]:.3f})", file=sys.stderr)
    out = {"mode": mode, "ppl": ev["ppl"], "kld_mean": ev.get("kld_mean")}
    for k, what in enumerate(("wall", "cpu")):
        e = [x[k] for x in runs["edgequant"]]
        t = [x[k] for x in runs["tool"]]
        out[what] = {"edgequant_s": e, "tool_s": t, "ratios": [x / y for x, y in zip(e, t)],
                     "ratio_of_medians": statistics.median(e) / statistics.median(t), "ratio_of_minima": min(e) / min(t)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="the 16-bit GGUF (default: SmolLM2-135M-Instruct F16, made on the spot)")
    ap.add_argument("--quant", type=Path, help="the quantized GGUF for KLD mode (default: its Q4_K_M)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-kld", action="store_true", help="PPL mode only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from edgequant.devices import default_threads
    from edgequant.text import builtin_text

    a.threads = a.threads or default_threads()
    f16, q4 = (a.gguf, a.quant) if a.gguf else default_files()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "pydoc.txt"
        text.write_text(builtin_text(), encoding="utf-8")
        results.append(compare("PPL", f16, None, a, text, Path(tmp)))
        if not a.no_kld and q4 is not None:
            results.append(compare("KLD", f16, q4, a, text, Path(tmp)))
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"ctx {a.ctx}, {a.chunks} chunks, {a.threads} threads, {a.rounds} rounds; {f16.name}")
    print("| mode | seconds | edgequant (median, min-max) | llama-perplexity | ratio of medians | ratio of minima | "
          "ratio per round |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for what in ("wall", "cpu"):
            d = r[what]
            e, t = d["edgequant_s"], d["tool_s"]
            print(f"| {r['mode']} | {what} | {statistics.median(e):.2f} ({min(e):.2f}-{max(e):.2f}) | "
                  f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {d['ratio_of_medians']:.3f} | "
                  f"{d['ratio_of_minima']:.3f} | "
                  f"{min(d['ratios']):.3f}-{max(d['ratios']):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
