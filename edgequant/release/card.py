"""The release's model card (README.md), rendered from its manifest.

``render_model_card`` is a pure function of the manifest (a :class:`~edgequant.release.manifest.Manifest`
or its JSON form, ``edgequant.manifest/1``) and returns text; the release runner writes it (and the
Ollama Modelfile, ``edgequant.release.modelfile``). Every number in the card is the manifest's,
formatted one way: perplexity with 4 decimals, KL divergence with 4 significant digits, tokens/s
with 1 decimal, same-top rate in percent with 1 decimal; ``—`` where something was not measured.

The recommended file (``recommend``): among the quantized GGUF files that were measured (mean KLD
or same-top rate present; the 16-bit reference never counts), the smallest one whose mean KLD is
at most ``RECOMMEND_MAX_KLD`` (0.05) or whose same-top rate is at least ``RECOMMEND_MIN_SAME_TOP``
(90 %); when none qualifies, the best-quality one (lowest mean KLD). No measurement, no
recommendation.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from huggingface_hub import ModelCardData

from edgequant.errors import EdgequantError
from edgequant.gptq_load import load_snippet
from edgequant.release.manifest import Artifact, GGUFArtifact, Manifest, Metrics, ModelArtifact, as_manifest
from edgequant.release.modelfile import ollama_name
from edgequant.release.template_gate import CONVERSATIONS
from edgequant.units import human_size

RECOMMEND_MAX_KLD = 0.05
RECOMMEND_MIN_SAME_TOP = 0.90
DASH = "—"
FLOAT_TYPES = ("F32", "F16", "BF16")
DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU"}
SAMPLE_MESSAGES = CONVERSATIONS["system + user"]


# -- small formatting helpers ----------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


def fmt_ppl(ppl: Any, err: Any = None) -> str:
    p, e = _num(ppl), _num(err)
    if p is None:
        return DASH
    return f"{p:.4f} ± {e:.4f}" if e is not None else f"{p:.4f}"


def fmt_sig(v: Any, digits: int = 4) -> str:
    """``digits`` significant digits without an exponent (0.05610, 0.0001234); 0 as ``0``."""
    x = _num(v)
    if x is None:
        return DASH
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    if decimals > 10:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{decimals}f}"


def fmt_tps(v: Any) -> str:
    x = _num(v)
    return DASH if x is None else f"{x:.1f}"


def fmt_pct(v: Any) -> str:
    x = _num(v)
    return DASH if x is None else f"{100 * x:.1f} %"


def fmt_size(n: Any) -> str:
    return human_size(_num(n), none=DASH)


def cell(text: Any) -> str:
    """A Markdown table cell: ``|`` escaped, newlines folded."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _fence(text: str, lang: str = "") -> str:
    """A fenced code block that survives backticks inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"




# -- reading the manifest ----------------------------------------------------------------------------------


def is_reference(m: Manifest, a: Artifact) -> bool:
    """The 16-bit file the others are compared with (any F32/F16/BF16 GGUF counts as one)."""
    ref = m.bench.reference
    return isinstance(a, GGUFArtifact) and ((ref is not None and a.path == ref) or a.type.upper() in FLOAT_TYPES)


def _metrics(a: ModelArtifact) -> Metrics:
    return a.metrics or Metrics()


def _fallbacks(a: ModelArtifact) -> int:
    return len(a.fallbacks) if isinstance(a, GGUFArtifact) else 0


def _size(a: Artifact) -> float:
    v = _num(a.size_bytes)
    return math.inf if v is None else v


def recommend(manifest: Manifest | Mapping[str, Any]) -> GGUFArtifact | None:
    """The GGUF artifact the card recommends (rule in the module docstring), or None."""
    m = as_manifest(manifest)
    measured = [a for a in m.models if isinstance(a, GGUFArtifact) and not is_reference(m, a) and _metrics(a).measured]
    if not measured:
        return None

    def kld(a: ModelArtifact) -> float:
        v = _num(_metrics(a).kld_mean)
        return math.inf if v is None else v

    def good(a: ModelArtifact) -> bool:
        k, s = _num(_metrics(a).kld_mean), _num(_metrics(a).same_top)
        return (k is not None and k <= RECOMMEND_MAX_KLD) or (s is not None and s >= RECOMMEND_MIN_SAME_TOP)

    ok = [a for a in measured if good(a)]
    if ok:
        return min(ok, key=lambda a: (_size(a), kld(a)))
    return min(measured, key=lambda a: (kld(a), -(_num(_metrics(a).same_top) or 0.0), _size(a)))


def _speed_devices(m: Manifest) -> list[str]:
    """Devices with a speed column: those benchmarked, plus any that has numbers."""
    devices = list(m.bench.devices)
    for a in m.models:
        for dev, s in _metrics(a).speed.items():
            if (_num(s.pp_tps) is not None or _num(s.tg_tps) is not None) and dev not in devices:
                devices.append(dev)
    return devices if any(_metrics(a).speed for a in m.models) else []


def _absent_reasons(m: Manifest, devices: list[str]) -> dict[str, str]:
    """Per device without numbers, why (the first model's ``absent``)."""
    reasons: dict[str, str] = {}
    for dev in devices:
        for a in m.models:
            s = _metrics(a).speed.get(dev)
            if s is not None and s.absent:
                reasons[dev] = str(s.absent)
                break
    return reasons


def _sort_rows(m: Manifest) -> list[ModelArtifact]:
    """GGUF files largest first, then GPTQ folders largest first."""
    def key(a: ModelArtifact):
        size = _num(a.size_bytes)
        return (0 if a.kind == "gguf" else 1, -(size if size is not None else -1))

    return sorted(m.models, key=key)


def _base_model(m: Manifest) -> str | None:
    return m.recipe.card.base_model or m.source.base_model


def _license(m: Manifest) -> str | None:
    return m.recipe.card.license or m.source.license


def _file_of(a: Artifact) -> str:
    """What a user passes to a tool: the GGUF (first shard), or the GPTQ folder."""
    if a.kind == "gguf" and a.files:
        return str(sorted(a.files)[0])
    return str(a.path)


# -- the model card -----------------------------------------------------------------------------------------


def front_matter(m: Manifest) -> dict:
    """The card's YAML metadata (Hugging Face ``ModelCardData`` keys)."""
    card = m.recipe.card
    tags = ["gguf", "llama-cpp", "quantized", "edgequant"]
    if any(a.kind == "gptq" for a in m.models):
        tags.insert(1, "gptq")
    if any(isinstance(a, GGUFArtifact) and a.imatrix for a in m.models):
        tags.append("imatrix")
    tags += list(card.tags)
    data: dict[str, Any] = {}
    base = _base_model(m)
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "quantized"
    if _license(m):
        data["license"] = _license(m)
    if card.quantized_by:
        data["quantized_by"] = card.quantized_by
    data["pipeline_tag"] = card.pipeline_tag or "text-generation"
    data["model_name"] = m.name
    data["tags"] = list(dict.fromkeys(tags))
    return data


def render_model_card(manifest: Manifest | Mapping[str, Any]) -> str:
    """README.md for the release: front matter, files table, usage, provenance (see module docstring)."""
    m = as_manifest(manifest)
    yaml_text = ModelCardData(**front_matter(m)).to_yaml()
    gptq_rows = [a for a in m.models if a.kind == "gptq"]
    rec = recommend(m)
    out = ["---", yaml_text.rstrip("\n"), "---", ""]
    out += _intro(m)
    out += _prompt_section(m)
    out += _files_section(m, rec)
    out += _types_section([a for a in m.models if a.kind == "gguf"])
    out += _mix_section(m)
    out += _notes_section(m)
    out += _usage_section(m, rec, gptq_rows)
    out += _how_section(m)
    out += _repro_section(m)
    return "\n".join(out).rstrip("\n") + "\n"


def _intro(m: Manifest) -> list[str]:
    """The title, the recipe's description and where the files come from."""
    name = m.name or "model"
    has = {kind: any(a.kind == kind for a in m.models) for kind in ("gguf", "gptq")}
    kinds = " and ".join(label for label, kind in (("GGUF", "gguf"), ("GPTQ", "gptq")) if has[kind]) or "quantized"
    out = [f"# {name} — {kinds}", ""]
    if m.recipe.card.description:
        out += [str(m.recipe.card.description).strip(), ""]
    base = _base_model(m)
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{m.source.path or name}`"
    v = m.versions
    made = f"edgequant {v.edgequant or '?'}"
    if v.llama_cpp_commit:
        made += f" with llama.cpp `{v.llama_cpp_commit}`"
    elif v.llama_cpp_python:
        made += f" with llama.cpp from llama-cpp-python {v.llama_cpp_python}"
    return out + [f"Quantizations of {origin}, made by {made}. Every number below was measured on this release's files; "
                  f"how is in [How this was made](#how-this-was-made).", ""]


def _prompt_section(m: Manifest) -> list[str]:
    """The source template's rendering of a sample conversation, or that there is none."""
    out = ["## Prompt format", ""]
    ct = m.chat_template
    if ct is not None and ct.example:
        return out + [_fence(str(ct.example), "text"), "",
                      "The chat template is embedded in every GGUF file (`tokenizer.chat_template`); llama.cpp, "
                      "llama-cpp-python and Ollama apply it for chat requests.", ""]
    return out + ["This model has no chat template: use it for plain text completion.", ""]


def _files_section(m: Manifest, rec: ModelArtifact | None) -> list[str]:
    """The table of every GGUF and GPTQ artifact with its numbers, the legend, the recommendation, the plot."""
    pp, tg = m.recipe.setting("bench", "pp_tokens"), m.recipe.setting("bench", "tg_tokens")
    devices = _speed_devices(m)
    header = ["File", "Type", "Size", "Bits/weight", "PPL", "KLD mean", "Same top"]
    for dev in devices:
        label = DEVICE_LABELS.get(dev, dev.upper())
        header += [f"{label} pp{pp or ''} t/s", f"{label} tg{tg or ''} t/s"]
    header.append("Notes")
    lines = ["## Files", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in _file_row(m, a, rec, devices)) + " |" for a in _sort_rows(m)]
    lines.append("")
    legend = ["PPL: perplexity on the evaluation text (± its standard error). KLD mean: mean KL divergence of each token's "
              "distribution from the reference's, in nats (0 = identical). Same top: share of tokens whose most likely "
              "next token is the reference's."]
    if devices:
        legend.append(f"Speed: llama-bench style pp{pp or ''} (prompt processing) and tg{tg or ''} (generation) tokens/s; "
                      f"{DASH} where not measured.")
    lines += [" ".join(legend), ""]
    for dev, why in _absent_reasons(m, devices).items():
        lines += [f"{DEVICE_LABELS.get(dev, dev)} speed was not measured: {why}.", ""]
    if rec is not None:
        lines += [f"**Recommended: `{_file_of(rec)}`** — the smallest measured GGUF with mean KLD ≤ {RECOMMEND_MAX_KLD:g} or "
                  f"same top ≥ {100 * RECOMMEND_MIN_SAME_TOP:.0f} % (when none qualifies, the one closest to the reference). "
                  "Take a bigger file if you have the memory, a smaller one if you do not.", ""]
    for p in m.of_kind("plot"):
        lines += [f"![quality and size of every file]({p.path})", ""]
    return lines


def _file_row(m: Manifest, a: ModelArtifact, rec: ModelArtifact | None, devices: list[str]) -> list[str]:
    """One row of the files table (cells unescaped)."""
    mt = _metrics(a)
    repo = m.recipe.card.repo_id
    shown = _file_of(a) if a.kind == "gguf" else f"{a.path}/"
    link = f"[{shown}](https://huggingface.co/{repo}/blob/main/{shown})" if repo and a.kind == "gguf" else f"`{shown}`"
    notes = []
    if rec is not None and a is rec:
        link = f"**{link}**"
        notes.append("★ recommended")
    if is_reference(m, a):
        notes.append("reference (16-bit)")
    if isinstance(a, GGUFArtifact) and a.imatrix:
        notes.append("imatrix")
    if a.kind == "gguf" and len(a.files) > 1:
        notes.append(f"{len(a.files)} parts")
    if _fallbacks(a):
        notes.append(f"{_fallbacks(a)} fallbacks")
    if isinstance(a, GGUFArtifact) and a.mix:
        notes.append("per-tensor mix" + ("" if a.mix.get("met", True) else ", target not met"))
    if not mt.measured and not is_reference(m, a) and _num(mt.ppl) is None:
        notes.append("not measured")
    bpw = _num(a.bits_per_weight)
    row = [link, a.type or DASH, fmt_size(a.size_bytes), DASH if bpw is None else f"{bpw:.2f}",
           fmt_ppl(mt.ppl, mt.ppl_error), fmt_sig(mt.kld_mean), fmt_pct(mt.same_top)]
    for dev in devices:
        s = mt.speed.get(dev)
        row += [fmt_tps(s.pp_tps if s else None), fmt_tps(s.tg_tps if s else None)]
    return row + [", ".join(notes)]


def _types_section(gguf_rows: list[ModelArtifact]) -> list[str]:
    """What each GGUF type is (from the quant type catalogue)."""
    from edgequant.quantize import types as qtypes

    seen, lines = set(), []
    for a in gguf_rows:
        if a.type in seen:
            continue
        seen.add(a.type)
        try:
            qt = qtypes.get(a.type)
        except EdgequantError:
            continue
        lines.append(f"- **{a.type}** ({qt.family}, {qt.bpw:g} bits/weight nominal): {qt.advice}.")
    return (["### About the GGUF types", "", *lines, ""] if lines else [])


_TARGET_WORDS = {"size": "the lowest KL divergence in a file of at most {text}", "bpw": "the lowest KL divergence "
                 "within {text} bits per weight", "kld": "the smallest file whose mean KL divergence stays within {text}"}


def _mix_section(m: Manifest) -> list[str]:
    """What each per-tensor mix (a recipe's target entry) is, how it was chosen and how to make it again."""
    mixes = [a for a in m.models if isinstance(a, GGUFArtifact) and a.mix]
    if not mixes:
        return []
    lines = ["### About the per-tensor mixes", "",
             "These files are not one of llama.cpp's fixed types: edgequant measured how much each tensor's error in "
             "each type costs in KL divergence and chose a type per tensor. llama.cpp's own quantizer wrote them with "
             "per-tensor overrides, so every llama.cpp-based runtime loads them.", ""]
    for a in mixes:
        x = a.mix
        target = x.get("target") or {}
        words = _TARGET_WORDS.get(target.get("kind"), "{text}").format(text=target.get("text", "?"))
        cal = x.get("calibration") or {}
        line = (f"- **{a.type}** (`{_file_of(a)}`): {words}. Predicted mean KLD {fmt_sig(x.get('predicted_kld'))}, "
                f"measured {fmt_sig(x.get('calibration_kld'))} on the {cal.get('tokens', '?')} calibration tokens "
                f"({cal.get('chunks', '?')}×{cal.get('ctx', '?')} of `{cal.get('text', '?')}`)")
        std = x.get("standard") or {}
        if std.get("kld"):
            line += (f", where llama.cpp's {std['type']} ({fmt_size(std.get('size_bytes'))}) measured "
                     f"{fmt_sig(std['kld'].get('kld_mean'))}")
        line += "."
        if not x.get("met", True):
            line += " **The target was not met.**"
        sp = x.get("speed") or {}
        if sp.get("mix") and sp.get("standard"):
            line += (f" Speed on the machine that chose it: pp {fmt_tps(sp['mix'].get('pp_tps'))} / tg "
                     f"{fmt_tps(sp['mix'].get('tg_tps'))} t/s against {std.get('type', 'the standard type')}'s "
                     f"{fmt_tps(sp['standard'].get('pp_tps'))} / {fmt_tps(sp['standard'].get('tg_tps'))}.")
        if x.get("excluded_types"):
            line += f" Left out: {', '.join(sorted(x['excluded_types']))}."
        counts = x.get("type_counts") or {}
        if counts:
            shown = ", ".join(f"{t} ×{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            line += f" Tensors: {shown}."
        lines.append(line)
        tt = x.get("tensor_types_file")
        if tt:
            lines.append(f"  The per-tensor types are in `{tt}` (and in the file's metadata, `quantize.tensor_types`): "
                         f"`edgequant quantize` or `llama-quantize` with `--tensor-type-file {tt}` and type "
                         f"{x.get('file_type', '?')} on the 16-bit file makes the same file.")
    return lines + [""]


def _notes_section(m: Manifest) -> list[str]:
    """Fallback tensors, and the importance matrix the imatrix files were made with."""
    lines = []
    fb = [a for a in m.models if _fallbacks(a)]
    if fb:
        lines += ["### Fallbacks", ""]
        lines += ["Some tensors could not take the requested type (their row length is not a multiple of its block size) "
                  "and were written in a fallback type, exactly as `llama-quantize` does; the size and bits/weight above "
                  "include them. This is common in small models and in the token embedding.", ""]
        lines += [f"- `{_file_of(a)}` ({a.type}): {_fallbacks(a)} tensors" for a in fb]
        lines.append("")
    if any(isinstance(a, GGUFArtifact) and a.imatrix for a in m.models):
        lines += _imatrix_note(m)
    return lines + _window_note(m)


def _window_note(m: Manifest) -> list[str]:
    """What the GGUF files do with the model's sliding window, and the converter's notes, as it wrote them."""
    ggufs = [a for a in m.models if isinstance(a, GGUFArtifact)]
    first = next((a for a in ggufs if a.sliding_window), None)
    out = []
    if first is not None:
        arch = f"llama.cpp's `{first.architecture}` architecture" if first.architecture else "their llama.cpp architecture"
        if first.sliding_window == "exact":
            text = (f"The GGUF files use {arch}, which honours the model's sliding window: llama.cpp's logits equal "
                    "transformers' at every context length.")
        else:
            text = (f"The GGUF files use {arch}, which attends to the whole context: up to the model's sliding window "
                    "the logits equal transformers', past it they differ, as in the GGUF files llama.cpp's own converter "
                    "writes.")
        out += ["### Sliding window", "", text, ""]
    notes = list(dict.fromkeys(n for a in ggufs for n in a.notes))
    if notes:
        out += ["### Conversion notes", "", *[f"- {n}" for n in notes], ""]
    return out


def _imatrix_note(m: Manifest) -> list[str]:
    """What the importance matrix was computed on, and where it is."""
    im = m.of_kind("imatrix")
    text = next((a.text for a in reversed(im) if a.text), None)
    text = (text or m.recipe.setting("imatrix", "text") or m.recipe.setting("calibration", "text")
            or "the built-in corpus (Python's pydoc_data.topics)")
    ctx, chunks = m.recipe.setting("imatrix", "ctx"), m.recipe.setting("imatrix", "chunks")
    return ["### Importance matrix", "",
            f"Files marked imatrix were quantized with an importance matrix computed on {text}, "
            f"ctx {'?' if ctx is None else ctx}, {'all' if chunks is None else chunks} chunks"
            + next((f", by {a.engine}" for a in reversed(im) if a.engine), "")
            + (f"; it is included as `{im[0].path}` for your own `llama-quantize --imatrix` runs." if im else "."), ""] \
        + _coverage_note(next((a.coverage for a in reversed(im) if getattr(a, "coverage", None) is not None), None))


CARD_ALL_LAYERS_UP_TO = 8  # more MoE layers: the coverage table lists only the layers with unseen experts

_POLICY_TEXT = {
    "fill": "their slots in the importance matrix hold the mean of their layer's seen experts, so they are quantized "
            "like their siblings (edgequant's `--unseen-experts fill`; the filled slots are listed in the file)",
    "uniform": "they have no importance data and were quantized with uniform weights, as llama.cpp does for them",
}


def _coverage_note(cov) -> list[str]:
    """For a MoE model, how many calibration tokens reached each expert (nothing for a dense model)."""
    if cov is None or not cov.layers:
        return []
    from edgequant.quantize.expert_coverage import format_ids

    text = (f"Expert coverage: the calibration text reached {cov.experts - cov.unseen} of the {cov.experts} experts "
            f"({len(cov.layers)} MoE layers × {cov.n_expert}); tokens routed to an expert: min {cov.min}, "
            f"median {cov.median:g}, max {cov.max}.")
    if cov.unseen:
        how = _POLICY_TEXT.get(cov.policy or "", _POLICY_TEXT["uniform"])
        text += f" {cov.unseen} experts saw no token: {how}."
    out = ["#### Expert coverage", "", text, ""]
    rows = cov.layers if len(cov.layers) <= CARD_ALL_LAYERS_UP_TO else cov.with_unseen
    if rows:
        out += ["| Layer | Experts reached | Min | Median | Max | Unseen experts |", "|---:|---:|---:|---:|---:|---|"]
        out += [f"| {lc.layer} | {lc.reached}/{lc.n_expert} | {lc.min} | {lc.median:g} | {lc.max} | "
                f"{cell(format_ids(lc.unseen)) if lc.unseen else DASH} |" for lc in rows]
        out.append("")
        if rows is not cov.layers:
            out += [f"The other {len(cov.layers) - len(rows)} layers reached every expert; `manifest.json` has every count.", ""]
    return out


def _usage_section(m: Manifest, rec: ModelArtifact | None, gptq_rows: list[ModelArtifact]) -> list[str]:
    """How to download and run the files: llama.cpp, llama-cpp-python, Ollama, transformers."""
    ggufs = [a for a in _sort_rows(m) if a.kind == "gguf"]
    example = rec or next((a for a in ggufs if not is_reference(m, a)), None) or (ggufs[0] if ggufs else None)
    lines = ["## Usage", ""]
    if example is not None:
        lines += _gguf_usage(m, example)
    if gptq_rows:
        lines += _gptq_usage(m, gptq_rows[0])
    return lines


def _gguf_usage(m: Manifest, example: ModelArtifact) -> list[str]:
    """Download, llama.cpp, llama-cpp-python and Ollama commands for one GGUF file."""
    f, repo = _file_of(example), m.recipe.card.repo_id
    lines = []
    if repo:
        lines += ["Download one file (not the whole repository):", "",
                  _fence(f'hf download {repo} --include "{f}" --local-dir .', "sh"), ""]
    lines += ["### llama.cpp", "", _fence(
        f"llama-cli -m {f} -cnv\n"
        + (f"llama-cli -hf {repo}:{example.type} -cnv   # download and run in one go\n" if repo else "")
        + f"llama-server -m {f} -c 4096 --port 8080   # OpenAI-compatible server on http://localhost:8080", "sh"), ""]
    msgs = ",\n".join(f"        {json.dumps(x, ensure_ascii=False)}" for x in SAMPLE_MESSAGES)
    lines += ["### llama-cpp-python", "", _fence(
        "from llama_cpp import Llama\n\n"
        f"llm = Llama(model_path={json.dumps(f)}, n_ctx=4096)\n"
        "reply = llm.create_chat_completion(\n"
        f"    messages=[\n{msgs},\n    ],\n"
        ")\n"
        'print(reply["choices"][0]["message"]["content"])', "python"), ""]
    on = ollama_name(m.name or "model")
    return lines + ["### Ollama", "",
                    f"The `Modelfile` in this repository points at `{f}` (change its `FROM` line to use another file):", "",
                    _fence(f"ollama create {on} -f Modelfile\nollama run {on}", "sh"), ""]


def _gptq_usage(m: Manifest, g: ModelArtifact) -> list[str]:
    """Loading a GPTQ folder with transformers (MoE folders: through defuser, see ``gptq_load.load_snippet``)."""
    path, repo = str(g.path), m.recipe.card.repo_id
    return ["### transformers (GPTQ)", "",
            ("The GPTQ folders load with GPTQModel (`pip install gptqmodel`; fast kernels need a CUDA GPU)" if getattr(g, "gptq_loader", None) else
             "The GPTQ folders load with transformers through GPTQModel (`pip install gptqmodel optimum`; fast kernels need a CUDA GPU)")
            + (f"; download one with `hf download {repo} --include \"{path}/*\" --local-dir .`" if repo else "") + ":", "",
            _fence(
                load_snippet(path, getattr(g, "defuser_model_type", None), getattr(g, "gptq_loader", None)) +
                f"messages = {json.dumps(SAMPLE_MESSAGES, ensure_ascii=False)}\n"
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True).to(model.device)\n"
                "out = model.generate(**inputs, max_new_tokens=64)\n"
                'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "python"), ""]


