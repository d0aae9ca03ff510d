"""What a measurement ran on: the host (CPU, cores, GPU, OS, llama.cpp's buffer policy) and tool versions."""

from __future__ import annotations

import platform
from pathlib import Path

from edgequant.devices import default_threads


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        gpu = None
    from edgequant.llamacpp import repack_policy

    return {"cpu": cpu, "cores": os.cpu_count(), "physical_cores": default_threads(), "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version(),
            "llama_cpp_buffers": repack_policy().to_dict()}


def versions() -> dict:
    """Versions of everything that can change a number in the report."""
    from importlib import metadata

    out = {}
    for dist in ("edgequant", "llama-cpp-python", "gguf", "torch", "transformers", "gptqmodel", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
