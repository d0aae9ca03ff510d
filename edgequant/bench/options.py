"""The settings of ``edgequant bench``, importable without numpy or torch: the CLI's and the recipe's
defaults come from here, so each default is written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgequant.text import Text


@dataclass
class BenchOptions:
    reference: str | Path | None = None
    text: str | Path | Text | None = None
    ctx: int = 512
    chunks: int | None = None
    devices: str | list[str] = "cpu"
    threads: int | None = None
    flash_attn: bool = True
    speed: bool = True
    quality: bool = True
    pp: int = 512  # llama-bench's -p
    tg: int = 128  # llama-bench's -n
    reps: int = 5  # llama-bench's -r
    n_batch: int = 2048
    n_ubatch: int = 512
    isolated_speed: bool = True  # each speed test in a fresh process (clean load time and peak RSS)
