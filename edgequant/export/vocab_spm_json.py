"""A SentencePiece ("llama") vocabulary from ``tokenizer.json`` alone.

transformers 5 saves Llama 2 / Mistral / Gemma / Phi-3 tokenizers as ``tokenizer.json`` only, without
the ``tokenizer.model`` llama.cpp's own converter insists on. That file still says everything llama.cpp's
SentencePiece tokenizer needs:

- pieces and ids: ``model.vocab`` (a ``{piece: id}`` map for BPE, ``[[piece, score], ...]`` for Unigram);
- scores: Unigram stores them. A SentencePiece BPE's scores only order its merges (llama.cpp merges the
  adjacent pair whose result has the highest score first), and tokenizer.json keeps that order as the
  rank of ``model.merges``. A piece's score is minus its place when the normal pieces are ordered by the
  first merge that makes them (pieces no merge makes, single characters, last, by id): for a model
  trained by ``sentencepiece`` these are exactly the ``tokenizer.model``'s scores (0, -1, -2, ...);
- types: the unknown piece, ``<0xNN>`` byte pieces (with ``byte_fallback``), the model's own control
  pieces (BOS/EOS/padding); added tokens are laid over them as for a ``tokenizer.model``;
- the space prefix: a ``Prepend('▁')`` normalizer or a ``Metaspace`` pre-tokenizer that prepends.
"""

from __future__ import annotations

import re
from typing import Any

import gguf

from edgequant.errors import EdgequantError

TT = gguf.TokenType
SPIECE_UNDERLINE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Texts SentencePiece trainers give their control pieces (bos/eos/pad), whatever the tokenizer's roles.
_CONTROL_TEXTS = ("<s>", "</s>", "<pad>", "<bos>", "<eos>")


def components(node: Any) -> list[dict]:
    """Every component of a tokenizer.json pipeline part (Sequence nodes flattened)."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers")
    return [c for x in inner for c in components(x)] if isinstance(inner, list) else [node]


def is_spm_style(tj: dict) -> bool:
    """A SentencePiece-style model (``▁`` for spaces, byte fallback, or Unigram), not a byte-level BPE."""
    model = tj.get("model") or {}
    parts = components(tj.get("pre_tokenizer")) + components(tj.get("decoder"))
    kinds = {c.get("type") for c in parts}
    if "ByteLevel" in kinds:
        return False
    if model.get("type") == "Unigram":
        return True
    prepends = any(c.get("type") == "Prepend" and c.get("prepend") == SPIECE_UNDERLINE for c in components(tj.get("normalizer")))
    replaces = any(c.get("type") == "Replace" and c.get("content") == SPIECE_UNDERLINE for c in components(tj.get("normalizer")))
    return bool({"Metaspace", "ByteFallback"} & kinds or model.get("byte_fallback") or prepends or replaces)


def space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts ``▁`` in front of the text (SentencePiece's add_dummy_prefix)."""
    if any(c.get("type") == "Prepend" and c.get("prepend") == SPIECE_UNDERLINE for c in components(tj.get("normalizer"))):
        return True
    for c in components(tj.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            scheme = c.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.14 wrote add_prefix_space
                return bool(c.get("add_prefix_space", True))
            return scheme in ("always", "first")
    return False


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


def _bpe_scores(vocab: dict[str, int], merges: list, normal: list[int], texts: dict[int, str]) -> dict[int, float]:
    """Score of each normal piece: minus its place in merge order (unmerged pieces last, by id)."""
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        a, b = _merge_pair(m)
        first.setdefault(a + b, rank)
    order = sorted(normal, key=lambda i: (first.get(texts[i], len(merges)), i))
    return {tid: -float(place) for place, tid in enumerate(order)}


def _control_ids(tj: dict, specials: dict[str, str | None]) -> set[str]:
    """The model's own control pieces: special added tokens that are pieces of the model and name BOS, EOS or padding."""
    added = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    roles = {t for r, t in specials.items() if r in ("bos", "eos", "pad") and t}
    return {t for t in added if t in roles or t in _CONTROL_TEXTS}


def spm_pieces(tj: dict, specials: dict[str, str | None], path: str) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece-style tokenizer.json's model (added tokens not laid over)."""
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":
        pairs = model.get("vocab") or []
        texts = {i: p[0] for i, p in enumerate(pairs)}
        given = {i: float(p[1]) for i, p in enumerate(pairs)}
        unk = texts.get(model.get("unk_id")) if model.get("unk_id") is not None else specials.get("unk")
    elif kind == "BPE":
        texts = {int(i): t for t, i in (model.get("vocab") or {}).items()}
        given, unk = None, model.get("unk_token") or specials.get("unk")
    else:
        raise EdgequantError(f"{path} holds a {kind} model; llama.cpp's SentencePiece vocabulary is built from BPE or Unigram models")
    if not texts:
        raise EdgequantError(f"{path} has an empty model vocabulary; re-download the tokenizer")
    n = max(texts) + 1
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(n)]
    types = [int(TT.NORMAL if i in texts else TT.UNUSED) for i in range(n)]
    scores = [0.0 if i in texts else -10000.0 for i in range(n)]
    control = _control_ids(tj, specials)
    added = {a["content"] for a in tj.get("added_tokens", [])}
    normal = []
    for i, text in texts.items():
        if text == unk:
            types[i] = TT.UNKNOWN
        elif text in control:
            types[i] = TT.CONTROL
        elif model.get("byte_fallback") and _BYTE_PIECE.fullmatch(text):
            types[i] = TT.BYTE
        elif text not in added:
            normal.append(i)
    if given is not None:  # Unigram: every piece's own score, as tokenizer.model has them
        for i in texts:
            scores[i] = given[i]
    else:
        for i, s in _bpe_scores(model.get("vocab") or {}, model.get("merges") or [], normal, texts).items():
            scores[i] = s
    return tokens, scores, [int(t) for t in types]
