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
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_INCOMPLETE = "it is incomplete (download every shard)"
MULTIMODAL_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
VISION_PARTS = re.compile(r"^(model\.)?(vision_tower|vision_model|multi_modal_projector|multimodal_projector)\.")


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

    def read_attention_shape(self) -> None:
        """config.json's attention shape: heads, KV heads (grouped-query), width and head size."""
        self.n_head = self.positive_int("num_attention_heads")
        self.n_kv_head = self.positive_int("num_key_value_heads", default=self.n_head)
        self.n_embd = self.positive_int("hidden_size")
        self.head_dim = self.positive_int("head_dim", default=self.n_embd // self.n_head)
        if self.n_head % self.n_kv_head:
            raise EdgequantError(f"config.json: num_attention_heads {self.n_head} is not a multiple of "
                                 f"num_key_value_heads {self.n_kv_head}; fix config.json")

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

    # -- the tensor plan: one walk over the checkpoint, with per-family hooks ---------------------

    # GGUF tensors every block must have (the completeness check); families add theirs
    block_needs: ClassVar[tuple[gguf.MODEL_TENSOR, ...]] = (
        gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
        gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_NORM)
    missing_embedding = "the checkpoint has no model.embed_tokens.weight; " + _INCOMPLETE

    def plan(self) -> list[PlannedTensor]:
        """Every output tensor in file order: the embedding, computed head tensors, the blocks, the rest.

        Each checkpoint tensor is renamed (:meth:`text_name`), skipped (:meth:`skipped`), kept aside for
        the family (:meth:`claims`, e.g. experts to stack), or mapped through gguf-py's name map and
        planned (:meth:`planned`); a name the map does not know is an error naming the tensor.
        """
        head = self.head_tensors()
        blocks: list[list[PlannedTensor]] = [[] for _ in range(self.n_blocks)]
        tail: list[PlannedTensor] = []
        claimed: dict[str, TensorRef] = {}
        for hf_name, ref in self.ckpt.tensors.items():
            name = self.text_name(hf_name)
            if name is None or self.skipped(name):
                continue
            if self.claims(name):
                claimed[name] = ref
                continue
            gguf_name = self.mapped_name(name)
            if gguf_name is None:
                raise self.unexpected(hf_name)
            pt = self.planned(name, gguf_name, ref)
            m = _LAYER.match(name)
            if m and int(m.group(1)) < self.n_blocks:
                blocks[int(m.group(1))].append(pt)
            elif m:
                raise EdgequantError(f"{hf_name} is in layer {m.group(1)} but config.json has {self.n_blocks} layers")
            elif gguf_name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD]):
                head.insert(0, pt)
            else:
                tail.append(pt)
        self.add_block_tensors(blocks, claimed)
        self.check_complete(head, blocks, tail)
        return head + [t for b in blocks for t in b] + tail

    def head_tensors(self) -> list[PlannedTensor]:
        """Tensors the family computes (RoPE factors), written after the embedding."""
        return []

    # where a multimodal class keeps its language model, and what it has besides (left out: llama.cpp
    # keeps a vision tower and its projector in a separate mmproj file)
    text_prefixes: ClassVar[tuple[str, ...]] = ()
    non_text: ClassVar[re.Pattern | None] = None

    def text_name(self, hf_name: str) -> str | None:
        """The language model's name for a checkpoint tensor (``model.…``, ``lm_head.…``); None skips it."""
        if self.non_text is not None and self.non_text.match(hf_name):
            return None
        for prefix in self.text_prefixes:
            if hf_name.startswith(prefix):
                rest = hf_name[len(prefix):]
                return rest if rest.startswith(("model.", "lm_head.")) else f"model.{rest}"
        return hf_name

    def skipped(self, name: str) -> bool:
        return bool(self.ignored.search(name))

    def claims(self, name: str) -> bool:
        """True for tensors the family plans itself in :meth:`add_block_tensors` (Mixtral's experts)."""
        return False

    def planned(self, name: str, gguf_name: str, ref: TensorRef) -> PlannedTensor:
        """One mapped tensor: checked against config.json and given its transform (permutation, offset)."""
        return self.single(gguf_name, ref)

    def add_block_tensors(self, blocks: list[list[PlannedTensor]], claimed: dict[str, TensorRef]) -> None:
        """Append what the family builds per block (expert stacks, attention sinks) once every tensor is seen."""

    def check_complete(self, head: list[PlannedTensor], blocks: list[list[PlannedTensor]], tail: list[PlannedTensor]) -> None:
        """A missing shard shows up here: no embedding, or a block without one of :attr:`block_needs`."""
        if self.tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD) not in {t.name for t in head}:
            raise EdgequantError(self.missing_embedding)
        for bid, block in enumerate(blocks):
            have = {t.name for t in block}
            missing = [n for n in (self.tensor_name(k, bid) for k in self.block_needed(bid, have)) if n not in have]
            if missing:
                raise EdgequantError(f"the checkpoint lacks {missing[0]}'s source for layer {bid}; {_INCOMPLETE}")

    def block_needed(self, bid: int, have: set[str]) -> tuple[gguf.MODEL_TENSOR, ...]:
        return self.block_needs


