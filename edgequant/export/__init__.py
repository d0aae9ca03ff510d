"""HF checkpoint -> GGUF."""
