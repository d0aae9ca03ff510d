"""llama.cpp's own tools (llama-perplexity, llama-bench, llama-imatrix, llama-quantize, llama-gguf-split),
built from the sdist of the installed llama-cpp-python: the same llama.cpp commit as the runtime.

The sdist comes from ``pip download --no-deps --no-binary :all: llama-cpp-python==<installed>``
into the edgequant cache, or from ``EDGEQUANT_LLAMA_CPP_SDIST`` (a ``.tar.gz`` or an unpacked
folder) on offline machines. The build is cached under ``~/.cache/edgequant/llama.cpp/`` by a key
of the sdist's sha256, the CMake arguments, the compiler and the CPU's flags (a native build
depends on them), like pip caches the wheel; a build is made in a temporary folder and renamed,
so an interrupted build leaves nothing under the final name.

Tests and benchmarks run these tools against edgequant on the same host. ``tool_env()`` points
them at llama-cpp-python's own shared libraries (same commit, so the same ABI), so both sides run
the very same ggml kernels.

    python -m edgequant.llamacpp_tools          # build if needed, print the bin folder
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from edgequant.errors import EdgequantError

TOOLS = ("llama-perplexity", "llama-bench", "llama-imatrix", "llama-quantize", "llama-gguf-split")
CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=ON",
              "-DCMAKE_BUILD_RPATH=$ORIGIN")  # the cached bin folder runs as it is: its libraries sit beside the tools
ENV_SDIST = "EDGEQUANT_LLAMA_CPP_SDIST"
ENV_BIN = "LLAMA_CPP_BIN"


def cache_root() -> Path:
    return Path(os.environ.get("EDGEQUANT_CACHE", Path.home() / ".cache" / "edgequant"))


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise EdgequantError("llama-cpp-python is not installed; pip install -e . first") from None


def sdist(version: str | None = None) -> Path:
    """The sdist archive or folder of llama-cpp-python ``version`` (default: the installed one)."""
    version = version or installed_version()
    named = os.environ.get(ENV_SDIST)
    if named:
        p = Path(named).expanduser()
        if not p.exists():
            raise EdgequantError(f"{ENV_SDIST}={named} does not exist; name the llama-cpp-python sdist (.tar.gz) or its unpacked folder")
        return p
    folder = cache_root() / "sdist"
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgequantError(f"could not download the llama-cpp-python {version} sdist ({tail}); "
                                 f"offline, set {ENV_SDIST} to a copy of it")
        os.replace(got[0], archive)
    return archive


def vendored(relpath: str) -> Path:
    """A file of the llama.cpp that the installed llama-cpp-python vendors (``models/ggml-vocab-qwen2.gguf``,
    ``models/templates/Qwen-Qwen3-0.6B.jinja``, ``convert_hf_to_gguf.py``), taken from its sdist into the
    cache once: test material and specs of exactly the runtime's llama.cpp commit."""
    src = sdist()
    if src.is_dir():
        path = _unpack(src, src) / relpath
        if not path.is_file():
            raise EdgequantError(f"{src} has no vendor/llama.cpp/{relpath}")
        return path
    final = cache_root() / "llama.cpp-vendored" / f"{installed_version()}-{src.stat().st_size}" / relpath
    if final.is_file():
        return final
    with tarfile.open(src) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == f"vendor/llama.cpp/{relpath}"), None)
        if member is None:
            raise EdgequantError(f"{src} has no vendor/llama.cpp/{relpath}")
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(f"{final.name}.{os.getpid()}.part")
        with tar.extractfile(member) as data, open(part, "wb") as out:
            shutil.copyfileobj(data, out)
        os.replace(part, final)
    return final


CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # what running llama.cpp's converter needs


def converter_dir() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/``, unpacked once per
    llama-cpp-python version from its sdist into the cache (``EDGEQUANT_LLAMA_CPP_SDIST`` names a
    pre-fetched archive or unpacked folder): the converter of exactly the runtime's llama.cpp commit."""
    src = sdist()
    if src.is_dir():
        root = src / "vendor" / "llama.cpp" if (src / "vendor" / "llama.cpp").is_dir() else src
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise EdgequantError(f"{src} has no vendor/llama.cpp/convert_hf_to_gguf.py; name the llama-cpp-python "
                                 f"sdist or its unpacked folder in {ENV_SDIST}")
        return root
    final = cache_root() / "llama.cpp-converter" / f"{installed_version()}-{src.stat().st_size}"
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".unpack-") as tmp:
        staged = Path(tmp) / "converter"
        try:
            with tarfile.open(src) as tar:
                for m in tar.getmembers():
                    rel = m.name.split("/", 1)[-1].removeprefix("vendor/llama.cpp/")
                    if not m.name.split("/", 1)[-1].startswith("vendor/llama.cpp/") or not m.isfile():
                        continue
                    if rel == CONVERTER_PARTS[0] or rel.startswith(CONVERTER_PARTS[1:]):
                        out = staged / rel
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(m) as data, open(out, "wb") as f:
                            shutil.copyfileobj(data, f)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EdgequantError(f"cannot unpack {src} ({e}); delete it to download it again, or set {ENV_SDIST}") from None
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise EdgequantError(f"{src} has no vendor/llama.cpp/convert_hf_to_gguf.py; name the llama-cpp-python sdist")
        try:
            os.replace(staged, final)
        except OSError:  # another process unpacked it first
            if not (final / "convert_hf_to_gguf.py").is_file():
                raise
    return final


