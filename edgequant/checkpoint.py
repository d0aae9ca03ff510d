"""Open a Hugging Face model folder once: config, a lazy tensor index, tokenizer files, model card.

Tensors are never loaded as a whole model. Each :class:`TensorRef` reads the rows it is asked
for: safetensors with ``pread`` of exactly that byte range, ``pytorch_model*.bin`` through
``torch.load(weights_only=True, mmap=True)``. So converting a 47 GB Mixtral touches one slice
at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgequant.errors import EdgequantError

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorRef:
    """One tensor of the checkpoint, read lazily."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    _open: Callable[[], Any] | None = field(repr=False, default=None)  # torch .bin: the mmap'ed state dict
    offset: int | None = None  # safetensors: absolute byte offset of the data in ``file``

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def read(self, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read ``tensor[index][rows[0]:rows[1]]`` without loading the rest of the tensor.

        Safetensors data is row-major, so that slice is one contiguous byte range: it is read with
        ``pread`` into a fresh buffer. (A memory map would keep every page it touched resident,
        counting the whole checkpoint in the process's RSS by the end of a conversion.)
        """
        if self.offset is None:  # a mmap'ed torch state dict
            t = self._open()[self.name]
            key = tuple(index) + ((slice(*rows),) if rows is not None else ())
            return t[key] if key else t
        k = len(index)
        inner = int(math.prod(self.shape[k + 1:])) if k < len(self.shape) else 1
        start = sum(i * int(math.prod(self.shape[j + 1:])) for j, i in enumerate(index))
        out_shape = list(self.shape[k:])
        if rows is not None:
            start += rows[0] * inner
            out_shape[0] = rows[1] - rows[0]
        count = int(math.prod(out_shape))
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        buf = bytearray(count * itemsize)
        _pread_exact(self.file, self.offset + start * itemsize, buf, self.name)
        if count == 0:
            return torch.empty(out_shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).reshape(out_shape)


def _pread_exact(path: Path, offset: int, buf: bytearray, name: str) -> None:
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise EdgequantError(
                    f"cannot read tensor {name} from {path.name}: the file ends early (truncated or corrupt; re-download it)"
                )
            done += n
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    files: list[Path]
    readme: Path | None

    @property
    def hf_architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise EdgequantError(
                f"{self.path / 'config.json'} names no architecture ('architectures' is empty); add the HF class name, e.g. \"MistralForCausalLM\""
            )
        return archs[0]

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.file(name)
        if p is None:
            return None
        return _read_json_file(p)

    def source_dtype(self) -> torch.dtype | None:
        """The dtype of the first matrix, as llama.cpp's ``--outtype auto`` decides it."""
        for ref in self.tensors.values():
            if len(ref.shape) >= 2:
                return ref.dtype
        return None

    def fingerprint(self) -> str:
        """A hash of config, tensor index, tokenizer files and weight-file headers.

        Cheap (no tensor data is read) yet changes when any weight file is replaced, because a
        safetensors header records every tensor's byte range.
        """
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        for name in sorted(self.tensors):
            ref = self.tensors[name]
            h.update(f"{name}|{ref.dtype}|{ref.shape}|{ref.file.name}\n".encode())
        for fname in TOKENIZER_FILES:
            p = self.file(fname)
            if p is not None:
                h.update(fname.encode())
                h.update(p.read_bytes())
        for f in self.files:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".safetensors":
                h.update(_safetensors_header(f))
        return h.hexdigest()


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local folder, or a hub id (``org/name``) fetched with huggingface_hub when online."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise EdgequantError(f"{p} is a file; pass the model folder (the one holding config.json)")
        return p
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    text,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.md", "*.txt"],
                )
            )
        except Exception as e:
            raise EdgequantError(
                f"{text} is not a local folder and could not be fetched from the Hugging Face hub "
                f"({type(e).__name__}); download it first (huggingface-cli download {text} --local-dir DIR) and pass DIR"
            ) from None
    raise EdgequantError(f"{p} does not exist; pass a Hugging Face model folder (with config.json) or a hub id org/name")


