"""llama.cpp on every CPU: the weight-buffer policy (AMX), loading through it, quiet logs, crash isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgequant import llamacpp
from edgequant.errors import EdgequantError
from edgequant.llamacpp import decide_repack

AVX512 = {"avx2", "avx512f", "avx512_vnni"}
SPR = AVX512 | {"amx_int8", "amx_tile", "amx_bf16"}  # Sapphire Rapids and newer
ROOT = Path(__file__).resolve().parent.parent


# --- the pure decision, every case -------------------------------------------------------------

def test_auto_without_amx_keeps_llama_cpp_default():
    p = decide_repack(mode="auto", cpu_flags=AVX512, extra_buffers=("CPU_REPACK",))
    assert p.repack is True and p.amx_cpu is False and p.amx_active is False and "no AMX" in p.reason


def test_auto_with_active_amx_backend_turns_extra_buffers_off():
    p = decide_repack(mode="auto", cpu_flags=SPR, extra_buffers=("AMX", "CPU_REPACK"))
    assert p.repack is False and p.amx_cpu and p.amx_active and "#20824" in p.reason


def test_auto_amx_cpu_but_build_without_amx_keeps_repack():
    # e.g. llama-cpp-python built with GGML_NATIVE=OFF and explicit AVX-512 flags (docs/cpu.md)
    p = decide_repack(mode="auto", cpu_flags=SPR, extra_buffers=("CPU_REPACK",))
    assert p.repack is True and p.amx_cpu and p.amx_active is False


def test_auto_build_with_amx_on_cpu_without_amx_keeps_repack():
    # ggml offers the AMX buffer only where the CPU grants AMX; the compiled-in flag alone is not enough
    p = decide_repack(mode="auto", cpu_flags=AVX512, extra_buffers=None, build_features={"AVX2", "AMX_INT8"})
    assert p.repack is True and p.amx_active is False


def test_auto_unknown_buffers_falls_back_to_build_features():
    on_spr = decide_repack(mode="auto", cpu_flags=SPR, extra_buffers=None, build_features={"AVX512", "AMX_INT8"})
    assert on_spr.repack is False and on_spr.amx_active is True
    no_amx_build = decide_repack(mode="auto", cpu_flags=SPR, extra_buffers=None, build_features={"AVX512", "REPACK"})
    assert no_amx_build.repack is True and no_amx_build.amx_active is False


def test_auto_nothing_known_on_an_amx_cpu_is_safe():
    p = decide_repack(mode="auto", cpu_flags=SPR, extra_buffers=None, build_features=())
    assert p.repack is False and p.amx_active is None and "unknown" in p.reason
    q = decide_repack(mode="auto", cpu_flags=AVX512, extra_buffers=None, build_features=())
    assert q.repack is True


def test_forced_modes_override_everything():
    for cpu, bufs in ((SPR, ("AMX", "CPU_REPACK")), (AVX512, ("CPU_REPACK",)), (set(), None)):
        on = decide_repack(mode="on", cpu_flags=cpu, extra_buffers=bufs)
        off = decide_repack(mode="off", cpu_flags=cpu, extra_buffers=bufs)
        assert on.repack is True and on.mode == "on" and off.repack is False and off.mode == "off"
    risky = decide_repack(mode="on", cpu_flags=SPR, extra_buffers=("AMX",))
    assert "may crash" in risky.reason


def test_mode_spellings_and_errors():
    assert [llamacpp.parse_mode(v) for v in (None, "", "AUTO", "1", "true", "0", "no", " off ")] == \
        ["auto", "auto", "auto", "on", "on", "off", "off", "off"]
    with pytest.raises(EdgequantError, match="use auto, on or off"):
        llamacpp.parse_mode("amx")
    with pytest.raises(EdgequantError, match="use auto, on or off"):
        decide_repack(mode="sometimes", cpu_flags=set(), extra_buffers=None)


def test_cpu_flags_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx2 amx_int8 amx_tile\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert llamacpp.cpu_flags(x86) == {"fpu", "avx2", "amx_int8", "amx_tile"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert llamacpp.cpu_flags(arm) == {"fp", "asimd", "sve"}
    assert llamacpp.cpu_flags(tmp_path / "missing") == frozenset()


# --- this host ---------------------------------------------------------------------------------

def test_this_hosts_policy_is_consistent():
    bufs = llamacpp.extra_buffer_types()
    assert bufs is not None, "ggml's extra buffer types could not be read"
    feats = llamacpp.build_features()
    assert feats, "llama_print_system_info gave no features"
    amx_cpu = "amx_int8" in llamacpp.cpu_flags()
    if "AMX" in bufs:
        assert amx_cpu and "AMX_INT8" in feats
    p = llamacpp.repack_policy()
    if os.environ.get(llamacpp.ENV_REPACK) in (None, "", "auto"):
        assert p.repack == ("AMX" not in bufs)
    assert json.loads(json.dumps(p.to_dict()))["repack"] == p.repack


def test_open_llama_applies_the_policy(tiny_llama_dir, tmp_path, monkeypatch):
    from edgequant.export.convert import convert

    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    for mode, expect in (("off", False), ("on", True)):
        monkeypatch.setenv(llamacpp.ENV_REPACK, mode)
        llamacpp.repack_policy.cache_clear()
        llm = llamacpp.open_llama(f16, n_ctx=32, n_threads=2)
        try:
            assert llm.model_params.use_extra_bufts is expect
        finally:
            llm.close()
    llamacpp.repack_policy.cache_clear()
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts is True  # nothing left patched


@pytest.mark.slow
def test_quantized_files_decode_through_edgequants_loader(smollm2_hf_dir, tmp_path):
    """Q8_0 and Q4_K_M (the types ggml's AMX kernel crashed on) decode through edgequant's own paths:
    the bench backend (logits) and the speed test."""
    import numpy as np

    from edgequant.bench.backends import LlamaCppBackend
    from edgequant.bench.speed import measure_speed
    from edgequant.export.convert import convert
    from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

    f16 = convert(smollm2_hf_dir, tmp_path, outtype="f16").files[0]
    files = {r.type: r.files[0] for r in quantize(f16, ["Q8_0", "Q4_K_M"], tmp_path, QuantizeOptions())}
    ref = LlamaCppBackend(f16, ctx=64, threads=2)
    ids = ref.tokenize("The Python language is a programming language that lets you work quickly.")[:32]
    want = ref.logits(ids, 0)
    ref.close()
    for qtype, path in files.items():
        b = LlamaCppBackend(path, ctx=64, threads=2)
        try:
            assert b.llm.model_params.use_extra_bufts is llamacpp.repack_policy().repack
            got = b.logits(ids, 0)
        finally:
            b.close()
        assert got.shape == want.shape and np.isfinite(got).all()
        agree = (got.argmax(-1) == want.argmax(-1)).mean()
        assert agree > 0.7, (qtype, agree)
        s = measure_speed(path, threads=2, pp=32, tg=4, reps=1)
        assert s.pp_tps > 0 and s.tg_tps > 0


def test_vocab_only_loads_print_nothing(tiny_llama_dir, tmp_path):
    """llama.cpp's loader lines (n_ctx_seq > n_ctx_train ...) stay out of the terminal unless --verbose."""
    from edgequant.export.convert import convert

    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    code = textwrap.dedent(f"""
        from edgequant.llamacpp import open_llama
        from edgequant.release.template_gate import _gguf_formatter
        _gguf_formatter({str(f16)!r})
        llm = open_llama({str(f16)!r}, n_ctx=512, n_threads=2)
        llm.eval(llm.tokenize(b"hello world"))
        llm.close()
    """)
    env = {k: v for k, v in os.environ.items() if k != llamacpp.ENV_VERBOSE}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "llama_" not in quiet.stderr + quiet.stdout, quiet.stderr[-2000:]
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, llamacpp.ENV_VERBOSE: "1"}, cwd=ROOT)
    assert loud.returncode == 0 and "llama_" in loud.stderr  # --verbose shows them


