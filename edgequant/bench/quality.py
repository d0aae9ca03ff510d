"""Perplexity and KL divergence, accumulated chunk by chunk, with llama-perplexity's arithmetic.

Perplexity is llama-perplexity's default mode: NLL in double precision over the scored second half
of every chunk; PPL = exp(mean NLL), error = PPL * sqrt(var / (count - 1)).

KL divergence is llama-perplexity's ``--kl-divergence`` mode, done in one run: for each chunk the
reference model's logits are turned into the tool's compressed log-probabilities (per token a
scale, a minimum and one uint16 per vocabulary entry, the lowest clamped at max - 16), held in memory
for that chunk only, and every other model is compared against them as the tool compares against
its ``--kl-divergence-base`` file. Same formulas, same float32/float64 mix, same percentiles: the
numbers equal the tool's on the same tokens, and no multi-gigabyte logits file is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CUTOFF = 16.0  # llama.cpp drops reference log-probs below max - 16


BLOCK = 16  # rows per vectorised pass: each pass's temporaries (16 x n_vocab floats) stay in the CPU cache


def _blocks(n: int):
    return (slice(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK))


def _max_and_sum_exp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the index of the max, the max, and sum(double(expf(x - max))), as the tool computes them."""
    imax = x.argmax(axis=1)
    mx = x[np.arange(len(x)), imax]
    sums = np.empty(len(x))
    for b in _blocks(len(x)):
        t = x[b] - mx[b, None]
        np.exp(t, out=t)
        sums[b] = t.sum(axis=1, dtype=np.float64)
    return imax, mx, sums


