"""``edgequant release`` with a target entry (``{target_bpw = ...}``): the mix is made by edgequant.mix from
the release's base file and imatrix, benchmarked by llama.cpp like every GGUF, its per-tensor list shipped
and hashed beside it, described in the card and the manifest, and not remade when nothing changed."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgequant.gguf_info import KEY_TENSOR_TYPES
from edgequant.release.manifest import Manifest
from edgequant.release.pipeline import release
from edgequant.release.recipe import load_recipe


@pytest.fixture(scope="module")
def kquant_dir():
    from fixtures_mix import tiny_kquant_llama

    return tiny_kquant_llama()


def _recipe(source, tmp_path, gguf_list: str, tables: str = ""):
    """The output folder and a recipe releasing ``source`` as ``Kq`` with ``gguf = <gguf_list>``."""
    out, recipe = tmp_path / "dist", tmp_path / "release.toml"
    recipe.write_text(f'[release]\nsource = "{source.as_posix()}"\nname = "Kq"\noutput = "{out.as_posix()}"\n'
                      f"gguf = {gguf_list}\n{tables}")
    return out, recipe


def test_release_with_a_target_entry(kquant_dir, tmp_path):
    import gguf

    out, recipe = _recipe(kquant_dir, tmp_path, '["Q4_K_M", {target_bpw = 5.5, imatrix = true, max_slowdown = 50, '
                                                 'calibration_chunks = 3}]', """
[imatrix]
ctx = 64
chunks = 8

[bench]
ctx = 64
chunks = 4
speed = false
threads = 2
""")
    first = release(load_recipe(recipe))
    assert first.status == "ok" and {"base", "imatrix", "Q4_K_M", "5.5bpw-mix", "bench"} <= set(first.made)

    m = json.loads((out / "manifest.json").read_text())
    for a in m["artifacts"]:  # every listed file is there with its sha256
        want = (a.get("file_sha256") or {a["path"]: a["sha256"]})[a["path"]]
        assert hashlib.sha256((out / a["path"]).read_bytes()).hexdigest() == want
    assert Manifest.from_dict(m).to_dict() == m
    arts = {a["path"]: a for a in m["artifacts"]}
    mix = arts["Kq-5.5bpw-mix.gguf"]
    assert mix["type"] == "5.5bpw-mix" and mix["quant_type"] == "mix" and mix["imatrix"]
    assert mix["bits_per_weight"] <= 5.5 and mix["metrics"]["kld_mean"] is not None  # llama.cpp ran it in the bench
    x = mix["mix"]
    assert x["target"]["kind"] == "bpw" and x["tensor_types_file"] == "Kq-5.5bpw-mix.tensor-types.txt"
    assert x["calibration"]["chunks"] == 3 and x["calibration"]["ctx"] == 64 and x["predicted_kld"] > 0
    assert x["speed"]["mix"]["pp_tps"] > 0 and x["standard"]["type"]  # the speed check ran against a standard type
    assert x["reproduce"].startswith("edgequant quantize Kq-BF16.gguf ")
    assert arts["Kq-5.5bpw-mix.tensor-types.txt"]["kind"] == "tensor_types"
    listed = (out / x["tensor_types_file"]).read_text().split()
    reader = gguf.GGUFReader(out / "Kq-5.5bpw-mix.gguf")
    field = reader.fields[KEY_TENSOR_TYPES]
    embedded = [bytes(field.parts[i]).decode() for i in field.data]
    assert listed == embedded and all(e.startswith("^") and "=" in e for e in listed)

    card = (out / "README.md").read_text()
    assert "### About the per-tensor mixes" in card and "per-tensor mix" in card
    assert "--tensor-type-file Kq-5.5bpw-mix.tensor-types.txt" in card
    bench = json.loads((out / "bench.json").read_text())
    assert any(r["type"].endswith(" mix") for r in bench["rows"])  # its own labelled point on the plot

    (out / x["tensor_types_file"]).unlink()  # a lost list is written again from the stage record
    again = release(load_recipe(recipe))
    assert again.made == [] and "5.5bpw-mix" in again.skipped
    assert (out / x["tensor_types_file"]).read_text().split() == listed


def test_impossible_target_names_its_entry(kquant_dir, tmp_path):
    """A target the model cannot meet (below its smallest candidate file) stops the release with one line
    naming the entry; nothing is left under the mix's name."""
    from edgequant.errors import EdgequantError

    out, recipe = _recipe(kquant_dir, tmp_path, '[{target_size = "10K", speed_check = false}]')
    with pytest.raises(EdgequantError) as e:
        release(load_recipe(recipe))
    msg = str(e.value)
    assert msg.startswith("gguf entry 10K-mix: --target-size 10K") and "\n" not in msg, msg
    assert not list(out.glob("Kq-10K-mix*")) and not list(out.rglob("*.part"))
