"""edgequant release: stages redone only when their inputs change, kill-safe, gates, merge, bad recipes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.errors import EdgequantError, GateFailed
from edgequant.release.manifest import Manifest
from edgequant.release.pipeline import release, release_merge
from edgequant.release.recipe import load_recipe

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def recipe_text(source: Path, output: Path, *, gguf='["Q8_0", "Q4_K_M"]', gptq: str = "", extra: str = "") -> str:
    return f"""
[release]
source = "{source.as_posix()}"
name = "Tiny"
output = "{output.as_posix()}"
gguf = {gguf}
{extra}

[bench]
ctx = 64
chunks = 2
pp_tokens = 32
tg_tokens = 4
repetitions = 1
threads = 2
{gptq}
"""


def write_recipe(tmp_path: Path, text: str, name: str = "release.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def check_manifest(folder: Path) -> dict:
    """Every artifact the manifest lists exists with its recorded sha256; nothing partial is left."""
    m = json.loads((folder / "manifest.json").read_text())
    for a in m["artifacts"]:
        hashes = a.get("file_sha256") or {a["files"][0]: a["sha256"]}
        for rel in a["files"]:
            data = (folder / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == hashes[rel], rel
    assert not list(folder.rglob("*.part"))
    assert Manifest.from_dict(m).to_dict() == m  # the typed manifest reads back exactly what it wrote
    return m


def test_release_redoes_only_what_changed(tiny_mistral_dir, tmp_path):
    out = tmp_path / "dist"
    path = write_recipe(tmp_path, recipe_text(tiny_mistral_dir, out))
    first = release(load_recipe(path))
    assert first.status == "ok" and set(first.made) == {"base", "Q8_0", "Q4_K_M", "bench"}
    m = check_manifest(out)
    kinds = {a["path"]: a["kind"] for a in m["artifacts"]}
    assert kinds[m["bench"]["reference_file"]] == "gguf"  # the 16-bit base: BF16 for this bf16 checkpoint
    assert kinds["README.md"] == "card" and kinds["Modelfile"] == "modelfile"
    q8 = next(a for a in m["artifacts"] if a["path"] == "Tiny-Q8_0.gguf")
    assert q8["metrics"]["kld_mean"] is not None and q8["metrics"]["speed"]["cpu"]["tg_tps"] > 0
    assert m["chat_template"]["checks"]  # the template gate ran on every GGUF

    t = time.perf_counter()
    again = release(load_recipe(path))
    assert again.made == [] and time.perf_counter() - t < 30  # seconds, not minutes
    (out / "Tiny-Q4_K_M.gguf").unlink()
    assert set(release(load_recipe(path)).made) == {"Q4_K_M", "bench"}
    path.write_text(recipe_text(tiny_mistral_dir, out).replace("ctx = 64", "ctx = 32"))
    assert release(load_recipe(path)).made == ["bench"]  # an evaluation option: only the bench rows
    path.write_text(recipe_text(tiny_mistral_dir, out, gguf='["Q8_0", {type = "Q4_K_M", pure = true}]').replace("ctx = 64", "ctx = 32"))
    assert set(release(load_recipe(path)).made) == {"Q4_K_M", "bench"}  # a quant option: that file and its row
    check_manifest(out)

    q8 = out / "Tiny-Q8_0.gguf"  # changed in place, size kept and mtime set back: still noticed, remade
    st = q8.stat()
    with open(q8, "r+b") as f:
        f.seek(st.st_size - 16)
        tail = f.read(16)
        f.seek(st.st_size - 16)
        f.write(bytes(b ^ 0x5A for b in tail))
    os.utime(q8, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert set(release(load_recipe(path)).made) == {"Q8_0", "bench"}
    check_manifest(out)  # the published sha256 are the files' own

    card = out / "README.md"  # a card edited by hand is not replaced silently
    card.write_text(card.read_text() + "\nMy own notes.\n")
    res = runner.invoke(app, ["release", str(path)])
    assert res.exit_code == 2 and "was edited since edgequant wrote it" in " ".join(res.stderr.split())
    assert "My own notes." in card.read_text()
    res = runner.invoke(app, ["release", str(path), "--force"])
    assert res.exit_code == 0, res.output
    assert "My own notes." not in card.read_text()
    check_manifest(out)

    # --only in a complete release folder remakes only what it names; the others stay published
    only = release(load_recipe(path).select(["Q8_0"]))
    assert only.made == []
    m = check_manifest(out)
    assert {"Tiny-Q8_0.gguf", "Tiny-Q4_K_M.gguf"} <= {a["path"] for a in m["artifacts"]}
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == 3 and "Tiny-Q4_K_M.gguf" in card.read_text()


def test_killed_release_finishes_on_rerun(tiny_mistral_dir, tmp_path):
    out = tmp_path / "dist"
    gptq = "[[gptq]]\nbits = 4\ngroup_size = 32\nsamples = 8\nseq_len = 64\n"
    path = write_recipe(tmp_path, recipe_text(tiny_mistral_dir, out, gptq=gptq))
    proc = subprocess.Popen([sys.executable, "-m", "edgequant", "release", str(path)], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # kill -9 while the GPTQ stage is writing
        if "making GPTQ" in line:
            time.sleep(2)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    result = release(load_recipe(path))
    assert "base" in result.skipped and "Q8_0" in result.skipped  # finished stages were kept
    assert "GPTQ-4bit-32g" in result.made
    m = check_manifest(out)
    g = next(a for a in m["artifacts"] if a["kind"] == "gptq")
    assert g["metrics"]["ppl"] > 0 and len(g["files"]) > 3
    assert not list(tmp_path.glob("logs")) and not list(REPO.glob("logs"))  # GPTQModel's log files kept out

    import fcntl

    with open(out / ".edgequant" / "lock") as f:  # the lock is free again (the killed run's went with it)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_template_mismatch_fails_with_diff(tiny_mistral_dir, tmp_path):
    tpl = tmp_path / "other.jinja"
    tpl.write_text("{{ bos_token }}{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}")
    path = write_recipe(tmp_path, recipe_text(tiny_mistral_dir, tmp_path / "dist", gguf='["Q8_0"]',
                                              extra='chat_template = "other.jinja"'))
    res = runner.invoke(app, ["release", str(path)])
    assert res.exit_code == 3, res.output
    text = " ".join(res.stderr.split())
    assert "template gate" in text and "renders" in text and "--- source (apply_chat_template)" in res.stderr
    assert "+++ Tiny-BF16.gguf (llama-cpp-python)" in res.stderr
    assert not (tmp_path / "dist" / "manifest.json").exists()


def test_quality_gate_failure_exits_3_with_manifest(tiny_mistral_dir, tmp_path):
    gate = '\n[[gates]]\nartifact = "Q8_0"\nmetric = "kld_mean"\nmax = 1e-12\n'
    gate += '\n[[gates]]\nartifact = "base"\nmetric = "ppl"\nmax = 1e9\n'  # the 16-bit file can be gated too
    path = write_recipe(tmp_path, recipe_text(tiny_mistral_dir, tmp_path / "dist", gguf='["Q8_0"]') + gate)
    res = runner.invoke(app, ["release", str(path), "--bench-speed", "false", "--device", "cpu", "--json"])
    assert res.exit_code == 3, res.output
    assert "quality gate failed" in " ".join(res.stderr.split())
    assert json.loads(res.stdout)["status"] == "gates failed"  # CI still gets the summary
    m = check_manifest(tmp_path / "dist")
    assert m["status"] == "gates failed" and [g["passed"] for g in m["gates"]] == [False, True]
    with pytest.raises(GateFailed):
        release(load_recipe(path))


def test_only_shards_merge(tiny_mistral_dir, tmp_path):
    path = write_recipe(tmp_path, recipe_text(tiny_mistral_dir, tmp_path / "unused"))
    for t in ("Q8_0", "Q4_K_M"):
        res = runner.invoke(app, ["release", str(path), "--only", t, "-o", str(tmp_path / t), "--bench-speed", "false", "--json"])
        assert res.exit_code == 0, res.output
        assert set(json.loads(res.stdout)["made"]) == {"base", t, "bench"}
    merged = release_merge([tmp_path / "Q8_0" / "manifest.json", tmp_path / "Q4_K_M"], tmp_path / "dist")
    m = check_manifest(tmp_path / "dist")
    types = [a["type"] for a in m["artifacts"] if a["kind"] == "gguf"]
    assert sorted(types) == ["BF16", "Q4_K_M", "Q8_0"] and merged.status == "ok"
    card = (tmp_path / "dist" / "README.md").read_text()
    assert "Tiny-Q8_0.gguf" in card and "Tiny-Q4_K_M.gguf" in card
    report = json.loads((tmp_path / "dist" / "bench.json").read_text())
    assert len(report["rows"]) == 3
    shard = json.loads((tmp_path / "Q8_0" / "bench.json").read_text())  # the shards' own settings, not defaults
    settings = ("text", "ctx", "chunks", "devices", "threads", "flash_attn", "speed_settings")
    assert {k: report[k] for k in settings} == {k: shard[k] for k in settings} and report["text"]["chars"] > 0

    import shutil

    other = tmp_path / "other"  # a shard benchmarked otherwise cannot join: one report states one set of settings
    shutil.copytree(tmp_path / "Q4_K_M", other)
    bench = json.loads((other / "bench.json").read_text())
    (other / "bench.json").write_text(json.dumps({**bench, "flash_attn": not bench["flash_attn"]}))
    with pytest.raises(EdgequantError, match="benchmarked with other settings") as e:
        release_merge([tmp_path / "Q8_0", other], tmp_path / "dist2")
    assert str(other) in str(e.value) and str(tmp_path / "Q8_0") in str(e.value) and "flash_attn" in str(e.value)


def test_bad_recipes_fail_before_work(tiny_mistral_dir, tmp_path):
    out = tmp_path / "dist"
    cases = {
        "unknown key": (recipe_text(tiny_mistral_dir, out).replace("gguf =", "gguf_typs ="), "unknown key 'gguf_typs'"),
        "unknown type": (recipe_text(tiny_mistral_dir, out, gguf='["Q4_K_Q"]'), "Q4_K_Q"),
        "missing source": (recipe_text(tmp_path / "nope", out), "nope"),
        "gate type": (recipe_text(tiny_mistral_dir, out) + '\n[[gates]]\nartifact = "Q8_0"\nmetric = "kld_mean"\nmax = "low"\n', "max"),
    }
    for name, (text, expect) in cases.items():
        path = write_recipe(tmp_path, text, f"{name.replace(' ', '_')}.toml")
        res = runner.invoke(app, ["release", str(path)])
        assert res.exit_code == 2, (name, res.output)
        msg = " ".join(res.stderr.split())
        assert expect in msg and f"{path.name}:" in msg, (name, msg)
        assert not out.exists(), name  # nothing started
    res = runner.invoke(app, ["release", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = runner.invoke(app, ["release", str(tiny_mistral_dir), "--bench-ctxx", "64"])
    assert res.exit_code == 2 and "--bench-ctx" in res.stderr


def test_split_release_names_shards_after_the_artifact(tiny_mixtral_dir, tmp_path):
    """split_max_size: the base and every quant are shard sets named Name-TYPE-0000i-of-0000n.gguf,
    written by llama.cpp's quantizer straight into the release folder and listed with their hashes."""
    out = tmp_path / "dist"
    path = write_recipe(tmp_path, recipe_text(tiny_mixtral_dir, out, gguf='["Q8_0"]',
                                              extra='split_max_size = "1M"').replace("repetitions = 1", "repetitions = 1\nspeed = false"))
    result = release(load_recipe(path))
    assert result.status == "ok"
    m = check_manifest(out)
    ggufs = {a["type"]: a for a in m["artifacts"] if a["kind"] == "gguf"}
    n = len(ggufs["Q8_0"]["files"])
    assert n > 1 and len(ggufs["BF16"]["files"]) == n
    assert ggufs["Q8_0"]["files"] == [f"Tiny-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert ggufs["Q8_0"]["metrics"]["kld_mean"] is not None
    assert not [p for p in out.iterdir() if p.name.startswith("Tiny-Q8_0") and p.name not in ggufs["Q8_0"]["files"]]