# -- quantization layout ----------------------------------------------------------------------------
# What the quantizers (edgequant.quantize: the imatrix collector, GPTQ) need to know about a family's
# transformers modules and checkpoint tensors, so that they hold no architecture names of their own.
# ``Architecture.quant_layout`` is the default (a dense decoder under ``model.layers``); families
# override the class attribute, or ``layout_for`` where it depends on the checkpoint.

from dataclasses import dataclass  # noqa: E402  (kept with the section it serves)

_EXPERT_TENSORS = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                   "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}


@dataclass(frozen=True)
class ExpertLayout:
    """Where a block keeps its MoE experts and how their matrices are named."""

    containers: tuple[str, ...] = ("mlp",)  # the block submodule holding ``experts``; the first is transformers'
    gate: tuple[str, ...] = ("gate_proj",)  # one expert's Linear names per role, in checkpoints and modules
    up: tuple[str, ...] = ("up_proj",)
    down: tuple[str, ...] = ("down_proj",)
    gate_up_stack: str = "gate_up_proj"  # transformers 5's fused parameters: [E, 2 ff, hidden], gate rows first
    down_stack: str = "down_proj"  # [E, hidden, ff]
    # False where the GPTQ backend (GPTQModel 7.6.0) loads a source with fused expert tensors with freshly
    # initialised experts (Qwen3-MoE): such sources are refused before any work
    gptq_fused_source: bool = True
    # the router, a module of the container (transformers' name): its forward returns the chosen experts'
    # indices (an integer tensor [tokens, top_k]) among its outputs; GPTQ counts the calibration tokens per expert
    router: str = "gate"
    # True where the stacks are input-major (GPT-OSS: ``gate_up_proj [E, hidden, 2 ff]``, ``down_proj
    # [E, ff, hidden]``) rather than transformers 5's usual ``[E, out, in]``. GPTQModel (defuser) splits GPT-OSS's
    # gate_up_proj into its first and second half of columns as ``gate_proj``/``up_proj`` (though the model reads
    # gate and up interleaved) and its runtime computes the source's function from them: halves, as elsewhere
    input_major: bool = False

    def role(self, linear: str) -> str | None:
        """``gate``, ``up`` or ``down`` for one expert's Linear name, else None."""
        return next((r for r in ("gate", "up", "down") if linear in getattr(self, r)), None)

    @property
    def router_paths(self) -> tuple[str, ...]:
        """The router's module path inside a block, under each container spelling."""
        return tuple(f"{c}.{self.router}" for c in self.containers)


@dataclass(frozen=True)
class FusedLinear:
    """A Linear whose rows stack several matrices that see the same input (Phi-3's ``mlp.gate_up_proj``:
    gate rows, then up rows). A GPTQ backend that quantizes ``parts`` one by one is fused back."""

    name: str  # the path inside a block, as the source stores it
    parts: tuple[str, ...]  # the split Linears, first rows first