def nll_of_next_tokens(logits: np.ndarray, next_ids: list[int] | np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[next_ids[i]] per row in float64, as llama-perplexity's default mode
    forms it: log(sum of float expf, in double) - (logit - max)."""
    x = np.asarray(logits, dtype=np.float32)
    _, mx, sums = _max_and_sum_exp(x)
    return np.log(sums) - (x[np.arange(len(x)), next_ids] - mx).astype(np.float64)


@dataclass
class CompressedReference:
    """One chunk of reference log-probabilities in llama-perplexity's uint16 form."""

    scale: np.ndarray  # float32 [n]
    min_log_prob: np.ndarray  # float32 [n]
    q: np.ndarray  # uint16 [n, vocab]

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> "CompressedReference":
        x = np.asarray(logits, dtype=np.float32)
        _, mx, sums = _max_and_sum_exp(x)
        lse = np.log(sums).astype(np.float32)
        mn = np.maximum(x.min(axis=1), mx - np.float32(CUTOFF))
        min_log_prob = (mn - mx) - lse
        scale = (mx - mn) / np.float32(65535.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
        q = np.empty(x.shape, dtype=np.uint16)
        for b in _blocks(len(x)):
            t = x[b] - mn[b, None]
            t *= inv[b, None]
            np.rint(t, out=t)
            t[x[b] <= mn[b, None]] = 0
            q[b] = t
        return cls(scale.astype(np.float32), min_log_prob.astype(np.float32), q)

    def log_probs(self, rows: slice = slice(None)) -> np.ndarray:
        return self.scale[rows, None] * self.q[rows].astype(np.float32) + self.min_log_prob[rows, None]


def _mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's interpolated percentile (in float32, as it computes it)."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - ip)
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


@dataclass
class QualityAccumulator:
    """PPL of one model, and its KLD statistics against the reference when one is given."""

    with_kld: bool
    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    count: int = 0
    running_ppl: list[float] = field(default_factory=list)
    # KLD mode sums, named as in the tool's kl_divergence_result
    k_nll: float = 0.0
    k_nll2: float = 0.0
    k_base: float = 0.0
    k_base2: float = 0.0
    k_nll_base: float = 0.0
    k_kld: float = 0.0
    k_kld2: float = 0.0
    k_pd: float = 0.0
    k_pd2: float = 0.0
    k_pd4: float = 0.0
    n_same_top: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, next_ids: np.ndarray, ref: CompressedReference | None = None) -> None:
        nll = nll_of_next_tokens(logits, next_ids)
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float((nll * nll).sum())
        self.count += len(nll)
        self.running_ppl.append(math.exp(self.nll_sum / self.count))
        if self.with_kld and ref is not None:
            self._add_kld(np.asarray(logits, dtype=np.float32), next_ids, ref)

    def _add_kld(self, x: np.ndarray, next_ids: np.ndarray, ref: CompressedReference) -> None:
        rows = np.arange(len(next_ids))
        imax, mx, sums = _max_and_sum_exp(x)
        lse = np.log(sums).astype(np.float32)
        nll = (mx + lse) - x[rows, next_ids]  # float32, as the tool's `const float nll`
        nll_base = -(ref.scale * ref.q[rows, next_ids].astype(np.float32) + ref.min_log_prob)
        m = mx + lse
        kld = np.empty(len(rows))
        same_top = 0
        for b in _blocks(len(rows)):
            base_lp = ref.log_probs(b)
            same_top += int((imax[b] == base_lp.argmax(axis=1)).sum())
            term = np.exp(base_lp) * (base_lp - x[b] + m[b, None])
            kld[b] = np.where(base_lp > np.float32(-CUTOFF), term, np.float32(0)).sum(axis=1, dtype=np.float64)
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        # the tool forms these products in float (float * float) and adds them to double sums
        f64 = np.float64
        pd2 = (p_diff * p_diff).astype(f64)
        self.k_nll += float(nll.astype(f64).sum())
        self.k_nll2 += float((nll * nll).astype(f64).sum())
        self.k_base += float(nll_base.astype(f64).sum())
        self.k_base2 += float((nll_base * nll_base).astype(f64).sum())
        self.k_nll_base += float((nll * nll_base).astype(f64).sum())
        self.k_kld += float(kld.sum())
        self.k_kld2 += float((kld * kld).sum())
        self.k_pd += float(p_diff.astype(f64).sum())
        self.k_pd2 += float(pd2.sum())
        self.k_pd4 += float((pd2 * pd2).sum())
        self.n_same_top += same_top
        self.kld_values.append(kld.astype(np.float32))
        self.p_diff_values.append(p_diff.astype(np.float32))

    def ppl(self) -> tuple[float, float]:
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        ppl = math.exp(mean)
        return ppl, (math.sqrt(var / (self.count - 1)) * ppl if var > 0 else 0.0)

    def kld(self) -> dict | None:
        """The tool's KLD summary (mean ± error, percentiles, Δp, same-top, ln PPL ratio)."""
        n = self.count
        if not self.with_kld or not self.kld_values:
            return None
        lp, lp_unc = _mean_and_uncertainty(self.k_nll, self.k_nll2, n)
        lb, lb_unc = _mean_and_uncertainty(self.k_base, self.k_base2, n)
        cov = ((self.k_nll_base / n - (self.k_nll / n) * (self.k_base / n)) / (n - 1)) if n >= 10 else 0.0
        ratio_unc = math.sqrt(max(lp_unc * lp_unc + lb_unc * lb_unc - 2.0 * cov, 0.0))
        kl, kl_unc = _mean_and_uncertainty(self.k_kld, self.k_kld2, n)
        pd, pd_unc = _mean_and_uncertainty(self.k_pd, self.k_pd2, n)
        mse, mse_unc = _mean_and_uncertainty(self.k_pd2, self.k_pd4, n)
        rms = math.sqrt(mse)
        top = self.n_same_top / n
        kv = np.sort(np.concatenate(self.kld_values))
        pv = np.sort(np.concatenate(self.p_diff_values))
        median = float(0.5 * (kv[len(kv) // 2] + kv[len(kv) // 2 - 1])) if len(kv) % 2 == 0 else float(kv[len(kv) // 2])
        return {
            "kld_mean": kl, "kld_mean_error": kl_unc, "kld_median": median,
            "kld_p99": _percentile(kv, 0.99), "kld_p999": _percentile(kv, 0.999), "kld_max": float(kv[-1]),
            "delta_p_mean": pd, "delta_p_mean_error": pd_unc,
            "delta_p_rms": rms, "delta_p_rms_error": (0.5 / rms * mse_unc) if rms > 0 else 0.0,
            "delta_p_p1": _percentile(pv, 0.01), "delta_p_p99": _percentile(pv, 0.99),
            "same_top": top, "same_top_error": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
            "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_error": ratio_unc,
            "ppl_ratio": math.exp(lp - lb), "ppl_base": math.exp(lb),
        }
