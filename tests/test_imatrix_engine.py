"""``edgequant imatrix --engine llama.cpp`` against llama.cpp's own llama-imatrix, run now on this host on the
same 16-bit GGUF and the same text (the tool is built from the sdist of the installed llama-cpp-python)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.errors import EdgequantError
from edgequant.export.convert import convert
from edgequant.llamacpp_tools import tool_env
from edgequant.quantize.imatrix import compute_imatrix
from edgequant.quantize.imatrix_file import read_imatrix
from edgequant.quantize.imatrix_llamacpp import resolve_engine
from edgequant.text import builtin_text

runner = CliRunner()


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text(builtin_text(), encoding="utf-8")
    return path


def _llama_imatrix(bin_dir: Path, gguf: Path, text: Path, ctx: int, chunks: int, out: Path):
    proc = subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
                           "--chunks", str(chunks), "-t", "2", "--no-ppl", "-o", str(out)],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_imatrix(out)


def _assert_same(ours, theirs) -> None:
    """Same entries, the same counts per matrix (expert), correlation >= 0.9999 of every matrix seen."""
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    for name, a in ours.entries.items():
        b = theirs.entries[name]
        assert a.sums.shape == b.sums.shape and np.array_equal(a.counts, b.counts), name
        for k in range(a.sums.shape[0]):
            if b.counts[k] == 0:
                assert not a.sums[k].any(), name  # no token reached this expert
                continue
            r = np.corrcoef(a.sums[k], b.sums[k])[0, 1]
            assert r >= 0.9999, (name, k, r)


def test_smollm2_equals_llama_imatrix(smollm2_hf_dir, llama_tools, pydoc, tmp_path):
    f16 = Path(convert(smollm2_hf_dir, tmp_path, outtype="f16").files[0])
    res = runner.invoke(app, ["imatrix", str(f16), "-o", str(tmp_path / "ours.gguf"), "--text", str(pydoc),
                              "--ctx", "128", "--chunks", "3", "--threads", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["engine"] == "llama.cpp" and r["chunks"] == 3 and r["entries"] == 30 * 7
    theirs = _llama_imatrix(llama_tools, f16, pydoc, 128, 3, tmp_path / "theirs.gguf")
    _assert_same(read_imatrix(tmp_path / "ours.gguf"), theirs)


def test_mixtral_experts_equal_llama_imatrix(tiny_mixtral_dir, llama_tools, pydoc, tmp_path):
    """Per-expert sums and counts from MUL_MAT_ID, experts no token reached included (one chunk of 32
    tokens leaves two of layer 1's eight experts unused); the HF folder is converted first."""
    r = compute_imatrix(tiny_mixtral_dir, tmp_path / "ours.gguf", text=pydoc, ctx=32, chunks=1, engine="llama.cpp",
                       unseen_experts="uniform")  # llama-imatrix keeps unseen experts at count 0
    assert r.engine == "llama.cpp"
    assert not list(Path(r.path).parent.glob("*-F16.gguf"))  # the temporary conversion is gone
    f16 = Path(convert(tiny_mixtral_dir, tmp_path, outtype="f16").files[0])
    theirs = _llama_imatrix(llama_tools, f16, pydoc, 32, 1, tmp_path / "theirs.gguf")
    ours = read_imatrix(tmp_path / "ours.gguf")
    _assert_same(ours, theirs)
    counts = ours.entries["blk.1.ffn_up_exps.weight"].counts
    assert (counts == 0).any() and counts.sum() == 32 * 2  # top-2 routing


def test_engine_choice_and_errors(smollm2_gguf_path, tiny_llama_dir, tmp_path):
    assert resolve_engine("auto", tiny_llama_dir, "cpu") == "llama.cpp"
    assert resolve_engine("auto", tiny_llama_dir, "cuda") == "torch"
    assert resolve_engine("auto", smollm2_gguf_path, "cuda") == "llama.cpp"
    with pytest.raises(EdgequantError, match="is a GGUF: use --engine llama.cpp"):
        resolve_engine("torch", smollm2_gguf_path)
    with pytest.raises(EdgequantError, match="use auto, llama.cpp or torch"):
        resolve_engine("onnx", tiny_llama_dir)
    res = runner.invoke(app, ["imatrix", str(smollm2_gguf_path), "-o", str(tmp_path / "i.gguf")])
    assert res.exit_code == 2 and "is quantized" in res.output and "--outtype f16" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "i.gguf").exists()


def test_manifest_records_the_engine_and_reads_old_manifests():
    from edgequant.release.manifest import ImatrixArtifact, artifact_from_dict

    a = ImatrixArtifact(path="imatrix.gguf", files=["imatrix.gguf"], text="pydoc", ctx=512, chunks=32, engine="llama.cpp")
    assert artifact_from_dict(a.to_dict()).engine == "llama.cpp"
    old = {k: v for k, v in a.to_dict().items() if k != "engine"}  # written before there was a choice
    assert artifact_from_dict(old).engine is None and artifact_from_dict(old).ctx == 512