@dataclass(frozen=True)
class ModuleSite:
    """A module (or tensor) name placed in a layout."""

    block: int
    path: str  # inside the block: ``self_attn.q_proj``, ``mlp.experts``, ``mlp.experts.3.w1``
    kind: str  # ``linear``, ``experts`` (a fused experts module), ``expert`` (one expert's Linear), ``stack`` (3-D)
    expert: int | None = None
    role: str | None = None  # gate / up / down for ``expert``; gate_up / down for ``stack``


@dataclass(frozen=True)
class WeightSlice:
    """Where a quantized module's ``[out, in]`` matrix is: a tensor (or parameter), one expert of a 3-D
    stack, a row range of it."""

    tensor: str
    expert: int | None = None
    rows: tuple[int, int] | None = None  # output channels [start, end)
    input_major: bool = False  # the stack stores [in, out] per expert

    def shape(self, shapes: dict) -> tuple[int, int]:
        """The ``(out, in)`` of the matrix, from the tensor's shape in ``shapes``."""
        shape = tuple(int(d) for d in shapes[self.tensor])[1 if self.expert is not None else 0:]
        if self.input_major:
            shape = (shape[1], shape[0])
        return (self.rows[1] - self.rows[0], shape[1]) if self.rows else (shape[0], shape[1])

    def view(self, tensor):
        """The ``[out, in]`` matrix as a view of ``tensor`` (the whole parameter ``self.tensor``)."""
        t = tensor[self.expert] if self.expert is not None else tensor
        if self.input_major:
            t = t.transpose(0, 1)
        return t[self.rows[0]:self.rows[1]] if self.rows else t


@dataclass(frozen=True)
class QuantLayout:
    """The decoder as the quantizers see it: where the blocks are, which matrices are quantized, how
    experts and fused Linears are stored, and which spelling the converter's tensor map reads."""

    blocks: tuple[str, ...] = ("model.layers",)  # transformers' module path of the blocks, then other checkpoint spellings
    experts: ExpertLayout | None = None
    fused: tuple[FusedLinear, ...] = ()
    kept: str = r"(^|\.)(\w*norm\w*|gate|router)$"  # block matrices never quantized: norms, MoE routers
    gguf_blocks: str = "model.layers"  # the spelling gguf-py's tensor name map knows
    # why ``edgequant gptq`` refuses this family (one line naming what to use instead); None: it quantizes it
    gptq_refused: str | None = None

    @property
    def module_blocks(self) -> str:
        return self.blocks[0]

    def site(self, name: str) -> ModuleSite | None:
        """Where ``name`` (a module path, or a tensor name without ``.weight``) sits; None outside the blocks."""
        for prefix in self.blocks:
            if name.startswith(prefix + "."):
                bid, _, path = name[len(prefix) + 1:].partition(".")
                if bid.isdigit() and path:
                    return self._place(int(bid), path)
        return None

    def _place(self, bid: int, path: str) -> ModuleSite:
        ex = self.experts
        head, sep, rest = path.partition(".experts")
        if ex is None or not sep or head not in ex.containers:
            return ModuleSite(bid, path, "linear")
        if not rest:
            return ModuleSite(bid, path, "experts")
        parts = rest[1:].split(".")
        if len(parts) == 2 and parts[0].isdigit() and ex.role(parts[1]):
            return ModuleSite(bid, path, "expert", int(parts[0]), ex.role(parts[1]))
        if len(parts) == 1 and parts[0] in (ex.gate_up_stack, ex.down_stack):
            return ModuleSite(bid, path, "stack", role="gate_up" if parts[0] == ex.gate_up_stack else "down")
        return ModuleSite(bid, path, "linear")

    def n_blocks(self, names) -> int:
        """How many blocks the names (tensors or modules) reach into."""
        return len({s.block for n in names if (s := self.site(n)) is not None})

    def quantized_inputs(self, shapes: dict) -> dict[str, int]:
        """Tensor name -> input dimension of every block matrix a GPTQ backend quantizes (2-D weights
        other than norms and routers, and 3-D expert stacks); ``shapes``: name -> shape."""
        out = {}
        for name, shape in shapes.items():
            site = self.site(name.removesuffix(".weight"))
            if site is None:
                continue
            if site.kind == "stack" and len(shape) == 3:
                out[name] = int(shape[1] if self.experts.input_major else shape[2])
            elif name.endswith(".weight") and len(shape) == 2 and site.kind != "stack" and not re.search(self.kept, site.path):
                out[name] = int(shape[1])
        return out

    def find_weight(self, module: str, shapes: dict) -> WeightSlice | None:
        """Where a quantized module's matrix is among ``shapes`` (name -> shape: a checkpoint's tensors or a
        model's parameters), whatever spelling of the blocks and of the experts they use."""
        site = self.site(module)
        if site is None:
            return WeightSlice(module + ".weight") if module + ".weight" in shapes else None
        for prefix in self.blocks:
            if f"{prefix}.{site.block}.{site.path}.weight" in shapes:
                return WeightSlice(f"{prefix}.{site.block}.{site.path}.weight")
        return self._find_expert(site, shapes) if site.kind == "expert" else None

    def _find_expert(self, site: ModuleSite, shapes: dict) -> WeightSlice | None:
        ex = self.experts
        for prefix in self.blocks:
            for container in ex.containers:
                base = f"{prefix}.{site.block}.{container}.experts"
                for name in getattr(ex, site.role):
                    if f"{base}.{site.expert}.{name}.weight" in shapes:
                        return WeightSlice(f"{base}.{site.expert}.{name}.weight")
                stack = f"{base}.{ex.down_stack if site.role == 'down' else ex.gate_up_stack}"
                if stack in shapes:
                    ff = int(shapes[stack][2 if ex.input_major else 1]) // 2
                    rows = {"down": None, "gate": (0, ff), "up": (ff, 2 * ff)}[site.role]
                    return WeightSlice(stack, site.expert, rows, ex.input_major)
        return None

    def gguf_name(self, arch: Architecture, module: str) -> str | None:
        """The GGUF tensor (``blk.*``) a Linear module's matrix becomes, for the imatrix; None for others."""
        site = self.site(module)
        if site is None:
            return None
        if site.kind == "expert":
            return arch.tensor_name(_EXPERT_TENSORS[site.role], site.block)
        name = arch.mapped_name(f"{self.gguf_blocks}.{site.block}.{site.path}.weight")
        return name if name is not None and name.startswith("blk.") else None

    def expert_gguf_names(self, arch: Architecture, block: int) -> tuple[str, str, str]:
        """The GGUF gate, up and down expert stacks of a block."""
        return tuple(arch.tensor_name(_EXPERT_TENSORS[r], block) for r in ("gate", "up", "down"))  # type: ignore[return-value]