def test_bench_json_says_which_policy(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from edgequant.cli import app
    from edgequant.export.convert import convert

    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    r = CliRunner().invoke(app, ["bench", str(f16), "--speed-only", "--pp", "16", "--tg", "2", "--reps", "1",
                                 "--threads", "2", "--repack", "off", "--json"])
    try:
        assert r.exit_code == 0, r.output
        bufs = json.loads(r.stdout)["host"]["llama_cpp_buffers"]
        assert bufs["repack"] is False and bufs["mode"] == "off" and bufs["reason"] == "forced off"
        table = CliRunner().invoke(app, ["bench", str(f16), "--speed-only", "--pp", "16", "--tg", "2", "--reps", "1",
                                         "--threads", "2"])
        # rich wraps the caption at the terminal's width, wherever the host's CPU name puts the break
        assert table.exit_code == 0 and "llama.cpp weight repacking off (forced off)" in " ".join(table.stdout.split())
        bad = CliRunner().invoke(app, ["bench", str(f16), "--speed-only", "--repack", "maybe"])
        assert bad.exit_code == 2 and "use auto, on or off" in bad.output
    finally:
        os.environ.pop(llamacpp.ENV_REPACK, None)
        llamacpp.repack_policy.cache_clear()


# --- a crash is one failed test, not a dead suite ----------------------------------------------

def test_a_crashing_test_is_reported_and_the_rest_still_run(tmp_path):
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import os, signal

        def test_before():
            pass

        def test_segfaults():
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_after():
            pass
    """))
    # the project's own pytest configuration (pyproject.toml), on a folder of its own
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "1 failed, 2 passed" in out, out
    assert "test_segfaults" in out and "crashed" in out, out


def test_vendored_files_come_from_the_runtime_sdist():
    """Test material of exactly the runtime's llama.cpp (vocab GGUFs, templates), taken from its sdist once."""
    from edgequant.errors import EdgequantError
    from edgequant.gguf_info import inspect_gguf
    from edgequant.llamacpp_tools import vendored

    vocab = vendored("models/ggml-vocab-qwen2.gguf")
    assert inspect_gguf(vocab).metadata["tokenizer.ggml.pre"] == "qwen2"
    assert vendored("models/ggml-vocab-qwen2.gguf") == vocab  # cached
    with pytest.raises(EdgequantError, match="has no vendor/llama.cpp/models/nope.gguf"):
        vendored("models/nope.gguf")
