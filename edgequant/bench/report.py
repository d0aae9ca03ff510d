"""The bench report in every form a user or CI wants: flat rows, CSV, Markdown, JSON schema, PNG plot.

One row per (model, device): quality columns come from the quality run (device-independent, filled
on every row of the model), speed columns from that device's run. An absent device gives a row
whose speed cells say ``absent`` and whose ``absent`` column says why.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from edgequant import units
from edgequant.bench.run import SCHEMA, BenchReport

COLUMNS = [
    "name", "type", "kind", "reference", "size_bytes", "bits_per_weight", "ppl", "ppl_error", "ln_ppl_ratio",
    "kld_mean", "kld_p99", "delta_p_mean", "delta_p_rms", "same_top", "device", "backend", "threads",
    "pp", "pp_tps", "pp_std", "tg", "tg_tps", "tg_std", "load_seconds", "peak_rss_bytes", "peak_vram_bytes", "absent",
]
_QUALITY = ("ppl", "ppl_error", "ln_ppl_ratio", "kld_mean", "kld_p99", "delta_p_mean", "delta_p_rms", "same_top")
_SPEED = ("device", "backend", "threads", "pp", "pp_tps", "pp_std", "tg", "tg_tps", "tg_std", "load_seconds",
          "peak_rss_bytes", "peak_vram_bytes", "absent")


def flat_rows(report: BenchReport) -> list[dict]:
    out = []
    for r in report.rows:
        base = {"name": r.name, "type": r.type, "kind": r.kind, "reference": r.is_reference,
                "size_bytes": r.size_bytes, "bits_per_weight": r.bits_per_weight}
        q = r.quality or {}
        base.update({k: q.get(k) for k in _QUALITY})
        for s in r.speed or [None]:
            row = dict(base)
            sd = s.to_dict() if s is not None else {}
            row.update({k: sd.get(k) for k in _SPEED})
            if s is None:
                row["device"] = report.quality_device
            out.append(row)
    return out


def to_csv(report: BenchReport) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in flat_rows(report):
        w.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def _f(v, fmt: str, none: str = "—") -> str:
    return none if v is None else format(v, fmt)


def human_size(n: float | None) -> str:
    return units.human_size(n, digits=1)


def display_rows(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the terminal table and the Markdown table."""
    header = ["model", "type", "size", "bits/w", "PPL", "ln PPL ratio", "KLD mean", "KLD 99%", "Δp RMS",
              "same top", "device", "pp t/s", "tg t/s", "peak RSS"]
    cells = []
    for row in flat_rows(report):
        ppl = "—" if row["ppl"] is None else f"{row['ppl']:.4f} ± {row['ppl_error']:.4f}"
        if row.get("absent"):
            pp = tg = "absent"
        else:
            pp = "—" if row["pp_tps"] is None else f"{row['pp_tps']:.1f} ± {row['pp_std']:.1f}"
            tg = "—" if row["tg_tps"] is None else f"{row['tg_tps']:.1f} ± {row['tg_std']:.1f}"
        name = row["name"] + (" (reference)" if row["reference"] else "")
        if row["reference"]:  # its KLD against its own compressed log-probs is only the compression floor
            kld = ["ref"] * 5
        else:
            kld = [_f(row["ln_ppl_ratio"], ".5f"), _f(row["kld_mean"], ".6f"), _f(row["kld_p99"], ".6f"),
                   "—" if row["delta_p_rms"] is None else f"{100 * row['delta_p_rms']:.3f} %",
                   "—" if row["same_top"] is None else f"{100 * row['same_top']:.3f} %"]
        cells.append([
            name, str(row["type"]), human_size(row["size_bytes"]), _f(row["bits_per_weight"], ".2f"), ppl, *kld,
            str(row["device"] or "—"), pp, tg, human_size(row["peak_rss_bytes"]),
        ])
    return header, cells


def to_markdown(report: BenchReport) -> str:
    header, cells = display_rows(report)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    lines.append("")
    lines.append(describe_settings(report))
    for row in flat_rows(report):
        if row.get("absent"):
            lines.append(f"- {row['name']} on {row['device']}: absent ({row['absent']})")
    for n in report.notes:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def describe_settings(report: BenchReport) -> str:
    parts = []
    if report.text:
        parts.append(f"text: {report.text['name']}, ctx {report.ctx}, {report.chunks} chunks")
        parts.append(f"KLD reference: {Path(report.reference).name}" if report.reference else "no KLD reference")
    if report.speed_settings:
        s = report.speed_settings
        parts.append(f"speed: pp{s['pp']}/tg{s['tg']}, {s['reps']} reps after a warm-up, batch {s['n_batch']}/{s['n_ubatch']}")
    parts.append(f"{report.threads} threads, flash attention {'on' if report.flash_attn else 'off'}")
    parts.append(f"host: {report.host.get('cpu')}" + (f", {report.host['gpu']}" if report.host.get("gpu") else ""))
    bufs = report.host.get("llama_cpp_buffers")
    if bufs:
        parts.append(f"llama.cpp weight repacking {'on' if bufs['repack'] else 'off'} ({bufs['reason']})")
    return "; ".join(parts)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller size, smaller metric)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _is_mix(row) -> bool:
    """A file whose per-tensor types were overridden (bench labels it ``<type> mix``)."""
    return str(row.type).endswith("mix")


