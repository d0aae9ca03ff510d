"""``edgequant convert --outtype <llama.cpp quant type>``: HF folder → 16-bit GGUF → llama.cpp's quantizer.

Conversion (``edgequant.export``) writes f32/f16/bf16/q8_0; every other type is a quantization of
that file, so this composition lives in the quantize layer, above both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgequant.atomic import check_writable, remove_stale_temp_dirs, temp_dir
from edgequant.errors import EdgequantError
from edgequant.export.convert import ConvertResult, planned_path
from edgequant.export.convert import convert as export_convert
from edgequant.export.gguf_file import OUTTYPES
from edgequant.quantize import types as qtypes
from edgequant.quantize.gguf_quant import QuantizeOptions, output_name, quantize


def convert(source, output=None, *, outtype: str = "auto", **kw) -> ConvertResult:
    """``edgequant.export.convert.convert`` for every output type: llama.cpp quant types (Q4_K_M, ...)
    through a temporary 16-bit file in the output folder, removed afterwards (on failure and Ctrl-C too)."""
    if outtype.lower() in (*OUTTYPES, "auto"):
        return export_convert(source, output, outtype=outtype, **kw)
    if kw.get("split_max_size", 0) < 0 or kw.get("split_max_tensors", 0) < 0:
        raise EdgequantError("--split-max-size and --split-max-tensors must be positive (or 0 for no split)")
    return _to_quant(source, output, outtype=outtype, **kw)


def _to_quant(source, output, *, outtype: str, **kw) -> ConvertResult:
    """HF folder -> temporary 16-bit GGUF in the output folder -> llama.cpp quantizer; the
    temporary file is removed afterwards, on failure and on Ctrl-C too."""
    qt = qtypes.get(outtype)  # unknown names fail here, listing the valid ones
    if qt.needs_imatrix:
        raise EdgequantError(
            f"{qt.name} needs an importance matrix, which convert cannot make: convert to F16 first, then run "
            f"`edgequant imatrix MODEL -o imatrix.gguf` and `edgequant quantize MODEL-F16.gguf {qt.name} --imatrix imatrix.gguf`"
        )
    out = Path(output) if output is not None else Path.cwd()
    parent = out.parent if out.suffix == ".gguf" else out
    early = out if out.suffix == ".gguf" else out / output_name(planned_path(source, parent, kw.get("model_name")), qt.name)
    check_writable([early], force=kw.get("force", False))  # before minutes of 16-bit conversion, not after
    remove_stale_temp_dirs(parent)
    tmp_dir = temp_dir(parent)
    try:
        base = export_convert(source, tmp_dir, outtype="auto", **kw)
        target = out if out.suffix == ".gguf" else out / output_name(Path(base.files[0]), qt.name)
        split = bool(kw.get("split_max_size") or kw.get("split_max_tensors"))  # shards in, same shards out
        (q,) = quantize(base.files[0], [qt.name], target, QuantizeOptions(force=kw.get("force", False), keep_split=split))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    base.files, base.outtype = q.files, q.type
    base.size_bytes, base.bits_per_weight = q.size_bytes, q.bits_per_weight
    base.seconds = round(base.seconds + q.seconds, 3)
    base.fallbacks = base.fallbacks + [str(f) for f in q.fallbacks]
    return base
