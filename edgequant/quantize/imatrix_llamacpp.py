"""``edgequant imatrix --engine llama.cpp``: the importance matrix from llama.cpp's own graph evaluation.

A 16-bit GGUF (F16, BF16 or F32 weights) runs in llama-cpp-python with a graph evaluation callback
(``llama_context_params.cb_eval``), the hook ``llama-imatrix`` uses. For each graph node the
scheduler first asks whether we want its data; we say yes to every ``MUL_MAT_ID`` (MoE experts)
and to each ``MUL_MAT`` whose weight is a ``blk.*`` tensor and whose activations (``src1``) are F32
with at least 16 rows, as ``tools/imatrix/imatrix.cpp`` does. Once such a node is computed we read
its activations and add, per input column, the sum of their squares and the number of rows seen:

- a dense matrix: every row of ``src1`` (per matrix when the weight is 3-D);
- ``MUL_MAT_ID``: for each (token, slot) the expert in the ``ids`` tensor gets that token's row,
  so every expert has its own sums and count, and experts no token reached stay at zero.

The text is tokenized once as llama-imatrix tokenizes its ``-f`` file (one trailing newline dropped,
``add_special``, no special-token parsing), cut into chunks of ``ctx`` tokens (the first token of each chunk overwritten with BOS
when the vocabulary adds BOS) and each chunk is decoded from an empty cache with every token an
output, so the last layer runs on all of them as in the tool. Nothing after the last collected
node of a graph is needed (the output matrix and logits: the tool collects ``output.weight`` only
with ``--process-output``), so from the second chunk on the callback stops the graph there.

The engine works on any file llama.cpp runs, including architectures transformers cannot run here
and files from llama.cpp's own converter; an HF folder is converted to a temporary F16 GGUF first
(in a child process, so that the converter's torch runtime is not resident while llama.cpp runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgequant.atomic import check_writable
from edgequant.devices import default_threads
from edgequant.errors import EdgequantError
from edgequant.progress import progress_count
from edgequant.quantize.expert_coverage import DEFAULT_POLICY, resolve_policy, settle_unseen
from edgequant.quantize.imatrix_file import Imatrix, ImatrixEntry, ImatrixResult, write_imatrix
from edgequant.text import chunk_ids, load_text

ENGINES = ("auto", "llama.cpp", "torch")
SIXTEEN_BIT = ("F32", "F16", "BF16")
MIN_ROWS = 16  # llama-imatrix ignores dense products of fewer tokens
_F32, _I32 = 0, 26  # ggml_type
_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64  # ggml.h
_OBJECT_SIZE = 32  # sizeof(struct ggml_object): ggml_tensor_overhead() is this plus the tensor


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml.h (the fields read here, in their order, with the rest as padding)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _MAX_DIMS), ("nb", ctypes.c_size_t * _MAX_DIMS),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _MAX_SRC), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * _MAX_NAME), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# -- choosing the engine -------------------------------------------------------------------------------


def is_gguf(source: str | Path) -> bool:
    p = Path(source)
    return p.is_file() and p.suffix.lower() == ".gguf"


def resolve_engine(engine: str | None, source: str | Path, device: str = "cpu") -> str:
    """``llama.cpp`` or ``torch``. ``auto``: llama.cpp for a GGUF and on CPU (faster and smaller than
    the torch engine, and measured equal to llama-imatrix: docs/quantize.md); torch for an HF folder on CUDA."""
    e = (engine or "auto").strip().lower()
    e = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "gguf": "llama.cpp", "hf": "torch",
         "transformers": "torch"}.get(e, e)
    if e not in ENGINES:
        raise EdgequantError(f"--engine {engine!r}: use auto, llama.cpp or torch")
    gguf_in = is_gguf(source)
    if e == "torch" and gguf_in:
        raise EdgequantError(f"--engine torch runs HF folders; {Path(source).name} is a GGUF: use --engine llama.cpp "
                             f"(or auto)")
    if e == "auto":
        e = "llama.cpp" if gguf_in or str(device).lower() == "cpu" else "torch"
    return e


def compute(source: str | Path, output: str | Path, *, engine: str = "auto", device: str = "cpu", **kw) -> ImatrixResult:
    """``edgequant imatrix`` for either engine (the CLI and ``release`` call this; torch is imported only
    when its engine runs). ``kw``: ``text``, ``ctx``, ``chunks``, ``force``, ``unseen_experts`` (and ``threads``
    for llama.cpp)."""
    if resolve_engine(engine, source, device) == "llama.cpp":
        return compute_imatrix_llamacpp(source, output, device=device, **kw)
    from edgequant.quantize.imatrix import compute_imatrix

    kw.pop("threads", None)
    return compute_imatrix(source, output, engine="torch", device=device, **kw)


# -- the engine ----------------------------------------------------------------------------------------


def compute_imatrix_llamacpp(
    source: str | Path,
    output: str | Path,
    *,
    text=None,
    ctx: int = 512,
    chunks: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    force: bool = False,
    unseen_experts: str = DEFAULT_POLICY,
) -> ImatrixResult:
    """An importance matrix of ``source`` (a 16-bit GGUF, or an HF folder converted to a temporary F16
    GGUF) on ``text``, computed by llama.cpp and written to ``output``; see the module docstring.
    ``unseen_experts``: the policy for MoE experts no token reached (``expert_coverage``)."""
    unseen_experts = resolve_policy(unseen_experts)
    t0 = time.perf_counter()
    output = Path(output)
    check_writable([output], force=force)  # before minutes of compute, not after
    corpus = load_text(text)
    with _gguf_of(source) as gguf_path:
        check_sixteen_bit(gguf_path)
        col = Collector(_ggml())
        n = _run(gguf_path, col, corpus.text, ctx, chunks, device, threads or default_threads())
    result = Imatrix(entries=col.entries(), datasets=[corpus.name], chunk_count=n, chunk_size=ctx)
    if not result.entries:
        raise EdgequantError(f"llama.cpp computed no blk.* weight matrix of {Path(source).name}; is it a causal LM?")
    coverage = settle_unseen(result, unseen_experts)
    write_imatrix(result, output, force=force)
    return ImatrixResult(path=str(output), entries=len(result.entries), chunks=n, chunk_size=ctx, tokens=n * ctx,
                         dataset=corpus.name, device=device, seconds=round(time.perf_counter() - t0, 2),
                         engine="llama.cpp", coverage=coverage,
                         warnings=[coverage.warning] if coverage and coverage.warning else [])


@contextlib.contextmanager
def _gguf_of(source: str | Path):
    """``source`` itself when it is a GGUF; an HF folder converted to a temporary F16 GGUF (removed after)."""
    if is_gguf(source):
        from edgequant.gguf_info import shard_paths

        yield shard_paths(Path(source))[0]  # llama.cpp opens a split GGUF by its first shard
        return
    p = Path(source)
    if p.is_file():
        raise EdgequantError(f"{p} is neither a .gguf file nor an HF model folder; pass one of them")
    with tempfile.TemporaryDirectory(prefix="edgequant-imatrix-") as tmp:
        yield _convert_in_child(source, Path(tmp))


_CHILD = "import sys; from edgequant.quantize.imatrix_llamacpp import child_convert; child_convert(*sys.argv[1:])"


def _convert_in_child(source: str | Path, folder: Path) -> Path:
    """``edgequant.export.convert`` to F16 in a child process: the torch runtime the converter loads
    (~220 MB) is gone before llama.cpp runs, so the peak memory is the larger of the two steps, not their sum."""
    import edgequant
    from edgequant import progress

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(edgequant.__file__).parent.parent), env.get("PYTHONPATH")]))
    quiet = "1" if getattr(progress, "_quiet", False) else "0"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(folder), quiet], env=env,
                          stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if "error" in answer:
        raise EdgequantError(answer["error"])
    if proc.returncode != 0 or "file" not in answer:
        raise EdgequantError(f"converting {source} to a temporary F16 GGUF failed (exit status {proc.returncode}); "
                             f"run edgequant convert {source} --outtype f16 to see why, then pass that file")
    return Path(answer["file"])


def child_convert(source: str, folder: str, quiet: str) -> None:
    """The child's side: one JSON line on stdout, the file or the one-line error."""
    import logging

    from edgequant import progress
    from edgequant.export.convert import convert

    progress.set_quiet(quiet == "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = convert(source, Path(folder), outtype="f16")
    except EdgequantError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        raise SystemExit(2) from None
    print(json.dumps({"file": res.files[0]}), flush=True)


def check_sixteen_bit(path: Path) -> None:
    """Refuse a quantized GGUF: the matrix must come from the weights being quantized, not a quant of them."""
    from edgequant.gguf_info import read_header, shard_paths

    tensors = [t for shard in shard_paths(path) for t in read_header(shard)[1]]
    bad = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2 and t.type not in SIXTEEN_BIT]
    if bad:
        raise EdgequantError(f"{path.name} is quantized ({bad[0].name} is {bad[0].type}); an imatrix is computed on a "
                             f"16-bit GGUF: convert the HF model with edgequant convert --outtype f16 and pass that file")


