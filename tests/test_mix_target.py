"""``edgequant quantize --target-size/--target-bpw/--target-kld`` (edgequant/mix) on a tiny Llama whose rows
fill k-quant blocks: the written file keeps the budget, the saved recipe reproduces it byte for byte through
``quantize --tensor-type-file``, llama.cpp loads and runs every file, a KLD target holds on the measured
KLD, impossible targets are one line."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.gguf_info import KEY_TENSOR_TYPES, inspect_gguf
from edgequant.mix.target import TargetOptions, parse_target, quantize_target
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize, read_tensor_type_file

KQUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
FAST = dict(ctx=128, calibration_chunks=4)


@pytest.fixture(scope="module")
def kq(tmp_path_factory):
    """The F16 GGUF of the k-quant-friendly tiny Llama, its imatrix, and llama.cpp's Q4_K_M of it."""
    from fixtures_mix import tiny_kquant_llama

    from edgequant.export.convert import convert
    from edgequant.quantize.imatrix import compute_imatrix

    d = tmp_path_factory.mktemp("kq")
    f16 = Path(convert(tiny_kquant_llama(), d, outtype="f16").files[0])
    imx = d / "imatrix.gguf"
    compute_imatrix(f16, imx, ctx=128, chunks=8)
    (q4,) = quantize(f16, ["Q4_K_M"], d / "std", QuantizeOptions(imatrix=imx))
    return f16, imx, Path(q4.files[0])


def _generate(path: Path) -> str:
    """A few greedy tokens from llama.cpp on the file."""
    from edgequant.llamacpp import open_llama

    llm = open_llama(path, n_ctx=64)
    try:
        return llm("def main(", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_target_size_keeps_the_budget_and_the_recipe_reproduces_the_file(kq, tmp_path):
    f16, imx, q4 = kq
    budget = q4.stat().st_size
    r = CliRunner().invoke(app, ["quantize", str(f16), "--target-size", str(budget), "--imatrix", str(imx),
                                 "--ctx", "128", "--calibration-chunks", "4", "--max-slowdown", "50",
                                 "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    mix = Path(res["file"])
    assert mix.name == f"{f16.name.removesuffix('-F16.gguf')}-{budget}-mix.gguf"
    assert mix.stat().st_size <= budget and res["size_bytes"] == mix.stat().st_size
    assert res["met"] and res["measured"]["kld_mean"] > 0 and res["predicted_kld"] > 0
    assert res["standard"]["type"] and res["speed"]["mix"]["tg_tps"] > 0 and res["speed"]["standard"]["pp_tps"] > 0
    # k-quants are real candidates on these rows, and something was chosen for every quantizable tensor
    assert KQUANTS & {t.upper() for t in res["tensor_types"].values()}
    assert {c["role"] for c in res["calibration"]["roles"]} >= {"attn_q", "ffn_down", "token_embd", "output"}
    # the recipe: in the file's metadata and beside it; quantize --tensor-type-file gives the same bytes
    entries = read_tensor_type_file(res["tensor_types_file"])
    assert len(entries) == len(res["tensor_types"])
    meta = gguf.GGUFReader(str(mix)).fields[KEY_TENSOR_TYPES].contents()
    assert meta == entries
    again = tmp_path / "again.gguf"
    r2 = CliRunner().invoke(app, ["quantize", str(f16), res["file_type"], "--tensor-type-file", res["tensor_types_file"],
                                  "--imatrix", str(imx), "-o", str(again)])
    assert r2.exit_code == 0, r2.output
    assert again.read_bytes() == mix.read_bytes()
    assert _generate(mix)
    # the bench labels it a mix, not the standard type whose llama_ftype it carries
    from edgequant.bench.run import describe_model

    assert describe_model(mix, "gguf").type == f"{res['file_type']} mix"


def test_target_kld_holds_on_the_measured_kld(kq, tmp_path):
    f16, imx, q4 = kq
    bound = 0.02
    res = quantize_target(f16, parse_target(kld=bound), tmp_path,
                          TargetOptions(imatrix=imx, max_slowdown=None, **FAST))
    assert res.met and res.measured["kld_mean"] <= bound
    assert Path(res.file).name.endswith("-kld0.02-mix.gguf")
    assert res.size_bytes < f16.stat().st_size
    assert _generate(Path(res.file))


def test_target_bpw_without_imatrix_uses_no_i_quants(kq, tmp_path):
    f16, _, _ = kq
    res = quantize_target(f16, parse_target(bpw=5.0), tmp_path, TargetOptions(max_slowdown=None, **FAST))
    info = inspect_gguf(res.file)
    assert info.bits_per_weight <= 5.0
    assert not any(t.startswith("IQ") for t in info.type_counts)


@pytest.mark.parametrize("args, expect", [
    (["--target-size", "1K"], "below the smallest file"),
    (["--target-size", "10G"], "not below the source's own size"),
    (["--target-bpw", "1"], "below the smallest file"),
    (["--target-kld", "-1"], "positive"),
    (["--target-size", "abc"], "not a number"),
    (["--target-size", "1G", "--target-kld", "0.1"], "pass one of"),
    (["Q4_K_M", "--target-size", "1G"], "chooses the types itself"),
])
def test_impossible_targets_are_one_line(kq, tmp_path, args, expect):
    f16, _, _ = kq
    pre, rest = ([args[0]], args[1:]) if not args[0].startswith("--") else ([], args)
    r = CliRunner().invoke(app, ["quantize", str(f16), *pre, *rest, "--max-slowdown", "off", "-o", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert expect in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob("*.gguf"))
