"""GGUF quant types, importance matrix, GPTQ (see issues: quantize, gptq)."""
