"""The package's layers point one way (docs/architecture.md): every import, module-level or inside a
function, goes to the same layer or to one it may use, and no two packages import each other.

    base <- export <- quantize <- mix <- release <- top
    base <- bench  <- mix

bench stands beside export and quantize: it loads GGUF files and HF/GPTQ folders through the base
layer only, and neither export nor quantize imports it. mix (quantize --target-*) is where the two
meet: it quantizes candidate files and measures them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "edgequant"

# each layer and the layers it may import (besides its own)
USES = {
    "base": set(),
    "export": {"base"},
    "quantize": {"base", "export"},
    "bench": {"base"},
    "mix": {"base", "export", "quantize", "bench"},
    "release": {"base", "export", "quantize", "bench", "mix"},
    "top": {"base", "export", "quantize", "bench", "mix", "release"},
}
LAYERS = list(USES)
TOP = {"cli", "demo", "__main__"}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself (__version__)
        return "base"
    head = parts[1]
    if head in TOP:
        return "top"
    if head in LAYERS:
        return head
    return "base"  # edgequant/<module>.py: errors, atomic, progress, units, env, devices, text, ...


def may_import(importer: str, imported: str) -> bool:
    """Whether a module of layer ``importer`` may import one of layer ``imported``."""
    return imported == importer or imported in USES[importer]


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    found = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "edgequant"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "edgequant":
                found.append((name, node.lineno))
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in sorted(modules().items()):
        mine = layer(module)
        for target, line in imports(path, module):
            if not may_import(mine, layer(target)):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {layer(module)} imports {target} ({layer(target)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_package_imports_another_that_imports_it():
    edges: dict[str, set[str]] = {}
    for module, path in modules().items():
        a = layer(module)
        for target, _ in imports(path, module):
            b = layer(target)
            if a != b:
                edges.setdefault(a, set()).add(b)
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))
    assert not cycles, cycles


def test_the_checker_sees_wrong_imports(tmp_path):
    """The rule itself: a base module importing the release layer is caught, a release module importing base is not;
    bench and quantize never import each other."""
    assert may_import(layer("edgequant.release.pipeline"), layer("edgequant.atomic"))
    assert not may_import(layer("edgequant.atomic"), layer("edgequant.release.pipeline"))
    assert not may_import(layer("edgequant.bench.backends"), layer("edgequant.quantize.gptq"))
    assert not may_import(layer("edgequant.bench.run"), layer("edgequant.export.convert"))
    assert not may_import(layer("edgequant.quantize.imatrix"), layer("edgequant.bench.run"))
    assert not may_import(layer("edgequant.export.convert"), layer("edgequant.bench.run"))
    assert may_import(layer("edgequant.bench.backends"), layer("edgequant.gptq_load"))
    assert all(may_import("top", b) for b in LAYERS) and not any(may_import("base", b) for b in LAYERS if b != "base")
    assert layer("edgequant.quantize.to_quant") == "quantize" and layer("edgequant.cli") == "top"
    f = tmp_path / "probe.py"
    f.write_text("from edgequant.release.pipeline import release\ndef f():\n    import edgequant.bench.run\n")
    assert [t for t, _ in imports(f, "edgequant.probe")] == ["edgequant.release.pipeline", "edgequant.bench.run"]
