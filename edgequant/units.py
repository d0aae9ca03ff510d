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


SIZE_UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """``50G``, ``500M``, ``2K`` or a byte count, decimal units like llama.cpp's --split-max-size;
    ValueError for anything else."""
    t = text.strip().upper().removesuffix("B")
    if t and t[-1] in SIZE_UNITS:
        return int(float(t[:-1]) * SIZE_UNITS[t[-1]])
    return int(t)
