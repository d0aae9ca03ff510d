"""Every llama.cpp model edgequant runs is opened here, with a weight-buffer policy that works on this CPU.

llama.cpp can move weights out of the plain CPU buffer into "extra" buffer types at load time
(``llama_model_params.use_extra_bufts``, llama-bench's ``--repack``, the tools' ``-nr``): ggml's
CPU_REPACK buffer (weights re-laid for its AVX2/NEON kernels) and, on Intel CPUs with AMX, the AMX
buffer. On AMX machines a native build of llama-cpp-python repacks Q4_0/Q4_1/Q8_0/k-quant weights
into AMX tiles and ``ggml_backend_amx_mul_mat`` segfaults on decode (llama.cpp #20824). ggml has
no switch for AMX alone: turning extra buffers off is the only runtime way round it, and it turns
CPU_REPACK off with it. So the policy (``decide_repack``) is:

- ``auto`` (default): extra buffers stay on (llama.cpp's default, nothing changes) unless the AMX
  buffer type is active in this process, i.e. the CPU has AMX *and* the build has the AMX backend;
  then they are off. That is also the fastest configuration llama-bench can run on such a host
  (``--repack 1`` crashes there).
- ``on`` / ``off``: forced, from ``--repack`` or ``EDGEQUANT_REPACK``.

docs/cpu.md explains the choice and a build recipe without AMX that keeps CPU_REPACK.

llama.cpp's own log lines (context warnings, load details) stay out of the terminal unless
``EDGEQUANT_VERBOSE=1`` (``--verbose``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

MODES = ("auto", "on", "off")
ENV_REPACK = "EDGEQUANT_REPACK"
ENV_VERBOSE = "EDGEQUANT_VERBOSE"
AMX_BUFFER = "AMX"  # ggml's name of the AMX extra buffer type (ggml-cpu/amx/amx.cpp)
AMX_ISSUE = "llama.cpp #20824"


@dataclass(frozen=True)
class RepackPolicy:
    """How llama.cpp places weights on this host, and why."""

    repack: bool  # llama_model_params.use_extra_bufts
    mode: str  # what was asked: auto, on, off
    reason: str
    amx_cpu: bool  # the CPU reports amx_int8
    amx_active: bool | None  # the AMX buffer type is in this build's extra buffers (None: not known)
    extra_buffers: tuple[str, ...] | None  # ggml's extra CPU buffer types in this process (None: not known)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extra_buffers"] = list(self.extra_buffers) if self.extra_buffers is not None else None
        return d

    def describe(self) -> str:
        """One phrase for a report's host line."""
        return f"weight repacking {'on' if self.repack else 'off'} ({self.reason})"


def parse_mode(value: str | None, source: str = "--repack") -> str:
    mode = (value or "auto").strip().lower()
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off", "": "auto"}
    mode = aliases.get(mode, mode)
    if mode not in MODES:
        raise EdgequantError(f"{source} {value!r}: use auto, on or off (docs/cpu.md)")
    return mode


