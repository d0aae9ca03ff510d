"""``edgequant quantize``: llama.cpp's own quantizer, in process, through llama-cpp-python.

``llama_model_quantize`` with its params struct is the code ``llama-quantize`` runs, so our files
are llama.cpp's bytes. We add what a release needs around it: several types in one call, the
imatrix passed as data (refused for another model), per-tensor overrides, fallback reporting
(llama.cpp logs each tensor whose row length does not fit its type; we collect those lines), a
progress bar fed by the same log, and ``*.part`` → rename.

llama.cpp's C API loads the input once per output type; the input is memory-mapped, so after the
first type it is read from the page cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import gguf
import llama_cpp

from edgequant.atomic import atomic_outputs, check_free_space, check_output_folder, check_writable, part_path
from edgequant.errors import EdgequantError
from edgequant.gguf_info import KEY_TENSOR_TYPES, inspect_gguf, parse_shard_name, shard_name, shard_paths
from edgequant.progress import progress_count
from edgequant.quantize import types as qtypes
from edgequant.quantize.imatrix_file import Imatrix, check_matches_model, read_imatrix

log = logging.getLogger("edgequant.llama_cpp")

_FLOAT_FILE_TYPES = {"F32", "F16", "BF16"}
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FALLBACK = re.compile(r"(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*falling back to\s+(\S+)")
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5  # ggml.h's enum ggml_log_level (llama-cpp-python's comment is stale)
_TYPE_SUFFIX = re.compile(r"-(F32|F16|BF16|Q8_0)$", re.IGNORECASE)


@dataclass
class Fallback:
    tensor: str
    ncols: int
    wanted: str
    used: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.ncols} columns do not fill {self.wanted}'s blocks; llama.cpp used {self.used}"


@dataclass
class QuantizeResult:
    type: str
    files: list[str]
    size_bytes: int
    bits_per_weight: float
    seconds: float
    type_counts: dict[str, int]
    fallbacks: list[Fallback] = field(default_factory=list)
    imatrix: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeOptions:
    imatrix: Path | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[str] = field(default_factory=list)  # "pattern=TYPE", llama-quantize's --tensor-type
    pure: bool = False
    leave_output_tensor: bool = False
    allow_requantize: bool = False
    keep_split: bool = False
    threads: int = 0
    force: bool = False
    check_load: bool = True  # load the written file in llama.cpp (scratch files about to be loaded anyway skip it)


def ggml_type(name: str) -> int:
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        valid = ", ".join(t.name for t in gguf.GGMLQuantizationType)
        raise EdgequantError(f"unknown tensor type {name!r}; valid: {valid}") from None


def read_tensor_type_file(path: str | Path) -> list[str]:
    """A ``--tensor-type-file`` as llama-quantize reads it: ``PATTERN=TYPE`` entries separated by
    whitespace (one per line in the files edgequant writes)."""
    p = Path(path)
    if not p.is_file():
        raise EdgequantError(f"--tensor-type-file {p}: no such file; pass the .tensor-types.txt written by quantize --target-*")
    entries = p.read_text(encoding="utf-8", errors="replace").split()
    if not entries:
        raise EdgequantError(f"--tensor-type-file {p} is empty; it should hold PATTERN=TYPE entries such as attn_v=q8_0")
    parse_tensor_types(entries)  # one clear line for a malformed entry
    return entries


def output_name(src: Path, type_name: str) -> str:
    """``Model-7B-F16.gguf`` -> ``Model-7B-Q4_K_M.gguf`` (the converter's naming)."""
    shard = parse_shard_name(src.name)
    stem = shard[0] if shard else src.name.removesuffix(".gguf")
    return f"{_TYPE_SUFFIX.sub('', stem)}-{type_name}.gguf"


# -- llama.cpp's log: our logger, our progress, our fallback list ----------------------------------


class _LogCapture:
    def __init__(self, on_line):
        self.on_line = on_line
        self.buf = ""
        self.level = 1
        self.callback = llama_cpp.llama_log_callback(self._cb)

    def _cb(self, level: int, text: bytes, _user) -> None:
        if level != GGML_LOG_CONT:
            self.level = level
        self.buf += text.decode("utf-8", "replace")
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            # quiet by default: what matters (fallbacks, errors) is reported in our result; -v shows the rest
            log.log(logging.ERROR if self.level == GGML_LOG_ERROR else logging.DEBUG, "%s", line)
            self.on_line(line)


@contextlib.contextmanager
def _captured_llama_log(on_line) -> Iterator[None]:
    cap = _LogCapture(on_line)
    llama_cpp.llama_log_set(cap.callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from edgequant.llamacpp import install_log_handler  # edgequant's handler (prints only when verbose)

        install_log_handler()


# -- params ------------------------------------------------------------------------------------------


def _imatrix_array(m: Imatrix):
    names, arrays = [], []
    arr = (llama_cpp.llama_model_imatrix_data * (len(m.entries) + 1))()
    for i, (name, entry) in enumerate(sorted(m.entries.items())):
        values = entry.values().reshape(-1).astype("float32")
        names.append(name.encode())
        arrays.append(values)
        arr[i].name = names[-1]
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(m.entries)].name = None
    return arr, (names, arrays)


def parse_tensor_types(specs: list[str]) -> list[tuple[str, int]]:
    """llama-quantize's ``--tensor-type PATTERN=TYPE`` (a regex searched in tensor names)."""
    parsed = []
    for spec in specs:
        pattern, sep, tname = spec.rpartition("=")
        if not sep or not pattern:
            raise EdgequantError(f"--tensor-type {spec!r}: use PATTERN=TYPE, e.g. attn_v=q8_0 or 'blk\\.[0-3]\\.ffn_down=q6_k'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise EdgequantError(f"--tensor-type {spec!r}: bad regular expression ({e})") from None
        parsed.append((pattern, ggml_type(tname)))
    return parsed


def _tt_array(specs: list[str]):
    parsed = parse_tensor_types(specs)
    arr = (llama_cpp.llama_model_tensor_override * (len(parsed) + 1))()
    keep = [pattern.encode() for pattern, _ in parsed]
    for i, ((_, qtype), pattern) in enumerate(zip(parsed, keep)):
        arr[i].pattern = pattern
        arr[i].type = qtype
    arr[len(parsed)].pattern = None
    return arr, keep


def _kv_array(values: dict[str, str | int]):
    arr = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        arr[i].key = key.encode()[:127]
        if isinstance(value, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = str(value).encode()[:127]
    arr[len(values)].key = b""
    return arr


# -- the command -------------------------------------------------------------------------------------


def quantize(
    source: str | Path,
    types: list[str],
    output: str | Path | None = None,
    options: QuantizeOptions | None = None,
) -> list[QuantizeResult]:
    """Quantize a GGUF (F16/BF16/F32, any shard of a split file) into each of ``types``."""
    opts = options or QuantizeOptions()
    src = Path(source)
    info = inspect_gguf(src)  # one clear line for a missing, non-GGUF or truncated file
    wanted = [qtypes.get(t) for t in types]
    if not wanted:
        raise EdgequantError("name at least one quant type (see edgequant quantize --list)")
    # general.file_type is optional in GGUF: without it, the tensors' own types tell
    floats_only = set(info.type_counts) <= {"F32", "F16", "BF16"}
    quantized = info.file_type not in _FLOAT_FILE_TYPES if info.file_type is not None else not floats_only
    if quantized and not opts.allow_requantize:
        held = info.file_type or ", ".join(sorted(t for t in info.type_counts if t not in ("F32", "F16", "BF16")))
        raise EdgequantError(
            f"{src.name} is already quantized ({held}); requantizing compounds the error. Quantize from the "
            f"F16/BF16/F32 GGUF, or pass --allow-requantize if you accept the loss"
        )
    imatrix = None
    if opts.imatrix is not None:
        imatrix = read_imatrix(Path(opts.imatrix))
        check_matches_model(imatrix, {t.name: t.shape for t in info.tensors}, path=Path(opts.imatrix))
    for t in wanted:
        if t.needs_imatrix and imatrix is None:
            raise EdgequantError(
                f"{t.name} needs an importance matrix: run `edgequant imatrix MODEL -o imatrix.gguf`, then pass --imatrix imatrix.gguf"
            )
    _check_overrides_fit(info, opts)
    out_dir = Path(output) if output is not None else src.parent
    if out_dir.suffix == ".gguf":
        if len(wanted) > 1:
            raise EdgequantError("-o names one file but several types were asked for; pass a folder")
        finals = {wanted[0].name: out_dir}
        out_dir = out_dir.parent
    else:
        finals = {t.name: out_dir / output_name(src, t.name) for t in wanted}
    if opts.keep_split and len(info.files) == 1:
        opts = dataclasses.replace(opts, keep_split=False)  # nothing to keep
    if opts.keep_split:
        check_writable([p for f in finals.values() for p in _split_finals(f, len(info.files))], force=opts.force)
    else:
        check_writable(list(finals.values()), force=opts.force)
    check_output_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first_input = shard_paths(src)[0]
    native = _NativeOptions(imatrix, opts)  # the same arrays serve every type
    return [_quantize_one(first_input, info, t, finals[t.name], native, opts) for t in wanted]


class _NativeOptions:
    """The C arrays llama.cpp reads (imatrix data, provenance keys, tensor-type overrides), built
    once and kept alive, with the Python objects they point into, for every call that uses them."""

    def __init__(self, imatrix: Imatrix | None, opts: QuantizeOptions):
        self.imatrix_path = str(opts.imatrix) if imatrix is not None else None
        self.imatrix = self.kv = self.tt = None
        self._keep: list = []
        if imatrix is not None:
            arr, hold = _imatrix_array(imatrix)
            self.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
            provenance: dict[str, str | int] = {"quantize.imatrix.file": Path(opts.imatrix).name}  # llama-quantize's keys
            if imatrix.datasets:
                provenance["quantize.imatrix.dataset"] = imatrix.datasets[0]
            provenance["quantize.imatrix.entries_count"] = len(imatrix.entries)
            if imatrix.chunk_count:
                provenance["quantize.imatrix.chunks_count"] = imatrix.chunk_count
            kv = _kv_array(provenance)
            self.kv = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
            self._keep += [arr, hold, kv]
        if opts.tensor_types:
            arr, hold = _tt_array(opts.tensor_types)
            self.tt = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
            self._keep += [arr, hold]


def _quantize_one(src: Path, info, t: qtypes.QuantType, final: Path, native: _NativeOptions,
                  opts: QuantizeOptions) -> QuantizeResult:
    """One type: llama.cpp's quantizer into ``.part`` names (or a staging folder for kept shards),
    renamed when it succeeded, then llama.cpp's own load check."""
    need = int(info.n_params * max(t.bpw, 4.0) / 8) + 64 * 1024 * 1024
    check_free_space(final.parent, need * (2 if opts.tensor_types else 1))  # overrides: the header rewrite copies it
    params = _params(t, native, opts)
    t0 = time.perf_counter()
    with progress_count(f"{t.name}", len(info.tensors)) as bar:
        watch = _LogWatcher(t.name, bar)
        if opts.keep_split:
            files = _write_shards(src, final, len(info.files), params, t, watch, opts.tensor_types)
        else:
            files = _write_file(src, final, params, t, watch, opts.tensor_types)
    if opts.check_load:
        from edgequant.llamacpp import verify_written

        verify_written(files)
    out_info = inspect_gguf(files[0])
    return QuantizeResult(
        type=t.name, files=[str(f) for f in files], size_bytes=out_info.size_bytes,
        bits_per_weight=out_info.bits_per_weight, seconds=round(time.perf_counter() - t0, 3),
        type_counts=out_info.type_counts, fallbacks=watch.fallbacks,
        imatrix=native.imatrix_path,
    )


def _params(t: qtypes.QuantType, native: _NativeOptions, opts: QuantizeOptions):
    """llama.cpp's ``llama_model_quantize_params`` for one type, as ``llama-quantize`` fills them."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(t.ftype)
    params.nthread = opts.threads if opts.threads > 0 else (os.cpu_count() or 1)
    params.allow_requantize = opts.allow_requantize
    params.pure = opts.pure
    params.quantize_output_tensor = not opts.leave_output_tensor
    params.keep_split = opts.keep_split
    if opts.output_tensor_type:
        params.output_tensor_type = ggml_type(opts.output_tensor_type)
    if opts.token_embedding_type:
        params.token_embedding_type = ggml_type(opts.token_embedding_type)
    if native.imatrix is not None:
        params.imatrix = native.imatrix
        params.kv_overrides = native.kv
    if native.tt is not None:
        params.tt_overrides = native.tt
    return params


_DRY_TYPE = re.compile(r"\((\w+)\)\s*$")
_DRY_SIZE = re.compile(r"size =\s*([\d.]+) MiB(?:\s*->\s*([\d.]+) MiB)?")


def dry_run(source: str | Path, type_name: str, options: QuantizeOptions | None = None) -> dict[str, str]:
    """What llama.cpp's quantizer would give each tensor for ``type_name`` (``--dry-run``: nothing is
    written): tensor name -> ggml type name, for every tensor of the file. A tensor llama.cpp leaves
    as it is keeps its own type."""
    opts = options or QuantizeOptions()
    src = shard_paths(Path(source))[0]
    info = inspect_gguf(src)
    t = qtypes.get(type_name)
    native = _NativeOptions(None, dataclasses.replace(opts, imatrix=None))
    params = _params(t, native, opts)
    params.dry_run = True
    own = {x.name: x.type.lower() for x in info.tensors}
    chosen: dict[str, str] = {}
    current: list[str | None] = [None]

    def on_line(line: str) -> None:
        if (m := _PROGRESS.match(line)):
            current[0] = m.group(3)
        if current[0] and (m := _DRY_SIZE.search(line)):
            tm = _DRY_TYPE.search(line) if m.group(2) else None
            chosen[current[0]] = tm.group(1).lower() if tm else own.get(current[0], "?")
            current[0] = None

    with _captured_llama_log(on_line):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(), ctypes.byref(params))
    _check_rc(rc, t, [])
    return {name: chosen.get(name, own[name]) for name in own}


class _LogWatcher:
    """Reads llama.cpp's quantizer log line by line: advances the progress bar, collects the
    fallbacks it reports and the error lines (for the message when it fails)."""

    def __init__(self, type_name: str, bar):
        self.type_name, self.bar = type_name, bar
        self.fallbacks: list[Fallback] = []
        self.errors: list[str] = []

    def __call__(self, line: str) -> None:
        if (m := _PROGRESS.match(line)):
            self.bar.advance(1)
            self.bar.describe(f"{self.type_name} {m.group(3)}")
        if (m := _FALLBACK.search(line)):
            self.fallbacks.append(Fallback(m.group(1), int(m.group(2)), m.group(4), m.group(5)))
        if "error" in line.lower() or "requires an imatrix" in line:
            self.errors.append(line.strip())


def _run_quantizer(src: Path, dst: Path, params, t: qtypes.QuantType, watch: _LogWatcher) -> None:
    """``llama_model_quantize(src, dst)``, its log read by ``watch``; an error names what llama.cpp said."""
    with _captured_llama_log(watch):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    _check_rc(rc, t, watch.errors)




def _record_overrides(part: Path, tensor_types: list[str]) -> None:
    """Add the ``--tensor-type`` list to a written file's metadata (llama.cpp's kv overrides hold only
    short scalars, so the header is rewritten; the tensor data is copied as is)."""
    if not tensor_types:
        return
    from edgequant.gguf_layout import with_metadata

    tmp = part_path(part)  # a .part name: swept like the others if this process is killed
    try:
        with_metadata(part, tmp, {KEY_TENSOR_TYPES: list(tensor_types)})
        os.replace(tmp, part)
    finally:
        tmp.unlink(missing_ok=True)


def _write_file(src: Path, final: Path, params, t: qtypes.QuantType, watch: _LogWatcher,
                tensor_types: list[str]) -> list[Path]:
    """One output file, written as ``.part`` and renamed."""
    with atomic_outputs([final]) as (part,):
        _run_quantizer(src, part, params, t, watch)
        _record_overrides(part, tensor_types)
    return [final]


def _write_shards(src: Path, final: Path, n_shards: int, params, t: qtypes.QuantType,
                  watch: _LogWatcher, tensor_types: list[str]) -> list[Path]:
    """``--keep-split``: llama.cpp names the shards itself, so it writes them into a staging folder (a
    ``.part`` name of this write's own); they become the ``.part`` files of ``atomic_outputs`` and are
    renamed together when every shard is there."""
    finals = _split_finals(final, n_shards)  # checked for existing files in quantize()
    with atomic_outputs(finals) as parts:
        staging = part_path(finals[0])  # swept with the first shard's leftovers if this run is killed
        staging.mkdir()
        try:
            _run_quantizer(src, staging / final.name, params, t, watch)
            produced = sorted(staging.glob("*.gguf"))
            if len(produced) != len(finals):
                raise RuntimeError(f"internal error: llama.cpp wrote {len(produced)} shards, expected {len(finals)}")
            for shard, part in zip(produced, parts):
                os.replace(shard, part)
            _record_overrides(parts[0], tensor_types)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return finals


def _check_overrides_fit(info, opts: QuantizeOptions) -> None:
    """llama.cpp sends ``--tensor-type`` overrides through its usual fallback (reported like any
    other), but applies ``--output-tensor-type`` and ``--token-embedding-type`` as given: when rows
    do not fill that type's blocks it aborts the process (GGML_ASSERT) or fails validation. Refuse
    those two up front."""
    for option, name, tname in (("--output-tensor-type", "output.weight", opts.output_tensor_type),
                                ("--token-embedding-type", "token_embd.weight", opts.token_embedding_type)):
        if not tname:
            continue
        qt = gguf.GGMLQuantizationType(ggml_type(tname))
        block = gguf.GGML_QUANT_SIZES[qt][0]
        for t in info.tensors:
            if t.name == name and t.shape[0] % block:
                raise EdgequantError(
                    f"{option} {tname}: {t.name} has rows of {t.shape[0]} values, not a multiple of {qt.name}'s block of "
                    f"{block}, and llama.cpp applies this option without a fallback (it would abort); choose a type "
                    f"with 32-value blocks such as q8_0, q5_0 or q4_0"
                )


def _split_finals(final: Path, n: int) -> list[Path]:
    stem = final.name.removesuffix(".gguf")
    return [final.with_name(shard_name(stem, i, n)) for i in range(1, n + 1)]


def _check_rc(rc: int, t: qtypes.QuantType, errors: list[str]) -> None:
    if rc == 0:
        return
    detail = errors[-1] if errors else f"llama_model_quantize returned {rc}"
    if any("imatrix" in e for e in errors):
        raise EdgequantError(f"{t.name}: llama.cpp refused: {detail} (pass --imatrix, made with edgequant imatrix)")
    raise EdgequantError(f"{t.name}: llama.cpp's quantizer failed: {detail}")

