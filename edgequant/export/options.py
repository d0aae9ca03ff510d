"""Convert's choices that other layers name too (the recipe, the CLI), importable without torch."""

from __future__ import annotations

# --sliding-window: "exact" writes a window the runtime honours where llama.cpp has an architecture for it;
# "ignore" writes the family's usual architecture, whose runtime may attend to the whole context
# (docs/convert.md says why "ignore" is the default).
SLIDING_WINDOW_MODES = ("ignore", "exact")
DEFAULT_SLIDING_WINDOW = "ignore"
