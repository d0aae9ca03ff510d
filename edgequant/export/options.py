"""Convert's choices that other layers name too (the recipe, the CLI), importable without torch."""

from __future__ import annotations

# --sliding-window: "exact" writes a window the runtime honours where llama.cpp has an architecture for it;
# "ignore" writes the family's usual architecture, whose runtime may attend to the whole context
# (docs/convert.md says why "ignore" is the default).
SLIDING_WINDOW_MODES = ("ignore", "exact")
DEFAULT_SLIDING_WINDOW = "ignore"

# --converter: "auto" converts with edgequant's own code where it has the architecture (export/archs/) and
# with llama.cpp's convert_hf_to_gguf.py (of the installed llama-cpp-python) otherwise.
CONVERTERS = ("auto", "native", "llama.cpp")
DEFAULT_CONVERTER = "auto"
