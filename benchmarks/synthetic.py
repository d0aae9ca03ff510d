"""Synthetic ~1B checkpoints for the converter benchmark, built once and cached.

``synthetic_1b()``: a ~1.03B-parameter Mistral-shaped checkpoint with random bf16 weights in two
safetensors shards, written tensor by tensor so the generator never holds more than one row block in
memory, and a small SentencePiece tokenizer trained on Python's own help topics (8000 pieces; config
``vocab_size`` is 32000, the converters pad the rest with ``[PADn]`` tokens).

``synthetic_qwen3_1b()``: a ~1.3B-parameter Qwen3-shaped checkpoint (per-head q/k norms, head_dim 128
≠ hidden/heads, tied embeddings, ``vocab_size`` 151936 above the tokenizer's 151669 tokens) with the
real Qwen tokenizer and Qwen3 chat template of the test fixtures (llama.cpp's
``models/ggml-vocab-qwen2.gguf`` turned into ``tokenizer.json``).

``synthetic_qwen3_moe_2l()``: two decoder layers of Qwen3-30B-A3B at their real width (hidden 2048,
128 experts of 768 rows, top-8, 32 query heads of 128, untied 151936-row embeddings; 1.87B parameters,
3.7 GB of bf16) with the per-expert tensor names ``save_pretrained`` writes and the same Qwen tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

CACHE = Path(os.environ.get("EDGEQUANT_BENCH_CACHE", Path.home() / ".cache" / "edgequant" / "bench"))
REPO = Path(__file__).resolve().parent.parent

# -- the synthetic ~1B Mistral ---------------------------------------------------------------

SYNTH_CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 20,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
    "transformers_version": "5.0.0",
}
SP_PIECES = 8000
SYNTH_SEED = 1234
SHARD_MAX_BYTES = 1_100_000_000
SYNTH_VERSION = 3  # bump when the generator changes what it writes

# Mistral-7B-Instruct-v0.1's prompt format: [INST] ... [/INST], BOS once at the start, EOS after answers.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)


def synth_tensors(cfg: dict[str, Any], *, qk_norm: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Mistral-style decoder, in writing order; ``qk_norm`` adds Qwen3's
    per-head q/k norms, and ``tie_word_embeddings`` leaves out ``lm_head``."""
    h, ff, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            *([(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))] if qk_norm else []),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (ff, h)),
            (p + "mlp.up_proj.weight", (ff, h)),
            (p + "mlp.down_proj.weight", (h, ff)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_random_bf16(fh, name: str, shape: tuple[int, ...], gen) -> None:
    """Random bf16 rows, 16M elements at a time (norms near 1, matrices ~N(0, 0.02))."""
    import torch

    n = _numel(shape)
    step = 16 * 1024 * 1024
    for start in range(0, n, step):
        k = min(step, n - start)
        x = torch.randn(k, generator=gen, dtype=torch.float32)
        if len(shape) == 1:
            x = x.mul_(0.05).add_(1.0)
        else:
            x = x.mul_(0.02)
        fh.write(x.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        nb = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _train_tokenizer(out: Path) -> None:
    """A SentencePiece BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2, like Llama/Mistral)
    trained on the text of Python's help topics, plus the HF tokenizer files made from it."""
    import sentencepiece as spm
    from pydoc_data.topics import topics

    lines = [ln for text in topics.values() for ln in text.splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=SP_PIECES, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=2, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    tok_cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": SYNTH_CONFIG["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    # tokenizer.json, as real Mistral folders ship it. Made in a folder without config.json: next to a
    # "mistral" config, transformers 5 picks its generic backend, which drops the Metaspace prefix.
    try:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name in ("tokenizer.model", "tokenizer_config.json"):
                shutil.copy(out / name, Path(tmp) / name)
            AutoTokenizer.from_pretrained(tmp).save_pretrained(Path(tmp) / "saved")
            shutil.copy(Path(tmp) / "saved" / "tokenizer.json", out / "tokenizer.json")
    except Exception as e:  # tokenizer.model alone is a complete tokenizer for both converters
        print(f"  (no tokenizer.json: {type(e).__name__}: {e})", file=sys.stderr)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
             for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    tok_cfg["added_tokens_decoder"] = added
    tok_cfg["chat_template"] = MISTRAL_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def _write_checkpoint(out: Path, cfg: dict[str, Any], entries: list[tuple[str, tuple[int, ...]]]) -> int:
    """Random bf16 shards of at most SHARD_MAX_BYTES plus the index; returns the bytes written."""
    import torch

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nb = 2 * _numel(shape)
        if shards[-1] and size + nb > SHARD_MAX_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    gen = torch.Generator().manual_seed(SYNTH_SEED)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {fname} ({len(shard)} tensors)", file=sys.stderr)
        with open(out / fname, "wb") as fh:
            fh.write(_safetensors_header(shard))
            for name, shape in shard:
                _write_random_bf16(fh, name, shape, gen)
                weight_map[name] = fname
                total += 2 * _numel(shape)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return total


def _cached(name: str, spec: dict[str, Any], cfg: dict[str, Any], entries: list[tuple[str, tuple[int, ...]]],
            tokenizer: Callable[[Path], None], cache: Path) -> Path:
    """Build the folder once (weights, config, tokenizer); later calls return the cached folder."""
    out = cache / name
    done = out / ".complete.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    total = _write_checkpoint(out, cfg, entries)
    tokenizer(out)
    done.write_text(json.dumps(spec))
    n_params = sum(_numel(s) for _, s in entries)
    print(f"  synthetic model: {n_params / 1e9:.3f}B params, {total / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s -> {out}", file=sys.stderr)
    return out


def synthetic_1b(cache: Path = CACHE) -> Path:
    """The synthetic ~1B Mistral (SentencePiece tokenizer trained on Python's help topics)."""
    spec = {"version": SYNTH_VERSION, "config": SYNTH_CONFIG, "sp_pieces": SP_PIECES, "seed": SYNTH_SEED}

    def tokenizer(out: Path) -> None:
        (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
        _train_tokenizer(out)

    return _cached("synthetic-mistral-1b", spec, SYNTH_CONFIG, synth_tensors(SYNTH_CONFIG), tokenizer, cache)


# -- the synthetic ~1.3B Qwen3 ---------------------------------------------------------------

QWEN3_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
    "transformers_version": "5.0.0",
}
QWEN3_VERSION = 1


def _qwen_tokenizer(out: Path) -> None:
    """The tokenizer files of the tiny Qwen3 test fixture (the real Qwen tokenizer and chat template)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import fixtures_qwen
    finally:
        sys.path.pop(0)
    src = fixtures_qwen.tiny_qwen3()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def synthetic_qwen3_1b(cache: Path = CACHE) -> Path:
    """The synthetic ~1.3B Qwen3 (the real Qwen tokenizer)."""
    spec = {"version": QWEN3_VERSION, "config": QWEN3_CONFIG, "seed": SYNTH_SEED}
    return _cached("synthetic-qwen3-1b", spec, QWEN3_CONFIG, synth_tensors(QWEN3_CONFIG, qk_norm=True), _qwen_tokenizer, cache)


# -- two layers of Qwen3-30B-A3B at real width -----------------------------------------------

QWEN3_MOE_CONFIG: dict[str, Any] = {
    **{k: v for k, v in QWEN3_CONFIG.items() if k != "intermediate_size"},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "tie_word_embeddings": False,
}
QWEN3_MOE_VERSION = 1


def moe_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Qwen3-MoE decoder with per-expert Linears (router ``mlp.gate``)."""
    h, ff, n = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in synth_tensors({**cfg, "intermediate_size": ff}, qk_norm=True):
        if ".mlp." not in name:
            out.append((name, shape))
        elif name.endswith("mlp.gate_proj.weight"):  # the first of a layer's three dense MLP tensors
            p = name.removesuffix("gate_proj.weight")
            out.append((p + "gate.weight", (n, h)))
            for e in range(n):
                out += [(f"{p}experts.{e}.gate_proj.weight", (ff, h)), (f"{p}experts.{e}.up_proj.weight", (ff, h)),
                        (f"{p}experts.{e}.down_proj.weight", (h, ff))]
    return out


def synthetic_qwen3_moe_2l(cache: Path = CACHE) -> Path:
    """Two Qwen3-30B-A3B layers at real width (the real Qwen tokenizer)."""
    spec = {"version": QWEN3_MOE_VERSION, "config": QWEN3_MOE_CONFIG, "seed": SYNTH_SEED}
    return _cached("synthetic-qwen3-moe-2l", spec, QWEN3_MOE_CONFIG, moe_tensors(QWEN3_MOE_CONFIG), _qwen_tokenizer, cache)
