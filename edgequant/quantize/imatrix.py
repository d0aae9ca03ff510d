"""``edgequant imatrix``: an importance matrix from calibration text, through transformers.

Like ``llama-imatrix``: the text is tokenized once and cut into chunks of ``ctx`` tokens (the first
token of each chunk replaced by BOS when the model adds BOS); every chunk runs through the model
and, for every weight matrix llama.cpp quantizes (the ``blk.*`` matrices), the squares of its
input activations are summed per input column, with the number of tokens seen. For MoE experts
the sums and counts are per expert and only count the tokens routed to that expert. The result
is written in llama.cpp's GGUF imatrix format (``llama-quantize --imatrix`` accepts it).

Activations come from forward hooks on the HF modules: ``nn.Linear`` inputs, and for
transformers 5's fused experts module the routed hidden states (gate/up input) and the
recomputed ``act(gate) * up`` (down input).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from edgequant.atomic import check_writable
from edgequant.text import chunk_ids, load_text
from edgequant.checkpoint import Checkpoint, open_checkpoint
from edgequant.devices import resolve_device
from edgequant.errors import EdgequantError
from edgequant.export.archs import architecture_for
from edgequant.progress import progress_count
from edgequant.quantize.expert_coverage import DEFAULT_POLICY, resolve_policy, settle_unseen
from edgequant.quantize.imatrix_file import Imatrix, ImatrixEntry, ImatrixResult, write_imatrix  # noqa: F401 - re-exported
from edgequant.quantize.imatrix_llamacpp import compute_imatrix_llamacpp, resolve_engine


class _Collector:
    """Per tensor (and per expert): the sums of squared input activations per column, and the token counts."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _slot(self, name: str, n_expert: int, cols: int) -> None:
        """Zeroed sums and counts for ``name`` on first use."""
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_expert, cols, dtype=torch.float64)
            self.counts[name] = torch.zeros(n_expert, dtype=torch.float64)

    def add(self, name: str, x: torch.Tensor, expert: int | None = None, n_expert: int = 1) -> None:
        """Add the rows of ``x`` (the inputs a matrix saw) to ``name``'s slot of ``expert``."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self._slot(name, n_expert, x.shape[-1])
        e = 0 if expert is None else expert
        self.sums[name][e] += (x * x).sum(0).cpu()
        self.counts[name][e] += x.shape[0]

    def linear_hook(self, name: str):
        """A pre-hook adding a plain Linear's inputs."""
        def hook(_module, args):
            self.add(name, args[0].detach())
        return hook

    def expert_linear_hook(self, name: str, expert: int, n_expert: int, cols: int):
        """A per-expert Linear sees only the tokens routed to its expert: its inputs are that expert's slot."""
        self._slot(name, n_expert, cols)  # present even if no token reaches this expert

        def hook(_module, args):
            self.add(name, args[0].detach(), expert, n_expert)
        return hook

    def experts_hook(self, names: tuple[str, str, str]):
        """A pre-hook on a fused experts module (GGUF ``names`` of its gate, up and down stacks): per
        expert, the routed hidden states (gate/up input) and the recomputed ``act(gate) * up`` (down input)."""
        gate, up, down = names

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.reshape(x.shape[0], -1)
            n_expert = module.gate_up_proj.shape[0]
            for name, cols in ((gate, x.shape[-1]), (up, x.shape[-1]), (down, module.down_proj.shape[-1])):
                self._slot(name, n_expert, cols)  # so that experts no token reached are present too
            for e in range(n_expert):
                rows = (index == e).any(-1)
                if not bool(rows.any()):
                    continue
                xe = x[rows].float()
                g, u = torch.nn.functional.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
                h = module.act_fn(g) * u
                self.add(gate, xe, e, n_expert)
                self.add(up, xe, e, n_expert)
                self.add(down, h, e, n_expert)
        return hook

    def imatrix(self) -> dict[str, ImatrixEntry]:
        """What was collected, as imatrix entries (float32)."""
        return {n: ImatrixEntry(sums=self.sums[n].numpy().astype(np.float32), counts=self.counts[n].numpy().astype(np.float32))
                for n in self.sums}


