"""Artifact names, one function per kind: the file or folder the pipeline writes, the label the bench
prints and the row the model card shows all come from here.

GGUF names follow llama.cpp's convention (``Name-Q4_K_M.gguf``, shards ``Name-Q4_K_M-00001-of-00003.gguf``
from gguf-py's ``SHARD_NAME_FORMAT``, in :func:`edgequant.gguf_info.shard_name`); GPTQ names say every
setting that changes the weights' layout, so two different checkpoints never share a name.
"""

from __future__ import annotations


def gptq_label(bits: int, group_size: int, desc_act: bool = False, sym: bool = True) -> str:
    """``GPTQ-4bit-128g``; ``GPTQ-4bit-perchannel`` for one group per row (group_size -1); ``-act`` with
    act-order (desc_act); ``-asym`` for an asymmetric grid."""
    group = f"{group_size}g" if group_size > 0 else "perchannel"
    return f"GPTQ-{bits}bit-{group}" + ("-act" if desc_act else "") + ("" if sym else "-asym")


def gptq_folder(model_name: str, label: str) -> str:
    """``Name-GPTQ-4bit-128g``: the folder of one GPTQ checkpoint (``label`` from :func:`gptq_label`, or a
    recipe's own artifact name)."""
    return f"{model_name}-{label}"


def gptq_label_from_config(quantization_config: dict) -> str:
    """The label of a GPTQ checkpoint from its ``quantization_config`` (what a folder on disk says it is)."""
    q = quantization_config or {}
    return gptq_label(int(q.get("bits") or 0), int(q.get("group_size") or -1), bool(q.get("desc_act", False)),
                      bool(q.get("sym", True)))