def _read_json_file(p: Path) -> dict[str, Any]:
    """A JSON object from a model folder, or one line saying what is wrong with the file."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise EdgequantError(f"{p} is not UTF-8 text (byte {e.start}); fix or re-download it") from None
    except json.JSONDecodeError as e:
        raise EdgequantError(f"{p} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise EdgequantError(f"{p} holds a JSON {type(data).__name__}, not an object; fix or re-download it")
    return data


def open_checkpoint(source: str | os.PathLike[str]) -> Checkpoint:
    path = resolve_source(source)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise EdgequantError(f"no config.json in {path}: not a Hugging Face model folder (pass the folder that holds config.json)")
    config = _read_json_file(cfg_path)
    if "text_config" in config and isinstance(config["text_config"], dict):
        config = {**config, **config["text_config"]}

    files = _weight_files(path)
    tensors: dict[str, TensorRef] = {}
    for f in files:
        for ref in (_index_safetensors(f) if f.suffix == ".safetensors" else _index_torch_bin(f)):
            if ref.name in tensors:
                raise EdgequantError(f"tensor {ref.name} appears in both {tensors[ref.name].file.name} and {f.name}; remove the stale file")
            tensors[ref.name] = ref
    readme = path / "README.md"
    return Checkpoint(path=path, config=config, tensors=tensors, files=files, readme=readme if readme.is_file() else None)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EdgequantError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise EdgequantError(f"{index.name} lists {missing[0]}, which is missing from {path}; download every shard")
        return [path / n for n in names]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise EdgequantError(f"no weights in {path}: expected model.safetensors, model-0000N-of-0000M.safetensors or pytorch_model.bin")


def _safetensors_header(f: Path) -> bytes:
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise EdgequantError(f"{f} is truncated (no safetensors header); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise EdgequantError(f"{f} is not a safetensors file (header length {n}); re-download it")
        data = fh.read(n)
        if len(data) < n:
            raise EdgequantError(f"{f} is truncated (header cut short); re-download it")
        return data


def _index_safetensors(f: Path) -> list[TensorRef]:
    raw = _safetensors_header(f)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise EdgequantError(f"{f} has a corrupt safetensors header; re-download it") from None
    size = f.stat().st_size
    data_start = 8 + len(raw)
    refs = []
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise EdgequantError(f"{f.name}: tensor {name} has dtype {info['dtype']}, which edgequant cannot convert yet")
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise EdgequantError(f"{f} has a corrupt safetensors header (tensor {name}); re-download it") from None
        ref = TensorRef(name=name, shape=shape, dtype=dtype, file=f, offset=data_start + begin)
        if begin < 0 or end - begin != ref.nbytes or any(d < 0 for d in shape):
            # the safetensors library refuses such a header too: reading it would take a neighbour's bytes
            raise EdgequantError(f"{f} is corrupt: tensor {name} of shape {list(shape)} ({info['dtype']}) needs {ref.nbytes} "
                                 f"bytes but its header gives {end - begin}; re-download it")
        end_max = max(end_max, end)
        refs.append(ref)
    if data_start + end_max > size:
        raise EdgequantError(
            f"{f} is truncated: its header describes {data_start + end_max} bytes, the file has {size}; re-download it"
        )
    return refs


def _index_torch_bin(f: Path) -> list[TensorRef]:
    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise
    except Exception as e:
        # torch's own advice ("set weights_only=False if you trust the source") would run the pickle's code
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EdgequantError(
            f"{f.name} is a pickle checkpoint that loads only by running code ({first}); edgequant never does. "
            f"Re-download the model's .safetensors files, or convert it where you trust it: "
            f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors"
        ) from None
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return [
        TensorRef(name=k, shape=tuple(v.shape), dtype=v.dtype, file=f, _open=lambda sd=sd: sd)
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    ]
