"""MoE expert coverage of ``edgequant imatrix`` and the policy for experts no token reached.

References: the tokens routed to each expert counted by forward pre-hooks on transformers' routers
(``mlp.gate``'s input times its weight, top-k, bincount; our code not involved), llama.cpp's own
``llama-quantize`` reading the written file, and llama-cpp-python running the quantized files.
Tiny Mixtral fixture: 2 layers, 8 experts, top-2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.llamacpp_tools import run_tool
from edgequant.quantize.expert_coverage import KEY_FILLED, ExpertCoverage, LayerCoverage, coverage_of, format_ids
from edgequant.quantize.gguf_quant import QuantizeOptions, quantize
from edgequant.quantize.imatrix import compute_imatrix
from edgequant.quantize.imatrix_file import Imatrix, ImatrixEntry, ImatrixResult, read_imatrix
from edgequant.text import builtin_text
from llama_helpers import hf_model, hf_tokenizer, llama_logits

runner = CliRunner()
STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# a plain stretch of the built-in text (prose, no trailing newline): HF and llama.cpp tokenize it alike
TEXT = builtin_text()[2000:12000].rstrip("\n")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def mixtral_f32(tiny_mixtral_dir, tmp_path_factory) -> Path:
    """The Mixtral fixture as an F32 GGUF: llama.cpp routes on transformers' float32 weights."""
    return Path(convert(tiny_mixtral_dir, tmp_path_factory.mktemp("f32"), outtype="f32").files[0])


