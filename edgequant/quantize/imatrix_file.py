"""llama.cpp's GGUF importance-matrix format: read, write, validate against a model.

A file has ``general.type = imatrix``, ``imatrix.datasets`` / ``imatrix.chunk_count`` /
``imatrix.chunk_size``, and per weight matrix two F32 tensors: ``<tensor>.in_sum2`` of ggml shape
``[n_cols, n_mat]`` (the sum over tokens of squared input activations, per input column, per
expert for MoE) and ``<tensor>.counts`` ``[1, n_mat]`` (tokens seen, per expert). The quantizer
weighs each column by ``in_sum2 / counts`` (1 where an expert saw no token).

edgequant adds two keys llama.cpp ignores (``expert_coverage``): the policy for experts no token
reached and the expert slots that policy filled, so that a file read back reports its true coverage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgequant.atomic import atomic_outputs, check_writable
from edgequant.errors import EdgequantError
from edgequant.quantize.expert_coverage import KEY_FILLED, KEY_POLICY, ExpertCoverage, coverage_of

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat, n_cols]
    counts: np.ndarray  # float32 [n_mat]

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[1])

    def values(self) -> np.ndarray:
        """What llama-quantize hands the quantizer: sums / counts per matrix, 1 where unseen."""
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return out


@dataclass
class ImatrixResult:
    """What ``edgequant imatrix`` wrote (``--json`` prints it); ``engine``: llama.cpp or torch."""

    path: str
    entries: int
    chunks: int
    chunk_size: int
    tokens: int
    dataset: str
    device: str
    seconds: float
    engine: str = "torch"
    coverage: ExpertCoverage | None = None  # MoE models: tokens per expert per layer (expert_coverage.py)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coverage"] = None if self.coverage is None else self.coverage.to_dict()
        return d


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    filled: dict[str, list[int]] = field(default_factory=dict)  # expert slots the ``fill`` policy wrote
    unseen_policy: str | None = None  # fill, uniform or error; None: a file edgequant did not write

    @property
    def coverage(self) -> ExpertCoverage | None:
        """Tokens per expert per MoE layer (filled slots count as unseen); None for a dense model."""
        return coverage_of(self)


def write_imatrix(m: Imatrix, path: Path, *, force: bool = False) -> Path:
    path = Path(path)
    check_writable([path], force=force)
    w = gguf.GGUFWriter(path=None, arch="imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    w.add_string(KEY_TYPE, "imatrix")
    w.add_array(KEY_DATASETS, m.datasets or ["unknown"])
    w.add_uint32(KEY_CHUNK_COUNT, m.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, m.chunk_size)
    if m.unseen_policy:
        w.add_string(KEY_POLICY, m.unseen_policy)
    if any(m.filled.values()):
        w.add_array(KEY_FILLED, [f"{name}:{e}" for name in sorted(m.filled) for e in sorted(m.filled[name])])
    for name in sorted(m.entries):
        e = m.entries[name]
        w.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(e.sums, dtype=np.float32))
        w.add_tensor(name + COUNT_SUFFIX, np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
    with atomic_outputs([path]) as (part,):
        w.write_header_to_file(part)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    if path.is_dir():
        raise EdgequantError(f"imatrix {path} is a folder; pass the imatrix .gguf file")
    if not path.is_file():
        raise EdgequantError(f"imatrix {path} does not exist; make one with: edgequant imatrix MODEL -o {path.name}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise EdgequantError(
            f"{path} is not a GGUF imatrix ({type(e).__name__}); legacy .dat files: convert with llama-imatrix --in-file X.dat -o X.gguf"
        ) from None
    fields = reader.fields
    kind = fields.get(KEY_TYPE)
    if kind is None or bytes(kind.parts[kind.data[0]]).decode() != "imatrix":
        raise EdgequantError(f"{path} is a GGUF but not an importance matrix (general.type is not 'imatrix')")
    m = Imatrix()
    if KEY_DATASETS in fields:
        f = fields[KEY_DATASETS]
        m.datasets = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
    for key, attr in ((KEY_CHUNK_COUNT, "chunk_count"), (KEY_CHUNK_SIZE, "chunk_size")):
        if key in fields:
            setattr(m, attr, int(fields[key].parts[fields[key].data[0]][0]))
    if KEY_POLICY in fields:
        f = fields[KEY_POLICY]
        m.unseen_policy = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    if KEY_FILLED in fields:
        f = fields[KEY_FILLED]
        for i in f.data:
            name, _, expert = bytes(f.parts[i]).decode("utf-8", "replace").rpartition(":")
            if name and expert.isdigit():
                m.filled.setdefault(name, []).append(int(expert))
    sums, counts = {}, {}
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name[: -len(COUNT_SUFFIX)]] = data.reshape(-1)
    for name, s in sums.items():
        if name not in counts:
            raise EdgequantError(f"{path}: {name} has in_sum2 but no counts; the file is corrupt")
        m.entries[name] = ImatrixEntry(sums=s, counts=counts[name])
    return m


def check_matches_model(m: Imatrix, model_tensors: dict[str, list[int]], *, path: Path) -> None:
    """Refuse an imatrix made for another model: every entry must name a model tensor with the
    same row length and expert count (``model_tensors``: name -> ggml shape)."""
    matched = 0
    for name, e in m.entries.items():
        shape = model_tensors.get(name)
        if shape is None:
            continue
        matched += 1
        n_mat = shape[2] if len(shape) > 2 else 1
        if shape[0] != e.n_cols or n_mat != e.sums.shape[0]:
            raise EdgequantError(
                f"imatrix {path} was made for another model: {name} has {shape[0]} columns x {n_mat} matrices here, "
                f"{e.n_cols} x {e.sums.shape[0]} in the imatrix; compute one for this model with edgequant imatrix"
            )
    if m.entries and matched == 0:
        raise EdgequantError(f"imatrix {path} names none of this model's tensors; it was made for another model")
