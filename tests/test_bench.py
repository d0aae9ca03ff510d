"""edgequant bench: perplexity and KLD equal to llama-perplexity's, HF rows, speed rows, reports, errors."""

from __future__ import annotations

import csv
import io
import json

import jsonschema
import pytest
from typer.testing import CliRunner

from edgequant.bench import backends, report, speed
from edgequant.bench.perplexity import gguf_perplexity
from edgequant.bench.run import BenchOptions, run_bench
from edgequant.text import builtin_text
from edgequant.cli import app
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.llamacpp_tools import parse_perplexity, run_tool
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize

runner = CliRunner()

# The references are llama.cpp's own tools, built from the sdist of the installed llama-cpp-python
# (edgequant.llamacpp_tools: same commit) and run live on this host, on llama-cpp-python's own
# libraries and with edgequant's weight-buffer policy (docs/cpu.md): the same kernels on both
# sides. The kernels differ by CPU and by repacking (Q4_K_M KLD 0.054730 on one host, 0.054239 on
# another), so no number from another machine is pinned here.
#   llama-perplexity -m SmolLM2-F16.gguf -f pydoc.txt -c 512 --chunks 4 -t 2
#   llama-perplexity -m SmolLM2-F16.gguf -f pydoc.txt -c 512 --chunks 4 -t 2 --kl-divergence-base base.kld
#   llama-perplexity -m SmolLM2-F16-<TYPE>.gguf -c 512 -t 2 --kl-divergence-base base.kld --kl-divergence
KLD_TYPES = ("Q8_0", "Q4_K_M", "Q2_K")


@pytest.fixture(scope="module")
def smol_f16(tmp_path_factory, smollm2_hf_dir):
    return convert(smollm2_hf_dir, tmp_path_factory.mktemp("ppl"), outtype="f16").files[0]


@pytest.fixture(scope="module")
def smol_quants(smol_f16):
    results = quantize(smol_f16, list(KLD_TYPES), None, QuantizeOptions())
    return {r.type: r.files[0] for r in results}


