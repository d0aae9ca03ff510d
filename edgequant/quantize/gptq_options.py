"""The settings of ``edgequant gptq``, importable without torch: the CLI's and the recipe's defaults come
from here, so each default is written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgequant.quantize.gptq import GPTQBackend


@dataclass
class GPTQOptions:
    group_size: int | None = None  # None: 128, or the largest of 64/32 dividing every input dimension
    desc_act: bool = False  # act-order: quantize columns by decreasing activation (g_idx permuted)
    sym: bool = True
    damp_percent: float = 0.05  # GPTQModel's default for GPTQ (the paper's code used 0.01)
    true_sequential: bool = True
    calibration: str | Path | None = None  # a text file or the built-in corpus (load_text)
    samples: int = 128  # calibration sequences
    seq_len: int = 512  # tokens per calibration sequence (128 x 512 fits the built-in corpus)
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 1
    force: bool = False
    backend: GPTQBackend | None = None  # default: GPTQModelBackend()