def decide_repack(*, mode: str, cpu_flags: Collection[str], extra_buffers: Sequence[str] | None,
                  build_features: Collection[str] = ()) -> RepackPolicy:
    """The buffer policy from the CPU's features and the llama.cpp build's (pure; unit-tested for every case).

    ``cpu_flags``: the CPU's feature flags (``/proc/cpuinfo``). ``extra_buffers``: names of the extra
    CPU buffer types ggml offers in this process, or None when they could not be read.
    ``build_features``: ggml's compiled-in CPU features (``llama_print_system_info``), the fallback
    when the buffer list is unknown."""
    mode = parse_mode(mode)
    amx_cpu = "amx_int8" in cpu_flags
    if extra_buffers is not None:
        amx_active: bool | None = AMX_BUFFER in extra_buffers
    elif "AMX_INT8" in build_features:
        amx_active = amx_cpu  # the AMX buffer type exists only where the CPU grants AMX
    elif build_features:
        amx_active = False  # the build has no AMX kernels
    else:
        amx_active = None
    bufs = tuple(extra_buffers) if extra_buffers is not None else None
    if mode == "on":
        warn = f"; the AMX kernel may crash ({AMX_ISSUE})" if amx_active else ""
        return RepackPolicy(True, mode, f"forced on{warn}", amx_cpu, amx_active, bufs)
    if mode == "off":
        return RepackPolicy(False, mode, "forced off", amx_cpu, amx_active, bufs)
    if amx_active:
        return RepackPolicy(False, mode, f"AMX backend active: its kernel crashes on quantized weights ({AMX_ISSUE})",
                            amx_cpu, amx_active, bufs)
    if amx_active is None and amx_cpu:
        return RepackPolicy(False, mode, "AMX CPU and the build's AMX support unknown: off to be safe",
                            amx_cpu, amx_active, bufs)
    why = "no AMX backend" if not amx_cpu else "AMX CPU, build without the AMX backend"
    return RepackPolicy(True, mode, why, amx_cpu, amx_active, bufs)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where not readable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def build_features() -> frozenset[str]:
    """ggml's compiled-in CPU features (``AVX2``, ``AMX_INT8``, ``REPACK``, ...) of the installed llama-cpp-python."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    feats = set()
    for part in info.replace("|", "\n").splitlines():
        name, eq, value = part.partition("=")
        if eq and value.strip() == "1":
            feats.add(name.split(":")[-1].strip())
    return frozenset(feats)


@functools.lru_cache(maxsize=1)
def extra_buffer_types() -> tuple[str, ...] | None:
    """Names of the extra CPU buffer types ggml offers in this process (what ``use_extra_bufts`` enables).

    Read through ggml's backend registry, as llama.cpp itself reads them; None if that fails."""
    try:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        names = ("libggml.so", "libggml.dylib", "ggml.dll")
        base_names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
        ggml = next(ctypes.CDLL(str(lib_dir / n)) for n in names if (lib_dir / n).exists())
        base = next(ctypes.CDLL(str(lib_dir / n)) for n in base_names if (lib_dir / n).exists())
        install_log_handler()
        llama_cpp.llama_backend_init()
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_buft_name.restype = ctypes.c_char_p
        base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not dev:
            return None
        reg = base.ggml_backend_dev_backend_reg(dev)
        fn = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            return ()
        get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
        arr = get(dev)
        out = []
        i = 0
        while arr and arr[i]:
            out.append(base.ggml_backend_buft_name(arr[i]).decode("utf-8", "replace"))
            i += 1
        return tuple(out)
    except (OSError, AttributeError, StopIteration, ValueError):
        return None


def set_repack_mode(mode: str | None) -> None:
    """The ``--repack`` flag: recorded in the environment, so speed processes started later inherit it."""
    if mode is None:
        return
    os.environ[ENV_REPACK] = parse_mode(mode)
    repack_policy.cache_clear()


def set_verbose(verbose: bool) -> None:
    """The ``--verbose`` flag: show llama.cpp's own log lines (also in child processes)."""
    if verbose:
        os.environ[ENV_VERBOSE] = "1"


def verbose() -> bool:
    return os.environ.get(ENV_VERBOSE, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def repack_policy() -> RepackPolicy:
    """This process's policy: ``EDGEQUANT_REPACK`` (or ``--repack``) over ``auto``."""
    mode = parse_mode(os.environ.get(ENV_REPACK), ENV_REPACK)
    bufs = extra_buffer_types()
    feats = build_features() if bufs is None else frozenset()
    return decide_repack(mode=mode, cpu_flags=cpu_flags(), extra_buffers=bufs, build_features=feats)


_patch_lock = threading.RLock()


@contextlib.contextmanager
def _model_params(repack: bool):
    """llama-cpp-python's ``Llama`` takes no ``use_extra_bufts``: its model params come from
    ``llama_model_default_params()``, so while a model loads that function returns the policy's."""
    import llama_cpp.llama_cpp as C

    with _patch_lock:
        original = C.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = repack
            return p

        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = original


_log_state: dict = {"callback": None, "errors": collections.deque(maxlen=8)}


def install_log_handler() -> None:
    """Route llama.cpp's log lines (C code, every level) through edgequant: shown only when verbose.

    llama-cpp-python's own handler maps ggml's levels off by one (WARN is shown as an error even
    with ``verbose=False``), so ``n_ctx_seq (512) > n_ctx_train (0)`` reached the terminal on
    every vocab-only load. Error lines are kept (``last_errors``) for the one-line message."""
    import llama_cpp

    if _log_state["callback"] is not None:
        llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))
        return

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data) -> None:  # noqa: ARG001 - C signature
        msg = (text or b"").decode("utf-8", "replace")
        if level == 4 and msg.strip():  # GGML_LOG_LEVEL_ERROR
            _log_state["errors"].append(msg.strip())
        if verbose():
            sys.stderr.write(msg)
            sys.stderr.flush()

    _log_state["callback"] = _callback  # keep a reference: C holds only the pointer
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def last_errors() -> list[str]:
    """llama.cpp's most recent error lines (for an error message that says what it refused)."""
    return list(_log_state["errors"])