def _layout_for(cls, hf_architecture: str) -> QuantLayout:
    """The quantization layout of an HF architecture class of the family (Gemma 3's multimodal class has its own)."""
    return cls.quant_layout


def _expert_count(self) -> int:
    """How many experts each MoE block has (0 for a dense model), under either spelling of the key."""
    return int(self.hparam("num_local_experts", "num_experts", default=0) or 0)


def _imatrix_matrices(self) -> list[str]:
    """The GGUF matrices an importance matrix should cover: every planned ``blk.*`` tensor of two or more
    dimensions that llama.cpp may quantize (routers and other F32-kept tensors left out)."""
    return [t.name for t in self.plan() if t.name.startswith("blk.") and len(t.shape) >= 2 and not t.keep_f32]


Architecture.quant_layout = QuantLayout()
Architecture.layout_for = classmethod(_layout_for)
Architecture.expert_count = _expert_count
Architecture.imatrix_matrices = _imatrix_matrices


def quant_layout(hf_architecture: str) -> QuantLayout:
    """The layout of an HF architecture (``config.json``'s ``architectures[0]``); the default one for
    architectures edgequant does not convert (a GPTQ backend may still quantize them)."""
    from edgequant.export.archs import architecture_for

    try:
        cls = architecture_for(hf_architecture)
    except EdgequantError:
        return QuantLayout()
    return cls.layout_for(hf_architecture)


# The text decoder of a multimodal class (Gemma 3's, Mistral 3's): its blocks under the language model,
# as transformers 5 names the modules, then as older checkpoints spell the tensors.
MULTIMODAL_TEXT_LAYOUT = QuantLayout(blocks=("model.language_model.layers", "language_model.model.layers"))
