"""The settings of ``edgequant gptq``, importable without torch: the CLI's and the recipe's defaults come
from here, so each default is written once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

MOE_ROUTINGS = ("auto", "native", "all")
MIN_EXPERT_SHARE = 0.005  # the share of the calibration tokens an expert needs under native routing (GPTQModel's
# own threshold, below which it quantizes the expert by round-to-nearest; edgequant passes it explicitly)

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
    # MoE: how the quantizing forward routes calibration tokens to experts. "auto": the router's own top-k when
    # every expert gets enough tokens (MIN_EXPERT_SHARE of them, counted first), else every token to every expert;
    # "native": the router's top-k, and an expert short of tokens is an error; "all": every token to every expert
    moe_routing: str = "auto"
    force: bool = False
    backend: GPTQBackend | None = None  # default: GPTQModelBackend()

