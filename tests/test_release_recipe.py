"""Release recipe: schema, defaults, validation messages with file:line, flags, --only (pure Python)."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

from edgequant.errors import EdgequantError
from edgequant.release.recipe import (
    FLAGS, TABLES, BenchSettings, Gate, GPTQVariant, Recipe, find_line, load_recipe, parse_flag_args, recipe_from_dict,
    recipe_from_options, to_toml,
)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "calib.txt").write_text("some calibration text\n")
    return tmp_path


def write(folder: Path, text: str, name: str = "release.toml") -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def errors(path: Path) -> list[str]:
    with pytest.raises(EdgequantError) as e:
        load_recipe(path)
    return str(e.value).splitlines()


FULL = """
[release]
source = "model"
name = "Tiny-1B"
output = "out"
base_type = "BF16"
keep_base = false
split_max_size = "2G"
gguf = ["Q8_0", "q4_k_m", {type = "Q2_K", imatrix = true}, "IQ2_XS"]
devices = ["cpu", "cuda"]
template_gate = true

[[gguf]]
type = "Q4_K_M"
name = "Q4_K_L"
output_tensor_type = "q8_0"
token_embedding_type = "Q8_0"
tensor_types = ["ffn_down=q6_k"]

[imatrix]
ctx = 256
chunks = 50

[calibration]
text = "calib.txt"

[bench]
text = "wikitext-2"
ctx = 1024
chunks = 4
speed = true
pp_tokens = 256
tg_tokens = 64
repetitions = 5
threads = 8

[[gptq]]
bits = 4
group_size = 64

[[gptq]]
bits = 8
group_size = -1
desc_act = true
sym = false
damp_percent = 0.01
samples = 64
seq_len = 1024
seed = 7

[[gates]]
artifact = "q4_k_m"
metric = "kld_mean"
max = 0.1

[[gates]]
artifact = "*"
metric = "same_top"
min = 0.8

[[gates]]
artifact = "Q8_0"
metric = "tg_tps"
min = 20
device = "cuda"

