"""MoE expert coverage of an importance matrix, and the policy for experts no calibration token reached.

Coverage is read from the imatrix itself, so it is the same for both engines and for any imatrix file
(``llama-imatrix``'s too): per MoE layer, the token counts of its expert stack (``blk.N.ffn_up_exps``,
else ``ffn_gate_exps``, ``ffn_gate_up_exps`` or ``ffn_down_exps``, the names gguf-py gives llama.cpp's
expert stacks; every stack of a layer sees the same routed tokens). A count is the number of
(token, slot) pairs routed to that expert, so a layer's counts sum to tokens x experts per token.
A dense model has no expert stack and no coverage.

An expert that saw no token has no importance data. What goes into the file for it is the policy
(``--unseen-experts``):

- ``fill`` (the default): its slot in every expert stack of the layer gets the mean, column by column,
  of the layer's seen experts' values (``in_sum2 / counts``, each seen expert weighing the same), with
  a count of 1, so the quantizer weighs its columns like its siblings' (the approach of ik_llama.cpp).
  The file lists every slot filled so in the metadata key ``edgequant.imatrix.filled_experts``
  (``"<tensor>:<expert>"`` strings); reading the file back counts those slots as unseen again.
  llama.cpp ignores the key.
- ``uniform``: the slot keeps count 0, as ``llama-imatrix`` writes it; ``llama-quantize`` then weighs
  every column of that expert by 1 (no importance data).
- ``error``: stop before writing, naming the fix (more or longer calibration text, more ``--chunks``).

Unseen experts are never silent: the result carries a warning line (the CLI prints it) and the coverage
lists their ids per layer. A tensor none of whose experts saw a token cannot be filled and stays uniform.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgequant.errors import EdgequantError

POLICIES = ("fill", "uniform", "error")
DEFAULT_POLICY = "fill"
KEY_FILLED = "edgequant.imatrix.filled_experts"  # array of "<tensor>:<expert>" strings
KEY_POLICY = "edgequant.imatrix.unseen_experts"  # the policy the file was written with


def _stack_names() -> tuple[str, ...]:
    """gguf-py's names of llama.cpp's expert stacks (``blk.{bid}.ffn_up_exps`` ...), in the order coverage prefers them."""
    import gguf

    T = gguf.MODEL_TENSOR
    kinds = [getattr(T, k, None) for k in ("FFN_UP_EXP", "FFN_GATE_EXP", "FFN_GATE_UP_EXP", "FFN_DOWN_EXP")]
    return tuple(gguf.TENSOR_NAMES[k] for k in kinds if k is not None)


@functools.lru_cache(maxsize=1)
def _stack_patterns() -> tuple[re.Pattern, ...]:
    """One pattern per stack kind (the block number its group), in the order of :func:`_stack_names`."""
    return tuple(re.compile("^" + re.escape(n).replace(re.escape("{bid}"), r"(\d+)", 1) + r"\.weight$") for n in _stack_names())


def _is_stack(name: str, entry) -> bool:
    return entry.counts.size > 1 and any(p.match(name) for p in _stack_patterns())


def resolve_policy(policy: str | None) -> str:
    p = (policy or DEFAULT_POLICY).strip().lower()
    if p not in POLICIES:
        raise EdgequantError(f"--unseen-experts {policy!r}: use fill, uniform or error")
    return p


# -- the coverage ---------------------------------------------------------------------------------------


@dataclass
class LayerCoverage:
    """One MoE layer: the tokens routed to each of its experts (``tokens[e]``), the ids of those that saw
    none (``unseen``) and of those whose slots the ``fill`` policy filled (``filled``, a subset of ``unseen``)."""

    layer: int
    tensor: str  # the expert stack whose counts these are (for GPTQ calibration: the router module)
    tokens: list[int]
    unseen: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)

    @property
    def n_expert(self) -> int:
        return len(self.tokens)

    @property
    def reached(self) -> int:
        return self.n_expert - len(self.unseen)

    @property
    def min(self) -> int:
        return int(min(self.tokens))

    @property
    def max(self) -> int:
        return int(max(self.tokens))

    @property
    def median(self) -> float:
        return float(np.median(self.tokens))

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tensor": self.tensor, "experts": self.n_expert, "reached": self.reached,
                "min": self.min, "median": self.median, "max": self.max, "unseen": list(self.unseen),
                "filled": list(self.filled), "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerCoverage:
        return cls(layer=int(d["layer"]), tensor=str(d.get("tensor", "")), tokens=[int(x) for x in d.get("tokens") or []],
                   unseen=[int(x) for x in d.get("unseen") or []], filled=[int(x) for x in d.get("filled") or []])


@dataclass
class ExpertCoverage:
    """Per MoE layer, how many calibration tokens each expert saw; ``policy``: what was done with the unseen
    ones (None: a file edgequant did not write, whose zero counts llama-quantize reads as uniform)."""

    layers: list[LayerCoverage] = field(default_factory=list)
    policy: str | None = None

    @property
    def n_expert(self) -> int:
        return max((lc.n_expert for lc in self.layers), default=0)

    @property
    def unseen(self) -> int:
        """Experts that saw no token, over all layers."""
        return sum(len(lc.unseen) for lc in self.layers)

    @property
    def experts(self) -> int:
        return sum(lc.n_expert for lc in self.layers)

    @property
    def with_unseen(self) -> list[LayerCoverage]:
        return [lc for lc in self.layers if lc.unseen]

    @property
    def filled(self) -> int:
        return sum(len(lc.filled) for lc in self.layers)

    @property
    def tokens(self) -> list[int]:
        """Every expert's token count, layer after layer."""
        return [t for lc in self.layers for t in lc.tokens]

    @property
    def min(self) -> int:
        return min(self.tokens, default=0)

    @property
    def median(self) -> float:
        return float(np.median(self.tokens)) if self.tokens else 0.0

    @property
    def max(self) -> int:
        return max(self.tokens, default=0)

    @property
    def warning(self) -> str | None:
        """One line when some expert saw no token (None when every expert was reached)."""
        if not self.unseen:
            return None
        n_layers = len(self.with_unseen)
        what = f"{self.unseen} of {self.experts} experts in {n_layers} of {len(self.layers)} MoE layers saw no calibration token"
        if self.policy == "fill":
            left = self.unseen - self.filled
            how = "their imatrix slots were filled with the mean of their layer's seen experts (--unseen-experts fill)"
            if left:
                how += f"; {left} in layers where no expert saw a token stay uniform"
        elif self.policy == "uniform":
            how = "llama-quantize weighs their columns uniformly (--unseen-experts uniform)"
        else:
            how = "llama-quantize weighs their columns uniformly (the file records no policy)"
        return f"{what}: {how}; more or longer calibration text (--chunks, --calibration) reaches more of them"

    def summary(self) -> str:
        """One line: layers, experts reached, tokens per expert."""
        return (f"{len(self.layers)} MoE layers x {self.n_expert} experts: {self.experts - self.unseen}/{self.experts} reached, "
                f"tokens per expert min {self.min}, median {self.median:g}, max {self.max}")

    def to_dict(self) -> dict:
        return {"policy": self.policy, "layers_count": len(self.layers), "experts": self.experts,
                "reached": self.experts - self.unseen, "unseen": self.unseen, "filled": self.filled,
                "min": self.min, "median": self.median, "max": self.max, "warning": self.warning,
                "layers": [lc.to_dict() for lc in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ExpertCoverage | None:
        if not isinstance(d, Mapping):
            return None
        return cls(layers=[LayerCoverage.from_dict(x) for x in d.get("layers") or [] if isinstance(x, Mapping)],
                   policy=d.get("policy"))


def _stacks(entries: Mapping[str, Any]) -> dict[int, list[str]]:
    """Layer -> its expert stacks among ``entries`` (one matrix per expert), in preference order."""
    found: dict[int, list[tuple[int, str]]] = {}
    for rank, pattern in enumerate(_stack_patterns()):
        for name, e in entries.items():
            if e.counts.size > 1 and (m := pattern.match(name)):
                found.setdefault(int(m.group(1)), []).append((rank, name))
    return {b: [n for _, n in sorted(v)] for b, v in sorted(found.items())}


def coverage_of(m, policy: str | None = None) -> ExpertCoverage | None:
    """The expert coverage of an :class:`~edgequant.quantize.imatrix_file.Imatrix` (None for a dense model);
    slots listed in ``m.filled`` count as unseen. ``policy``: the one recorded (default: the file's)."""
    stacks = _stacks(m.entries)
    if not stacks:
        return None
    filled = getattr(m, "filled", {}) or {}
    layers = []
    for block, names in stacks.items():
        name = names[0]
        counts = np.asarray(m.entries[name].counts, dtype=np.float64).copy()
        was_filled = sorted({e for e in filled.get(name, []) if 0 <= e < counts.size})
        counts[was_filled] = 0
        tokens = [int(round(c)) for c in counts]
        layers.append(LayerCoverage(layer=block, tensor=name, tokens=tokens,
                                    unseen=[e for e, t in enumerate(tokens) if t == 0], filled=was_filled))
    return ExpertCoverage(layers=layers, policy=policy if policy is not None else getattr(m, "unseen_policy", None))


def settle_unseen(m, policy: str = DEFAULT_POLICY) -> ExpertCoverage | None:
    """Apply ``policy`` to ``m`` (an ``Imatrix`` about to be written; changed in place for ``fill``) and return
    its coverage; ``error`` raises when an expert saw no token. See the module docstring."""
    policy = resolve_policy(policy)
    cov = coverage_of(m, policy)
    if cov is None:
        return None
    if cov.unseen and policy == "error":
        worst = cov.with_unseen[0]
        raise EdgequantError(
            f"{cov.unseen} of {cov.experts} experts saw no calibration token (layer {worst.layer}: experts "
            f"{format_ids(worst.unseen)}); give more or longer calibration text (--calibration, --chunks), "
            f"or pass --unseen-experts fill")
    m.unseen_policy = policy
    if policy != "fill" or not cov.unseen:
        return cov
    for name, e in m.entries.items():
        if not _is_stack(name, e):
            continue
        seen = e.counts > 0
        if seen.all() or not seen.any():
            continue
        mean = (e.sums[seen] / e.counts[seen, None]).mean(axis=0)
        idx = np.flatnonzero(~seen)
        e.sums[idx] = mean.astype(e.sums.dtype)
        e.counts[idx] = 1
        m.filled[name] = sorted(set(m.filled.get(name, [])) | {int(i) for i in idx})
    return coverage_of(m, policy)


def format_ids(ids: list[int], limit: int = 12) -> str:
    """Expert ids as ranges (``0, 3-5, 9``), the first ``limit`` pieces, then a count."""
    pieces: list[str] = []
    run: list[int] = []
    for i in sorted(ids):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            pieces.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        pieces.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    if len(pieces) > limit:
        return ", ".join(pieces[:limit]) + f", ... ({len(ids)} in all)"
    return ", ".join(pieces)
