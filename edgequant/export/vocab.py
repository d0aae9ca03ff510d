"""Tokenizer -> GGUF vocabulary: SentencePiece (``tokenizer.model``, or a SentencePiece-style ``tokenizer.json``
alone: see vocab_spm_json) or byte-level BPE (``tokenizer.json``).

Token texts, scores and types follow llama.cpp's converter rules (added special tokens are
CONTROL, other added tokens USER_DEFINED, ids the vocabulary does not fill are ``[PADn]``
UNUSED). Whether BOS/EOS are added is taken from what the HF tokenizer actually does when it
encodes text, the ground truth our tokenization tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gguf

from edgequant.checkpoint import Checkpoint
from edgequant.errors import EdgequantError
from edgequant.export import pretokenizer
from edgequant.export import vocab_eog
from edgequant.export import vocab_spm_json as spm_json

TT = gguf.TokenType
SPIECE_UNDERLINE = "\u2581"
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")  # from the tokenizer; eot / eom: vocab_eog


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)
    reference: Any = field(default=None, repr=False)  # the HF tokenizer, the reference for the written file's ids

    def token_text(self, role: str) -> str | None:
        i = self.special_ids.get(role)
        return self.tokens[i] if i is not None else None

    def resolve_end_of_generation(self, ckpt: Checkpoint, template: str | None) -> None:
        """eot / eom ids so that llama.cpp stops at every id generation_config.json stops at (see vocab_eog)."""
        self.notes += vocab_eog.resolve_end_of_generation(ckpt, self.tokens, self.types, self.special_ids, template)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id, "pad": w.add_pad_token_id,
                  "eot": w.add_eot_token_id, "eom": w.add_eom_token_id}
        for role, tid in self.special_ids.items():
            adders[role](tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)


def build_vocab(ckpt: Checkpoint, pre_override: str | None = None) -> Vocab:
    tok_cfg = ckpt.read_json("tokenizer_config.json") or {}
    tj = ckpt.read_json("tokenizer.json") if ckpt.file("tokenizer.json") is not None else None
    if ckpt.file("tokenizer.model") is not None:
        vocab = _sentencepiece(ckpt, tok_cfg)
    elif tj is not None and spm_json.is_spm_style(tj):
        vocab = _sentencepiece_from_json(ckpt, tok_cfg, tj)
    elif tj is not None:
        vocab = _bpe(ckpt, tok_cfg, pre_override)
    else:
        raise EdgequantError(
            f"no tokenizer in {ckpt.path}: expected tokenizer.model (SentencePiece) or tokenizer.json; copy the tokenizer files next to config.json"
        )
    if pre_override and vocab.model == "llama":
        vocab.notes.append(f"--pre-tokenizer {pre_override} ignored: it names a byte-level BPE split, and this vocabulary is SentencePiece")
    _resolve_specials(ckpt, tok_cfg, vocab)
    _resolve_add_bos_eos(ckpt, tok_cfg, vocab)
    return vocab


# -- SentencePiece ---------------------------------------------------------------------------


def _sentencepiece(ckpt: Checkpoint, tok_cfg: dict[str, Any]) -> Vocab:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    path = ckpt.file("tokenizer.model")
    proc = SentencePieceProcessor()
    try:
        proc.LoadFromFile(str(path))
        proto = spm_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise EdgequantError(f"{path} is not a SentencePiece model ({e}); re-download it") from None
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE: llama.cpp's "llama" vocab handles both scores
        raise EdgequantError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not supported by llama.cpp's SPM tokenizer")
    pieces, scores, types = [], [], []
    for i in range(proc.vocab_size()):
        pieces.append(proc.IdToPiece(i))
        scores.append(proc.GetScore(i))
        if proc.IsUnknown(i):
            types.append(int(TT.UNKNOWN))
        elif proc.IsControl(i):
            types.append(int(TT.CONTROL))
        elif proc.IsUnused(i):
            types.append(int(TT.UNUSED))
        elif proc.IsByte(i):
            types.append(int(TT.BYTE))
        else:
            types.append(int(TT.NORMAL))
    return _spm_vocab(ckpt, tok_cfg, (pieces, scores, types), bool(proto.normalizer_spec.add_dummy_prefix), "tokenizer.model")


def _sentencepiece_from_json(ckpt: Checkpoint, tok_cfg: dict[str, Any], tj: dict) -> Vocab:
    """The same SentencePiece vocabulary from tokenizer.json alone (how transformers 5 saves Llama 2 / Mistral /
    Gemma / Phi-3 tokenizers): see vocab_spm_json."""
    smap = ckpt.read_json("special_tokens_map.json") or {}
    specials = {r: _token_content(tok_cfg.get(f"{r}_token")) or _token_content(smap.get(f"{r}_token")) for r in SPECIAL_ROLES}
    pieces = spm_json.spm_pieces(tj, specials, str(ckpt.file("tokenizer.json")))
    vocab = _spm_vocab(ckpt, tok_cfg, pieces, spm_json.space_prefix(tj), "tokenizer.json")
    vocab.notes.append("SentencePiece vocabulary built from tokenizer.json (the folder has no tokenizer.model, as transformers 5 saves it)")
    return vocab


def _spm_vocab(ckpt: Checkpoint, tok_cfg: dict[str, Any], pieces: tuple[list[str], list[float], list[int]],
               dummy_prefix: bool, source: str) -> Vocab:
    """The "llama" vocabulary from SentencePiece pieces: padded to the model's rows, added tokens laid over."""
    texts, piece_scores, piece_types = pieces
    n_sp = len(texts)
    n_vocab = int(_vocab_rows(ckpt) or tokenizer_size(ckpt, n_sp, tok_cfg))
    n = min(n_sp, n_vocab)
    tokens = texts[:n] + [f"[PAD{i}]" for i in range(n, n_vocab)]
    scores = piece_scores[:n] + [-10000.0] * (n_vocab - n)
    types = piece_types[:n] + [int(TT.UNUSED)] * (n_vocab - n)
    vocab = Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores)
    if n_sp > n_vocab:
        vocab.notes.append(f"{source} has {n_sp} pieces but config vocab_size is {n_vocab}: pieces from {n_vocab} on are dropped")

    added = ckpt.read_json("added_tokens.json") or {}
    for text, tid in added.items():
        _set_added(vocab, int(tid), text, special=False)
    for tid, info in (tok_cfg.get("added_tokens_decoder") or {}).items():
        _set_added(vocab, int(tid), info["content"], special=bool(info.get("special")))
    _overlay_tokenizer_json_added(ckpt, vocab)

    vocab.add_space_prefix = dummy_prefix
    if tok_cfg.get("add_prefix_space") is not None:
        vocab.add_space_prefix = bool(tok_cfg["add_prefix_space"])
    _check_spm_space_prefix(ckpt, vocab)
    return vocab


