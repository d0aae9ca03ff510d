"""Choosing one type per tensor: a multiple-choice knapsack, solved by Lagrangian relaxation and then
greedy marginal gains.

Each tensor has options (type, bytes, cost), where cost is the tensor's predicted share of the KL
divergence. The costs add up over tensors (the usual first-order model of independent quantization
errors). Two questions:

- ``within_bytes``: the lowest total cost whose bytes stay within a budget;
- ``within_cost``: the fewest bytes whose total cost stays within a bound.

For a multiplier ``lam`` every tensor independently takes the option minimising ``cost + lam * bytes``;
sweeping ``lam`` walks the lower convex hull of the (bytes, cost) trade-off. Bisection finds the
hull point nearest the constraint; then single-tensor moves that keep the constraint are made while
any improves the objective (spending the leftover bytes, or saving bytes within the leftover cost),
best ratio first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    cost: float


@dataclass
class Choice:
    tensor: str
    options: list[Option]  # at least one

    def cheapest(self) -> Option:
        return min(self.options, key=lambda o: (o.bytes, o.cost))

    def best(self) -> Option:
        return min(self.options, key=lambda o: (o.cost, o.bytes))


@dataclass
class Solution:
    picks: dict[str, Option]

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.picks.values())

    @property
    def cost(self) -> float:
        return sum(o.cost for o in self.picks.values())


def _pick(choices: list[Choice], lam: float) -> dict[str, Option]:
    return {c.tensor: min(c.options, key=lambda o: (o.cost + lam * o.bytes, o.bytes)) for c in choices}


def _bisect(choices: list[Choice], ok) -> dict[str, Option]:
    """The hull point with the smallest multiplier ``lam`` (the most bytes) for which ``ok(picks)`` holds;
    ``ok`` must become true as ``lam`` grows (fewer bytes, more cost) for ``within_bytes``."""
    lo, hi = 0.0, 1.0
    while not ok(_pick(choices, hi)):
        hi *= 4.0
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if ok(_pick(choices, mid)):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return _pick(choices, hi)


def within_bytes(choices: list[Choice], budget: int) -> Solution | None:
    """Lowest total cost with total bytes <= ``budget``; None when even the cheapest options exceed it."""
    if sum(c.cheapest().bytes for c in choices) > budget:
        return None
    if sum(c.best().bytes for c in choices) <= budget:
        return Solution({c.tensor: c.best() for c in choices})
    picks = _bisect(choices, lambda p: sum(o.bytes for o in p.values()) <= budget)
    if sum(o.bytes for o in picks.values()) > budget:  # the multiplier ran out: start from the cheapest
        picks = {c.tensor: c.cheapest() for c in choices}
    _spend(choices, picks, budget)
    return Solution(picks)


def _greedy(choices: list[Choice], picks: dict[str, Option], left: float, move) -> None:
    """While some single-tensor change is allowed, make the one with the best ratio. ``move(cur, new, left)``
    gives (ratio, what it uses of ``left``) for an allowed change, None otherwise."""
    by_name = {c.tensor: c for c in choices}
    while True:
        best, best_ratio, best_used = None, 0.0, 0.0
        for name, cur in picks.items():
            for o in by_name[name].options:
                m = move(cur, o, left)
                if m is not None and m[0] > best_ratio:
                    best, (best_ratio, best_used) = (name, o), m
        if best is None:
            return
        left -= best_used
        picks[best[0]] = best[1]


def _spend(choices: list[Choice], picks: dict[str, Option], budget: int) -> None:
    """Spend the bytes left: the most cost saved per byte added, among the changes that fit."""
    def move(cur: Option, o: Option, left: float):
        extra, gain = o.bytes - cur.bytes, cur.cost - o.cost
        return (gain / max(extra, 1), extra) if gain > 0 and extra <= left else None

    _greedy(choices, picks, budget - sum(o.bytes for o in picks.values()), move)


def within_cost(choices: list[Choice], bound: float) -> Solution | None:
    """Fewest total bytes with total cost <= ``bound``; None when even the best options exceed it."""
    if sum(c.best().cost for c in choices) > bound:
        return None
    if sum(c.cheapest().cost for c in choices) <= bound:
        return Solution({c.tensor: c.cheapest() for c in choices})
    # the largest lam (fewest bytes) whose cost still fits: bisect on "cost too high"
    lo, hi = 0.0, 1.0

    def cost(lam: float) -> float:
        return sum(o.cost for o in _pick(choices, lam).values())

    while cost(hi) <= bound and hi < 1e30:
        hi *= 4.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if cost(mid) <= bound:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    picks = _pick(choices, lo)
    _save(choices, picks, bound)
    return Solution(picks)


def _save(choices: list[Choice], picks: dict[str, Option], bound: float) -> None:
    """Use the cost left under the bound: the most bytes saved per cost added, among the changes that fit."""
    def move(cur: Option, o: Option, left: float):
        saved, added = cur.bytes - o.bytes, o.cost - cur.cost
        return (saved / max(added, 1e-30), added) if saved > 0 and added <= left else None

    _greedy(choices, picks, bound - sum(o.cost for o in picks.values()), move)
