"""The two ways the benchmark runs a model: llama.cpp for GGUF files, torch for HF and GPTQ folders.

Both give the same three things: the token ids of a text (BOS first when the model adds BOS), the
logits of one chunk evaluated from an empty cache, and a load/close life cycle. Speed is measured
in ``speed.py`` on a fresh instance of each model, so quality runs and speed runs never share a
context.

Devices are explicit: ``cpu`` always works; ``cuda`` means every layer offloaded (llama.cpp built
with CUDA) or the torch model on the GPU. When a backend cannot use CUDA, ``cuda_absent_reason``
says why, and the caller reports the row as absent instead of quietly running on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgequant.devices import DEVICES, default_threads, parse_devices  # noqa: F401 - part of this module's API
from edgequant.errors import EdgequantError
from edgequant.gguf_info import GGUFInfo, inspect_gguf


def gguf_header(path: str | Path) -> GGUFInfo:
    """``inspect_gguf`` once per file version in a process (its string arrays take ~0.3 s to walk
    for a 50 K vocabulary, and a bench run asks for the kind, the row and the load of each file)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return inspect_gguf(p)  # its one clear line for a missing file
    return _header(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _header(path: str, mtime_ns: int, size: int) -> GGUFInfo:  # noqa: ARG001 - the key of the file's version
    return inspect_gguf(path)


def model_kind(path: str | Path) -> str:
    """``gguf`` for a .gguf file, ``gptq`` for a folder with a GPTQ quantization_config, else ``hf``."""
    p = Path(path)
    if p.suffix == ".gguf" or p.is_file():
        gguf_header(p)  # one clear line for a missing, truncated or non-GGUF file
        return "gguf"
    if not p.is_dir():
        raise EdgequantError(f"{p} does not exist; pass a .gguf file or a Hugging Face model folder")
    config = p / "config.json"
    if not config.is_file():
        raise EdgequantError(f"{p} has no config.json; pass a .gguf file or a Hugging Face model folder")
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    if str(quant.get("quant_method", "")).lower() == "gptq":
        return "gptq"
    return "hf"


def cuda_absent_reason(kind: str) -> str | None:
    """Why this kind of model cannot run on CUDA here, or None when it can."""
    if kind == "gguf":
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            return "llama-cpp-python was built without GPU offload (reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\", see docs/gpu.md)"
        return None
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


@dataclass
class Loaded:
    """What every backend tells the report about the model it loaded."""

    kind: str  # gguf, hf, gptq
    backend: str  # llama.cpp or torch
    device: str
    n_vocab: int
    add_bos: bool
    bos_id: int | None


TOOL_BATCH = 2048  # llama-perplexity's default -b: it packs n_batch // ctx chunks into one decode


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: a context holds at most this many sequences


def chunks_per_decode(ctx: int, n_chunks: int | None = None) -> int:
    """llama-perplexity's n_seq (``max(1, n_batch / n_ctx)``), no more than the chunks there are and than
    llama.cpp's sequence limit; at least 1 (a bad ``--ctx``/``--chunks`` is reported by the chunking)."""
    n_seq = min(max(1, TOOL_BATCH // max(ctx, 1)), MAX_SEQUENCES)
    return max(1, min(n_seq, n_chunks)) if n_chunks else n_seq


def _sequences(n_seq: int):
    """``Llama`` sets no ``n_seq_max``: one KV stream per chunk, not unified, as llama-perplexity's
    ``n_parallel``."""
    from edgequant.llamacpp import context_params

    return context_params(n_seq_max=n_seq, kv_unified=False)


class LlamaCppBackend:
    """A GGUF through llama-cpp-python, set up as llama-perplexity sets up its context: ``n_seq``
    chunks of ``ctx`` tokens per decode, each its own sequence, and logits output only for the
    second half of each chunk (the rows the tool scores)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, ctx: int = 512,
                 flash_attn: bool = True, n_seq: int = 1, n_batch: int | None = None, n_ubatch: int | None = None):
        from edgequant.llamacpp import open_llama

        self.path, self.ctx, self.n_seq = str(path), ctx, n_seq
        threads = threads or default_threads()
        n_batch = n_batch or ctx * n_seq
        try:
            with _sequences(n_seq):
                self.llm = open_llama(
                    self.path, n_ctx=ctx * n_seq, n_batch=n_batch, n_ubatch=n_ubatch or min(n_batch, 512),
                    logits_all=False, flash_attn=flash_attn, n_threads=threads, n_threads_batch=threads,
                    n_gpu_layers=-1 if device == "cuda" else 0,
                    op_offload=device == "cuda",  # a CUDA build would otherwise send big CPU batches to the GPU
                )
        except ValueError as e:
            from edgequant.llamacpp import last_errors

            why = (last_errors() or [str(e)])[-1]
            if "context" in str(e).lower():  # the file loaded; the context (KV cache for ctx tokens) did not
                raise EdgequantError(f"llama.cpp could not make a context of {ctx} tokens for {Path(self.path).name} "
                                     f"({why}); pass a smaller --ctx (512 is llama.cpp's usual)") from None
            raise EdgequantError(f"llama.cpp cannot load {self.path} ({why}); run edgequant inspect on it") from None
        add_bos = bool(self.llm._model.add_bos_token())
        self.info = Loaded("gguf", "llama.cpp", device, self.llm.n_vocab(), add_bos,
                           self.llm.token_bos() if add_bos else None)
        self._batch = None
        self._layout: tuple[int, int] | None = None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # BOS only if the vocab adds it

    def _batch_for(self, length: int, first: int):
        """The run's llama_batch laid out for chunks of ``length`` tokens: token i is position
        i % length of sequence i // length, with an output row when that position is >= ``first``.
        Only the tokens change between decodes of the same layout."""
        import llama_cpp

        n = self.ctx * self.n_seq
        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(n, 0, 1)
        b = self._batch
        if self._layout != (length, first):
            i = np.arange(n, dtype=np.int32)
            np.ctypeslib.as_array(b.pos, shape=(n,))[:] = i % length
            np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
            np.ctypeslib.as_array(b.logits, shape=(n,))[:] = (i % length) >= first
            for k, seq in enumerate((i // length).tolist()):
                b.seq_id[k][0] = seq
            self._layout = (length, first)
        return b

    def logits_of(self, chunks: list[list[int]], first: int) -> list[np.ndarray]:
        """For each chunk (at most ``n_seq`` of one length <= ``ctx``, each decoded as its own
        sequence from an empty cache, in one ``llama_decode``), the logits at positions ``first ..
        len-2``: read-only views of llama.cpp's output buffer, valid until the next call."""
        import llama_cpp

        length = len(chunks[0]) if chunks else 0
        if not chunks or len(chunks) > self.n_seq or not first < length <= self.ctx or \
                any(len(c) != length for c in chunks):
            raise ValueError(f"logits_of takes 1 to {self.n_seq} chunks of one length in ({first}, {self.ctx}]")
        b = self._batch_for(length, first)
        n = len(chunks) * length
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = np.asarray(chunks, dtype=np.int32).ravel()
        b.n_tokens = n
        ctx = self.llm.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise EdgequantError(f"llama.cpp failed to decode {len(chunks)} chunks of {length} tokens of {self.path}")
        rows = length - first  # output rows per chunk; the last one predicts past the chunk
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(chunks) * rows, self.info.n_vocab))
        out.flags.writeable = False
        return [out[k * rows:(k + 1) * rows - 1] for k in range(len(chunks))]

    def logits(self, chunk: list[int], first: int) -> np.ndarray:
        """Logits at positions ``first .. len(chunk)-2`` of one chunk, as an array of its own."""
        return self.logits_of([chunk], first)[0].copy()

    def close(self) -> None:
        if self._batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()


class TorchBackend:
    """An HF folder (plain or GPTQ) through transformers, in float32 on CPU for reference-grade logits."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, kind: str | None = None):
        import torch

        from edgequant.progress import quiet_libraries

        quiet_libraries()
        self.path = str(path)
        self.torch = torch
        self.device = torch.device(device)
        kind = kind or model_kind(path)
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        with _quiet_transformers():
            from transformers import AutoTokenizer

            from edgequant.remote_code import load_kwargs, refused

            with refused(self.path):
                self.tokenizer = AutoTokenizer.from_pretrained(self.path, **load_kwargs(self.path))
            if kind == "gptq":
                from edgequant.gptq_load import load_gptq_model

                self.model = load_gptq_model(self.path, device=device)
            else:
                from transformers import AutoModelForCausalLM

                # float32 on CPU: bf16 arithmetic would put its own rounding into a reference;
                # on CUDA the checkpoint's dtype (what people run there).
                dtype = torch.float32 if device == "cpu" else "auto"
                with refused(self.path):
                    self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype,
                                                                      **load_kwargs(self.path)).to(self.device)
        self.model.eval()
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a", add_special_tokens=True).input_ids
        add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.info = Loaded(kind, "torch", device, n_vocab, add_bos, bos if add_bos else None)

    def tokenize(self, text: str) -> list[int]:
        with _quiet_transformers():
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ([self.info.bos_id] if self.info.add_bos else []) + list(ids)

    def logits_of(self, chunks: list[list[int]], first: int) -> list[np.ndarray]:
        """For each chunk, the logits at positions ``first .. len(chunk)-2`` (one forward pass each)."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for chunk in chunks:
                ids = torch.tensor([chunk], device=self.device)
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(chunk) - first).logits
                out.append(logits[0, :-1].float().cpu().numpy())
        return out

    def logits(self, chunk: list[int], first: int) -> np.ndarray:
        """Logits at positions ``first .. len(chunk)-2`` of one chunk."""
        return self.logits_of([chunk], first)[0]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns about long token sequences and load details we report ourselves."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def open_backend(path: str | Path, *, device: str, threads: int | None, ctx: int, flash_attn: bool = True,
                 n_seq: int = 1, kind: str | None = None):
    """The quality-run backend for a model: llama.cpp for GGUF (``n_seq`` chunks per decode), torch for HF/GPTQ."""
    kind = kind or model_kind(path)
    reason = cuda_absent_reason(kind) if device == "cuda" else None
    if reason:
        raise EdgequantError(f"{Path(path).name} on cuda: {reason}")
    if kind == "gguf":
        return LlamaCppBackend(path, device=device, threads=threads, ctx=ctx, flash_attn=flash_attn, n_seq=n_seq)
    return TorchBackend(path, device=device, threads=threads, kind=kind)