def _overlay_tokenizer_json_added(ckpt: Checkpoint, vocab: Vocab) -> None:
    """tokenizer.json's added tokens (where transformers 5 keeps them: Phi-3's ``<|end|>``, Gemma's turn
    tokens) over the SentencePiece pieces; the model's own special pieces (``<s>``, ``</s>``, ``<unk>``)
    keep their SentencePiece type."""
    for a in (ckpt.read_json("tokenizer.json") or {}).get("added_tokens", []):
        tid = int(a["id"])
        if tid >= len(vocab.tokens) or vocab.types[tid] in (TT.NORMAL, TT.UNUSED):
            _set_added(vocab, tid, a["content"], special=bool(a.get("special")))


def _vocab_rows(ckpt: Checkpoint) -> int | None:
    """The architecture's vocabulary size: config.json's (padded), or None for the tokenizer's own."""
    from edgequant.export.archs import architecture_for

    try:
        return architecture_for(ckpt.hf_architecture).vocab_rows(ckpt)
    except EdgequantError:  # an architecture convert does not know: config.json's word
        return ckpt.config.get("vocab_size")


def tokenizer_size(ckpt: Checkpoint, n_pieces: int, tok_cfg: dict[str, Any]) -> int:
    """The tokenizer's own token count: its SentencePiece pieces and every added token's id."""
    ids = [int(i) for i in (tok_cfg.get("added_tokens_decoder") or {})]
    ids += [int(a["id"]) for a in (ckpt.read_json("tokenizer.json") or {}).get("added_tokens", [])]
    ids += [int(i) for i in (ckpt.read_json("added_tokens.json") or {}).values()]
    return max([n_pieces - 1, *ids]) + 1


