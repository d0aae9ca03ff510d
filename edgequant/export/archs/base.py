"""What every architecture module provides."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import gguf

from edgequant.checkpoint import Checkpoint, TensorRef
from edgequant.errors import EdgequantError
from edgequant.export.options import DEFAULT_SLIDING_WINDOW, SLIDING_WINDOW_MODES
from edgequant.export.plan import Part, PlannedTensor

_MISSING = object()



class Architecture:
    """One model family: its GGUF architecture, its hyperparameters and its tensor layout."""

    hf_names: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # HF tensor names that carry nothing llama.cpp needs
    ignored = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")

    def __init__(self, ckpt: Checkpoint, *, sliding_window: str = DEFAULT_SLIDING_WINDOW):
        if sliding_window not in SLIDING_WINDOW_MODES:
            raise EdgequantError(f"--sliding-window {sliding_window!r}: use {' or '.join(SLIDING_WINDOW_MODES)}")
        self.sliding_window_mode = sliding_window
        self.ckpt = ckpt
        self.config = self.model_config(ckpt)
        self.notes: list[str] = []  # decisions and fallbacks the user must be told about
        self.n_blocks = int(self.hparam("num_hidden_layers", "n_layers", "n_layer"))
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_blocks)

    @classmethod
    def model_config(cls, ckpt: Checkpoint) -> dict:
        """The part of config.json that describes the language model (a multimodal class nests it)."""
        return ckpt.config

    @classmethod
    def vocab_rows(cls, ckpt: Checkpoint) -> int | None:
        """How many tokens the GGUF vocabulary has: config.json's vocab_size (ids the tokenizer does not
        fill become ``[PADn]`` tokens), or None for the tokenizer's own size (the embedding is truncated)."""
        return ckpt.config.get("vocab_size")

    @property
    def arch_name(self) -> str:
        """The GGUF ``general.architecture`` (and the prefix of its keys)."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def window(self) -> str | None:
        """How the file treats the model's sliding window: ``exact``, ``ignored`` (the runtime attends to
        the whole context), or None when the model has no window shorter than its context."""
        return None

    def hparam(self, *keys: str, default: Any = _MISSING) -> Any:
        for k in keys:
            if self.config.get(k) is not None:
                return self.config[k]
        if default is _MISSING:
            raise EdgequantError(f"config.json lacks {keys[0]}; it is required for {self.ckpt.hf_architecture}")
        return default

    def positive_int(self, *keys: str, default: Any = _MISSING) -> int:
        """An hparam that must be a whole number >= 1 (head counts, sizes): one line naming the key otherwise."""
        value = self.hparam(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
            raise EdgequantError(f"config.json {keys[0]} is {value!r}; it must be a whole number >= 1 (fix config.json)")
        return int(value)

    def tensor_name(self, key: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
        return gguf.TENSOR_NAMES[key].format(bid=bid) + suffix

    def mapped_name(self, hf_name: str) -> str | None:
        return self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def single(self, gguf_name: str, ref: TensorRef, **part_kw: Any) -> PlannedTensor:
        return PlannedTensor(name=gguf_name, parts=[Part(ref=ref, **part_kw)], sources=[ref.name])

    def unexpected(self, hf_name: str) -> EdgequantError:
        return EdgequantError(
            f"tensor {hf_name} has no place in a {self.arch_name} GGUF; this {self.ckpt.hf_architecture} checkpoint "
            f"has a layout edgequant does not know (see docs/adding-an-architecture.md)"
        )

    # -- what subclasses implement ------------------------------------------------------------

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def plan(self) -> list[PlannedTensor]:
        raise NotImplementedError
