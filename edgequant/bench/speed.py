"""Tokens per second like ``llama-bench``: pp (prompt processing) and tg (text generation).

For a GGUF, exactly llama-bench's procedure through llama.cpp's C API: a fresh context, one warm-up
run of each test, then ``reps`` runs each from an empty KV cache; pp decodes ``pp`` random tokens
(BOS first when the model adds BOS) in batches of ``n_batch``, tg decodes ``tg`` tokens one at a
time. t/s = tokens / seconds of each run; the result is the mean and the sample standard deviation
over the runs (llama-bench's ``avg_ts`` and ``stddev_ts``).

For an HF or GPTQ folder the same two tests through torch: one forward pass over ``pp`` tokens
(only the last position's logits computed, as llama.cpp outputs one) and ``tg`` single-token steps
with the KV cache.

Load time, the peak resident memory of the measuring process (sampled every 10 ms from load to the
end of the last run; the bench measures each model in a fresh process, so it is that model's) and,
on CUDA, the peak device memory used above what was in use before loading are reported beside the
rates.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgequant.bench.backends import cuda_absent_reason, model_kind
from edgequant.devices import default_threads


@dataclass
class SpeedResult:
    device: str
    backend: str | None = None
    threads: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    pp: int = 512
    tg: int = 128
    reps: int = 5
    pp_tps: float | None = None
    pp_std: float | None = None
    tg_tps: float | None = None
    tg_std: float | None = None
    load_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    absent: str | None = None  # why this device could not be measured; every number is then None

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vram_used() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return total - free
    except Exception:  # noqa: BLE001 - no CUDA runtime: not measured
        return None
    return None


class _PeakSampler:
    """Peak RSS (and device memory) above the level when it started, sampled in a thread."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.base_rss = _rss_bytes()
        self.base_vram = _vram_used() if cuda else None
        self.peak_rss = self.base_rss
        self.peak_vram = self.base_vram
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_bytes())
        if self.cuda and self.base_vram is not None:
            v = _vram_used()
            if v is not None:
                self.peak_vram = max(self.peak_vram, v)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def rss(self) -> int:
        return self.peak_rss

    def vram(self) -> int | None:
        return None if self.peak_vram is None or self.base_vram is None else self.peak_vram - self.base_vram


def _mean_std(tokens: int, seconds: list[float]) -> tuple[float, float]:
    rates = [tokens / s for s in seconds]
    return statistics.fmean(rates), (statistics.stdev(rates) if len(rates) > 1 else 0.0)


def measure_speed(path: str | Path, *, device: str = "cpu", threads: int | None = None, pp: int = 512,
                  tg: int = 128, reps: int = 5, n_batch: int = 2048, n_ubatch: int = 512,
                  flash_attn: bool = True, seed: int = 0, isolated: bool = False) -> SpeedResult:
    """pp/tg tokens per second of one model on one device (an ``absent`` result when it cannot run there).

    ``isolated``: measure in a fresh Python process, as llama-bench is one process per run: load time
    and peak RSS then belong to this model alone, not to whatever this process loaded before."""
    if isolated:
        return _isolated(path, dict(device=device, threads=threads, pp=pp, tg=tg, reps=reps, n_batch=n_batch,
                                    n_ubatch=n_ubatch, flash_attn=flash_attn, seed=seed))
    kind = model_kind(path)
    threads = threads or default_threads()
    result = SpeedResult(device=device, pp=pp, tg=tg, reps=reps, threads=threads)
    if device == "cuda":
        reason = cuda_absent_reason(kind)
        if reason:
            result.absent = reason
            return result
    if kind == "gguf":
        return _llama_cpp_speed(path, result, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn, seed=seed)
    return _torch_speed(path, kind, result, seed=seed)


