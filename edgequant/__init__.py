"""edgequant: ship Hugging Face causal LMs to the edge (GGUF, GPTQ, llama.cpp-exact benchmarks)."""

__version__ = "0.1.0"
