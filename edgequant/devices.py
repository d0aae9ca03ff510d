"""Devices and threads: what ``--device`` accepts and what llama.cpp's tools choose by default."""

from __future__ import annotations

import os
from pathlib import Path

from edgequant.errors import EdgequantError

DEVICES = ("cpu", "cuda")


def parse_devices(spec: str | list[str] | None) -> list[str]:
    """``"cpu,cuda"`` → ``["cpu", "cuda"]``; unknown names are an error, order is kept, no repeats."""
    items = spec if isinstance(spec, list) else (spec or "cpu").split(",")
    devices: list[str] = []
    for d in (x.strip().lower() for x in items):
        if d not in DEVICES:
            raise EdgequantError(f"--device {d!r}: use cpu, cuda or both (cpu,cuda)")
        if d not in devices:
            devices.append(d)
    if not devices:
        raise EdgequantError("--device: name at least one of cpu, cuda")
    return devices


def default_threads() -> int:
    """Physical cores, as llama.cpp's tools choose by default (llama-bench, llama-perplexity)."""
    cores = set()
    try:
        for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
            siblings = cpu / "topology" / "thread_siblings_list"
            if siblings.is_file():
                cores.add(siblings.read_text().strip())
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def resolve_device(device: str):
    """``cpu`` or ``cuda`` as a torch device; CUDA asked for where torch has none is one line."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise EdgequantError(
                f"--device cuda asked for, but torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU); use --device cpu"
            )
        return torch.device("cuda")
    if device != "cpu":
        raise EdgequantError(f"--device {device!r}: use cpu or cuda")
    return torch.device("cpu")
