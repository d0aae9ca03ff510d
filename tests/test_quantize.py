"""quantize and imatrix: every catalogue type from llama.cpp's own quantizer, run by llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.quantize.to_quant import convert as convert_any
from edgequant.gguf_info import inspect_gguf
from edgequant.quantize import types as qtypes
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from edgequant.quantize.imatrix import compute_imatrix
from edgequant.quantize.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from edgequant.llamacpp import open_llama
from llama_helpers import hf_tokenizer, llama, llama_logits

runner = CliRunner()
LEGACY_32 = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]


def test_catalogue_matches_llama_cpp():
    names = [t.name for t in qtypes.CATALOGUE]
    assert len(names) == len(set(names))
    for t in qtypes.CATALOGUE:
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{t.ftype.name}") == int(t.ftype)
    assert qtypes.get("q4_k").name == "Q4_K_M"
    with pytest.raises(EdgequantError, match="Q4_K_M"):
        qtypes.get("Q4_K_XL")
    wanted = {"Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
              "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
              "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "F16", "BF16"}
    assert wanted <= set(names)


def _uniform(m: Imatrix) -> Imatrix:
    """The same entries with every column weighted 1: what an imatrix-requiring type gets "without" one."""
    return Imatrix(entries={n: ImatrixEntry(sums=np.repeat(e.counts[:, None], e.n_cols, 1).astype(np.float32), counts=e.counts)
                            for n, e in m.entries.items()}, datasets=["uniform"], chunk_count=m.chunk_count, chunk_size=m.chunk_size)


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_hf_dir):
    """SmolLM2 F16 GGUF, an imatrix of it, and every catalogue type made from them."""
    d = tmp_path_factory.mktemp("smol")
    f16 = Path(convert(smollm2_hf_dir, d, outtype="f16").files[0])
    im = d / "imatrix.gguf"
    compute_imatrix(smollm2_hf_dir, im, ctx=256, chunks=6)
    uniform = write_imatrix(_uniform(read_imatrix(im)), d / "uniform.gguf")
    plain = [t.name for t in qtypes.CATALOGUE if not t.needs_imatrix and t.name != "F16"]
    results = {r.type: r for r in quantize(f16, plain, d / "plain")}
    results |= {r.type: r for r in quantize(f16, [t.name for t in qtypes.CATALOGUE if t.needs_imatrix], d / "imat",
                                            QuantizeOptions(imatrix=im))}
    with_imatrix = {f"{r.type}+imatrix": r for r in quantize(f16, ["Q2_K"], d / "imat", QuantizeOptions(imatrix=im))}
    with_imatrix |= {f"{r.type}+uniform": r for r in quantize(f16, ["IQ3_XXS"], d / "uniform", QuantizeOptions(imatrix=uniform))}
    return {"f16": f16, "imatrix": im, "results": results, "with_imatrix": with_imatrix, "dir": d}


@pytest.mark.slow
def test_every_type_loads_and_generates(smol, smollm2_hf_dir):
    results = smol["results"]
    assert set(results) == {t.name for t in qtypes.CATALOGUE} - {"F16"}
    prompt = hf_tokenizer(str(smollm2_hf_dir)).encode("The Python language is")
    for name, r in results.items():
        info = inspect_gguf(r.files[0])
        assert info.file_type == name, (name, info.file_type)
        assert not list(Path(r.files[0]).parent.glob("*.part"))
        llm = open_llama(r.files[0], n_ctx=32, n_batch=32, n_threads=2)
        try:
            generated = [t for _, t in zip(range(3), llm.generate(prompt, temp=0.0))]
            n_vocab = llm.n_vocab()
        finally:
            llm.close()
        assert len(generated) == 3 and all(0 <= t < n_vocab for t in generated), name


@pytest.mark.slow
def test_fallbacks_are_reported_for_576_wide_rows(smol):
    r = smol["results"]["Q4_K_M"]
    assert r.fallbacks, "SmolLM2's 576-wide rows cannot hold 256-blocks: llama.cpp falls back and we must say so"
    fb = r.fallbacks[0]
    assert fb.ncols == 576 and fb.wanted == "q4_K"
    info = inspect_gguf(r.files[0])
    assert info.type_counts.get("Q5_0", 0) > 0  # what llama.cpp used instead
    assert not smol["results"]["Q8_0"].fallbacks


@pytest.mark.slow
@pytest.mark.parametrize("name", LEGACY_32)
def test_size_matches_bits_per_weight_when_blocks_fit(name, smol, tmp_path):
    """With --pure every matrix gets the base type; 576 is a multiple of 32, so bpw is the type's own."""
    (r,) = quantize(smol["f16"], [name], tmp_path, QuantizeOptions(pure=True))
    nominal = qtypes.get(name).bpw
    assert not r.fallbacks
    assert nominal <= r.bits_per_weight <= nominal * 1.01, (name, r.bits_per_weight, nominal)