@pytest.fixture(scope="module")
def pydoc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text(builtin_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tool_ppl(llama_tools, smol_f16, pydoc_file):
    """llama-perplexity's own output on the F16 file, run now on this host."""
    return parse_perplexity(run_tool("llama-perplexity", "-m", str(smol_f16), "-f", str(pydoc_file), "-c", "512",
                                     "--chunks", "4", "-t", "2"))


@pytest.fixture(scope="module")
def tool_kld(llama_tools, smol_f16, smol_quants, pydoc_file, tmp_path_factory):
    """llama-perplexity --kl-divergence on each quantized file against the F16 file's saved logits."""
    base = tmp_path_factory.mktemp("kld") / "base.kld"
    run_tool("llama-perplexity", "-m", str(smol_f16), "-f", str(pydoc_file), "-c", "512", "--chunks", "4", "-t", "2",
             "--kl-divergence-base", str(base))
    return {t: parse_perplexity(run_tool("llama-perplexity", "-m", str(f), "-c", "512", "-t", "2",
                                         "--kl-divergence-base", str(base), "--kl-divergence"))
            for t, f in smol_quants.items()}


@pytest.mark.slow
def test_perplexity_equals_llama_perplexity(smol_f16, pydoc_file, tool_ppl):
    r = gguf_perplexity(smol_f16, pydoc_file, ctx=512, chunks=4, threads=2)
    assert len(tool_ppl["running_ppl"]) == 4 and tool_ppl["ppl"] > 1
    assert round(r.ppl, 4) == tool_ppl["ppl"]  # the printed digits
    assert round(r.ppl_error, 5) == pytest.approx(tool_ppl["ppl_error"], abs=1.01e-5)
    assert [round(x, 4) for x in r.running_ppl] == tool_ppl["running_ppl"]
    assert r.scored_tokens == 4 * (512 // 2 - 1)


@pytest.mark.slow
def test_flash_attention_off_equals_the_tool_with_fa_off(llama_tools, smol_f16, pydoc_file):
    r = gguf_perplexity(smol_f16, pydoc_file, ctx=512, chunks=1, threads=2, flash_attn=False)
    assert r.chunks == 1 and r.scored_tokens == 255  # --chunks 1 scores one chunk, as llama-perplexity does
    tool = parse_perplexity(run_tool("llama-perplexity", "-m", str(smol_f16), "-f", str(pydoc_file), "-c", "512",
                                     "--chunks", "1", "-t", "2", "-fa", "off"))
    assert round(r.ppl, 4) == tool["ppl"]
    on = gguf_perplexity(smol_f16, pydoc_file, ctx=512, chunks=1, threads=2)
    assert on.ppl != r.ppl  # LLAMACPP_FACTS: flash attention changes the fourth decimal (17.7503 vs 17.7495 on one host)


@pytest.mark.slow
def test_kld_equals_llama_perplexity_kl_divergence(smol_f16, smol_quants, pydoc_file, tool_ppl, tool_kld):
    rep = run_bench([smol_f16, *smol_quants.values()],
                    BenchOptions(text=pydoc_file, ctx=512, chunks=4, threads=2, speed=False))
    assert rep.reference == str(smol_f16) and rep.chunks == 4  # the F16 file is picked as the reference
    rows = {r.type: r.quality for r in rep.rows}
    assert round(rows["F16"]["ppl"], 4) == tool_ppl["ppl"]
    for qtype, tool in tool_kld.items():
        q = rows[qtype]  # equal to the printed digits (the last one may differ by float32 rounding)
        six, pct = dict(abs=1.01e-6), dict(abs=1.01e-3)
        assert 0 < tool["kld_mean"] < 1, (qtype, tool)
        for key in ("kld_mean", "kld_p99", "kld_median", "kld_p999", "kld_max", "ln_ppl_ratio"):
            assert q[key] == pytest.approx(tool[key], **six), (qtype, key)
        for key in ("delta_p_mean", "delta_p_rms", "same_top"):  # printed in percent with 3 decimals
            assert 100 * q[key] == pytest.approx(tool[key], **pct), (qtype, key)


@pytest.mark.slow
def test_kld_against_the_hf_checkpoint_orders_the_quants(smollm2_hf_dir, smol_f16, smol_quants):
    """Done-means 2: F16 near zero, Q8_0 small, Q4_K_M larger, Q2_K largest, on the same tokens."""
    rep = run_bench([smol_f16, *smol_quants.values()],
                    BenchOptions(reference=smollm2_hf_dir, ctx=512, chunks=2, threads=2, speed=False))
    ref = rep.rows[0]
    assert ref.is_reference and ref.kind == "hf" and ref.type == "bfloat16"
    kld = {r.type: r.quality["kld_mean"] for r in rep.rows[1:]}
    assert kld["F16"] < 1e-3
    assert kld["F16"] < kld["Q8_0"] < 0.01 < kld["Q4_K_M"] < kld["Q2_K"]
    top = {r.type: r.quality["same_top"] for r in rep.rows[1:]}
    assert top["F16"] > 0.99 and top["Q2_K"] < top["Q4_K_M"] < top["Q8_0"]


def test_f32_gguf_matches_its_hf_source_in_the_same_run(tiny_mistral_dir, tmp_path):
    """An HF folder (torch backend) and its F32 GGUF (llama.cpp) scored on one token stream."""
    f32 = convert(tiny_mistral_dir, tmp_path, outtype="f32").files[0]
    rep = run_bench([f32], BenchOptions(reference=tiny_mistral_dir, ctx=64, chunks=3, threads=2, pp=32, tg=8, reps=1))
    hf, gg = rep.rows
    assert hf.kind == "hf" and gg.kind == "gguf"
    assert abs(gg.quality["ppl"] - hf.quality["ppl"]) / hf.quality["ppl"] < 1e-5
    assert gg.quality["kld_mean"] < 1e-5 and gg.quality["same_top"] == 1.0
    for row, backend in ((hf, "torch"), (gg, "llama.cpp")):
        (s,) = row.speed
        assert s.backend == backend and s.device == "cpu" and s.absent is None
        assert s.pp_tps > 0 and s.tg_tps > 0 and s.load_seconds >= 0
        assert 50e6 < s.peak_rss_bytes < 2e9  # the measuring process's own peak, not its parent's


def test_speed_like_llama_bench(tiny_llama_dir, tmp_path):
    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    r = speed.measure_speed(f16, threads=2, pp=64, tg=16, reps=3)
    assert r.backend == "llama.cpp" and r.reps == 3 and r.n_batch == 2048 and r.n_ubatch == 512
    assert r.pp_tps > 0 and r.tg_tps > 0 and r.pp_std >= 0 and r.tg_std >= 0


def test_device_selection(monkeypatch, tiny_llama_dir, tmp_path):
    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    assert backends.parse_devices("cpu,CUDA,cpu") == ["cpu", "cuda"]
    with pytest.raises(EdgequantError, match="use cpu, cuda"):
        backends.parse_devices("tpu")
    # This machine has no CUDA: asking for it fails before any work, with the reason.
    if backends.cuda_absent_reason("gguf") and backends.cuda_absent_reason("hf"):
        with pytest.raises(EdgequantError, match="CUDA is not available here"):
            run_bench([f16], BenchOptions(devices="cpu,cuda", speed=True, quality=False))
        r = speed.measure_speed(f16, device="cuda", pp=8, tg=2, reps=1)
        assert r.absent and r.pp_tps is None and r.tg_tps is None  # never CPU numbers under a GPU label
    # CUDA usable by torch but llama-cpp-python built for CPU only: a mixed run goes on, and the
    # GGUF's cuda row says why it is absent.
    from edgequant.bench import run as run_mod

    reason = lambda kind: "built without GPU offload" if kind == "gguf" else None  # noqa: E731
    for module in (backends, speed, run_mod):
        monkeypatch.setattr(module, "cuda_absent_reason", reason)
    assert run_mod._check_devices(["cpu", "cuda"], {"gguf", "hf"}, quality=True) == "cpu"
    assert run_mod._check_devices(["cuda"], {"hf"}, quality=True) == "cuda"
    with pytest.raises(EdgequantError, match="cannot use CUDA"):  # quality on CUDA alone needs every model there
        run_mod._check_devices(["cuda"], {"gguf", "hf"}, quality=True)
    with pytest.raises(EdgequantError, match="CUDA is not available here"):  # nothing here can use CUDA
        run_mod._check_devices(["cpu", "cuda"], {"gguf"}, quality=False)
    cuda = speed.measure_speed(f16, device="cuda", pp=16, tg=4, reps=1)
    assert cuda.device == "cuda" and cuda.absent == "built without GPU offload" and cuda.pp_tps is None
    rep = run_bench([f16], BenchOptions(devices="cpu", quality=False, pp=16, tg=4, reps=1, threads=2))
    rep.rows[0].speed.append(cuda)
    rows = report.flat_rows(rep)
    assert [r["device"] for r in rows] == ["cpu", "cuda"] and rows[0]["pp_tps"] > 0 and rows[1]["pp_tps"] is None
    md = report.to_markdown(rep)
    assert "| absent | absent |" in md and "on cuda: absent (built without GPU offload)" in md


def test_bench_cli_outputs(smol_f16, smol_quants, tmp_path):
    out_md, png = tmp_path / "bench.md", tmp_path / "quality.png"
    res = runner.invoke(app, ["bench", smol_f16, smol_quants["Q4_K_M"], "--ctx", "128", "--chunks", "2", "--pp", "32",
                              "--tg", "4", "--reps", "1", "--threads", "2", "--json", "-o", str(out_md), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    schema = json.loads(runner.invoke(app, ["bench", "--json-schema"]).stdout)
    jsonschema.validate(data, schema)
    ref, q4 = data["rows"]
    assert ref["is_reference"] and q4["quality"]["chunks"] == 2 and q4["quality"]["kld_mean"] > 0
    assert q4["speed"][0]["tg"] == 4 and q4["speed"][0]["pp_tps"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert out_md.read_text().startswith("{")  # --json with -o writes JSON
    csv_out = runner.invoke(app, ["bench", smol_quants["Q8_0"], "--speed-only", "--pp", "16", "--tg", "2", "--reps", "1",
                                  "--format", "csv"])
    assert csv_out.exit_code == 0, csv_out.output
    (row,) = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert row["type"] == "Q8_0" and float(row["pp_tps"]) > 0 and row["ppl"] == ""
    md = runner.invoke(app, ["bench", smol_quants["Q8_0"], "--quality-only", "--ctx", "128", "--chunks", "2", "--format", "md"])
    assert md.exit_code == 0 and md.stdout.startswith("| model |") and "Q8_0" in md.stdout


def test_bench_errors(smol_f16, tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    other = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    for args, expect in (
        (["bench", smol_f16, "--text", str(short)], "fewer than 2 chunks"),
        (["bench", str(tmp_path / "missing.gguf")], "does not exist"),
        (["bench", str(tmp_path)], "no config.json"),
        (["bench", smol_f16, "--text", str(tmp_path / "nope.txt")], "does not exist"),
        (["bench", smol_f16, "--ctx", "7"], "even context"),
        (["bench", smol_f16, "--chunks", "0"], "--chunks 0"),
        (["bench", smol_f16, other, "--quality-only", "--ctx", "64", "--chunks", "2"], "vocabulary"),
        (["bench", smol_f16, "--device", "cuda"], "CUDA"),
        (["bench", smol_f16, "--format", "xml"], "--format xml"),
        (["bench", smol_f16, "--speed-only", "--quality-only"], "nothing to measure"),
        (["bench"], "at least one"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert expect in " ".join(r.stderr.split()), (args, r.stderr)


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.5, 3.0)]
    assert report.pareto_front(pts) == [0, 1, 3]
