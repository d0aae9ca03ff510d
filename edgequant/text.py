"""Evaluation and calibration text: a file, the built-in offline corpus, or a named dataset.

The built-in corpus is Python's own documentation text (``pydoc_data.topics``, shipped with every
CPython): natural English prose with code, identical on every machine with the same Python, so
numbers measured on it are reproducible offline. About 465 K characters (113 K SmolLM2 tokens).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

BUILTIN_ALIASES = {None, "", "builtin", "pydoc", "python-docs"}
DATASETS = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1", "test")}


@dataclass(frozen=True)
class Text:
    name: str  # what the text is, for reports and imatrix metadata
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(source: str | Path | Text | None = None) -> Text:
    """``None``/``pydoc``: the built-in corpus; ``wikitext-2``: the dataset (online); else a file path
    (a ``Text`` already loaded is returned as it is)."""
    if isinstance(source, Text):
        return source
    key = None if source is None else str(source)
    if key in BUILTIN_ALIASES:
        import platform

        return Text(name=f"pydoc_data.topics (Python {platform.python_version()})", text=builtin_text())
    if key in DATASETS:
        return _dataset(key)
    path = Path(key)
    if path.is_dir():
        raise EdgequantError(f"text file {path} is a folder; pass a text file")
    if not path.is_file():
        raise EdgequantError(f"text file {path} does not exist; pass a text file, 'pydoc' (built in) or one of {', '.join(DATASETS)}")
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise EdgequantError(f"text file {path} is empty; pass a file with natural text")
    nul = b"\x00" in data[:1 << 20]
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if nul or bad > max(16, len(text) // 1000):
        what = "NUL bytes" if nul else f"{bad} bytes that are not UTF-8"
        raise EdgequantError(f"text file {path} looks binary ({what}); pass natural text in UTF-8 "
                             f"(perplexity and calibration on binary data mean nothing)")
    return Text(name=path.name, text=text)


def _dataset(name: str) -> Text:
    repo, config, split = DATASETS[name]
    try:
        from datasets import load_dataset

        rows = load_dataset(repo, config, split=split)
    except ImportError:
        raise EdgequantError(f"{name} needs the 'datasets' package (pip install datasets), or pass --text FILE") from None
    except Exception as e:
        raise EdgequantError(f"cannot load {name} ({type(e).__name__}); offline? pass --text FILE or use the built-in 'pydoc' text") from None
    return Text(name=name, text="\n".join(rows["text"]))


def chunk_ids(ids: list[int], ctx: int, n_chunks: int | None, bos_id: int | None, *, minimum: int = 1) -> list[list[int]]:
    """llama.cpp's chunking (llama-perplexity, llama-imatrix): back-to-back ``ctx``-token chunks of
    the once-tokenized text, each chunk's first token overwritten with BOS when the model adds BOS.
    The text must hold ``minimum`` chunks (llama-perplexity needs 2 x ctx tokens) even when fewer
    are asked for."""
    if ctx < 1:
        raise EdgequantError(f"--ctx {ctx}: use a positive number of tokens per chunk (512 is llama.cpp's usual)")
    if n_chunks is not None and n_chunks < 1:
        raise EdgequantError(f"--chunks {n_chunks}: use a positive number of chunks, or leave it out for all of them "
                             f"(llama.cpp's -1)")
    available = len(ids) // ctx
    if available < minimum:
        raise EdgequantError(
            f"the text has {len(ids)} tokens, fewer than {minimum} chunk{'s' if minimum > 1 else ''} of {ctx} "
            f"(it needs {minimum * ctx}); pass a longer text or a smaller --ctx"
        )
    n = available if n_chunks is None else min(n_chunks, available)
    chunks = []
    for i in range(n):
        c = list(ids[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            c[0] = bos_id
        chunks.append(c)
    return chunks
