"""The per-tensor type choice (edgequant/mix/solve.py) against exhaustive search on small instances,
and the header rewrite that embeds a mix's recipe (gguf_layout.with_metadata) against gguf-py's reader."""

from __future__ import annotations

import itertools
import random

import gguf
import numpy as np
import pytest

from edgequant.mix import solve


def _instance(rng: random.Random, n_tensors: int) -> list[solve.Choice]:
    """Tensors with types of falling size and rising error (like Q8_0 > Q6_K > Q4_K > Q2_K), each tensor
    with its own sensitivity, some options dominated."""
    choices = []
    for i in range(n_tensors):
        size = rng.randint(1, 20) * 1000
        sens = rng.uniform(0.1, 10)
        opts = []
        for bits in (16, 8, 6, 5, 4.5, 4, 3, 2):
            err = sens * 2.0 ** (-bits) * rng.uniform(0.7, 1.3)
            opts.append(solve.Option(f"t{bits}", int(size * bits), 0.0 if bits == 16 else err))
        choices.append(solve.Choice(f"blk.{i}", opts))
    return choices


def _brute(choices, ok, objective):
    best = None
    for combo in itertools.product(*(c.options for c in choices)):
        if ok(combo):
            v = objective(combo)
            if best is None or v < best:
                best = v
    return best


@pytest.mark.parametrize("seed", range(6))
def test_within_bytes_respects_the_budget_and_is_near_the_optimum(seed):
    rng = random.Random(seed)
    choices = _instance(rng, 5)
    lo = sum(c.cheapest().bytes for c in choices)
    hi = sum(c.best().bytes for c in choices)
    for frac in (0.05, 0.2, 0.4, 0.7):
        budget = int(lo + frac * (hi - lo))
        sol = solve.within_bytes(choices, budget)
        assert sol is not None and sol.bytes <= budget
        optimum = _brute(choices, lambda c: sum(o.bytes for o in c) <= budget, lambda c: sum(o.cost for o in c))
        assert sol.cost <= optimum * 1.10 + 1e-12, (frac, sol.cost, optimum)


@pytest.mark.parametrize("seed", range(6))
def test_within_cost_respects_the_bound_and_is_near_the_optimum(seed):
    rng = random.Random(100 + seed)
    choices = _instance(rng, 5)
    worst = sum(c.cheapest().cost for c in choices)
    for frac in (0.002, 0.02, 0.2):
        bound = worst * frac
        sol = solve.within_cost(choices, bound)
        assert sol is not None and sol.cost <= bound
        optimum = _brute(choices, lambda c: sum(o.cost for o in c) <= bound, lambda c: sum(o.bytes for o in c))
        assert sol.bytes <= optimum * 1.10, (frac, sol.bytes, optimum)


def test_impossible_and_trivial_targets():
    choices = _instance(random.Random(7), 4)
    lo = sum(c.cheapest().bytes for c in choices)
    hi = sum(c.best().bytes for c in choices)
    assert solve.within_bytes(choices, lo - 1) is None
    assert solve.within_bytes(choices, lo).bytes == lo
    top = solve.within_bytes(choices, hi + 10)
    assert top.cost == 0.0
    assert solve.within_cost(choices, 10.0).bytes == lo  # every cheapest option already within the bound
    assert solve.within_cost(choices, 0.0).cost == 0.0


def test_with_metadata_adds_and_replaces_keys_and_keeps_the_tensors(tmp_path):
    from edgequant.gguf_layout import read_layout, with_metadata

    src = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 3)
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((4, 64)).astype(np.float32),
              "b.weight": rng.standard_normal((3, 32)).astype(np.float16)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = tmp_path / "b.gguf"
    with_metadata(src, dst, {"quantize.tensor_types": ["^a\\.weight$=q8_0", "^b\\.weight$=f16"],
                             "general.name": "renamed", "x.count": 5})
    r = gguf.GGUFReader(str(dst))
    assert r.fields["general.name"].contents() == "renamed"
    assert r.fields["llama.block_count"].contents() == 3
    assert r.fields["x.count"].contents() == 5
    assert r.fields["quantize.tensor_types"].contents() == ["^a\\.weight$=q8_0", "^b\\.weight$=f16"]
    for t in r.tensors:
        np.testing.assert_array_equal(np.asarray(t.data).reshape(arrays[t.name].shape), arrays[t.name])
    assert set(read_layout(dst).tensors) == set(arrays)


def test_kernel_speeds_and_the_speed_model():
    """ggml's kernels time every type that fits a row length (none that does not), and the speed model
    built on them says a mix equal to the standard file is exactly as fast, one in slower kernels slower,
    and a speed penalty that is zero for the standard's own types."""
    from edgequant.mix.cost import TensorCosts
    from edgequant.mix.kernels import measure_kernels
    from edgequant.mix.speed import build_model

    Q = gguf.GGMLQuantizationType
    k = measure_kernels([Q.Q8_0, Q.Q4_K, Q.Q5_1], [256, 96], threads=2, reps=1)
    assert set(k) == {("Q8_0", 256), ("Q4_K", 256), ("Q5_1", 256), ("Q8_0", 96), ("Q5_1", 96)}  # Q4_K needs 256
    assert all(s.pp_s_per_weight > 0 and s.tg_s_per_weight > 0 for s in k.values())

    def tc(name, role, shape, types):
        return TensorCosts(name, role, shape, Q.F16, shape[1], shape[1], {q: 1 for q in types})

    costs = {"blk.0.ffn_up.weight": tc("blk.0.ffn_up.weight", "ffn_up", [256, 512], [Q.Q8_0, Q.Q4_K, Q.Q5_1]),
             "blk.0.attn_q.weight": tc("blk.0.attn_q.weight", "attn_q", [96, 96], [Q.Q8_0, Q.Q5_1]),
             "token_embd.weight": tc("token_embd.weight", "token_embd", [96, 1000], [Q.Q8_0, Q.Q5_1])}
    ref = {"blk.0.ffn_up.weight": "q4_k", "blk.0.attn_q.weight": "q8_0", "token_embd.weight": "q8_0"}
    m = build_model(costs, ref, k, "Q4_K_M", has_output=True, expert_share=1.0)
    assert "token_embd.weight" not in m.times  # a row lookup when the model has its own output matrix
    assert m.ratios({n: t.upper() for n, t in ref.items()}) == pytest.approx((1.0, 1.0))
    slow = {**{n: t.upper() for n, t in ref.items()}, "blk.0.ffn_up.weight": "Q5_1", "blk.0.attn_q.weight": "Q5_1"}
    pp, tg = m.ratios(slow)

    def total(types, attr):
        return (256 * 512 * getattr(k[(types[0], 256)], attr) + 96 * 96 * getattr(k[(types[1], 96)], attr))

    assert pp == pytest.approx(total(("Q5_1", "Q5_1"), "pp_s_per_weight") / total(("Q4_K", "Q8_0"), "pp_s_per_weight"))
    assert tg == pytest.approx(total(("Q5_1", "Q5_1"), "tg_s_per_weight") / total(("Q4_K", "Q8_0"), "tg_s_per_weight"))
    assert m.penalty("token_embd.weight", "Q5_1") == 0.0
    tied = build_model(costs, ref, k, "Q4_K_M", has_output=False, expert_share=1.0)
    assert "token_embd.weight" in tied.times  # tied embeddings: token_embd is also the output matrix
