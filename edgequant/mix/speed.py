"""A mix's matrix-multiplication time beside a standard type's, predicted from this machine's kernel
speeds (``kernels.py``) before any file is written, so that the choice keeps within ``--max-slowdown``
tensor by tensor instead of leaving whole types out.

A tensor's time in a type is its weights times the type's seconds per weight at its row length, for a
prompt batch (pp) and for one token (tg). Only matrix multiplications count: the token embedding is a
row lookup (unless the model ties it to the output), norms stay F32 in both files, attention is the same
in both. The rest of a forward pass is the same for both files, so the predicted ratio of the sums
overstates the whole model's slowdown: the constraint errs on the safe side. MoE expert tensors count
at the share of experts a token uses in tg (all of them in a prompt batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgequant.mix.cost import TensorCosts
from edgequant.mix.kernels import KernelSpeed


@dataclass
class SpeedModel:
    standard: str  # the standard type whose per-tensor types are the reference
    times: dict[str, dict[str, tuple[float, float]]]  # tensor -> type -> (pp, tg) seconds
    reference: dict[str, str]  # tensor -> its type in the standard file
    std_pp: float = 0.0
    std_tg: float = 0.0
    # the standard file's measured time over its predicted multiplication time (pp batch, one token), from 1
    # to 4: a slowdown of the multiplications is diluted by this much in the whole forward pass
    pp_scale: float = 1.0
    tg_scale: float = 1.0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.std_pp = sum(self.times[n][t][0] for n, t in self.reference.items() if n in self.times)
        self.std_tg = sum(self.times[n][t][1] for n, t in self.reference.items() if n in self.times)

    def ratios(self, picks: dict[str, str]) -> tuple[float, float]:
        """Predicted (pp, tg) matrix-multiplication time of ``picks`` over the standard file's."""
        pp = tg = 0.0
        for n, t in picks.items():
            row = self.times.get(n)
            if row is not None:
                a, b = row.get(t, row[self.reference[n]])
                pp, tg = pp + a, tg + b
        return (pp / self.std_pp if self.std_pp else 1.0, tg / self.std_tg if self.std_tg else 1.0)

    def calibrate(self, pp_seconds: float | None, tg_seconds: float | None) -> None:
        """Scale the allowance by the standard file's measured pp-batch and per-token times (seconds)."""
        def scale(real, predicted):
            return min(max(real / predicted, 1.0), 4.0) if real and predicted else 1.0

        self.pp_scale, self.tg_scale = scale(pp_seconds, self.std_pp), scale(tg_seconds, self.std_tg)

    def within(self, picks: dict[str, str], percent: float) -> bool:
        """``picks`` predicted at most ``percent`` slower than the standard file in the whole forward pass."""
        pp, tg = self.ratios(picks)
        return pp <= 1 + percent * self.pp_scale / 100 and tg <= 1 + percent * self.tg_scale / 100

    def penalty(self, tensor: str, type_name: str) -> float:
        """The tensor's share of the standard file's pp plus its share of tg, in this type."""
        t = self.times.get(tensor, {}).get(type_name)
        if t is None or not self.std_pp or not self.std_tg:
            return 0.0
        return t[0] / self.std_pp + t[1] / self.std_tg


def build_model(costs: dict[str, TensorCosts], reference: dict[str, str], kernels: dict[tuple[str, int], KernelSpeed],
                standard: str, *, has_output: bool, expert_share: float) -> SpeedModel:
    """Per tensor and type the predicted (pp, tg) seconds; ``reference`` gives each tensor's standard type."""
    times: dict[str, dict[str, tuple[float, float]]] = {}
    for name, c in costs.items():
        if c.role == "token_embd" and has_output:
            continue  # a row lookup, not a matrix multiplication
        k = c.shape[0]
        weights = math.prod(c.shape)
        tg_weights = weights * (expert_share if len(c.shape) == 3 else 1.0)
        types = {q.name for q in c.bytes} | {reference.get(name, "").upper()} - {""}
        row = {}
        for t in types:
            ks = kernels.get((t, k))
            if ks is not None:
                row[t] = (weights * ks.pp_s_per_weight, tg_weights * ks.tg_s_per_weight)
        if reference.get(name, "").upper() in row:
            times[name] = row
    ref = {n: reference[n].upper() for n in times}
    return SpeedModel(standard, times, ref)