def _set_added(vocab: Vocab, tid: int, text: str, *, special: bool) -> None:
    if tid >= len(vocab.tokens):
        vocab.notes.append(f"added token {text!r} has id {tid} >= vocab_size {len(vocab.tokens)}: dropped")
        return
    if special or _looks_special(text):
        vocab.types[tid] = TT.CONTROL
    else:
        text = text.replace(SPIECE_UNDERLINE, " ")  # llama.cpp expects user-defined tokens pre-normalized
        vocab.types[tid] = TT.USER_DEFINED
    vocab.tokens[tid] = text
    if vocab.scores is not None:
        vocab.scores[tid] = -1000.0


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _check_spm_space_prefix(ckpt: Checkpoint, vocab: Vocab) -> None:
    """llama.cpp prepends '▁' to every text segment after a special token; say so when HF does not."""
    tj = ckpt.read_json("tokenizer.json")
    if not tj or not vocab.add_space_prefix:
        return
    pre = tj.get("pre_tokenizer") or {}
    subs = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in subs:
        if p.get("type") == "Metaspace" and p.get("prepend_scheme") == "first":
            vocab.notes.append(
                "tokenizer.json uses Metaspace(prepend_scheme='first'): the HF tokenizer adds no space prefix to text "
                "that follows a special token, llama.cpp's SentencePiece tokenizer does. Plain text tokenizes the same; "
                "a prompt like '[INST]Hi' differs by one token. (Mistral's legacy Prepend normalizer matches llama.cpp.)"
            )


# -- byte-level BPE --------------------------------------------------------------------------


def _bpe(ckpt: Checkpoint, tok_cfg: dict[str, Any], pre_override: str | None) -> Vocab:
    tj = ckpt.read_json("tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise EdgequantError(
            f"tokenizer.json holds a {model.get('type')} model; edgequant converts SentencePiece (tokenizer.model, or a "
            f"SentencePiece-style BPE or Unigram tokenizer.json) and byte-level BPE vocabularies"
        )
    pre = pretokenizer.validate(pre_override) if pre_override else pretokenizer.identify(tj, tok_cfg)
    entries: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    n_vocab = int(ckpt.config.get("vocab_size") or 0)
    top = max([*entries, *added]) + 1
    if n_vocab < top:
        if n_vocab:
            raise EdgequantError(f"tokenizer.json has token id {top - 1} but config vocab_size is {n_vocab}; the tokenizer does not belong to this model")
        n_vocab = top
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            a = added[i]
            special = bool(a.get("special")) or _looks_special(a["content"])
            tokens.append(a["content"])
            types.append(int(TT.CONTROL if special else TT.USER_DEFINED))
        elif i in entries:
            tokens.append(entries[i])
            types.append(int(TT.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)
    if pre_override:
        vocab.notes.append(f"pre-tokenizer set by --pre-tokenizer to {pre!r} (not checked against tokenizer.json)")
    return vocab


# -- special tokens and BOS/EOS --------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _resolve_specials(ckpt: Checkpoint, tok_cfg: dict[str, Any], vocab: Vocab) -> None:
    index = {t: i for i, t in enumerate(vocab.tokens)}
    smap = ckpt.read_json("special_tokens_map.json") or {}
    for role in SPECIAL_ROLES:
        text = _token_content(tok_cfg.get(f"{role}_token")) or _token_content(smap.get(f"{role}_token"))
        tid = index.get(text) if text is not None else None
        if tid is None:
            cfg_id = ckpt.config.get(f"{role}_token_id")
            if isinstance(cfg_id, list):
                cfg_id = cfg_id[0] if cfg_id else None
            if isinstance(cfg_id, int) and 0 <= cfg_id < len(vocab.tokens):
                tid = cfg_id
        if tid is not None:
            vocab.special_ids[role] = tid


def _resolve_add_bos_eos(ckpt: Checkpoint, tok_cfg: dict[str, Any], vocab: Vocab) -> None:
    """What the HF tokenizer really adds when encoding text (the reference our tests use)."""
    try:
        from transformers import AutoTokenizer

        from edgequant.remote_code import load_kwargs, refused

        with refused(ckpt.path):
            tok = AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
        plain = tok.encode("Hello world", add_special_tokens=False)
        full = tok.encode("Hello world", add_special_tokens=True)
    except EdgequantError:
        raise
    except Exception as e:  # fall back to the declared flags
        vocab.notes.append(f"could not load the HF tokenizer ({type(e).__name__}: {e}); BOS/EOS flags taken from tokenizer_config.json")
        vocab.add_bos = bool(tok_cfg.get("add_bos_token", vocab.model == "llama"))
        vocab.add_eos = bool(tok_cfg.get("add_eos_token", False))
        return
    vocab.reference = tok
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    vocab.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    vocab.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    for flag, value in (("add_bos_token", vocab.add_bos), ("add_eos_token", vocab.add_eos)):
        declared = tok_cfg.get(flag)
        if declared is not None and bool(declared) != value:
            vocab.notes.append(f"tokenizer_config.json says {flag}={declared} but the HF tokenizer behaves as {value}; wrote {value}")