# -- ggml ----------------------------------------------------------------------------------------------


class _Ggml:
    """The few libggml-base functions the callback needs, and the op codes checked by name."""

    def __init__(self, base: ctypes.CDLL):
        base.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        base.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        base.ggml_backend_tensor_get.restype = None
        base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        base.ggml_nbytes.restype = ctypes.c_size_t
        base.ggml_nbytes.argtypes = [ctypes.c_void_p]
        base.ggml_op_name.restype = ctypes.c_char_p
        base.ggml_op_name.argtypes = [ctypes.c_int]
        base.ggml_tensor_overhead.restype = ctypes.c_size_t
        self.base = base
        self.mul_mat, self.mul_mat_id = 29, 30  # enum ggml_op of ggml.h
        if (base.ggml_op_name(self.mul_mat), base.ggml_op_name(self.mul_mat_id)) != (b"MUL_MAT", b"MUL_MAT_ID") or \
                base.ggml_tensor_overhead() != _OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
            raise EdgequantError("this llama-cpp-python's ggml differs from the one edgequant reads (ggml_op or "
                                 "ggml_tensor layout); use edgequant imatrix --engine torch")

    def is_host(self, t: GgmlTensor) -> bool:
        return bool(self.base.ggml_backend_buffer_is_host(t.buffer))

    def array(self, ptr: int, t: GgmlTensor, dtype, ndim: int) -> np.ndarray:
        """The tensor's data as a strided array of its last ``ndim`` ggml dimensions (outermost first),
        read in place from host memory or copied from a device."""
        shape = tuple(int(t.ne[i]) for i in reversed(range(ndim)))
        strides = tuple(int(t.nb[i]) for i in reversed(range(ndim)))
        if self.is_host(t):
            span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
            buf = (ctypes.c_char * span).from_address(t.data)
        else:
            buf = np.empty(self.base.ggml_nbytes(ptr), dtype=np.uint8)
            self.base.ggml_backend_tensor_get(ptr, buf.ctypes.data, 0, buf.nbytes)
        return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)