def plot(report: BenchReport, path: str | Path) -> Path:
    """PNG: file size against PPL and against mean KLD, Pareto front drawn and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgequant.atomic import atomic_outputs

    rows = [r for r in report.rows if r.quality]
    metrics = [("ppl", "perplexity (lower is better)")]
    if any(r.quality.get("kld_mean") is not None for r in rows):
        metrics.append(("kld_mean", f"mean KLD vs {Path(report.reference).name} (lower is better)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        pts = [(r.size_bytes / 1e9, r.quality[key], r) for r in rows if r.quality.get(key) is not None]
        if not pts:
            continue
        front = pareto_front([(x, y) for x, y, _ in pts])
        for i, (x, y, r) in enumerate(pts):
            on = i in front
            ax.scatter([x], [y], s=70 if on else 40, marker="*" if r.is_reference else "D" if _is_mix(r) else "o",
                       color="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(str(r.type), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", alpha=0.6, label="Pareto front")
        if any(_is_mix(r) for _, _, r in pts):
            ax.scatter([], [], marker="D", color="tab:gray", label="per-tensor mix (quantize --target)")
        ax.set_xlabel("file size (GB)")
        ax.set_ylabel(label)
        if key == "kld_mean" and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
    title = f"{report.text['name']}, ctx {report.ctx}, {report.chunks} chunks" if report.text else ""
    fig.suptitle(f"edgequant bench — {title}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_outputs([path]) as (part,):
        fig.savefig(part, dpi=120, format="png")
    plt.close(fig)
    return path


_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA,
    "title": "edgequant bench report",
    "type": "object",
    "required": ["schema", "text", "ctx", "chunks", "reference", "devices", "quality_device", "threads",
                 "flash_attn", "speed_settings", "rows", "notes", "host", "versions", "seconds"],
    "properties": {
        "schema": {"const": SCHEMA},
        "text": {"type": ["object", "null"], "required": ["name", "sha256", "chars"],
                 "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}, "chars": {"type": "integer"}}},
        "ctx": {"type": "integer"},
        "chunks": _INT,
        "reference": _STR,
        "devices": {"type": "array", "items": {"enum": ["cpu", "cuda"]}},
        "quality_device": {"enum": ["cpu", "cuda", None]},
        "threads": {"type": "integer"},
        "flash_attn": {"type": "boolean"},
        "speed_settings": {"type": ["object", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "host": {"type": "object", "properties": {
            # how llama.cpp placed the weights on this host (edgequant.llamacpp.RepackPolicy, docs/cpu.md)
            "llama_cpp_buffers": {"type": "object", "required": ["repack", "mode", "reason", "amx_cpu", "amx_active"],
                                  "properties": {"repack": {"type": "boolean"}, "mode": {"enum": ["auto", "on", "off"]},
                                                 "reason": {"type": "string"}, "amx_cpu": {"type": "boolean"},
                                                 "amx_active": {"type": ["boolean", "null"]},
                                                 "extra_buffers": {"type": ["array", "null"], "items": {"type": "string"}}}},
        }},
        "versions": {"type": "object"},
        "seconds": {"type": "number"},
        "rows": {"type": "array", "items": {
            "type": "object",
            "required": ["model", "name", "kind", "type", "size_bytes", "bits_per_weight", "n_params", "is_reference",
                         "quality", "speed"],
            "properties": {
                "model": {"type": "string"}, "name": {"type": "string"}, "kind": {"enum": ["gguf", "hf", "gptq"]},
                "type": _STR, "size_bytes": {"type": "integer"}, "bits_per_weight": _NUM, "n_params": _INT,
                "is_reference": {"type": "boolean"},
                "quality": {"type": ["object", "null"], "required": ["device", "ppl", "ppl_error", "chunks", "scored_tokens"],
                            "properties": {
                                "device": {"enum": ["cpu", "cuda"]}, "ppl": {"type": "number"}, "ppl_error": {"type": "number"},
                                "running_ppl": {"type": "array", "items": {"type": "number"}},
                                "chunks": {"type": "integer"}, "scored_tokens": {"type": "integer"},
                                "kld_mean": _NUM, "kld_mean_error": _NUM, "kld_median": _NUM, "kld_p99": _NUM,
                                "kld_p999": _NUM, "kld_max": _NUM, "delta_p_mean": _NUM, "delta_p_rms": _NUM,
                                "same_top": _NUM, "ln_ppl_ratio": _NUM, "ln_ppl_ratio_error": _NUM, "ppl_ratio": _NUM,
                            }},
                "speed": {"type": "array", "items": {
                    "type": "object", "required": ["device", "pp", "tg", "reps", "pp_tps", "tg_tps", "absent"],
                    "properties": {
                        "device": {"enum": ["cpu", "cuda"]}, "backend": {"enum": ["llama.cpp", "torch", None]},
                        "threads": _INT, "n_batch": _INT, "n_ubatch": _INT, "pp": {"type": "integer"},
                        "tg": {"type": "integer"}, "reps": {"type": "integer"}, "pp_tps": _NUM, "pp_std": _NUM,
                        "tg_tps": _NUM, "tg_std": _NUM, "load_seconds": _NUM, "peak_rss_bytes": _INT,
                        "peak_vram_bytes": _INT, "absent": _STR,
                    }}},
            }}},
    },
}