def compute_imatrix(
    source: str | Path,
    output: str | Path,
    *,
    text: str | Path | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    device: str = "cpu",
    force: bool = False,
    engine: str = "auto",
    unseen_experts: str = DEFAULT_POLICY,
) -> ImatrixResult:
    """An importance matrix of ``source`` on ``text``, written to ``output`` in llama.cpp's GGUF imatrix
    format. ``engine`` (``edgequant.quantize.imatrix_llamacpp.resolve_engine``): ``torch`` runs an HF
    folder through transformers (see the module docstring), ``llama.cpp`` a 16-bit GGUF (or an HF
    folder converted to one) through llama.cpp's graph callback; ``auto`` picks by input and device.
    ``unseen_experts``: what a MoE expert no token reached gets (``fill``, ``uniform`` or ``error``;
    ``edgequant.quantize.expert_coverage``); the result's ``coverage`` lists the tokens per expert."""
    unseen_experts = resolve_policy(unseen_experts)
    if resolve_engine(engine, source, device) == "llama.cpp":
        return compute_imatrix_llamacpp(source, output, text=text, ctx=ctx, chunks=chunks, device=device, force=force,
                                        unseen_experts=unseen_experts)
    t0 = time.perf_counter()
    output = Path(output)
    check_writable([output], force=force)  # before minutes of compute, not after
    dev = resolve_device(device)
    ckpt = open_checkpoint(source)
    arch = architecture_for(ckpt.hf_architecture)(ckpt)
    corpus = load_text(text)
    batches = _chunks(ckpt, corpus.text, ctx, chunks)
    model = _load_model(ckpt, dev)
    col = _Collector()
    _measure(model, batches, dev, _hooks(model, col, arch, arch.expert_count()), ckpt.hf_architecture)
    result = Imatrix(entries=col.imatrix(), datasets=[corpus.name], chunk_count=len(batches), chunk_size=ctx)
    _check_covered(arch, result)
    coverage = settle_unseen(result, unseen_experts)
    write_imatrix(result, output, force=force)
    return ImatrixResult(
        path=str(output), entries=len(result.entries), chunks=len(batches), chunk_size=ctx,
        tokens=len(batches) * ctx, dataset=corpus.name, device=dev.type, seconds=round(time.perf_counter() - t0, 2),
        engine="torch", coverage=coverage, warnings=[coverage.warning] if coverage and coverage.warning else [],
    )


def _check_covered(arch, result: Imatrix) -> None:
    """Every matrix the GGUF will quantize got an entry: refuse a partial imatrix (a family whose modules the
    hooks do not reach, such as GPT-OSS's experts) instead of writing it."""
    missing = [n for n in arch.imatrix_matrices() if n not in result.entries]
    if missing:
        raise EdgequantError(
            f"the torch imatrix engine collected nothing for {len(missing)} matrices of this "
            f"{arch.ckpt.hf_architecture} (e.g. {missing[0]}); use --engine llama.cpp, which runs the converted GGUF")


def _chunks(ckpt: Checkpoint, text: str, ctx: int, chunks: int | None) -> list[list[int]]:
    """The text tokenized once with the source's tokenizer and cut into chunks of ``ctx`` tokens
    (BOS first in each when the tokenizer adds BOS), as ``llama-imatrix`` does."""
    from transformers import AutoTokenizer

    from edgequant.remote_code import load_kwargs, refused

    with refused(ckpt.path):
        tok = AutoTokenizer.from_pretrained(str(ckpt.path), **load_kwargs(ckpt.path))
    ids = tok(text, add_special_tokens=True, verbose=False).input_ids
    bos = tok.bos_token_id if (tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id) else None
    return chunk_ids(ids, ctx, chunks, bos)


def _load_model(ckpt: Checkpoint, dev: torch.device):
    """The source in eval mode on ``dev`` (float32 on CPU, bfloat16 on CUDA)."""
    from transformers import AutoModelForCausalLM

    from edgequant.remote_code import load_kwargs, refused

    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    with refused(ckpt.path):
        return AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=dtype, **load_kwargs(ckpt.path)).to(dev).eval()


def _hooks(model, col: _Collector, arch, n_expert: int) -> list:
    """A forward pre-hook on every module whose inputs a quantized matrix sees: fused experts
    modules, per-expert Linears, and the Linears of ``blk.*`` tensors. Where they are and what
    they become in the GGUF is the architecture's quantization layout (``export.archs``)."""
    layout = arch.layout_for(arch.ckpt.hf_architecture)
    handles = []
    for name, module in model.named_modules():
        site = layout.site(name)
        if site is None:
            continue
        # input-major stacks (GPT-OSS's) are not hooked: the check below then refuses the torch engine for them
        if site.kind == "experts" and hasattr(module, "gate_up_proj") and not layout.experts.input_major:
            hook = col.experts_hook(layout.expert_gguf_names(arch, site.block))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        elif not isinstance(module, torch.nn.Linear) or (site.kind == "expert" and not n_expert):
            continue
        elif (gname := layout.gguf_name(arch, name)) is None:
            continue
        elif site.kind == "expert":  # one Linear per expert: the hub's Mixtral layout, or GPTQModel's defused one
            handles.append(module.register_forward_pre_hook(
                col.expert_linear_hook(gname, site.expert, n_expert, module.in_features)))
        else:
            handles.append(module.register_forward_pre_hook(col.linear_hook(gname)))
    return handles


def _measure(model, batches: list[list[int]], dev: torch.device, handles: list, hf_architecture: str) -> None:
    """Run every chunk through the model with the hooks on; the hooks are removed afterwards."""
    if not handles:
        raise EdgequantError(f"found no weight matrices to measure in {hf_architecture}; is this a causal LM?")
    try:
        with torch.no_grad(), progress_count("imatrix", len(batches)) as bar:
            for chunk in batches:
                model(torch.tensor([chunk], device=dev))
                bar.advance(1)
    finally:
        for h in handles:
            h.remove()
