#!/usr/bin/env python
"""Benchmark ``edgequant gptq`` against a plain GPTQModel script doing the same work.

Both quantize SmolLM2-135M-Instruct (the bf16 test fixture) to GPTQ 4-bit on CPU with the same
settings (group size 64, sym, desc_act off, damp 0.05, true_sequential, in-memory layers) on the
same calibration windows: edgequant picks them (seeded) and writes them to a JSON file the plain
script reads. Each runs in a fresh process through the wrapper of ``benchmarks/convert.py``
(wall time, CPU time, peak RSS from ``getrusage(RUSAGE_CHILDREN)``). We also report whether the
two checkpoints hold identical tensors.

    python benchmarks/gptq.py                       # 32 x 256 tokens, 4-bit
    python benchmarks/gptq.py --samples 128 --seq-len 512 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from quantize import measure  # noqa: E402  (the wrapper every benchmark here uses)

PLAIN = r"""
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel crashes on 2-core machines without it
from gptqmodel import GPTQModel, QuantizeConfig
src, windows, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
data = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in json.load(open(windows))]
qc = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, damp_percent=0.05,
                    true_sequential=True, format="gptq", offload_to_disk=False)
model = GPTQModel.load(src, qc, device="cpu")
model.quantize(data, batch_size=1, calibration_data_min_length=1)
model.save(out)
"""


def same_tensors(a: Path, b: Path) -> str:
    import torch
    from safetensors import safe_open

    def load(folder):
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    ta, tb = load(a), load(b)
    if ta.keys() != tb.keys():
        return f"different names ({len(ta)} / {len(tb)})"
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    return "identical" if not diff else f"{len(diff)} of {len(ta)} tensors differ (e.g. {diff[0]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", type=Path, help="HF folder (default: the SmolLM2 test fixture)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    if args.model is None:
        import fixtures

        args.model = fixtures.smollm2_hf()
    from transformers import AutoTokenizer

    from edgequant.text import load_text
    from edgequant.quantize.gptq import calibration_windows, folder_name

    work = Path(tempfile.mkdtemp(prefix="edgequant-gptq-bench-"))
    tok = AutoTokenizer.from_pretrained(str(args.model))
    windows = calibration_windows(tok, load_text(None).text, args.samples, args.seq_len, 0)
    (work / "windows.json").write_text(json.dumps(windows))
    (work / "plain.py").write_text(PLAIN)
    env_note = os.environ.get("GPTQMODEL_CPU_WORKERS", "2 (set by both)")

    rows = {}
    for label, cmd, out in (
        ("edgequant", [sys.executable, "-m", "edgequant", "gptq", str(args.model), "--bits", str(args.bits),
                       "--group-size", str(args.group_size), "--samples", str(args.samples), "--seq-len",
                       str(args.seq_len), "--seed", "0", "-o", str(work / "ours"), "--force", "--json"],
         work / "ours" / folder_name(args.model.name, args.bits, args.group_size)),
        ("plain GPTQModel", [sys.executable, str(work / "plain.py"), str(args.model), str(work / "windows.json"),
                             str(work / "plain"), str(args.bits), str(args.group_size)], work / "plain"),
    ):
        best = None
        for i in range(args.repeat):
            m = measure(cmd, log=work / f"{label.replace(' ', '_')}-{i}", cwd=REPO)
            if m["rc"] != 0:
                raise SystemExit(f"{label} failed (rc {m['rc']}); logs in {work}")
            if best is None or m["seconds"] < best["seconds"]:
                best = m
        best["size_mb"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
        rows[label] = (best, out)

    print(f"GPTQ {args.bits}-bit g{args.group_size}, {args.samples} x {args.seq_len} tokens, {args.model.name}, "
          f"CPU, GPTQMODEL_CPU_WORKERS={env_note}, best of {args.repeat}")
    print(f"{'':18} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'weights MB':>11}")
    for label, (m, _) in rows.items():
        cpu = m.get("user_s", 0) + m.get("sys_s", 0)
        print(f"{label:18} {m['seconds']:8.1f} {cpu:8.1f} {m['maxrss_mb']:12.0f} {m['size_mb']:11.1f}")
    print("tensors:", same_tensors(rows["edgequant"][1], rows["plain GPTQModel"][1]))
    print(f"(work folder {work})")


if __name__ == "__main__":
    main()