def _how_section(m: Manifest) -> list[str]:
    """Provenance: source, tools, machine, command, evaluation, stage times, the recipe."""
    lines = ["## How this was made", "", _source_line(m), _tools_line(m), _machine_line(m)]
    if m.command:
        lines.append(f"- Command: `{m.command}`")
    if m.created:
        lines.append(f"- Created: {m.created}")
    lines.append(_evaluation_line(m))
    reps = m.recipe.setting("bench", "repetitions")
    if reps:
        lines.append(f"- Speed: mean of {reps} runs per file and device; the deviations are in `bench.md`.")
    timed = [f"{stage} " + ("cached" if s.skipped else (f"{_num(s.seconds):.1f} s" if _num(s.seconds) is not None else "done"))
             for stage, s in m.stages.items()]
    if timed:
        lines.append("- Stages: " + ", ".join(timed))
    return lines + [""] + _recipe_block(m)


def _source_line(m: Manifest) -> str:
    src = m.source
    line = f"- Source: `{src.path or '?'}`"
    if src.architecture:
        line += f" ({src.architecture}" + (f", {src.n_params:,} parameters)" if isinstance(src.n_params, int) else ")")
    if src.fingerprint:
        line += f", fingerprint `{src.fingerprint}`"
    return line


def _tools_line(m: Manifest) -> str:
    """The versions of every tool that made or measured the files."""
    v = m.versions
    tools = [f"edgequant {v.edgequant or '?'}"]
    if v.llama_cpp_commit or v.llama_cpp_python:
        tools.append("llama.cpp " + (f"`{v.llama_cpp_commit}`" if v.llama_cpp_commit else "(commit unknown)")
                     + (f" via llama-cpp-python {v.llama_cpp_python}" if v.llama_cpp_python else ""))
    for label, value in (("gguf-py", v.gguf), ("transformers", v.transformers), ("torch", v.torch), ("GPTQModel", v.gptqmodel),
                         ("Python", v.python)):
        if value:
            tools.append(f"{label} {value}")
    return "- Tools: " + ", ".join(tools)