def _logsoftmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
def test_quality_ordered_by_bits_and_imatrix_helps(smol, smollm2_hf_dir):
    """KL divergence against the F16 file, on text far from the imatrix's calibration chunks.

    SmolLM2's 576-wide rows send most tensors of the k-quant mixes to legacy fallbacks (Q4_K ->
    Q5_0, Q5_K -> Q5_1), and the fixture's weights are a dequantized Q4_1 checkpoint, so Q5_K_M
    (mostly Q5_1) measures slightly worse than Q4_K_M (mostly Q5_0) here; both sit between Q6_K
    and Q3_K_M. docs/quantize.md records the numbers.
    """
    from pydoc_data.topics import topics

    tok = hf_tokenizer(str(smollm2_hf_dir))
    chunks = [tok.encode(topics["specialnames"][20000:26000])[:512], tok.encode(topics["types"][5000:11000])[:512]]
    refs = [_logsoftmax(llama_logits(smol["f16"], ids)) for ids in chunks]

    def kld(path) -> float:
        return float(np.mean([(np.exp(r) * (r - _logsoftmax(llama_logits(path, ids)))).sum(-1).mean() for r, ids in zip(refs, chunks)]))

    k = {n: kld(smol["results"][n].files[0]) for n in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")}
    assert k["Q8_0"] < k["Q6_K"] < min(k["Q5_K_M"], k["Q4_K_M"]) <= max(k["Q5_K_M"], k["Q4_K_M"]) < k["Q3_K_M"] < k["Q2_K"], k
    w = smol["with_imatrix"]
    assert kld(w["Q2_K+imatrix"].files[0]) < 0.85 * k["Q2_K"]
    assert kld(smol["results"]["IQ3_XXS"].files[0]) < 0.9 * kld(w["IQ3_XXS+uniform"].files[0])


def test_imatrix_format_and_moe_counts(tiny_mixtral_dir, tmp_path):
    path = tmp_path / "imatrix.gguf"
    r = compute_imatrix(tiny_mixtral_dir, path, ctx=64, chunks=3, engine="torch")  # its layout: no router entry
    m = read_imatrix(path)
    cfg = json.loads((tiny_mixtral_dir / "config.json").read_text())
    n_exp, top_k, n_layer = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    assert r.chunks == 3 and m.chunk_count == 3 and m.chunk_size == 64
    assert len(m.entries) == n_layer * 7  # q k v o + 3 expert stacks
    e = m.entries["blk.0.ffn_down_exps.weight"]
    assert e.sums.shape == (n_exp, cfg["intermediate_size"])
    assert e.counts.sum() == 3 * 64 * top_k  # each token counted once per expert it was routed to
    assert m.entries["blk.0.attn_q.weight"].counts.tolist() == [3 * 64]
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    t = {t.name: t for t in reader.tensors}
    assert list(t["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [cfg["intermediate_size"], n_exp]
    assert list(t["blk.0.ffn_down_exps.weight.counts"].shape) == [1, n_exp]


def test_imatrix_quantizes_moe_iq_types(tiny_mixtral_dir, tmp_path):
    f16 = convert(tiny_mixtral_dir, tmp_path, outtype="f16").files[0]
    im = tmp_path / "im.gguf"
    compute_imatrix(tiny_mixtral_dir, im, ctx=64, chunks=2)
    (r,) = quantize(f16, ["IQ2_XS"], tmp_path, QuantizeOptions(imatrix=im))
    assert r.fallbacks  # 128-wide rows: every 256-block type falls back, reported
    with llama(r.files[0]) as llm:
        llm.eval(hf_tokenizer(str(tiny_mixtral_dir)).encode("hello world"))


def _fails(args, expect):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expect in " ".join(result.stderr.split()), result.stderr


def test_bad_input(tiny_mistral_dir, tiny_mixtral_dir, tmp_path):
    f16 = convert(tiny_mistral_dir, tmp_path / "m", outtype="f16").files[0]
    out = tmp_path / "out"
    _fails(["quantize", f16, "Q4_K_XL", "-o", str(out)], "valid: F32, F16")
    _fails(["quantize", f16, "IQ2_XS", "-o", str(out)], "edgequant imatrix")
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    _fails(["quantize", str(junk), "Q4_K_M", "-o", str(out)], "not a GGUF")
    _fails(["quantize", str(tmp_path / "missing.gguf"), "Q4_K_M", "-o", str(out)], "does not exist")
    q8 = convert(tiny_mistral_dir, tmp_path / "q8", outtype="q8_0").files[0]
    _fails(["quantize", q8, "Q4_K_M", "-o", str(out)], "already quantized")
    other = tmp_path / "other.gguf"
    compute_imatrix(tiny_mixtral_dir, other, ctx=64, chunks=1)
    _fails(["quantize", f16, "IQ2_XS", "--imatrix", str(other), "-o", str(out)], "made for another model")
    _fails(["quantize", f16, "Q4_K_M", "--tensor-type", "attn_v", "-o", str(out)], "PATTERN=TYPE")
    _fails(["quantize", f16, "Q4_K_M", "--token-embedding-type", "q4_k", "-o", str(out)], "would abort")
    _fails(["convert", str(tiny_mistral_dir), "--outtype", "IQ2_XS", "-o", str(out)], "convert to F16 first")
    _fails(["quantize", f16, "Q4_K_M", "--imatrix", f16, "-o", str(out)], "not an importance matrix")
    assert not out.exists() or not list(out.iterdir())


def test_options_and_convert_to_kquant(tiny_mistral_dir, tmp_path):
    f16 = convert(tiny_mistral_dir, tmp_path, outtype="f16").files[0]
    with pytest.raises(EdgequantError, match="would abort"):  # 128-wide rows cannot hold Q6_K's 256-blocks
        quantize(f16, ["Q4_0"], tmp_path / "o", QuantizeOptions(output_tensor_type="q6_k"))
    (fb,) = quantize(f16, ["Q8_0"], tmp_path / "fb", QuantizeOptions(tensor_types=["attn_q=q4_k"]))
    assert {f.tensor for f in fb.fallbacks} == {"blk.0.attn_q.weight", "blk.1.attn_q.weight"}  # llama.cpp's fallback, reported
    (r,) = quantize(f16, ["Q4_0"], tmp_path / "o", QuantizeOptions(tensor_types=[r"attn_v=q8_0"], output_tensor_type="q5_0",
                                                                      token_embedding_type="q8_0"))
    types = {t.name: t.type for t in inspect_gguf(r.files[0]).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "Q5_0"
    (r2,) = quantize(f16, ["Q4_0"], tmp_path / "leave", QuantizeOptions(leave_output_tensor=True))
    assert {t.name: t.type for t in inspect_gguf(r2.files[0]).tensors}["output.weight"] == "F16"
    stale = tmp_path / "direct" / ".edgequant-tmp-999999999"  # left by a run killed with SIGKILL
    stale.mkdir(parents=True)
    (stale / "model-F16.gguf").write_bytes(b"partial")
    result = convert_any(tiny_mistral_dir, tmp_path / "direct", outtype="Q4_K_M")
    assert result.outtype == "Q4_K_M" and result.files[0].endswith("-Q4_K_M.gguf")
    assert [p.name for p in (tmp_path / "direct").iterdir()] == [Path(result.files[0]).name]  # temp F16 removed
    with llama(result.files[0]) as llm:
        llm.eval(hf_tokenizer(str(tiny_mistral_dir)).encode("hello"))


def test_convert_to_kquant_keeps_the_split(tiny_mixtral_dir, tmp_path):
    result = convert_any(tiny_mixtral_dir, tmp_path, outtype="Q4_0", split_max_tensors=8)
    assert len(result.files) >= 3 and result.files[0].endswith(f"-Q4_0-00001-of-{len(result.files):05d}.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(f).name for f in result.files)
    with llama(result.files[0]) as llm:
        llm.eval(hf_tokenizer(str(tiny_mixtral_dir)).encode("hello"))


def test_keep_split(tiny_mixtral_dir, tmp_path):
    shards = convert(tiny_mixtral_dir, tmp_path / "split", outtype="f16", split_max_tensors=8).files
    assert len(shards) >= 3
    (kept,) = quantize(shards[0], ["Q8_0"], tmp_path / "kept", QuantizeOptions(keep_split=True))
    assert len(kept.files) == len(shards) and kept.files[0].endswith(f"-Q8_0-00001-of-{len(shards):05d}.gguf")
    (single,) = quantize(shards[0], ["Q8_0"], tmp_path / "single")
    assert len(single.files) == 1
    ids = hf_tokenizer(str(tiny_mixtral_dir)).encode("hello world, again")
    np.testing.assert_array_equal(llama_logits(kept.files[0], ids), llama_logits(single.files[0], ids))
    assert not [p for p in (tmp_path / "kept").iterdir() if p.name.startswith(".")]


def test_cli_quantize_json_and_list(tiny_llama_dir, tmp_path):
    f16 = convert(tiny_llama_dir, tmp_path, outtype="f16").files[0]
    res = runner.invoke(app, ["quantize", f16, "Q8_0", "Q4_0", "-o", str(tmp_path / "q"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["type"] for r in rows] == ["Q8_0", "Q4_0"]
    listed = runner.invoke(app, ["quantize", "--list", "--json"])
    assert {t["name"] for t in json.loads(listed.stdout)} == {t.name for t in qtypes.CATALOGUE}


def test_imatrix_cli_errors(tiny_llama_dir, tmp_path):
    _fails(["imatrix", str(tiny_llama_dir), "-o", str(tmp_path / "i.gguf"), "--device", "cuda"], "no CUDA device")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _fails(["imatrix", str(tiny_llama_dir), "-o", str(tmp_path / "i.gguf"), "--calibration", str(short)], "fewer than 1 chunk of 512")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(["imatrix", str(tiny_llama_dir), "-o", str(tmp_path / "i.gguf"), "--calibration", str(empty)], "is empty")
    assert not (tmp_path / "i.gguf").exists()


def test_llama_quantize_accepts_our_imatrix(tiny_mixtral_dir, tmp_path, llama_tools):
    """llama.cpp's own llama-quantize (built from the same sdist) reads our imatrix."""
    import subprocess

    bin_dir = llama_tools
    f16 = convert(tiny_mixtral_dir, tmp_path, outtype="f16").files[0]
    im = tmp_path / "im.gguf"
    compute_imatrix(tiny_mixtral_dir, im, ctx=64, chunks=2)
    theirs = tmp_path / "theirs.gguf"
    from edgequant.llamacpp_tools import tool_env

    proc = subprocess.run([str(Path(bin_dir) / "llama-quantize"), "--imatrix", str(im), f16, str(theirs), "IQ2_XS"],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ours,) = quantize(f16, ["IQ2_XS"], tmp_path / "ours", QuantizeOptions(imatrix=im))
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours.files[0])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and bytes(ta.data) == bytes(tb.data), ta.name