class _LlamaBenchTests:
    """llama-bench's two tests on one GGUF through llama.cpp's C API: random tokens (BOS first when
    the model adds BOS), pp in batches of ``n_batch``, tg one token at a time, each run timed from an
    empty KV cache."""

    def __init__(self, path, result: SpeedResult, *, n_batch: int, n_ubatch: int, flash_attn: bool, seed: int):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.path, self.result = path, result
        self.n_batch, self.n_ubatch, self.flash_attn = n_batch, n_ubatch, flash_attn
        self.rng = random.Random(seed)

    def context(self, n_ctx: int):
        """A fresh model and context sized for one test, as llama-bench makes one per test."""
        from edgequant.bench.backends import LlamaCppBackend

        r = self.result
        return LlamaCppBackend(self.path, device=r.device, threads=r.threads, ctx=n_ctx, flash_attn=self.flash_attn,
                               n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    def decode(self, b, tokens: list[int]) -> None:
        """One ``llama_decode`` of ``tokens`` as one batch."""
        lc = self.llama_cpp
        arr = (lc.llama_token * len(tokens))(*tokens)
        if lc.llama_decode(b.llm.ctx, lc.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed during the speed test")

    def prompt(self, b) -> None:
        """The pp test: ``pp`` random tokens in batches of ``n_batch``."""
        done = 0
        while done < self.result.pp:
            n = min(self.result.pp - done, self.n_batch)
            toks = [self.rng.randrange(b.info.n_vocab) for _ in range(n)]
            if done == 0 and b.info.add_bos:
                toks[0] = b.info.bos_id
            self.decode(b, toks)
            done += n
        self.llama_cpp.llama_synchronize(b.llm.ctx)

    def generate(self, b, n: int) -> None:
        """The tg test: ``n`` single-token decodes."""
        tok = b.info.bos_id if b.info.add_bos else self.rng.randrange(b.info.n_vocab)
        for _ in range(n):
            self.decode(b, [tok])
            self.llama_cpp.llama_synchronize(b.llm.ctx)
            tok = self.rng.randrange(b.info.n_vocab)

    def timed(self, b, fn, *args) -> float:
        """Seconds of one run of ``fn`` from an empty KV cache."""
        lc = self.llama_cpp
        lc.llama_memory_clear(lc.llama_get_memory(b.llm.ctx), False)
        t = time.perf_counter()
        fn(b, *args)
        return time.perf_counter() - t

    def run(self, test: str) -> None:
        """One test (``pp`` or ``tg``) in its own context: a warm-up, then the timed repetitions."""
        r = self.result
        n = r.pp if test == "pp" else r.tg
        if not n:
            return
        t0 = time.perf_counter()
        b = self.context(n)
        if r.load_seconds is None:
            r.load_seconds = round(time.perf_counter() - t0, 3)
        try:
            self.llama_cpp.llama_set_n_threads(b.llm.ctx, r.threads, r.threads)
            if test == "pp":
                self.timed(b, self.prompt)
                r.pp_tps, r.pp_std = _mean_std(n, [self.timed(b, self.prompt) for _ in range(r.reps)])
            else:
                self.timed(b, self.generate, 1)  # llama-bench warms generation up with one token
                r.tg_tps, r.tg_std = _mean_std(n, [self.timed(b, self.generate, n) for _ in range(r.reps)])
        finally:
            b.close()


def _llama_cpp_speed(path, result: SpeedResult, *, n_batch: int, n_ubatch: int, flash_attn: bool, seed: int) -> SpeedResult:
    """pp and tg of a GGUF, exactly llama-bench's procedure, with the peak memory of the whole run."""
    result.backend, result.n_batch, result.n_ubatch = "llama.cpp", n_batch, n_ubatch
    tests = _LlamaBenchTests(path, result, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn, seed=seed)
    with _PeakSampler(result.device == "cuda") as mem:
        for test in ("pp", "tg"):
            tests.run(test)
    result.peak_rss_bytes, result.peak_vram_bytes = mem.rss(), mem.vram()
    return result


def _torch_speed(path, kind: str, result: SpeedResult, *, seed: int) -> SpeedResult:
    import torch

    from edgequant.bench.backends import TorchBackend

    gen = torch.Generator().manual_seed(seed)
    result.backend = "torch"
    cuda = result.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with _PeakSampler(cuda) as mem:
        t0 = time.perf_counter()
        b = TorchBackend(path, device=result.device, threads=result.threads, kind=kind)
        result.load_seconds = round(time.perf_counter() - t0, 3)
        model, dev, n_vocab = b.model, b.device, b.info.n_vocab
        try:
            def prompt() -> float:
                ids = torch.randint(n_vocab, (1, result.pp), generator=gen)
                if b.info.add_bos:
                    ids[0, 0] = b.info.bos_id
                ids = ids.to(dev)
                sync()
                t = time.perf_counter()
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                return time.perf_counter() - t

            def generate(n: int) -> float:
                tok = torch.tensor([[b.info.bos_id if b.info.add_bos else 0]], device=dev)
                nxt = torch.randint(n_vocab, (n,), generator=gen).tolist()
                past = None
                sync()
                t = time.perf_counter()
                with torch.inference_mode():
                    for i in range(n):
                        out = model(input_ids=tok, past_key_values=past, use_cache=True)
                        past = out.past_key_values
                        sync()
                        tok = torch.tensor([[nxt[i]]], device=dev)
                return time.perf_counter() - t

            if result.pp:
                prompt()
                result.pp_tps, result.pp_std = _mean_std(result.pp, [prompt() for _ in range(result.reps)])
            if result.tg:
                generate(1)
                result.tg_tps, result.tg_std = _mean_std(result.tg, [generate(result.tg) for _ in range(result.reps)])
        finally:
            b.close()
    result.peak_rss_bytes, result.peak_vram_bytes = mem.rss(), mem.vram()
    return result



def _isolated(path: str | Path, kwargs: dict) -> SpeedResult:
    import json
    import subprocess
    import sys

    from edgequant.errors import EdgequantError

    cmd = [sys.executable, "-m", "edgequant.bench.speed", str(path), json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:  # killed by a signal: a crash inside llama.cpp or torch, not a bad input
        raise EdgequantError(f"speed test of {Path(path).name} crashed (signal {-proc.returncode}); if llama.cpp "
                             f"crashed on this CPU, retry with --repack off (docs/cpu.md)")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgequantError(f"speed test of {Path(path).name} failed ({tail})")
    return SpeedResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":  # one isolated measurement: python -m edgequant.bench.speed PATH JSON_KWARGS
    import json
    import sys

    from edgequant.progress import quiet_libraries

    quiet_libraries()
    # peak RSS is sampled from /proc/self/statm: ru_maxrss would start at the parent's RSS at fork time
    print(json.dumps(measure_speed(sys.argv[1], **json.loads(sys.argv[2])).to_dict()))