@contextlib.contextmanager
def context_params(**fields):
    """``Llama`` exposes only some of llama.cpp's context parameters: while a context is made inside this
    block, llama.cpp's default context params carry ``fields`` (``n_seq_max``, ``cb_eval``, ...)."""
    import llama_cpp.llama_cpp as C

    original = C.llama_context_default_params

    def params():
        p = original()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    C.llama_context_default_params = params
    try:
        yield
    finally:
        C.llama_context_default_params = original


def open_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama`` with this host's buffer policy and llama.cpp's logs kept quiet (unless verbose)."""
    import llama_cpp

    kwargs.setdefault("verbose", verbose())
    policy = repack_policy()
    install_log_handler()
    _log_state["errors"].clear()
    with _model_params(policy.repack):
        llm = llama_cpp.Llama(model_path=str(path), **kwargs)
    try:
        if not kwargs.get("vocab_only"):
            _check_positions(path, llm)
    except EdgequantError:
        llm.close()
        raise
    return llm


def _check_positions(path: str | Path, llm) -> None:
    """A context longer than a learned position table (GPT-2, StarCoder: ``position_embd``) would abort
    llama.cpp at the first token past it (a GGML_ASSERT, not an error): refuse it in one line. Models with
    RoPE run past their training context; the header is read only when the context is longer than that."""
    n_ctx, n_train = llm.n_ctx(), llm._model.n_ctx_train()
    if n_ctx <= n_train:
        return
    from edgequant.gguf_info import read_header

    table = next((t for t in read_header(Path(path))[1] if t.name == "position_embd.weight"), None)
    if table is not None and len(table.shape) > 1 and n_ctx > table.shape[1]:
        raise EdgequantError(f"{Path(path).name} has {table.shape[1]} learned positions; a context of {n_ctx} tokens "
                             f"would crash llama.cpp: use --ctx {table.shape[1]} or less")


def verify_written(files: Sequence[str | Path]) -> None:
    """A GGUF edgequant wrote must load in llama.cpp: checked (``check_loads``) on the first file (a
    split loads from its first shard); a file llama.cpp refuses is removed, never left under its name."""
    try:
        check_loads(files[0])
    except EdgequantError:
        for f in files:
            Path(f).unlink(missing_ok=True)
        raise


def check_loads(path: str | Path) -> None:
    """llama.cpp reads the file's metadata, vocabulary and every tensor's shape (no weights: ``no_alloc``),
    or the error names what it refused (about half a second; the weights are not read)."""
    import llama_cpp

    install_log_handler()
    _log_state["errors"].clear()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # no_alloc asserts on a memory-mapped load
    params.n_gpu_layers = 0
    params.use_extra_bufts = False  # nothing is placed: no repacking, no AMX
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = "; ".join(e for e in last_errors() if "failed to load model" not in e)[-300:] or "no reason given"
        raise EdgequantError(f"llama.cpp refuses {Path(path).name} ({why}); the file was removed (an inconsistent "
                             f"checkpoint, e.g. config.json against its weights, or an edgequant bug)")
    llama_cpp.llama_model_free(model)
