"""Sizes for people: decimal units, as llama.cpp and the Hugging Face hub print them."""

from __future__ import annotations


def human_size(n: float | None, digits: int = 2, none: str = "—") -> str:
    """``145_000_000`` -> ``145.00 MB``; bytes without decimals; ``none`` when unknown."""
    if n is None:
        return none
    x = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(x) < 1000 or unit == "TB":
            return f"{x:.0f} B" if unit == "B" else f"{x:.{digits}f} {unit}"
        x /= 1000
    return none