def routed_by_hooks(folder: Path, ctx: int, n_chunks: int) -> np.ndarray:
    """[layer, expert] tokens routed, counted by pre-hooks on transformers' routers over llama.cpp's chunks of
    the text (back to back, the first token of each overwritten with BOS when the tokenizer adds one)."""
    tok = hf_tokenizer(str(folder))
    ids = tok(TEXT).input_ids
    bos = tok.bos_token_id if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else None
    assert len(ids) >= ctx * n_chunks
    model = hf_model(str(folder))
    k, n = model.config.num_experts_per_tok, getattr(model.config, "num_local_experts", None) or model.config.num_experts
    counts = np.zeros((len(model.model.layers), n), dtype=np.int64)

    def hook(layer: int):
        def count(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            top = torch.nn.functional.linear(x, module.weight.float()).topk(k, dim=-1).indices
            counts[layer] += torch.bincount(top.reshape(-1), minlength=n).numpy()
        return count

    handles = [layer.mlp.gate.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = ids[c * ctx:(c + 1) * ctx]
            if bos is not None:
                chunk[0] = bos
            model(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("engine", ["torch", "llama.cpp"])
def test_coverage_equals_router_hook_counts(engine, tiny_mixtral_dir, mixtral_f32, text_file, tmp_path):
    ctx, n_chunks = 64, 2
    want = routed_by_hooks(tiny_mixtral_dir, ctx, n_chunks)
    assert (want.sum(1) == ctx * n_chunks * 2).all()  # top-2
    source = tiny_mixtral_dir if engine == "torch" else mixtral_f32
    r = compute_imatrix(source, tmp_path / "im.gguf", text=text_file, ctx=ctx, chunks=n_chunks, engine=engine)
    assert r.engine == engine and r.coverage is not None
    got = np.array([lc.tokens for lc in r.coverage.layers])
    assert [lc.layer for lc in r.coverage.layers] == [0, 1]
    assert np.array_equal(got, want), (got, want)
    # every stack of a layer counts the same tokens, and the file read back says the same
    entries = read_imatrix(tmp_path / "im.gguf").entries
    for b in range(2):
        for s in STACKS:
            assert np.array_equal(entries[f"blk.{b}.{s}.weight"].counts[want[b] > 0], want[b][want[b] > 0])
    assert read_imatrix(tmp_path / "im.gguf").coverage.to_dict()["layers"] == r.coverage.to_dict()["layers"]
    d = r.to_dict()["coverage"]
    assert (d["experts"], d["reached"] + d["unseen"], d["min"], d["max"]) == (16, 16, int(want.min()), int(want.max()))


def _expert_slices(path: Path, name: str) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return np.asarray(t.data).reshape(int(t.shape[-1]), -1)


def test_unseen_experts_fill_uniform_error(tiny_mixtral_dir, mixtral_f32, text_file, tmp_path, llama_tools):
    """One chunk of 32 tokens leaves experts without a token (the hooks say which); fill writes the mean of the
    layer's seen experts into their slots and lists them in the file, uniform leaves count 0, error stops."""
    want = routed_by_hooks(tiny_mixtral_dir, 32, 1)
    unseen = {b: [int(e) for e in np.flatnonzero(want[b] == 0)] for b in range(len(want))}
    assert any(unseen.values()), want  # the case under test
    kw = dict(text=text_file, ctx=32, chunks=1, engine="llama.cpp")
    fill = compute_imatrix(mixtral_f32, tmp_path / "fill.gguf", **kw)  # the default policy
    uniform = compute_imatrix(mixtral_f32, tmp_path / "uniform.gguf", unseen_experts="uniform", **kw)
    for r, policy in ((fill, "fill"), (uniform, "uniform")):
        assert r.coverage.policy == policy and {lc.layer: lc.unseen for lc in r.coverage.layers} == unseen
        assert len(r.warnings) == 1 and f"--unseen-experts {policy}" in r.warnings[0]
    assert {lc.layer: lc.filled for lc in fill.coverage.layers} == unseen
    assert all(not lc.filled for lc in uniform.coverage.layers)

    m_fill, m_uni = read_imatrix(tmp_path / "fill.gguf"), read_imatrix(tmp_path / "uniform.gguf")
    back = m_fill.coverage  # read back: the filled slots are still unseen
    assert back.policy == "fill" and {lc.layer: lc.unseen for lc in back.layers} == unseen
    assert {lc.layer: lc.filled for lc in back.layers} == unseen
    assert m_uni.coverage.policy == "uniform" and not m_uni.filled
    for b, ids in unseen.items():
        for s in STACKS:
            name = f"blk.{b}.{s}.weight"
            f, u = m_fill.entries[name], m_uni.entries[name]
            seen = u.counts > 0
            assert not u.counts[ids].any() and (f.counts[ids] == 1).all()  # uniform: count 0; fill: one pseudo-token
            assert np.array_equal(f.sums[seen], u.sums[seen]) and np.array_equal(f.counts[seen], u.counts[seen])
            mean = (u.sums[seen] / u.counts[seen, None]).mean(0)  # each seen expert weighs the same
            np.testing.assert_allclose(f.values()[ids], np.broadcast_to(mean, (len(ids), mean.size)), rtol=1e-6)
            assert (u.values()[ids] == 1).all()

    # llama.cpp's own llama-quantize reads the file (the extra keys are ignored) and finds every matrix
    tool_q = tmp_path / "tool-Q4_K_M.gguf"
    out = run_tool("llama-quantize", "--imatrix", str(tmp_path / "fill.gguf"), str(mixtral_f32), str(tool_q), "Q4_K_M", "2")
    assert f"loaded {len(m_fill.entries)} importance matrix entries" in out, out[-2000:]
    assert not re.search(r"did not find weights for blk\.", out), out[-2000:]
    # edgequant's quantize (llama.cpp's quantizer in process): the filled experts are quantized with their
    # siblings' weights, not uniformly; the seen experts are byte for byte the same either way
    (q_fill,) = quantize(mixtral_f32, ["IQ2_XXS"], tmp_path / "fill", QuantizeOptions(imatrix=tmp_path / "fill.gguf"))
    (q_uni,) = quantize(mixtral_f32, ["IQ2_XXS"], tmp_path / "uni", QuantizeOptions(imatrix=tmp_path / "uniform.gguf"))
    for b, ids in unseen.items():
        name = f"blk.{b}.ffn_down_exps.weight"
        a, c = _expert_slices(Path(q_fill.files[0]), name), _expert_slices(Path(q_uni.files[0]), name)
        rest = [e for e in range(a.shape[0]) if e not in ids]
        assert np.array_equal(a[rest], c[rest])
        assert all(not np.array_equal(a[e], c[e]) for e in ids), name
    ids = hf_tokenizer(str(tiny_mixtral_dir))(TEXT[:200]).input_ids[:16]
    for path in (tool_q, Path(q_fill.files[0])):
        assert np.isfinite(llama_logits(path, ids)).all(), path

    with pytest.raises(EdgequantError, match=r"saw no calibration token .*--chunks.*--unseen-experts fill") as e:
        compute_imatrix(mixtral_f32, tmp_path / "error.gguf", unseen_experts="error", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "error.gguf").exists()


def test_cli_json_and_terminal(mixtral_f32, text_file, tmp_path):
    args = ["imatrix", str(mixtral_f32), "--text", str(text_file), "--ctx", "32", "--chunks", "1", "--threads", "2"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a.gguf"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    cov = d["coverage"]
    assert cov["policy"] == "fill" and cov["experts"] == 16 and len(cov["layers"]) == 2 and cov["unseen"] > 0
    assert [lc["layer"] for lc in cov["layers"]] == [0, 1] and all(len(lc["tokens"]) == 8 for lc in cov["layers"])
    assert sum(cov["layers"][0]["tokens"]) == 32 * 2 and d["warnings"] == [cov["warning"]]
    assert "warning:" in res.stderr and "saw no calibration token" in res.stderr  # never silent, also with --json
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "b.gguf")])
    assert res.exit_code == 0, res.output
    assert "experts: 2 MoE layers x 8 experts" in res.stdout and "unseen experts" in res.stdout
    worst = next(lc for lc in cov["layers"] if lc["unseen"])
    assert f"{worst['reached']}/8" in res.stdout and "(filled)" in res.stdout
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "c.gguf"), "--unseen-experts", "error"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--chunks" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "c.gguf").exists()
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "d.gguf"), "--unseen-experts", "drop"])
    assert res.exit_code == 2 and "use fill, uniform or error" in res.stderr