[card]
license = "apache-2.0"
quantized_by = "me"
base_model = "org/Tiny-1B"
tags = ["tiny"]
description = "Tiny model."
repo_id = "me/Tiny-1B-GGUF"
"""


def test_full_recipe(folder):
    r = load_recipe(write(folder, FULL))
    assert r.name == "Tiny-1B" and r.base_type == "bf16" and not r.keep_base and r.split_max_size == 2_000_000_000
    assert r.artifact_names == ["Q8_0", "Q4_K_M", "Q2_K", "IQ2_XS", "Q4_K_L", "GPTQ-4bit-64g", "GPTQ-8bit-perchannel-act-asym"]
    q2, iq2 = r.gguf[2], r.gguf[3]
    assert q2.imatrix and iq2.imatrix and not r.gguf[0].imatrix  # IQ2_XS needs one: switched on
    assert r.gguf[4].output_tensor_type == "Q8_0" and r.gguf[4].tensor_types == ("ffn_down=q6_k",)
    assert r.needs_imatrix and r.imatrix_device == "cuda"
    assert r.text_source("imatrix") == str(folder / "calib.txt")  # imatrix.text unset: the calibration text
    assert r.text_source("bench") == "wikitext-2"
    assert r.source_ref == str(folder / "model") and r.output_dir == folder / "out"
    assert r.gates[0].artifact == "Q4_K_M"  # canonical spelling
    assert r.gates[2].device == "cuda" and r.gate_device(r.gates[1]) is None
    assert r.gptq[1].seed == 7 and r.gptq[1].damp_percent == 0.01
    assert r.card.repo_id == "me/Tiny-1B-GGUF" and r.card.tags == ("tiny",)


def test_defaults(folder):
    r = load_recipe(write(folder, '[release]\nsource = "model"\n'))
    assert r.name == "model" and r.output == "dist/model" and r.base_type == "auto" and r.keep_base
    assert [v.type for v in r.gguf] == ["Q8_0", "Q4_K_M"] and r.gptq == () and r.gates == ()
    assert r.devices == ("cpu",) and not r.needs_imatrix and r.imatrix_device == "cpu"
    assert r.bench.ctx == 512 and r.bench.chunks is None and r.bench.pp_tokens == 512 and r.bench.tg_tokens == 128
    assert r.text_source("bench") is None and r.text_source("calibration") is None
    hub = load_recipe(write(folder, '[release]\nsource = "HuggingFaceTB/SmolLM2-135M-Instruct"\n', "hub.toml"))
    assert hub.name == "SmolLM2-135M-Instruct" and not hub.source_is_local and hub.source_ref == "HuggingFaceTB/SmolLM2-135M-Instruct"
    empty = load_recipe(write(folder, '[release]\nsource = "model"\ngguf = []\n[[gptq]]\nbits = 4\n', "g.toml"))
    assert empty.gguf == () and empty.artifact_names == ["GPTQ-4bit-128g"]


def test_round_trip_dict_and_toml(folder):
    r = load_recipe(write(folder, FULL))
    assert recipe_from_dict(r.to_dict(), base_dir=r.base_dir) == r
    again = load_recipe(write(folder, r.to_toml(), "again.toml"))
    assert again == r
    assert tomllib.loads(to_toml(r.to_dict()))  # valid TOML


def test_unknown_key_has_line_and_suggestion(folder):
    p = write(folder, """
        [release]
        source = "model"
        gguf_typs = ["Q8_0"]

        [bench]
        ctxx = 3
        """)
    errs = errors(p)
    assert errs[0] == f"{p}:3: unknown key 'gguf_typs' in [release] (did you mean 'gguf'?)"
    assert errs[1] == f"{p}:6: unknown key 'ctxx' in [bench] (did you mean 'ctx'?)"


def test_key_in_wrong_table_and_unknown_table(folder):
    p = write(folder, """
        source = "model"

        [release]
        source = "model"
        ctx = 512

        [imatrx]
        ctx = 3
        """)
    errs = errors(p)
    assert f"{p}:1: unknown key 'source' at the top level (put it under [release])" in errs
    assert f"{p}:5: unknown key 'ctx' in [release] (it belongs in [imatrix])" in errs
    assert f"{p}:7: unknown table 'imatrx' at the top level (did you mean [imatrix]?)" in errs


def test_bad_types_and_values(folder):
    p = write(folder, """
        [release]
        source = "model"
        gguf = [
          "Q8_0",
          "Q9_K",
          {type = "Q4_K_M", imatrx = true},
          {type = "IQ2_XS", imatrix = false},
          "F16",
        ]
        keep_base = "yes"
        devices = ["cpu", "tpu"]
        split_max_size = "big"

        [imatrix]
        ctx = "512"

        [bench]
        chunks = 4.0
        text = "missing.txt"

        [[gptq]]
        bits = 5
        damp_percent = 2
        group_size = 100
        """)
    errs = errors(p)
    expect = [
        ":5: unknown GGUF type 'Q9_K' in [release] gguf (did you mean 'Q6_K'?)",
        ":6: unknown key 'imatrx' in [release] gguf entry 3 (did you mean 'imatrix'?)",
        ":7: IQ2_XS needs an importance matrix; remove imatrix = false",
        ":8: F16 in [release] gguf is a 16/32-bit type, not a quantization",
        ":10: keep_base in [release] must be true or false, not a string (\"yes\")",
        ":11: devices: unknown device 'tpu'",
        ":12: split_max_size = \"big\": use a size like \"50G\"",
        ":15: ctx in [imatrix] must be an integer, not a string (\"512\")",
        ":18: chunks in [bench] must be an integer: write 4, not 4.0",
        ":19: text = \"missing.txt\" in [bench]: no such file",
        ":22: bits = 5 in [[gptq]] #1: use one of 2, 3, 4, 8",
        ":23: damp_percent = 2 in [[gptq]] #1: use a fraction between 0 and 1",
        ":24: group_size = 100 in [[gptq]] #1: use one of -1, 16, 32, 64, 128, 256, 512, 1024",
    ]
    for e in expect:
        assert any(line.startswith(str(p) + e) for line in errs), (e, errs)
    lines = [int(e.split(":")[1]) for e in errs]
    assert lines == sorted(lines)  # file order


def test_gates_validation(folder):
    p = write(folder, """
        [release]
        source = "model"
        gguf = ["Q4_K_M"]

        [bench]
        speed = false

        [[gates]]
        artifact = "Q4_K_M"
        metric = "kld_mean"
        max = "0.1"

        [[gates]]
        artifact = "Q5_K_M"
        metric = "kld_mean"
        max = 0.1

        [[gates]]
        artifact = "Q4_K_M"
        metric = "same_top"
        max = 0.9

        [[gates]]
        artifact = "Q4_K_M"
        metric = "kld_man"
        max = 0.1

        [[gates]]
        artifact = "Q4_K_M"
        metric = "tg_tps"
        min = 10

        [[gates]]
        artifact = "Q4_K_M"
        metric = "ppl"
        max = 20
        device = "cpu"

        [[gates]]
        artifact = "Q4_K_M"
        metric = "ppl"
        """)
    errs = errors(p)
    expect = [
        ":11: max in [[gates]] #1 must be a number, not a string (\"0.1\")",
        ":14: gate artifact 'Q5_K_M' is not in this recipe (did you mean 'Q4_K_M'?)",
        ":21: same_top is higher-is-better: use min = ..., not max",
        ":25: unknown metric 'kld_man' in [[gates]] #4 (did you mean 'kld_mean'?)",
        ":30: tg_tps gate in [[gates]] #5 needs speed measurements: set speed = true in [bench]",
        ":37: device in [[gates]] #6 applies to pp_tps/tg_tps only",
        ":41: [[gates]] #7 (ppl) has no threshold: add max = <number>",
    ]
    for e in expect:
        assert any(line.startswith(str(p) + e) for line in errs), (e, errs)


def test_source_checks(folder):
    (folder / "file.bin").write_text("x")
    (folder / "noconfig").mkdir()
    for source, msg in [("./nothere", "no such folder"), ("nothere", None), ("file.bin", "is a file"),
                        ("noconfig", "has no config.json"), ("a/b/c", "no such folder")]:
        p = write(folder, f'[release]\nsource = "{source}"\n', "s.toml")
        if msg is None:  # a bare name is neither a folder here nor a hub id
            with pytest.raises(EdgequantError, match="no such folder"):
                load_recipe(p)
            continue
        with pytest.raises(EdgequantError, match=msg) as e:
            load_recipe(p)
        assert str(e.value).startswith(f"{p}:2: ")
    with pytest.raises(EdgequantError, match=r"release.toml:1: no source"):
        load_recipe(write(folder, "[release]\nname = \"x\"\n"))


def test_toml_syntax_error_keeps_line_and_column(folder):
    p = write(folder, '[release]\nsource = "model"\ngguf = ["Q8_0" "Q4_K_M"]\n')
    with pytest.raises(EdgequantError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}:3:") and "invalid TOML" in str(e.value)
    with pytest.raises(EdgequantError, match="does not exist"):
        load_recipe(folder / "nope.toml")


def test_find_line():
    text = textwrap.dedent("""
        # comment with gguf = here
        [release]
        source = "m"  # name = not this
        gguf = [
          "Q8_0",
          {type = "Q2_K", imatrix = true},
        ]

        [[gates]]
        metric = "ppl"

        [[gates]]
        "metric" = "kld_mean"
        max = 0.1

        [bench]
        ctx = 512
        """).lstrip("\n")
    assert find_line(text, "release") == 2
    assert find_line(text, "release", "source") == 3
    assert find_line(text, "release", "name") is None  # only in a comment
    assert find_line(text, "release", "gguf") == 4
    assert find_line(text, "release", "gguf", value="Q2_K") == 6
    assert find_line(text, "release", "imatrix") == 6  # a key inside an inline table
    assert find_line(text, "release", "imatrix", after=7) is None
    assert find_line(text, "gates", "metric", index=0) == 10
    assert find_line(text, "gates", "metric", index=1) == 13  # quoted key, second [[gates]]
    assert find_line(text, "bench", "ctx") == 17
    assert find_line(text, "bench", "chunks") is None
    assert find_line(text, "card") is None
    assert find_line('bench.ctx = 3\n[release]\nsource = "x"\n', "bench", "ctx") == 1  # dotted key at the root


def test_recipe_from_options_and_flags(folder):
    r = recipe_from_options(
        str(folder / "model"), gguf=["Q8_0,Q4_K_M", "Q2_K:imatrix", '{type="Q4_K_M", name="Q4_K_L", output_tensor_type="Q8_0"}'],
        gptq=["4", "8:32"], gates=["Q4_K_M:kld_mean<=0.1", "*:same_top>=0.9", "Q8_0:tg_tps@cpu>=5"],
        bench_ctx=256, bench_chunks=None, devices="cpu", card_tags="a,b", keep_base=False, split_max_size="50G",
    )
    assert r.artifact_names == ["Q8_0", "Q4_K_M", "Q2_K", "Q4_K_L", "GPTQ-4bit-128g", "GPTQ-8bit-32g"]
    assert r.gguf[2].imatrix and r.bench.ctx == 256 and r.bench.chunks is None and not r.keep_base
    assert r.gates == (Gate("Q4_K_M", "kld_mean", max=0.1), Gate("*", "same_top", min=0.9), Gate("Q8_0", "tg_tps", min=5.0, device="cpu"))
    assert r.card.tags == ("a", "b") and r.split_max_size == 50_000_000_000
    with pytest.raises(EdgequantError, match=r"^--bench-ctx: ctx = 0 in \[bench\]: must be at least 1"):
        recipe_from_options(str(folder / "model"), bench_ctx=0)
    with pytest.raises(EdgequantError, match=r"^--gguf: unknown GGUF type 'Q9'"):
        recipe_from_options(str(folder / "model"), gguf=["Q9"])
    with pytest.raises(EdgequantError, match=r"^--gptq: bits = 5"):
        recipe_from_options(str(folder / "model"), gptq=["5"])
    with pytest.raises(EdgequantError, match=r"^--gate: gate artifact 'Q5_K_M' is not in this recipe"):
        recipe_from_options(str(folder / "model"), gates=["Q5_K_M:kld_mean<=0.1"])
    with pytest.raises(EdgequantError, match=r"--gate Q4_K_M kld_mean 0.1: write ARTIFACT:METRIC<=VALUE"):
        recipe_from_options(str(folder / "model"), gates=["Q4_K_M kld_mean 0.1"])
    with pytest.raises(EdgequantError, match=r"unknown release option 'bench_ctxx' \(did you mean 'bench_ctx'\?\)"):
        recipe_from_options(str(folder / "model"), bench_ctxx=3)
    with pytest.raises(EdgequantError, match=r"^--source: source 'nope/x/y'"):
        recipe_from_options("nope/x/y")


def test_every_key_has_a_flag():
    for section, keys in TABLES.items():
        if section in ("gguf", "gptq", "gates"):
            assert section in FLAGS
            continue
        for key in keys:
            if (section, key) == ("release", "source"):
                continue
            assert (key if section == "release" else f"{section}_{key}") in FLAGS, (section, key)


def test_with_overrides(folder):
    p = write(folder, FULL)
    r = load_recipe(p)
    o = r.with_overrides(bench_ctx=256, gptq=["3:128"], name=None, card_license="mit")
    assert o.bench.ctx == 256 and o.artifact_names[-1] == "GPTQ-3bit-128g" and o.name == "Tiny-1B" and o.card.license == "mit"
    assert o.gguf == r.gguf and r.bench.ctx == 1024  # the original is unchanged
    # the imatrix default applies to types that do not say, as if written in the file
    d = r.with_overrides(imatrix_default=True)
    assert d.gguf[0].imatrix and d.gguf[1].imatrix
    # a bad flag names the flag; file errors still name the line
    with pytest.raises(EdgequantError, match=r"^--bench-ctx: ctx in \[bench\] must be an integer"):
        r.with_overrides(bench_ctx="x")
    # --gguf replaces the list (release.gguf and [[gguf]]); gates on removed types then fail at their line
    with pytest.raises(EdgequantError, match=rf"^{p}:\d+: gate artifact 'q4_k_m' is not in this recipe"):
        r.with_overrides(gguf=["Q6_K"])


def test_select(folder):
    r = load_recipe(write(folder, FULL))
    assert r.select(["Q4_K_M"]).artifact_names == ["Q4_K_M"]
    assert r.select(["q4_k"]).artifact_names == ["Q4_K_M"]  # the catalogue's alias
    assert r.select(["gptq-8bit", "Q4_K_L"]).artifact_names == ["Q4_K_L", "GPTQ-8bit-perchannel-act-asym"]
    assert r.select(["GPTQ-4bit-64g"]).artifact_names == ["GPTQ-4bit-64g"]
    assert r.select(["gptq"]).artifact_names == ["GPTQ-4bit-64g", "GPTQ-8bit-perchannel-act-asym"]
    assert r.select(["gguf"]).artifact_names == ["Q8_0", "Q4_K_M", "Q2_K", "IQ2_XS", "Q4_K_L"]
    assert r.select(["Q8_0,Q2_K"]).artifact_names == ["Q8_0", "Q2_K"]
    assert r.select(["BF16"]).artifact_names == []  # the base only
    s = r.select(["Q8_0"])
    assert [g.artifact for g in s.gates] == ["*", "Q8_0"]  # the Q4_K_M gate went with Q4_K_M
    assert s.needs_imatrix is False
    with pytest.raises(EdgequantError, match=r"--only Q5_K_M: not an artifact of this recipe \(did you mean 'Q4_K_M'\?\)"):
        r.select(["Q5_K_M"])
    with pytest.raises(EdgequantError, match=r"--only gptq-3bit"):
        r.select(["gptq-3bit"])


def test_inline_table_key_line_is_its_entrys(folder):
    p = write(folder, """
        [release]
        source = "model"
        gguf = [
          {type = "Q2_K", imatrix = true},
          {type = "IQ2_XS", imatrix = false},
        ]
        """)
    assert errors(p) == [f"{p}:5: IQ2_XS needs an importance matrix; remove imatrix = false (or choose another type)"]


def test_duplicate_artifacts(folder):
    p = write(folder, '[release]\nsource = "model"\ngguf = ["Q4_K_M", {type = "Q4_K_M", imatrix = true}]\n')
    with pytest.raises(EdgequantError, match=r"two artifacts are named 'Q4_K_M'; give one a name"):
        load_recipe(p)
    ok = write(folder, '[release]\nsource = "model"\ngguf = ["Q4_K_M", {type = "Q4_K_M", imatrix = true, name = "Q4_K_M-imat"}]\n', "ok.toml")
    assert load_recipe(ok).artifact_names == ["Q4_K_M", "Q4_K_M-imat"]


def test_gate_helpers():
    g = Gate("Q4_K_M", "kld_mean", max=0.1)
    assert g.passes(g.value({"kld_mean": 0.05})) and not g.passes(g.value({"kld_mean": 0.2}))
    assert not g.passes(g.value({"kld_mean": None}))  # unmeasured fails
    r = Gate("Q4_K_M", "ppl_ratio", max=1.1)
    assert abs(r.value({"ln_ppl_ratio": 0.05}) - 1.0512711) < 1e-6 and r.passes(r.value({"ln_ppl_ratio": 0.05}))
    s = Gate("Q4_K_M", "tg_tps", min=50, device="cpu")
    assert s.value({"speed": {"cpu": {"tg_tps": 95.2}}}) == 95.2 and s.passes(95.2)
    assert s.value({"speed": {"cuda": {"absent": "no CUDA device"}}}) is None
    assert g.describe() == "Q4_K_M: kld_mean <= 0.1" and s.describe() == "Q4_K_M: tg_tps@cpu >= 50"


def test_recipe_is_frozen(folder):
    r = load_recipe(write(folder, '[release]\nsource = "model"\n'))
    with pytest.raises(AttributeError):
        r.name = "x"  # type: ignore[misc]
    assert isinstance(r, Recipe)


def test_docs_example_loads(tmp_path):
    """The example in docs/recipe.md is a valid recipe."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "recipe.md").read_text()
    example = re.search(r"## An example\n\n```toml\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "calibration_data.txt").write_text("calibration text\n")
    r = load_recipe(write(tmp_path, example))
    assert "IQ2_XS" in r.artifact_names and r.gguf[r.artifact_names.index("IQ2_XS")].imatrix
    assert r.artifact_names[-2:] == ["GPTQ-4bit-128g", "GPTQ-8bit-32g-act"]


def test_defaults_come_from_the_library_options():
    """GPTQ and bench defaults are the library's (GPTQOptions, BenchOptions), named in each key's metadata."""
    from edgequant.bench.run import BenchOptions
    from edgequant.mix.target import TargetOptions
    from edgequant.quantize.gptq_options import GPTQOptions
    from edgequant.release.recipe.schema import SECTIONS, key_fields, spec

    options = {"BenchOptions": BenchOptions(), "GPTQOptions": GPTQOptions(), "TargetOptions": TargetOptions()}
    mirrored = {}
    for section, cls in SECTIONS.items():
        for f in key_fields(cls):
            if spec(f).option:
                owner, name = spec(f).option.split(".")
                assert f.default == getattr(options[owner], name), (section, f.name)
                mirrored[f"{section}.{f.name}"] = name
    assert mirrored["bench.repetitions"] == "reps" and mirrored["bench.pp_tokens"] == "pp" and mirrored["gptq.samples"] == "samples"
    assert BenchSettings().repetitions == 5 and GPTQVariant().samples == 128 and GPTQVariant().damp_percent == 0.05


def test_parse_flag_args():
    args = ["--bench-ctx", "256", "--gguf", "Q8_0", "--gguf=Q2_K:imatrix", "--no-keep-base", "--bench-speed",
            "--template-gate", "false", "--device", "cuda", "--gate", "*:ppl<=3", "--card-tag", "a", "--card-tags", "b",
            "--name", "1.5", "--split-max-size", "2G", "--imatrix-default=true", "--bench-flash-attn"]
    assert parse_flag_args(args) == {
        "bench_ctx": 256, "gguf": ["Q8_0", "Q2_K:imatrix"], "keep_base": False, "bench_speed": True, "template_gate": False,
        "devices": ["cuda"], "gates": ["*:ppl<=3"], "card_tags": ["a", "b"], "name": "1.5", "split_max_size": "2G",
        "imatrix_default": True, "bench_flash_attn": True}
    assert parse_flag_args(["--bench-chunks", "1.5", "--card-license", "mit"]) == {"bench_chunks": 1.5, "card_license": "mit"}
    for bad, message in [(["--bench-ctxx", "3"], "unknown option --bench-ctxx (did you mean --bench-ctx?); every recipe key has a flag"),
                         (["--source", "x"], "unknown option --source"),
                         (["--name"], "--name needs a value"),
                         (["Q8_0"], "unexpected argument 'Q8_0'; recipe options are --name VALUE")]:
        with pytest.raises(EdgequantError) as e:
            parse_flag_args(bad)
        assert str(e.value).startswith(message), (bad, str(e.value))


def test_flag_args_make_the_recipe(folder):
    r = recipe_from_options(str(folder / "model"), **parse_flag_args(["--gguf", "Q8_0,Q2_K:imatrix", "--gptq", "4:64",
                                                                      "--no-bench-speed", "--device", "cpu"]))
    assert r.artifact_names == ["Q8_0", "Q2_K", "GPTQ-4bit-64g"] and r.gguf[1].imatrix and not r.bench.speed
    with pytest.raises(EdgequantError, match=r"^--device: devices: unknown device 'tpu'"):
        recipe_from_options(str(folder / "model"), **parse_flag_args(["--device", "tpu"]))


def test_docs_list_every_key_with_its_default():
    """docs/recipe.md has a row for every key of TABLES, showing its number and string defaults."""
    import json
    import re

    from edgequant.release.recipe.schema import SECTIONS, key_fields

    doc = (Path(__file__).resolve().parent.parent / "docs" / "recipe.md").read_text()
    headings = {"release": "### `[release]`", "gguf": "### GGUF types", "gptq": "### `[[gptq]]`", "imatrix": "### `[imatrix]`",
                "calibration": "### `[calibration]`", "bench": "### `[bench]`", "gates": "### `[[gates]]`", "card": "### `[card]`"}
    for section, cls in SECTIONS.items():
        body = re.split(r"\n##", doc.split(headings[section] + "\n", 1)[1], maxsplit=1)[0]
        rows = {cell: line for line in body.splitlines() if line.startswith("| `")
                for cell in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
        for f in key_fields(cls):
            assert f.name in rows, (section, f.name)
            default = f.default
            if isinstance(default, (int, float, str)) and not isinstance(default, bool):
                assert f"`{json.dumps(default)}`" in rows[f.name], (section, f.name, default)


def test_target_entries(folder):
    """{target_size = ...} entries: one target, no type options, named after the target, round-trip as written."""
    p = write(folder, """
        [release]
        source = "model"
        gguf = ["Q8_0", {target_size = "4.2G", imatrix = true}, {target_bpw = 4.5, speed_check = false, exclude_types = ["Q4_1"]},
                {target_kld = 0.01, name = "best", calibration_chunks = 8}, {target_size = 800000000}]
        """)
    r = load_recipe(p)
    assert r.artifact_names == ["Q8_0", "4.2G-mix", "4.5bpw-mix", "best", "800000000-mix"] and r.has_mix
    mix = r.gguf[1]
    assert mix.type is None and mix.imatrix and mix.target.kind == "size" and mix.target.value == 4.2e9 and r.needs_imatrix
    assert r.gguf[2].exclude_types == ("q4_1",) and not r.gguf[2].speed_check and r.gguf[3].calibration_chunks == 8
    assert r.gguf[0].to_dict() == {"type": "Q8_0", "imatrix": False, "name": None, "output_tensor_type": None,
                                   "token_embedding_type": None, "tensor_types": [], "pure": False,
                                   "leave_output_tensor": False}  # a type entry's keys (and stage key) as before
    assert "{target_size = \"4.2G\", imatrix = true}" in r.to_toml() or "{imatrix = true, target_size = \"4.2G\"}" in r.to_toml()
    assert recipe_from_dict(r.to_dict(), base_dir=r.base_dir) == r
    assert load_recipe(write(folder, r.to_toml(), "again.toml")).gguf == r.gguf

    bad = write(folder, """
        [release]
        source = "model"
        split_max_size = "1G"
        gguf = [{target_size = "big"}, {type = "Q4_K_M", target_bpw = 4.5}, {target_kld = 0.01, target_bpw = 3, pure = true},
                {target_bpw = -1}, {type = "Q4_K_M", max_slowdown = 3}, {target_bpw = 4, max_slowdown = -1},
                {target_bpw = 4, exclude_types = ["q9_k"]}, {imatrix = true}, {target_bpw = 5}]
        """, "bad.toml")
    msgs = errors(bad)
    expected = ["target_size = \"big\" in [release] gguf entry 1: not a number",
                "gguf entry 2 has both type and target_bpw: a target entry chooses per-tensor types itself",
                "gguf entry 3 has target_bpw and target_kld: give one target per entry",
                "pure in [release] gguf entry 3 applies to type entries",
                "target_bpw = -1.0 in [release] gguf entry 4: use a positive value",
                "max_slowdown in [release] gguf entry 5 applies to target entries",
                "max_slowdown = -1 in [release] gguf entry 6: use a percent >= 0",
                "exclude_types = \"q9_k\" in [release] gguf entry 7: not a ggml tensor type",
                "gguf entry 8 has no type: add type = \"Q4_K_M\" (or another catalogue type), or a target",
                "split_max_size with a target entry"]
    for want in expected:
        assert any(want in m for m in msgs), (want, msgs)
    assert all(m.startswith(f"{bad}:") for m in msgs), msgs  # each at its line
