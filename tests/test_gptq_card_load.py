"""The model card's transformers (GPTQ) code block, run as written in a fresh Python next to the folder,
loads the GPTQ folder with no missing, unexpected or mismatched keys and computes the logits of the
dequantized checkpoint (our own unpacking of the packed weights put into the plain source model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgequant.quantize.gptq import GPTQOptions, gptq
from edgequant.release.card import render_model_card
from edgequant.text import builtin_text
import fixtures_gpt_oss
import fixtures_qwen_moe
from gptq_check import dequantized_weights, replace_weights
from test_release_card import smol_manifest

FAST = GPTQOptions(samples=8, seq_len=64, group_size=32)
ROUTER_TIE = 0.02  # router logits closer than this may swap order in float16

# Appended to the card's block: report what transformers' own loader found (the function it logs its
# load report with, observed and still called) and the logits of fixed token ids.
_SPY = '''\
import transformers.modeling_utils as _mu
_report = {}
_log = _mu.log_state_dict_report
def _spy(*a, **k):
    info = k["loading_info"] if "loading_info" in k else a[3]
    _report.update(missing=sorted(info.missing_keys), unexpected=sorted(info.unexpected_keys),
                   mismatched=sorted(str(m) for m in info.mismatched_keys), errors=list(info.error_msgs))
    return _log(*a, **k)
_mu.log_state_dict_report = _spy
'''
_AFTER = '''
import json as _json, sys as _sys, torch as _torch
with _torch.no_grad():
    _logits = model(_torch.load(_sys.argv[1]).to(model.device)).logits[0].float().cpu()
_torch.save({"logits": _logits, "dtype": str(model.dtype).removeprefix("torch.")}, _sys.argv[2])
print("REPORT " + _json.dumps(_report))
'''


def _card_code(folder: Path, defuser_type: str | None, loader: str | None) -> str:
    """The card's GPTQ Python block, for a release holding this one GPTQ folder."""
    m = smol_manifest()
    m["artifacts"] = [a for a in m["artifacts"] if a["kind"] != "gptq"] + [
        {"path": folder.name, "kind": "gptq", "type": "GPTQ-4bit-32g", "bits": 4, "group_size": 32,
         "files": ["config.json", "model.safetensors"], "defuser_model_type": defuser_type, "gptq_loader": loader}]
    text = render_model_card(m)
    section = text.split("### transformers (GPTQ)", 1)[1]
    block = re.search(r"^(`{3,})python\n(.*?)\n\1$", section, re.S | re.M)
    assert block, section[:500]
    return block.group(2)


def _reference(src: Path, folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain source model in float32 with every quantized matrix replaced by our dequantization:
    its logits, and per token the smallest router margin over the MoE layers (how far the k-th chosen
    expert's router logit is above the first one left out; +inf for dense models)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    weights = dequantized_weights(folder)
    assert replace_weights(model, weights) == len(weights)
    margin = torch.full((ids.shape[1],), float("inf"))

    def on_router(module, args, out) -> None:  # transformers 5 routers return (logits, scores, indices)
        nonlocal margin
        logits, k = out[0].float(), out[2].shape[-1]
        top = logits.topk(k + 1, dim=-1).values
        margin = torch.minimum(margin, top[:, k - 1] - top[:, k])

    hooks = [m.register_forward_hook(on_router) for n, m in model.named_modules() if n.endswith((".mlp.gate", ".mlp.router"))]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    for h in hooks:
        h.remove()
    return logits, margin


MOE = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}  # which -> the defuser model_type its folder needs
GPTQMODEL_LOAD = {"gpt_oss"}  # folders whose card loads them with GPTQModel.load (per-expert Linears with biases)


@pytest.mark.parametrize("which", ["mixtral", "qwen3_moe", "gpt_oss", "llama"])
def test_card_code_block_loads_the_dequantized_checkpoint(which, tiny_mixtral_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    if which == "gpt_oss":
        src = fixtures_gpt_oss.tiny_gpt_oss()
    else:
        src = {"mixtral": tiny_mixtral_dir, "llama": tiny_llama_dir}.get(which) or fixtures_qwen_moe.tiny_qwen3_moe("per_expert")
    result = gptq(src, [4], tmp_path / "dist", FAST)[0]
    folder = Path(result.folder)
    assert result.defuser_model_type == MOE.get(which)
    assert result.gptq_loader == ("gptqmodel" if which in GPTQMODEL_LOAD else None)
    code = _card_code(folder, result.defuser_model_type, result.gptq_loader)
    assert f'path = "{folder.name}"' in code
    assert ("defuser.replace_fused_blocks" in code) == (which in MOE)
    assert ("model = GPTQModel.load(path, dtype=torch.float16)" in code) == (which in GPTQMODEL_LOAD)
    assert (folder / "README.md").read_text().count(code.split("messages =")[0].strip()) == 1  # the README shows the same lines

    ids = AutoTokenizer.from_pretrained(str(src))(builtin_text()[60_000:62_000], return_tensors="pt").input_ids[:, :64]
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "card.py"
    script.write_text(_SPY + code + "\n" + _AFTER)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          cwd=folder.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    if which in GPTQMODEL_LOAD:  # GPTQModel.load does not go through transformers' load report: the logits tell
        assert report in ({}, {"missing": [], "unexpected": [], "mismatched": [], "errors": []}), report
    else:
        assert report == {"missing": [], "unexpected": [], "mismatched": [], "errors": []}, report

    out = torch.load(tmp_path / "out.pt")
    assert out["dtype"] == "float16"  # the card's dtype
    ref, margin = _reference(src, folder, ids)
    got = out["logits"]
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    # float16 noise (~1e-3) can swap a router's k-th and (k+1)-th experts where they nearly tie: those
    # tokens take other experts and are left out; every other token must match the reference exactly
    clear = margin > ROUTER_TIE
    print(which, f"clear {int(clear.sum())}/{len(clear)}", f"cos min {float(cos[clear].min()):.6f}",
          f"max|d| {float((got - ref)[clear].abs().max()):.4g} of max|ref| {float(ref.abs().max()):.3g}",
          f"all tokens: cos min {float(cos.min()):.4f}")
    assert int(clear.sum()) >= 0.9 * len(clear), margin
    assert float(cos[clear].min()) >= 0.9999, cos
    assert float((got - ref)[clear].abs().max()) <= 0.01 * float(ref.abs().max())
