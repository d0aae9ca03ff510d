#!/usr/bin/env python
"""Benchmark ``edgequant bench --speed-only`` against llama.cpp's ``llama-bench`` on the same files.

For each GGUF, both measure pp<N> and tg<M> tokens/sec with the same threads, batch sizes, flash
attention and repetitions, each in a fresh process, alternating which goes first on each round so
that neither always runs on a warmer machine:

    llama-bench -m FILE -p 512 -n 128 -r 5 -t T -b 2048 -ub 512 -fa 1 -o json
    edgequant bench FILE --speed-only --pp 512 --tg 128 --reps 5 --threads T --json

The table prints both means, their ratio (edgequant / llama-bench) and whether it is within 10 %.

    python benchmarks/speed.py                                  # SmolLM2-135M Q8_0 and Q4_K_M (made on the spot)
    python benchmarks/speed.py --gguf a.gguf --gguf b.gguf --threads 8 --rounds 3
    python benchmarks/speed.py --llama-cpp-bin /tmp/llamacpp-build/bin --json

``llama-bench`` is found through ``--llama-cpp-bin DIR`` or ``$LLAMA_CPP_BIN`` (build recipe in
docs/bench.md); without it only edgequant's numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEQUANT_BENCH_CACHE", Path.home() / ".cache" / "edgequant" / "bench"))


def default_files() -> list[Path]:
    """SmolLM2-135M-Instruct Q8_0 and Q4_K_M, made from the test fixture once and cached."""
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    import fixtures

    from edgequant.export.convert import convert
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

    out = CACHE / "speed"
    f16 = out / "SmolLM2-135M-Instruct-F16.gguf"
    if not f16.is_file():
        convert(fixtures.smollm2_hf(), f16, outtype="f16")
    want = {t: out / f"SmolLM2-135M-Instruct-{t}.gguf" for t in ("Q8_0", "Q4_K_M")}
    missing = [t for t, p in want.items() if not p.is_file()]
    if missing:
        quantize(f16, missing, out, QuantizeOptions())  # named like the converter: ...-Q8_0.gguf
    return list(want.values())


def wheel_lib_dir() -> str:
    import llama_cpp

    return str(Path(llama_cpp.__file__).parent / "lib")


def llama_bench(binary: Path, gguf: Path, a) -> dict[str, tuple[float, float]]:
    env = dict(os.environ)
    if a.same_library:  # llama-bench's driver on the very libllama/libggml that llama-cpp-python (and so edgequant) runs
        env["LD_LIBRARY_PATH"] = wheel_lib_dir()
    cmd = [str(binary), "-m", str(gguf), "-p", str(a.pp), "-n", str(a.tg), "-r", str(a.reps), "-t", str(a.threads),
           "-b", str(a.batch), "-ub", str(a.ubatch), "-fa", "1", "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    out = {}
    for row in json.loads(res.stdout):
        key = "pp" if row["n_prompt"] else "tg"
        out[key] = (row["avg_ts"], row["stddev_ts"])
    return out


def edgequant_bench(gguf: Path, a) -> dict[str, tuple[float, float]]:
    cmd = [sys.executable, "-m", "edgequant", "bench", str(gguf), "--speed-only", "--pp", str(a.pp), "--tg", str(a.tg),
           "--reps", str(a.reps), "--threads", str(a.threads), "--batch-size", str(a.batch), "--ubatch-size",
           str(a.ubatch), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    (s,) = json.loads(res.stdout)["rows"][0]["speed"]
    return {"pp": (s["pp_tps"], s["pp_std"]), "tg": (s["tg_tps"], s["tg_std"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", action="append", type=Path, help="GGUF file (repeatable); default: SmolLM2 Q8_0 and Q4_K_M")
    ap.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per tool; the median of the rounds is reported")
    ap.add_argument("--same-library", action="store_true",
                    help="run llama-bench on llama-cpp-python's own libllama/libggml (LD_LIBRARY_PATH), to separate the "
                         "driver from differences between the two builds of llama.cpp")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from edgequant.bench.backends import default_threads

    a.threads = a.threads or default_threads()
    files = a.gguf or default_files()
    binary = Path(a.llama_cpp_bin) / "llama-bench" if a.llama_cpp_bin else None
    if binary is not None and not binary.is_file():
        print(f"no llama-bench in {a.llama_cpp_bin}; printing edgequant only", file=sys.stderr)
        binary = None
    results = []
    for f in files:
        runs: dict[str, list[dict]] = {"edgequant": [], "llama-bench": []}
        for r in range(a.rounds):
            order = ["edgequant", "llama-bench"] if r % 2 == 0 else ["llama-bench", "edgequant"]
            for tool in order:
                if tool == "edgequant":
                    runs[tool].append(edgequant_bench(f, a))
                elif binary is not None:
                    runs[tool].append(llama_bench(binary, f, a))
        row = {"file": f.name, "threads": a.threads}
        for tool, rs in runs.items():
            for test in ("pp", "tg"):
                row[f"{tool}_{test}"] = statistics.median(x[test][0] for x in rs) if rs else None
        for test in ("pp", "tg"):
            lb, eq = row[f"llama-bench_{test}"], row[f"edgequant_{test}"]
            row[f"ratio_{test}"] = eq / lb if lb else None
        results.append(row)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    lib = "llama-cpp-python's libraries" if a.same_library else "its own build"
    print(f"threads {a.threads}, pp{a.pp}/tg{a.tg}, {a.reps} reps, batch {a.batch}/{a.ubatch}, {a.rounds} alternating rounds; "
          f"llama-bench on {lib}")
    print(f"{'file':42} {'test':5} {'llama-bench t/s':>16} {'edgequant t/s':>14} {'ratio':>7}  within 10 %")
    for row in results:
        for test in ("pp", "tg"):
            lb, eq, ratio = row[f"llama-bench_{test}"], row[f"edgequant_{test}"], row[f"ratio_{test}"]
            ok = "—" if ratio is None else ("yes" if abs(ratio - 1) <= 0.10 else "NO")
            print(f"{row['file']:42} {test + str(a.pp if test == 'pp' else a.tg):5} "
                  f"{'—' if lb is None else f'{lb:.1f}':>16} {eq:>14.1f} {'—' if ratio is None else f'{ratio:.3f}':>7}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
