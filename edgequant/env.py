"""What a measurement ran on: the host (CPU, cores, GPU, OS, llama.cpp's buffer policy) and tool versions.

One shape for the versions, in the bench report and the release manifest alike: snake_case keys
(``edgequant``, ``llama_cpp_python``, ``llama_cpp_commit``, ``gguf``, ``torch``, ``transformers``,
``gptqmodel``, ``numpy``, ``python``), None for a package that is not installed.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from edgequant import __version__
from edgequant.devices import default_threads

# llama.cpp commit vendored by each llama-cpp-python release (from its CHANGELOG)
LLAMA_CPP_COMMITS = {"0.3.36": "0c1e57098"}


def first_gpu() -> str | None:
    """The first NVIDIA GPU's name: from torch when a run has imported it already, else from the driver's
    /proc files (importing torch only for a name costs a GGUF-only bench about a second)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a broken CUDA setup is "no GPU" here
            return None
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


def host_info() -> dict:
    """CPU model, core counts, first GPU, OS, Python and llama.cpp's weight-buffer policy."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = first_gpu()
    from edgequant.llamacpp import repack_policy

    return {"cpu": cpu, "cores": os.cpu_count(), "physical_cores": default_threads(), "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version(),
            "llama_cpp_buffers": repack_policy().to_dict()}


@dataclass(frozen=True)
class Versions:
    """Versions of everything that can change a number in a report or a file in a release."""

    edgequant: str | None = None
    llama_cpp_python: str | None = None
    llama_cpp_commit: str | None = None  # the llama.cpp that llama-cpp-python vendors, when known
    gguf: str | None = None
    torch: str | None = None
    transformers: str | None = None
    gptqmodel: str | None = None
    numpy: str | None = None
    python: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Versions:
        """From a report's or manifest's ``versions`` (unknown keys are ignored)."""
        data = data or {}
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def tool_versions() -> Versions:
    """The installed versions (distribution metadata; edgequant's own from the package)."""
    from importlib import metadata

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    lcp = dist("llama-cpp-python")
    return Versions(edgequant=__version__, llama_cpp_python=lcp, llama_cpp_commit=LLAMA_CPP_COMMITS.get(lcp or ""),
                    gguf=dist("gguf"), torch=dist("torch"), transformers=dist("transformers"),
                    gptqmodel=dist("gptqmodel"), numpy=dist("numpy"), python=platform.python_version())


def versions() -> dict:
    """:func:`tool_versions` as the plain dict a bench report and a manifest carry."""
    return tool_versions().to_dict()
