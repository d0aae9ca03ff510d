"""The building blocks of choosing per-tensor types: ggml's own row quantizer through ctypes, and
llama.cpp's dry run of a type, each checked against what llama.cpp's quantizer really writes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edgequant.export.convert import convert
from edgequant.gguf_info import inspect_gguf
from edgequant.quantize.ggml_rows import roundtrip, row_bytes
from edgequant.quantize.gguf_quant import dry_run, quantize, read_tensor_type_file

Q = gguf.GGMLQuantizationType


def _tensor(path: Path, name: str):
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name)


def test_dry_run_and_row_quantizer_match_the_written_file(tiny_llama_dir, tmp_path):
    f16 = Path(convert(tiny_llama_dir, tmp_path, outtype="f16").files[0])
    planned = dry_run(f16, "Q4_K_M")
    (q,) = quantize(f16, ["Q4_K_M"], tmp_path / "q")
    written = {t.name: t.type.lower() for t in inspect_gguf(q.files[0]).tensors}
    assert planned == written
    name = next(n for n, t in written.items() if t == "q8_0" and n != "token_embd.weight") if "q8_0" in written.values() \
        else next(n for n, t in written.items() if t not in ("f32", "f16"))
    qtype = Q[written[name].upper()]
    src = _tensor(f16, name)
    rows = np.asarray(src.data, dtype=np.float32).reshape(-1, int(src.shape[0]))
    ours = roundtrip(rows, qtype)
    out = _tensor(Path(q.files[0]), name)
    assert row_bytes(qtype, rows.shape[1]) * rows.shape[0] == out.n_bytes
    # gguf-py's own dequantizer reads llama.cpp's bytes: an independent reference
    theirs = gguf.quants.dequantize(out.data, qtype).reshape(rows.shape)
    np.testing.assert_array_equal(ours, theirs)


def test_tensor_type_file(tmp_path):
    p = tmp_path / "mix.tensor-types.txt"
    p.write_text("^blk\\.0\\.attn_v\\.weight$=q8_0\n^token_embd\\.weight$=q5_0\n")
    assert read_tensor_type_file(p) == ["^blk\\.0\\.attn_v\\.weight$=q8_0", "^token_embd\\.weight$=q5_0"]
