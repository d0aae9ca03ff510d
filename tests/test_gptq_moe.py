"""GPTQ on MoE models calibrates every expert: the tokens each router sends to each expert are counted (and
checked here against transformers' own router logits), an expert short of them is either an error
(``moe_routing="native"``) or makes the quantizing forward route every token to every expert (``auto``), and
the backend's report shows what each expert Linear was quantized from. Families GPTQ cannot serve are refused
in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fixtures_gpt_oss
import fixtures_qwen_moe
from edgequant.errors import EdgequantError
from edgequant.quantize.gptq import GPTQOptions, calibration_windows, count_expert_tokens, gptq, gptq_refusal


def _reference_counts(src, windows) -> list[list[int]]:
    """Per layer, tokens per expert from transformers' ``output_router_logits`` (top-k of the router logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto").eval()
    k, n = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, n, dtype=torch.int64)
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w]), output_router_logits=True).router_logits
            for layer, lg in enumerate(logits):
                counts[layer] += torch.bincount(lg.float().topk(k, dim=-1).indices.reshape(-1), minlength=n)
    return counts.tolist()


def _windows(src, opts: GPTQOptions) -> list[list[int]]:
    from transformers import AutoTokenizer

    from edgequant.text import load_text

    return calibration_windows(AutoTokenizer.from_pretrained(str(src)), load_text(None).text, opts.samples, opts.seq_len, opts.seed)


def _expert_rows(result):
    return [r for r in result.layers if ".experts." in r.module]


def test_every_expert_calibrated_by_its_router(tmp_path):
    src = fixtures_qwen_moe.tiny_qwen3_moe("per_expert")
    opts = GPTQOptions(samples=4, seq_len=64, group_size=32)
    result = gptq(src, [4], tmp_path, opts)[0]
    cov = result.experts
    tokens = opts.samples * opts.seq_len
    assert cov is not None and cov.tokens == tokens and cov.min_tokens == 2  # 0.5 % of 256, rounded up
    assert [l.tokens for l in cov.layers] == _reference_counts(src, _windows(src, opts))
    assert all(sum(l.tokens) == tokens * fixtures_qwen_moe.TOP_K for l in cov.layers)
    print("tokens per expert", [l.tokens for l in cov.layers], "GPTQ min", cov.gptq_min_samples)
    # enough tokens for every expert: the router's own choice, every expert Linear quantized by GPTQ from data
    assert cov.routing == "native" and cov.unseen == 0 and not cov.short and not result.warnings
    rows = _expert_rows(result)
    assert len(rows) == 2 * fixtures_qwen_moe.N_EXPERT * 3 and all(r.method == "gptq" and r.samples > 0 for r in rows)
    assert cov.gptq_min_samples == min(r.samples for r in rows) and cov.rtn_modules == []
    d = json.loads(json.dumps(result.to_dict()))  # --json
    assert d["experts"]["routing"] == "native" and d["experts"]["unseen"] == 0
    assert d["experts"]["layers"][0]["tokens"] == cov.layers[0].tokens


def test_an_expert_without_tokens_is_never_quantized_from_nothing(tmp_path):
    src = fixtures_qwen_moe.tiny_qwen3_moe("per_expert")
    opts = GPTQOptions(samples=2, seq_len=16, group_size=32)  # 32 tokens: some experts get none
    ref = _reference_counts(src, _windows(src, opts))
    unseen = sum(c == 0 for layer in ref for c in layer)
    assert unseen > 0, ref
    with pytest.raises(EdgequantError) as e:  # native routing refuses, before any quantizing
        gptq(src, [4], tmp_path / "native", GPTQOptions(**{**opts.__dict__, "moe_routing": "native"}))
    msg = str(e.value)
    assert "\n" not in msg and "--samples" in msg and "--seq-len" in msg and f"{unseen} of 16 experts" in msg
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())

    result = gptq(src, [4], tmp_path / "auto", opts)[0]  # auto: every token to every expert while quantizing
    cov = result.experts
    assert cov.routing == "all" and cov.unseen == unseen and [l.tokens for l in cov.layers] == ref
    assert any("every calibration token was routed to every expert" in n and "--samples" in n for n in result.notes)
    rows = _expert_rows(result)
    assert rows and all(r.method == "gptq" and r.samples == 32 for r in rows)  # each saw all 32 tokens
    assert cov.gptq_min_samples == 32 and cov.rtn_modules == [] and not result.warnings


def test_fused_qwen3_moe_refused_in_one_line(tmp_path):
    src = fixtures_qwen_moe.tiny_qwen3_moe("fused")
    out = tmp_path / "out"
    with pytest.raises(EdgequantError) as e:
        gptq(src, [4], out, GPTQOptions(samples=2, seq_len=16))
    msg = str(e.value)
    assert "\n" not in msg and "GGUF" in msg and "save_pretrained" in msg, msg
    assert not out.exists() or not any(out.iterdir())


def test_gpt_oss_is_quantized_and_counted_by_its_router():
    """GPT-OSS is no longer refused (its card-loaded logits: test_gptq_card_load); here its router's counts
    (``mlp.router``) match transformers' own router logits."""
    src = fixtures_gpt_oss.tiny_gpt_oss()
    assert gptq_refusal(src) is None
    from edgequant.checkpoint import open_checkpoint
    from edgequant.export.archs.base import quant_layout

    opts = GPTQOptions(samples=2, seq_len=32)
    windows = _windows(src, opts)
    layers = count_expert_tokens(open_checkpoint(src), quant_layout("GptOssForCausalLM"), windows)
    assert [l.tokens for l in layers] == _reference_counts(src, windows)
