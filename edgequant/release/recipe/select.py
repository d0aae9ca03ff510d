"""``--only``: which of a recipe's artifacts a list of names keeps (``Recipe.select``)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from edgequant.errors import EdgequantError
from edgequant.quantize import types as qtypes

if TYPE_CHECKING:
    from edgequant.release.recipe.schema import Recipe


def selected(recipe: Recipe, names: list[str]) -> tuple[set[int], set[int]]:
    """Indexes of the GGUF and the GPTQ variants that ``names`` keep; an unknown name is an error."""
    keep_gguf: set[int] = set()
    keep_gptq: set[int] = set()
    base = {b.casefold() for b in recipe.base_artifact_names}
    unknown = []
    for requested in names:
        wanted = qtypes.ALIASES.get(requested.upper(), requested).casefold()
        gguf = {i for i, v in enumerate(recipe.gguf) if wanted in ("gguf", v.artifact.casefold())}
        gptq = {i for i, v in enumerate(recipe.gptq) if _keeps_gptq(wanted, v.artifact.casefold())}
        keep_gguf |= gguf
        keep_gptq |= gptq
        if not (gguf or gptq or wanted in base or wanted in ("gguf", "gptq")):
            unknown.append(requested)
    if unknown:
        raise EdgequantError("\n".join(_not_an_artifact(recipe, u) for u in unknown))
    return keep_gguf, keep_gptq


def _keeps_gptq(wanted: str, artifact: str) -> bool:
    """``gptq``, the artifact's name, or a prefix of it such as ``gptq-4bit`` (all folded)."""
    return wanted in ("gptq", artifact) or (artifact.startswith(wanted + "-") and wanted.startswith("gptq-"))


def _not_an_artifact(recipe: Recipe, name: str) -> str:
    available = [*recipe.artifact_names, *recipe.base_artifact_names[1:]]
    folded = {a.casefold(): a for a in available}
    close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.5)
    hint = f" (did you mean {folded[close[0]]!r}?)" if close else ""
    return f"--only {name}: not an artifact of this recipe{hint}; artifacts: {', '.join(available) or 'none'}"
