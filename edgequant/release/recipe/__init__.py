"""Release recipes: one TOML file that says what a release holds, checked before any work starts.

```toml
[release]
source = "HuggingFaceTB/SmolLM2-135M-Instruct"   # hub id, or a folder relative to this file
gguf = ["Q8_0", "Q4_K_M", {type = "Q2_K", imatrix = true}, "IQ2_XS"]

[[gptq]]
bits = 4
group_size = 64

[[gates]]
artifact = "Q4_K_M"
metric = "kld_mean"
max = 0.1
```

Every key, its type, default and command-line flag is in ``docs/recipe.md``. Each key is declared
once, as a field of a frozen dataclass in ``schema.py``; the rest is read off those fields:

- ``schema``: the dataclass tree (``Recipe``, ``GGUFVariant``, ``GPTQVariant``, ``BenchSettings``...),
  ``TABLES`` (the keys the validator accepts), ``METRICS``, ``to_dict``;
- ``check``: ``file:line`` locations (``find_line``) and typed reading of one table;
- ``build``: validation of the whole recipe, every problem reported at once;
- ``flags``: ``FLAGS``, shorthands (``Q2_K:imatrix``, ``4:64``, ``Q4_K_M:kld_mean<=0.1``), ``parse_flag_args``;
- ``toml_write``: ``to_toml``; ``select``: ``--only``.

Validation collects every problem, then raises one ``EdgequantError`` whose lines each name the
place to fix: ``release.toml:12: unknown key 'gguf_typs' in [release] (did you mean 'gguf'?)``,
or ``--bench-ctx: ...`` for a value that came from a flag.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Mapping

from edgequant.errors import EdgequantError
from edgequant.release.recipe.build import build
from edgequant.release.recipe.check import find_line, toml_error
from edgequant.release.recipe.flags import FLAGS, apply_flags, parse_flag_args
from edgequant.release.recipe.schema import (
    ARRAY_TABLES, ARTIFACT_NAME, BASE_TYPES, DEFAULT_GGUF, DEVICES, GPTQ_BITS, GPTQ_GROUP_SIZES, HUB_ID, METRICS,
    SPEED_METRICS, TABLES, BenchSettings, CalibrationSettings, CardSettings, Gate, GGUFVariant, GPTQVariant,
    ImatrixSettings, Recipe,
)
from edgequant.release.recipe.toml_write import to_toml

__all__ = [
    "ARRAY_TABLES", "ARTIFACT_NAME", "BASE_TYPES", "DEFAULT_GGUF", "DEVICES", "FLAGS", "GPTQ_BITS", "GPTQ_GROUP_SIZES",
    "HUB_ID", "METRICS", "SPEED_METRICS", "TABLES", "BenchSettings", "CalibrationSettings", "CardSettings", "Gate",
    "GGUFVariant", "GPTQVariant", "ImatrixSettings", "Recipe", "find_line", "load_recipe", "parse_flag_args",
    "recipe_from_dict", "recipe_from_options", "to_toml",
]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is reported with its line before any work."""
    path = Path(path)
    if not path.is_file():
        raise EdgequantError(f"recipe {path} does not exist; pass a TOML recipe file (see docs/recipe.md)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgequantError(toml_error(str(path), e)) from None
    return build(raw, base_dir=str(path.resolve().parent), text=text, file=str(path))


def recipe_from_dict(raw: Mapping[str, Any], *, base_dir: str | Path = ".") -> Recipe:
    """Validate a recipe given as data (the shape of ``Recipe.to_dict()`` or of a parsed TOML file)."""
    return build(copy.deepcopy(dict(raw)), base_dir=str(base_dir), text=None, file=None)


def recipe_from_options(source: str | Path, base_dir: str | Path = ".", **flags: Any) -> Recipe:
    """A one-off recipe from command-line flags (``FLAGS`` lists them; ``None`` means not given)."""
    raw: dict = {"release": {"source": str(source)}}
    given = apply_flags(raw, flags)
    given[("release", "source")] = "source"
    return build(raw, base_dir=str(Path(base_dir).resolve()), text=None, file=None, flags=given)