def _machine_line(m: Manifest) -> str:
    """CPU, cores, GPU and OS of the host that made the release."""
    host = m.host
    hw = [str(host.cpu)] if host and host.cpu else []
    if host and host.cores:
        hw.append(f"{host.cores} cores")
    hw.append(f"GPU: {host.gpu}" if host and host.gpu else "no GPU")
    if host and host.os:
        hw.append(str(host.os))
    return "- Machine: " + ", ".join(hw)


def _evaluation_line(m: Manifest) -> str:
    b = m.bench
    ev = (f"- Evaluation: {b.text or '?'}, ctx {b.ctx if b.ctx is not None else '?'}, "
          f"{b.chunks if b.chunks is not None else 'all'} chunks, reference `{b.reference or b.reference_file or '?'}`")
    if b.threads:
        ev += f", {b.threads} threads"
    return ev + (". Perplexity is computed like `llama-perplexity` (the second half of every chunk is scored); "
                 "KLD and same top compare each file's next-token distributions with the reference's on the same tokens.")


def _recipe_block(m: Manifest) -> list[str]:
    """The recipe as TOML (JSON when it does not convert)."""
    recipe = m.recipe.data
    if not recipe:
        return []
    from edgequant.release.recipe import to_toml

    try:
        text, lang = to_toml(recipe), "toml"
    except (TypeError, AttributeError, KeyError):
        text, lang = json.dumps(recipe, indent=2, ensure_ascii=False), "json"
    return ["The recipe (`edgequant release` reads it; every option also has a flag):", "", _fence(text, lang), ""]


def _repro_section(m: Manifest) -> list[str]:
    """``sha256sum -c`` lines for every file, and each folder's combined hash."""
    lines = ["## Reproducibility", "",
             "`manifest.json` records the recipe, the source fingerprint, every tool version, every measurement and the "
             "SHA-256 of every file. Check a download with `sha256sum -c` on the lines below:", ""]
    sums, folders = [], []
    for a in m.artifacts:
        files = a.files or [a.path]
        if a.file_sha256 is not None:
            sums += [f"{h}  {f}" for f, h in a.file_sha256.items()]
        elif a.sha256 and len(files) == 1 and a.kind != "gptq":
            sums.append(f"{a.sha256}  {files[0]}")
        elif a.sha256:
            folders.append(a)
    if sums:
        lines += [_fence("\n".join(sums), "text"), ""]
    lines += [f"- `{a.path}`: SHA-256 `{a.sha256}` over its sorted file list and their hashes (see manifest.json)."
              for a in folders]
    return lines + ([""] if folders else [])
