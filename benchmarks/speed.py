#!/usr/bin/env python
"""Benchmark ``edgequant bench --speed-only`` against llama.cpp's ``llama-bench`` on the same files.

For each GGUF, both measure pp<N> and tg<M> tokens/sec with the same threads, batch sizes, flash
attention and repetitions, each in a fresh process, alternating which goes first on each round so
that neither always runs on a warmer machine:

    llama-bench -m FILE -p 512 -n 128 -r 5 -t T -b 2048 -ub 512 -fa 1 -o json
    edgequant bench FILE --speed-only --pp 512 --tg 128 --reps 5 --threads T --json

The table prints both means, their ratio (edgequant / llama-bench) and whether it is within 10 %.

Both run with the same weight-buffer policy (docs/cpu.md): ``llama-bench --repack 0|1`` beside
``edgequant bench --repack off|on``. By default the policy edgequant picks on this host; on a CPU
where ggml's AMX backend is active, both policies (``--repack 1`` is the one that crashes there:
the row then says so). ``--repack 0,1`` chooses.

    python benchmarks/speed.py                                  # SmolLM2-135M Q8_0 and Q4_K_M (made on the spot)
    python benchmarks/speed.py --gguf a.gguf --gguf b.gguf --threads 8 --rounds 3 --repack 0,1
    python benchmarks/speed.py --llama-cpp-bin /tmp/llamacpp-build/bin --json

``llama-bench`` is found through ``--llama-cpp-bin DIR`` or ``$LLAMA_CPP_BIN``, else the build that
``python -m edgequant.llamacpp_tools`` makes from the installed llama-cpp-python's sdist (cached).
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


class Crashed(Exception):
    """The process died of a signal (ggml's AMX kernel on quantized weights: llama.cpp #20824)."""


def _check(res: subprocess.CompletedProcess, what: str) -> None:
    if res.returncode < 0:
        raise Crashed(f"{what} crashed (signal {-res.returncode})")
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({res.returncode}): {(res.stderr.strip().splitlines() or [''])[-1]}")


def llama_bench(binary: Path, gguf: Path, a, repack: int) -> dict[str, tuple[float, float]]:
    from edgequant.llamacpp_tools import tool_env

    # --same-library: llama-bench's driver on the very libllama/libggml that llama-cpp-python (and so edgequant) runs
    env = tool_env(same_library=a.same_library, tools=binary.parent)
    cmd = [str(binary), "-m", str(gguf), "-p", str(a.pp), "-n", str(a.tg), "-r", str(a.reps), "-t", str(a.threads),
           "-b", str(a.batch), "-ub", str(a.ubatch), "-fa", "1", "--repack", str(repack), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    _check(res, f"llama-bench --repack {repack}")
    out = {}
    for row in json.loads(res.stdout):
        key = "pp" if row["n_prompt"] else "tg"
        out[key] = (row["avg_ts"], row["stddev_ts"])
    return out


def edgequant_bench(gguf: Path, a, repack: int) -> dict[str, tuple[float, float]]:
    cmd = [sys.executable, "-m", "edgequant", "bench", str(gguf), "--speed-only", "--pp", str(a.pp), "--tg", str(a.tg),
           "--reps", str(a.reps), "--threads", str(a.threads), "--batch-size", str(a.batch), "--ubatch-size",
           str(a.ubatch), "--repack", "on" if repack else "off", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0 and "crashed" in res.stderr:  # the isolated speed process died of a signal
        raise Crashed(f"edgequant --repack {'on' if repack else 'off'} crashed")
    _check(res, "edgequant bench")
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
    ap.add_argument("--repack", default=None,
                    help="weight-buffer policies to measure, e.g. 0,1 (default: edgequant's on this host; both where AMX is active)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from edgequant.devices import default_threads
    from edgequant.llamacpp import repack_policy

    a.threads = a.threads or default_threads()
    policy = repack_policy()
    if a.repack is not None:
        policies = [int(x) for x in a.repack.split(",")]
    else:
        policies = [0, 1] if policy.amx_active else [int(policy.repack)]
    files = a.gguf or default_files()
    if a.llama_cpp_bin:
        binary = Path(a.llama_cpp_bin) / "llama-bench"
    else:
        from edgequant.llamacpp_tools import bin_dir

        binary = bin_dir() / "llama-bench"
    if not binary.is_file():
        print(f"no llama-bench in {binary.parent}; printing edgequant only", file=sys.stderr)
        binary = None
    results = []
    for f in files:
        for repack in policies:
            runs: dict[str, list[dict]] = {"edgequant": [], "llama-bench": []}
            crashed: dict[str, str] = {}
            for r in range(a.rounds):
                order = ["edgequant", "llama-bench"] if r % 2 == 0 else ["llama-bench", "edgequant"]
                for tool in order:
                    if tool in crashed or (tool == "llama-bench" and binary is None):
                        continue
                    try:
                        runs[tool].append(edgequant_bench(f, a, repack) if tool == "edgequant"
                                          else llama_bench(binary, f, a, repack))
                    except Crashed as e:
                        crashed[tool] = str(e)
            row = {"file": f.name, "threads": a.threads, "repack": repack, "crashed": crashed}
            for tool, rs in runs.items():
                for test in ("pp", "tg"):
                    row[f"{tool}_{test}"] = statistics.median(x[test][0] for x in rs) if rs else None
            for test in ("pp", "tg"):
                lb, eq = row[f"llama-bench_{test}"], row[f"edgequant_{test}"]
                row[f"ratio_{test}"] = eq / lb if lb and eq else None
            results.append(row)
    if a.json:
        print(json.dumps({"host_policy": policy.to_dict(), "rows": results}, indent=2))
        return 0
    lib = "llama-cpp-python's libraries" if a.same_library else "its own build"
    print(f"threads {a.threads}, pp{a.pp}/tg{a.tg}, {a.reps} reps, batch {a.batch}/{a.ubatch}, {a.rounds} alternating rounds; "
          f"llama-bench on {lib}; edgequant's policy here: {policy.describe()}")
    print(f"{'file':42} {'repack':6} {'test':5} {'llama-bench t/s':>16} {'edgequant t/s':>14} {'ratio':>7}  within 10 %")

    def cell(v):
        return "crashed" if v == "crashed" else "—" if v is None else f"{v:.1f}"

    for row in results:
        for test in ("pp", "tg"):
            lb, eq, ratio = row[f"llama-bench_{test}"], row[f"edgequant_{test}"], row[f"ratio_{test}"]
            lb = "crashed" if "llama-bench" in row["crashed"] else lb
            eq = "crashed" if "edgequant" in row["crashed"] else eq
            ok = "—" if ratio is None else ("yes" if abs(ratio - 1) <= 0.10 else "NO")
            print(f"{row['file']:42} {row['repack']:<6} {test + str(a.pp if test == 'pp' else a.tg):5} "
                  f"{cell(lb):>16} {cell(eq):>14} {'—' if ratio is None else f'{ratio:.3f}':>7}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