# -- pure: dense models, read-back, manifest and card -----------------------------------------------------


def _imatrix(counts: dict[str, list[float]], cols: int = 4) -> Imatrix:
    return Imatrix(entries={n: ImatrixEntry(sums=np.ones((len(c), cols), np.float32), counts=np.array(c, np.float32))
                            for n, c in counts.items()})


def test_dense_has_no_coverage_and_a_foreign_file_reads_as_uniform():
    dense = _imatrix({"blk.0.ffn_up.weight": [10], "blk.0.attn_q.weight": [10]})
    assert coverage_of(dense) is None
    r = ImatrixResult(path="x", entries=2, chunks=1, chunk_size=10, tokens=10, dataset="d", device="cpu", seconds=0)
    assert r.to_dict()["coverage"] is None and r.to_dict()["warnings"] == []
    # a llama-imatrix file: no policy recorded; the router input (a dense matrix) is not a layer
    m = _imatrix({"blk.3.ffn_gate_exps.weight": [5, 0, 3, 0], "blk.3.ffn_gate_inp.weight": [8]})
    cov = coverage_of(m)
    assert cov.policy is None and [(lc.layer, lc.unseen) for lc in cov.layers] == [(3, [1, 3])]
    assert "the file records no policy" in cov.warning
    assert format_ids([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and format_ids(list(range(0, 40, 2)), limit=3).endswith("(20 in all)")


def _coverage() -> ExpertCoverage:
    return ExpertCoverage(policy="fill", layers=[
        LayerCoverage(layer=0, tensor="blk.0.ffn_up_exps.weight", tokens=[9, 7, 12, 4, 8, 6, 10, 8]),
        LayerCoverage(layer=1, tensor="blk.1.ffn_up_exps.weight", tokens=[20, 0, 11, 9, 0, 6, 10, 8], unseen=[1, 4],
                      filled=[1, 4])])


def test_manifest_carries_coverage_and_reads_old_manifests():
    from edgequant.release.manifest import ImatrixArtifact, Manifest, artifact_from_dict

    a = ImatrixArtifact(path="imatrix.gguf", files=["imatrix.gguf"], text="pydoc", ctx=512, chunks=8, engine="llama.cpp",
                        coverage=_coverage())
    d = a.to_dict()
    assert d["coverage"]["unseen"] == 2 and d["coverage"]["layers"][1]["unseen"] == [1, 4]
    back = artifact_from_dict(d)
    assert back.coverage.to_dict() == d["coverage"] and back.to_dict() == d
    old = {k: v for k, v in d.items() if k != "coverage"}  # a dense model's, or one written before coverage
    assert artifact_from_dict(old).coverage is None and "coverage" not in artifact_from_dict(old).to_dict()
    m = Manifest.from_dict({"name": "x", "artifacts": [d]})
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_card_shows_coverage_for_moe_only():
    from edgequant.release.card import render_model_card
    from test_release_card import smol_manifest

    dense = render_model_card(smol_manifest())
    assert "### Importance matrix" in dense and "Expert coverage" not in dense
    moe = smol_manifest()
    im = next(a for a in moe["artifacts"] if a["kind"] == "imatrix")
    im["coverage"] = _coverage().to_dict()
    card = render_model_card(moe)
    assert "reached 14 of the 16 experts (2 MoE layers × 8)" in card and "min 0, median 8, max 20" in card
    assert "2 experts saw no token: their slots in the importance matrix hold the mean" in card
    assert "| 1 | 6/8 | 0 | 8.5 | 20 | 1, 4 |" in card and "| 0 | 8/8 | 4 | 8 | 12 | — |" in card


def test_release_manifest_and_card_carry_coverage(tiny_mixtral_dir, tmp_path):
    """A Mixtral release: the imatrix stage's coverage is in manifest.json and the card; a stage record made
    before there was coverage (none in its result) still gives it, read from the imatrix file."""
    from edgequant.release.pipeline import release
    from edgequant.release.recipe import load_recipe
    from test_release import recipe_text, write_recipe

    out = tmp_path / "dist"
    text = recipe_text(tiny_mixtral_dir, out, gguf='[{type = "Q4_K_M", imatrix = true}]')
    text = text.replace("\n[bench]", "\n[imatrix]\nctx = 32\nchunks = 1\n\n[bench]").replace(
        "repetitions = 1", "repetitions = 1\nspeed = false")
    recipe = write_recipe(tmp_path, text)
    logged: list[str] = []
    assert release(load_recipe(recipe), log=logged.append).status == "ok"

    def coverage() -> dict:
        m = json.loads((out / "manifest.json").read_text())
        return next(a for a in m["artifacts"] if a["kind"] == "imatrix")["coverage"]

    cov = coverage()
    assert cov == read_imatrix(out / "imatrix.gguf").coverage.to_dict() and len(cov["layers"]) == 2
    card = (out / "README.md").read_text()
    assert f"reached {cov['reached']} of the 16 experts (2 MoE layers × 8)" in card
    assert "| Layer | Experts reached |" in card
    assert cov["unseen"] > 0 and cov["policy"] == "fill"  # 32 tokens do not reach every expert
    assert any("saw no calibration token" in line for line in logged) and "saw no token" in card
    state = out / ".edgequant" / "state.json"
    data = json.loads(state.read_text())
    del data["artifacts"]["imatrix"]["result"]["coverage"]  # as an older edgequant recorded it
    state.write_text(json.dumps(data))
    r = release(load_recipe(recipe))
    assert "imatrix" in r.skipped and coverage() == cov