@functools.lru_cache(maxsize=1)
def _ggml() -> _Ggml:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib / name).exists():
            return _Ggml(ctypes.CDLL(str(lib / name)))
    raise EdgequantError(f"libggml-base is not in {lib}; reinstall llama-cpp-python, or use --engine torch")


def weight_name(raw: bytes) -> str:
    """llama-imatrix's name filter: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


# -- the callback --------------------------------------------------------------------------------------


class Collector:
    """The ``cb_eval`` callback and the sums it accumulates (float64; llama-imatrix's are float32)."""

    def __init__(self, ggml: _Ggml):
        self.g = ggml
        self.sums: dict[str, np.ndarray] = {}  # [n_mat, n_cols]
        self.counts: dict[str, np.ndarray] = {}  # [n_mat]
        self.order: list[str] = []  # names collected in the current graph
        self.stop_after: str | None = None  # the last collected node of a graph, once known
        self.error: BaseException | None = None

    def callback(self, t_ptr: int, ask: bool, _user_data) -> bool:
        try:
            t = GgmlTensor.from_address(t_ptr)
            if ask:
                return self._wanted(t)
            name = weight_name(GgmlTensor.from_address(t.src[0]).name)
            if t.op == self.g.mul_mat_id:
                self._experts(t, name)
            else:
                self._dense(t, name)
            self.order.append(name)
            return name != self.stop_after
        except BaseException as e:  # noqa: BLE001 - nothing may unwind through C; re-raised after the decode
            self.error = self.error or e
            return False

    def _wanted(self, t: GgmlTensor) -> bool:
        if t.op == self.g.mul_mat_id:
            return True
        if t.op != self.g.mul_mat:
            return False
        src1 = GgmlTensor.from_address(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != _F32:
            return False
        return weight_name(GgmlTensor.from_address(t.src[0]).name).startswith("blk.")

    def _slot(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.float64)
        s, c = self.sums[name], self.counts[name]
        if s.shape != (n_mat, n_cols):
            raise EdgequantError(f"{name} is used with {n_mat} x {n_cols} and {s.shape[0]} x {s.shape[1]} inputs; "
                                 f"edgequant cannot collect its imatrix")
        return s, c

    def _dense(self, t: GgmlTensor, name: str) -> None:
        """Every row of ``src1``; a 3-D weight's matrices each take the rows of their own batch index."""
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        x = self.g.array(t.src[1], src1, np.float32, 4)  # [ne3, ne2, ne1, ne0]
        n02, n03 = int(src0.ne[2]), int(src0.ne[3])
        s, c = self._slot(name, n02 * n03, x.shape[3])
        if n02 * n03 == 1:
            rows = x.reshape(-1, x.shape[3])
            s[0] += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        else:
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    rows = x[i3, i2]
                    s[(i3 % n03) * n02 + i2 % n02] += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        c += x.shape[0] * x.shape[1] * x.shape[2] // (n02 * n03)

    def _experts(self, t: GgmlTensor, name: str) -> None:
        """``MUL_MAT_ID``: ``ids`` [n_tokens, n_used] picks, per token and slot, the expert whose sums
        get the token's row of ``src1`` [n_tokens, ne1, n_cols] (slot ``k`` reads row ``k % ne1``)."""
        src0, src1, ids_t = (GgmlTensor.from_address(t.src[i]) for i in range(3))
        if src1.ne[3] != 1:
            raise EdgequantError(f"{name}: MUL_MAT_ID activations with 4 dimensions; edgequant cannot collect them")
        x = self.g.array(t.src[1], src1, np.float32, 3)
        ids = self.g.array(t.src[2], ids_t, np.int32, 2)
        n_as = int(src0.ne[2])
        s, c = self._slot(name, n_as, x.shape[2])
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise EdgequantError(f"{name}: expert ids outside 0..{n_as - 1}; the model file is inconsistent")
        sq = np.square(x, dtype=np.float32)
        for k in range(ids.shape[1]):
            onehot = np.zeros((ids.shape[0], n_as), dtype=np.float32)
            onehot[np.arange(ids.shape[0]), ids[:, k]] = 1.0
            s += (onehot.T @ sq[:, k % x.shape[1], :]).astype(np.float64)
        c += np.bincount(ids.ravel(), minlength=n_as)

    def entries(self) -> dict[str, ImatrixEntry]:
        return {n: ImatrixEntry(sums=self.sums[n].astype(np.float32), counts=self.counts[n].astype(np.float32))
                for n in self.sums}


# -- running the chunks --------------------------------------------------------------------------------


@contextlib.contextmanager
def _with_callback(callback):
    """``Llama`` takes no ``cb_eval``: the callback rides on llama.cpp's default context params."""
    import llama_cpp

    from edgequant.llamacpp import context_params

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    with context_params(cb_eval=cb, cb_eval_user_data=None):
        yield cb


def _open(path: Path, callback, ctx: int, device: str, threads: int):
    """The model with one sequence of ``ctx`` tokens decoded as one graph; flash attention on, as the tools run."""
    import llama_cpp

    from edgequant.llamacpp import last_errors, open_llama

    if device != "cpu" and not llama_cpp.llama_supports_gpu_offload():
        raise EdgequantError(f"--device {device}: this llama-cpp-python has no GPU support; use --device cpu, "
                             f"or --engine torch for an HF folder")
    with _with_callback(callback) as cb:
        try:
            llm = open_llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads, n_threads_batch=threads,
                             flash_attn=True, n_gpu_layers=-1 if device != "cpu" else 0)
        except ValueError as e:
            why = (last_errors() or [str(e)])[-1]
            raise EdgequantError(f"llama.cpp cannot load {path.name} with a context of {ctx} tokens ({why}); "
                                 f"run edgequant inspect on it, or pass a smaller --ctx") from None
    return llm, cb


def _run(path: Path, col: Collector, text: str, ctx: int, n_chunks: int | None, device: str, threads: int) -> int:
    """Tokenize, chunk and decode every chunk with the callback on; the number of chunks."""
    import llama_cpp

    llm, cb = _open(path, col.callback, ctx, device, threads)
    try:
        # as llama-imatrix -f: one trailing newline dropped, then common_tokenize(add_special, no special parsing)
        ids = llm.tokenize(text.removesuffix("\n").encode("utf-8"), add_bos=True, special=False)
        add_bos = bool(llm._model.add_bos_token())
        chunks = chunk_ids(ids, ctx, n_chunks, llm.token_bos() if add_bos else None)
        batch = llama_cpp.llama_batch_init(ctx, 0, 1)
        try:
            _fill_layout(batch, ctx)
            with progress_count("imatrix", len(chunks)) as bar:
                for i, chunk in enumerate(chunks):
                    _decode(llm, batch, chunk, col, path)
                    if i == 0 and col.order and col.order.count(col.order[-1]) == 1:
                        col.stop_after = col.order[-1]  # the same graph every chunk: stop it there from now on
                    bar.advance(1)
        finally:
            llama_cpp.llama_batch_free(batch)
    finally:
        llm.close()
        del cb
    return len(chunks)


def _fill_layout(batch, ctx: int) -> None:
    """Positions 0..ctx-1 of sequence 0, every token an output (llama-imatrix asks for all logits)."""
    np.ctypeslib.as_array(batch.pos, shape=(ctx,))[:] = np.arange(ctx, dtype=np.int32)
    np.ctypeslib.as_array(batch.n_seq_id, shape=(ctx,))[:] = 1
    np.ctypeslib.as_array(batch.logits, shape=(ctx,))[:] = 1
    for k in range(ctx):
        batch.seq_id[k][0] = 0
    batch.n_tokens = ctx


def _decode(llm, batch, chunk: list[int], col: Collector, path: Path) -> None:
    import llama_cpp

    np.ctypeslib.as_array(batch.token, shape=(len(chunk),))[:] = np.asarray(chunk, dtype=np.int32)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    col.order.clear()
    rc = llama_cpp.llama_decode(llm.ctx, batch)
    if col.error is not None:
        err, col.error = col.error, None
        raise err
    if rc != 0:
        raise EdgequantError(f"llama.cpp failed to decode a chunk of {len(chunk)} tokens of {path.name} (status {rc})")