def _sha256(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(str(path.resolve()).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cxx
    raise EdgequantError("no C++ compiler found; install one (apt-get install g++ cmake) to build llama.cpp's tools")


def build_key(src: Path) -> str:
    from edgequant.llamacpp import cpu_flags

    parts = [_sha256(src), " ".join(CMAKE_ARGS), _compiler(), " ".join(sorted(cpu_flags()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _unpack(src: Path, into: Path) -> Path:
    if src.is_dir():
        root = src
    else:
        with tarfile.open(src) as tar:
            tar.extractall(into, filter="data")
        root = next(p for p in into.iterdir() if p.is_dir())
    vendored = root / "vendor" / "llama.cpp"
    if not (vendored / "CMakeLists.txt").is_file():
        raise EdgequantError(f"{src} has no vendor/llama.cpp; name the llama-cpp-python sdist")
    return vendored


def bin_dir(*, build: bool = True, log=None) -> Path:
    """The folder holding the tools: ``$LLAMA_CPP_BIN`` if set, else the cached build (made if ``build``)."""
    named = os.environ.get(ENV_BIN)
    if named:
        p = Path(named)
        missing = [t for t in TOOLS if not (p / t).is_file()]
        if missing:
            raise EdgequantError(f"{ENV_BIN}={named} lacks {', '.join(missing)}; unset it to build them")
        return p
    version = installed_version()
    src = sdist(version)
    final = cache_root() / "llama.cpp" / f"{version}-{build_key(src)}"
    if all((final / "bin" / t).is_file() for t in TOOLS):
        return final / "bin"
    if not build:
        raise EdgequantError(f"llama.cpp's tools are not built; run python -m edgequant.llamacpp_tools")
    for tool in ("cmake",):
        if not shutil.which(tool):
            raise EdgequantError("cmake is not installed; apt-get install cmake (or pip install cmake)")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmp:
        tmp = Path(tmp)
        root = _unpack(src, tmp / "src")
        build_dir = tmp / "build"
        jobs = str(os.cpu_count() or 2)
        steps = [["cmake", "-S", str(root), "-B", str(build_dir), *CMAKE_ARGS],
                 ["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TOOLS]]
        for cmd in steps:
            if log:
                log(" ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                (tmp.parent / "build-error.log").write_text(proc.stdout + proc.stderr)
                raise EdgequantError(f"building llama.cpp's tools failed; see {tmp.parent / 'build-error.log'}")
        staged = tmp / "out"
        (staged / "bin").mkdir(parents=True)
        for t in TOOLS:
            shutil.copy2(build_dir / "bin" / t, staged / "bin" / t)
        for lib in build_dir.glob("bin/*.so*"):
            shutil.copy2(lib, staged / "bin" / lib.name, follow_symlinks=False)
        (staged / "KEY").write_text(f"{src}\n{' '.join(CMAKE_ARGS)}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    return final / "bin"


def runtime_lib_dir() -> Path:
    """llama-cpp-python's own libllama/libggml* (the libraries edgequant runs)."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def tool_env(*, same_library: bool = True, tools: Path | None = None) -> dict[str, str]:
    """The environment to run a tool in: on llama-cpp-python's libllama/libggml* unless ``same_library``
    is off; the tools' own libraries (libllama-common, the tools' *-impl) from their folder."""
    env = dict(os.environ)
    dirs = [str(runtime_lib_dir())] if same_library else []
    dirs.append(str(tools or bin_dir()))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def repack_args(tool: str) -> list[str]:
    """The tool's flag for edgequant's buffer policy on this host (the same kernels on both sides)."""
    from edgequant.llamacpp import repack_policy

    on = repack_policy().repack
    if tool == "llama-bench":
        return ["--repack", "1" if on else "0"]  # llama-bench's own spelling
    return [] if on else ["--no-repack"]


_KLD_LINES = {
    "kld_mean": r"Mean    KLD:\s*(-?[\d.]+)",
    "kld_max": r"Maximum KLD:\s*(-?[\d.]+)",
    "kld_p999": r"99\.9%   KLD:\s*(-?[\d.]+)",
    "kld_p99": r"99\.0%   KLD:\s*(-?[\d.]+)",
    "kld_median": r"Median  KLD:\s*(-?[\d.]+)",
    "delta_p_mean": r"Mean    Δp:\s*(-?[\d.]+)",
    "delta_p_rms": r"RMS Δp    :\s*(-?[\d.]+)",
    "same_top": r"Same top p:\s*(-?[\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*(-?[\d.]+)",
}


def parse_perplexity(output: str) -> dict:
    """The numbers llama-perplexity prints: running PPL per chunk, the final estimate, and in
    ``--kl-divergence`` mode its KLD/Δp/same-top summary (percent values as printed)."""
    import re

    out: dict = {"running_ppl": [float(x) for x in re.findall(r"\[\d+\](\d+\.\d+),", output)]}
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", output)
    if final:
        out["ppl"], out["ppl_error"] = float(final.group(1)), float(final.group(2))
    for key, pattern in _KLD_LINES.items():
        m = re.search(pattern, output)
        if m:
            out[key] = float(m.group(1))
    return out


def run_tool(tool: str, *args: str, same_library: bool = True, timeout: float | None = 1800) -> str:
    """Run one of the tools with edgequant's buffer policy; its whole output (stdout + stderr) as text."""
    tools = bin_dir()
    cmd = [str(tools / tool), *args, *repack_args(tool)]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=tool_env(same_library=same_library, tools=tools), timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise EdgequantError(f"{' '.join(cmd)} exited with {proc.returncode}: {tail}")
    return proc.stdout + proc.stderr


def main() -> int:
    try:
        print(bin_dir(log=lambda m: print(m, file=sys.stderr)))
    except EdgequantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
