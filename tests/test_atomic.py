"""edgequant.atomic: every output is written under a .part name and renamed; a failure leaves nothing."""

from __future__ import annotations

import pytest

from edgequant.atomic import atomic_folder, atomic_outputs


def test_atomic_outputs_rename_on_success_and_remove_on_failure(tmp_path):
    final = tmp_path / "a.gguf"
    with atomic_outputs([final]) as (part,):
        part.write_bytes(b"x")
        assert part.name.endswith(".part") and not final.exists()
    assert final.read_bytes() == b"x"
    with pytest.raises(KeyboardInterrupt), atomic_outputs([tmp_path / "b.gguf"]) as (part,):
        part.write_bytes(b"half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_atomic_folder_stages_renames_and_cleans_up(tmp_path):
    final = tmp_path / "Model-GPTQ-4bit-128g"
    (tmp_path / "Model-GPTQ-4bit-128g.123-deadbeef.part").mkdir()  # a killed run's staging folder
    with atomic_folder(final) as part:
        (part / "config.json").write_text("{}")
        assert part.parent == tmp_path and part.name.endswith(".part") and not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name] and (final / "config.json").is_file()

    with pytest.raises(RuntimeError), atomic_folder(final, replace=True) as part:
        (part / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert [p.name for p in final.iterdir()] == ["config.json"]  # the old folder is untouched

    with atomic_folder(final, replace=True) as part:
        (part / "model.safetensors").write_bytes(b"new")
    assert [p.name for p in final.iterdir()] == ["model.safetensors"]
