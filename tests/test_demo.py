"""The README's first command ends in `edgequant demo`: it must work offline but for PyPI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgequant.cli import app
from edgequant.gguf_info import inspect_gguf


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    types = {c["outtype"]: Path(c["files"][0]) for c in data["conversions"]}
    assert set(types) == {"F16", "Q8_0"}
    for t, path in types.items():
        assert path.is_file() and inspect_gguf(path).file_type == t
    assert "paris" in data["answer"].lower()
    assert not list((tmp_path / "demo").glob("*.part"))
