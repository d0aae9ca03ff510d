"""The release's model card (README.md) and Ollama Modelfile, rendered from its manifest.

Both are pure functions of the manifest dict (``edgequant.manifest/1``) and return text; the
release runner writes them. Every number in the card is the manifest's, formatted one way:
perplexity with 4 decimals, KL divergence with 4 significant digits, tokens/s with 1 decimal,
same-top rate in percent with 1 decimal; ``—`` where something was not measured.

The recommended file (``recommend``): among the quantized GGUF files that were measured (mean KLD
or same-top rate present; the 16-bit reference never counts), the smallest one whose mean KLD is
at most ``RECOMMEND_MAX_KLD`` (0.05) or whose same-top rate is at least ``RECOMMEND_MIN_SAME_TOP``
(90 %); when none qualifies, the best-quality one (lowest mean KLD). No measurement, no
recommendation.

The Modelfile carries a ``TEMPLATE`` in Ollama's Go template syntax for the chat families in
``OLLAMA_FAMILIES`` (ChatML, Mistral ``[INST]``, Llama 3); for any other template it leaves the
template out, and Ollama derives one from the GGUF's ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from huggingface_hub import ModelCardData

from edgequant.errors import EdgequantError
from edgequant.units import human_size

RECOMMEND_MAX_KLD = 0.05
RECOMMEND_MIN_SAME_TOP = 0.90
DASH = "—"
FLOAT_TYPES = ("F32", "F16", "BF16")
DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU"}
SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]

Manifest = Mapping[str, Any]


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


def _models(m: Manifest) -> list[dict]:
    return [a for a in m.get("artifacts") or [] if a.get("kind") in ("gguf", "gptq")]


def is_reference(m: Manifest, a: Mapping[str, Any]) -> bool:
    ref = (m.get("bench") or {}).get("reference")
    return a.get("kind") == "gguf" and ((ref is not None and a.get("path") == ref) or str(a.get("type", "")).upper() in FLOAT_TYPES)


def _metrics(a: Mapping[str, Any]) -> Mapping[str, Any]:
    return a.get("metrics") or {}


def _measured(a: Mapping[str, Any]) -> bool:
    mt = _metrics(a)
    return _num(mt.get("kld_mean")) is not None or _num(mt.get("same_top")) is not None


def recommend(manifest: Manifest) -> dict | None:
    """The GGUF artifact the card recommends (rule in the module docstring), or None."""
    measured = [a for a in _models(manifest) if a.get("kind") == "gguf" and not is_reference(manifest, a) and _measured(a)]
    if not measured:
        return None

    def kld(a):
        v = _num(_metrics(a).get("kld_mean"))
        return math.inf if v is None else v

    def good(a):
        mt = _metrics(a)
        k, s = _num(mt.get("kld_mean")), _num(mt.get("same_top"))
        return (k is not None and k <= RECOMMEND_MAX_KLD) or (s is not None and s >= RECOMMEND_MIN_SAME_TOP)

    def size(a):
        v = _num(a.get("size_bytes"))
        return math.inf if v is None else v

    ok = [a for a in measured if good(a)]
    if ok:
        return min(ok, key=lambda a: (size(a), kld(a)))
    return min(measured, key=lambda a: (kld(a), -(_num(_metrics(a).get("same_top")) or 0.0), size(a)))


def _speed_devices(m: Manifest) -> list[str]:
    """Devices with a speed column: those benchmarked, plus any that has numbers."""
    devices = list((m.get("bench") or {}).get("devices") or [])
    for a in _models(m):
        for dev, s in (_metrics(a).get("speed") or {}).items():
            if isinstance(s, Mapping) and (_num(s.get("pp_tps")) is not None or _num(s.get("tg_tps")) is not None) and dev not in devices:
                devices.append(dev)
    has_any = any(isinstance(_metrics(a).get("speed"), Mapping) and _metrics(a).get("speed") for a in _models(m))
    return devices if has_any else []


def _absent_reasons(m: Manifest, devices: list[str]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for dev in devices:
        for a in _models(m):
            s = (_metrics(a).get("speed") or {}).get(dev)
            if isinstance(s, Mapping) and s.get("absent"):
                reasons[dev] = str(s["absent"])
                break
    return reasons


def _fallback_count(a: Mapping[str, Any]) -> int:
    f = a.get("fallbacks")
    if isinstance(f, bool):
        return 0
    if isinstance(f, int):
        return f
    if isinstance(f, (list, tuple)):
        return len(f)
    return 0


def _sort_rows(m: Manifest) -> list[dict]:
    def key(a):
        size = _num(a.get("size_bytes"))
        return (0 if a.get("kind") == "gguf" else 1, -(size if size is not None else -1))

    return sorted(_models(m), key=key)


def _recipe(m: Manifest) -> Mapping[str, Any]:
    return m.get("recipe") or {}


def _card_settings(m: Manifest) -> Mapping[str, Any]:
    return _recipe(m).get("card") or {}


def _bench_settings(m: Manifest) -> Mapping[str, Any]:
    return _recipe(m).get("bench") or {}


def _base_model(m: Manifest) -> str | None:
    return _card_settings(m).get("base_model") or (m.get("source") or {}).get("base_model")


def _license(m: Manifest) -> str | None:
    return _card_settings(m).get("license") or (m.get("source") or {}).get("license")


def _file_of(a: Mapping[str, Any]) -> str:
    """What a user passes to a tool: the GGUF (first shard), or the GPTQ folder."""
    files = a.get("files") or []
    if a.get("kind") == "gguf" and files:
        return str(sorted(files)[0])
    return str(a.get("path"))


def ollama_name(name: str) -> str:
    n = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return n or "model"


# -- the model card -----------------------------------------------------------------------------------------


def front_matter(manifest: Manifest) -> dict:
    """The card's YAML metadata (Hugging Face ``ModelCardData`` keys)."""
    card = _card_settings(manifest)
    models = _models(manifest)
    tags = ["gguf", "llama-cpp", "quantized", "edgequant"]
    if any(a.get("kind") == "gptq" for a in models):
        tags.insert(1, "gptq")
    if any(a.get("imatrix") for a in models):
        tags.append("imatrix")
    tags += [t for t in card.get("tags") or []]
    data: dict[str, Any] = {}
    base = _base_model(manifest)
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "quantized"
    if _license(manifest):
        data["license"] = _license(manifest)
    if card.get("quantized_by"):
        data["quantized_by"] = card["quantized_by"]
    data["pipeline_tag"] = card.get("pipeline_tag") or "text-generation"
    data["model_name"] = manifest.get("name")
    data["tags"] = list(dict.fromkeys(tags))
    return data


def render_model_card(manifest: Manifest) -> str:
    """README.md for the release: front matter, files table, usage, provenance (see module docstring)."""
    m = manifest
    name = m.get("name") or "model"
    meta = front_matter(m)
    yaml_text = ModelCardData(**meta).to_yaml()
    models = _models(m)
    gguf_rows = [a for a in models if a.get("kind") == "gguf"]
    gptq_rows = [a for a in models if a.get("kind") == "gptq"]
    rec = recommend(m)
    card = _card_settings(m)
    base = _base_model(m)
    versions = m.get("versions") or {}

    out: list[str] = ["---", yaml_text.rstrip("\n"), "---", ""]
    kinds = " and ".join(k for k, rows in (("GGUF", gguf_rows), ("GPTQ", gptq_rows)) if rows) or "quantized"
    out += [f"# {name} — {kinds}", ""]
    if card.get("description"):
        out += [str(card["description"]).strip(), ""]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{(m.get('source') or {}).get('path', name)}`"
    made = f"edgequant {versions.get('edgequant', '?')}"
    if versions.get("llama_cpp_commit"):
        made += f" with llama.cpp `{versions['llama_cpp_commit']}`"
    elif versions.get("llama_cpp_python"):
        made += f" with llama.cpp from llama-cpp-python {versions['llama_cpp_python']}"
    out += [f"Quantizations of {origin}, made by {made}. Every number below was measured on this release's files; "
            f"how is in [How this was made](#how-this-was-made).", ""]

    # prompt format
    ct = m.get("chat_template") or {}
    out += ["## Prompt format", ""]
    if ct.get("example"):
        out += [_fence(str(ct["example"]), "text"), ""]
        out += ["The chat template is embedded in every GGUF file (`tokenizer.chat_template`); llama.cpp, llama-cpp-python "
                "and Ollama apply it for chat requests.", ""]
    else:
        out += ["This model has no chat template: use it for plain text completion.", ""]

    # files
    out += _files_section(m, rec)
    out += _types_section(gguf_rows)
    out += _notes_section(m, rec)
    out += _usage_section(m, rec, gptq_rows)
    out += _how_section(m)
    out += _repro_section(m)
    return "\n".join(out).rstrip("\n") + "\n"


def _files_section(m: Manifest, rec: Mapping[str, Any] | None) -> list[str]:
    bench = _bench_settings(m)
    pp, tg = bench.get("pp_tokens"), bench.get("tg_tokens")
    devices = _speed_devices(m)
    repo = _card_settings(m).get("repo_id")
    header = ["File", "Type", "Size", "Bits/weight", "PPL", "KLD mean", "Same top"]
    for dev in devices:
        label = DEVICE_LABELS.get(dev, dev.upper())
        header += [f"{label} pp{pp or ''} t/s", f"{label} tg{tg or ''} t/s"]
    header.append("Notes")
    lines = ["## Files", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    for a in _sort_rows(m):
        mt = _metrics(a)
        shown = _file_of(a) if a.get("kind") == "gguf" else f"{a.get('path')}/"
        files = a.get("files") or []
        link = f"[{shown}](https://huggingface.co/{repo}/blob/main/{shown})" if repo and a.get("kind") == "gguf" else f"`{shown}`"
        if rec is not None and a is rec:
            link = f"**{link}**"
        notes = []
        if rec is not None and a is rec:
            notes.append("★ recommended")
        if is_reference(m, a):
            notes.append("reference (16-bit)")
        if a.get("imatrix"):
            notes.append("imatrix")
        if a.get("kind") == "gguf" and len(files) > 1:
            notes.append(f"{len(files)} parts")
        if _fallback_count(a):
            notes.append(f"{_fallback_count(a)} fallbacks")
        if not _measured(a) and not is_reference(m, a) and _num(mt.get("ppl")) is None:
            notes.append("not measured")
        row = [link, a.get("type", DASH), fmt_size(a.get("size_bytes")),
               DASH if _num(a.get("bits_per_weight")) is None else f"{_num(a.get('bits_per_weight')):.2f}",
               fmt_ppl(mt.get("ppl"), mt.get("ppl_error")), fmt_sig(mt.get("kld_mean")), fmt_pct(mt.get("same_top"))]
        for dev in devices:
            s = (mt.get("speed") or {}).get(dev) or {}
            row += [fmt_tps(s.get("pp_tps")), fmt_tps(s.get("tg_tps"))]
        row.append(", ".join(notes))
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    lines.append("")
    legend = ["PPL: perplexity on the evaluation text (± its standard error). KLD mean: mean KL divergence of each token's "
              "distribution from the reference's, in nats (0 = identical). Same top: share of tokens whose most likely "
              "next token is the reference's."]
    if devices:
        legend.append(f"Speed: llama-bench style pp{pp or ''} (prompt processing) and tg{tg or ''} (generation) tokens/s; "
                      f"{DASH} where not measured.")
    lines += [" ".join(legend), ""]
    reasons = _absent_reasons(m, devices)
    for dev, why in reasons.items():
        lines += [f"{DEVICE_LABELS.get(dev, dev)} speed was not measured: {why}.", ""]
    if rec is not None:
        lines += [f"**Recommended: `{_file_of(rec)}`** — the smallest measured GGUF with mean KLD ≤ {RECOMMEND_MAX_KLD:g} or "
                  f"same top ≥ {100 * RECOMMEND_MIN_SAME_TOP:.0f} % (when none qualifies, the one closest to the reference). "
                  "Take a bigger file if you have the memory, a smaller one if you do not.", ""]
    plots = [a for a in m.get("artifacts") or [] if a.get("kind") == "plot"]
    for p in plots:
        lines += [f"![quality and size of every file]({p.get('path')})", ""]
    return lines


def _types_section(gguf_rows: list[dict]) -> list[str]:
    from edgequant.quantize import types as qtypes

    seen, lines = set(), []
    for a in gguf_rows:
        t = str(a.get("type", ""))
        if t in seen:
            continue
        seen.add(t)
        try:
            qt = qtypes.get(t)
        except EdgequantError:
            continue
        lines.append(f"- **{t}** ({qt.family}, {qt.bpw:g} bits/weight nominal): {qt.advice}.")
    return (["### About the GGUF types", "", *lines, ""] if lines else [])


def _notes_section(m: Manifest, rec: Mapping[str, Any] | None) -> list[str]:
    lines = []
    fb = [a for a in _models(m) if _fallback_count(a)]
    if fb:
        lines += ["### Fallbacks", ""]
        lines += ["Some tensors could not take the requested type (their row length is not a multiple of its block size) "
                  "and were written in a fallback type, exactly as `llama-quantize` does; the size and bits/weight above "
                  "include them. This is common in small models and in the token embedding.", ""]
        for a in fb:
            lines.append(f"- `{_file_of(a)}` ({a.get('type')}): {_fallback_count(a)} tensors")
        lines.append("")
    im = [a for a in m.get("artifacts") or [] if a.get("kind") == "imatrix"]
    if any(a.get("imatrix") for a in _models(m)):
        text = None
        for a in im:
            text = a.get("text") or text
        ims = _recipe(m).get("imatrix") or {}
        cal = (_recipe(m).get("calibration") or {}).get("text")
        text = text or ims.get("text") or cal or "the built-in corpus (Python's pydoc_data.topics)"
        chunks = ims.get("chunks")
        lines += ["### Importance matrix", "",
                  f"Files marked imatrix were quantized with an importance matrix computed on {text}, "
                  f"ctx {ims.get('ctx', '?')}, {'all' if chunks is None else chunks} chunks"
                  + (f"; it is included as `{im[0].get('path')}` for your own `llama-quantize --imatrix` runs." if im else "."), ""]
    return lines


def _usage_section(m: Manifest, rec: Mapping[str, Any] | None, gptq_rows: list[dict]) -> list[str]:
    name = m.get("name") or "model"
    ggufs = [a for a in _sort_rows(m) if a.get("kind") == "gguf"]
    example = rec or (next((a for a in ggufs if not is_reference(m, a)), None)) or (ggufs[0] if ggufs else None)
    repo = _card_settings(m).get("repo_id")
    lines = ["## Usage", ""]
    if example is not None:
        f = _file_of(example)
        if repo:
            lines += ["Download one file (not the whole repository):", "",
                      _fence(f'hf download {repo} --include "{f}" --local-dir .', "sh"), ""]
        lines += ["### llama.cpp", "", _fence(
            f"llama-cli -m {f} -cnv\n"
            + (f"llama-cli -hf {repo}:{example.get('type')} -cnv   # download and run in one go\n" if repo else "")
            + f"llama-server -m {f} -c 4096 --port 8080   # OpenAI-compatible server on http://localhost:8080", "sh"), ""]
        msgs = ",\n".join(f"        {json.dumps(x, ensure_ascii=False)}" for x in SAMPLE_MESSAGES)
        lines += ["### llama-cpp-python", "", _fence(
            "from llama_cpp import Llama\n\n"
            f"llm = Llama(model_path={json.dumps(f)}, n_ctx=4096)\n"
            "reply = llm.create_chat_completion(\n"
            f"    messages=[\n{msgs},\n    ],\n"
            ")\n"
            'print(reply["choices"][0]["message"]["content"])', "python"), ""]
        on = ollama_name(name)
        lines += ["### Ollama", "",
                  f"The `Modelfile` in this repository points at `{f}` (change its `FROM` line to use another file):", "",
                  _fence(f"ollama create {on} -f Modelfile\nollama run {on}", "sh"), ""]
    if gptq_rows:
        g = gptq_rows[0]
        path = str(g.get("path"))
        lines += ["### transformers (GPTQ)", "",
                  "The GPTQ folders load with transformers through GPTQModel (`pip install gptqmodel`; fast kernels need a CUDA GPU)"
                  + (f"; download one with `hf download {repo} --include \"{path}/*\" --local-dir .`" if repo else "") + ":", "",
                  _fence(
                      "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                      f"path = {json.dumps(path)}\n"
                      "tokenizer = AutoTokenizer.from_pretrained(path)\n"
                      'model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")\n'
                      f"messages = {json.dumps(SAMPLE_MESSAGES, ensure_ascii=False)}\n"
                      "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                      "return_dict=True).to(model.device)\n"
                      "out = model.generate(**inputs, max_new_tokens=64)\n"
                      'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "python"), ""]
    return lines


def _how_section(m: Manifest) -> list[str]:
    v = m.get("versions") or {}
    src = m.get("source") or {}
    host = m.get("host") or {}
    bench = m.get("bench") or {}
    bs = _bench_settings(m)
    lines = ["## How this was made", ""]
    n = src.get("n_params")
    src_line = f"- Source: `{src.get('path', '?')}`"
    if src.get("architecture"):
        src_line += f" ({src['architecture']}"
        src_line += f", {n:,} parameters)" if isinstance(n, int) else ")"
    if src.get("fingerprint"):
        src_line += f", fingerprint `{src['fingerprint']}`"
    lines.append(src_line)
    tools = [f"edgequant {v.get('edgequant', '?')}"]
    if v.get("llama_cpp_commit") or v.get("llama_cpp_python"):
        tools.append("llama.cpp " + (f"`{v['llama_cpp_commit']}`" if v.get("llama_cpp_commit") else "(commit unknown)")
                     + (f" via llama-cpp-python {v['llama_cpp_python']}" if v.get("llama_cpp_python") else ""))
    for key, label in (("gguf", "gguf-py"), ("transformers", "transformers"), ("torch", "torch"), ("gptqmodel", "GPTQModel"), ("python", "Python")):
        if v.get(key):
            tools.append(f"{label} {v[key]}")
    lines.append("- Tools: " + ", ".join(tools))
    hw = [str(host[k]) for k in ("cpu",) if host.get(k)]
    if host.get("cores"):
        hw.append(f"{host['cores']} cores")
    if host.get("ram_gb"):
        hw.append(f"{host['ram_gb']} GB RAM")
    hw.append(f"GPU: {host['gpu']}" if host.get("gpu") else "no GPU")
    if host.get("os"):
        hw.append(str(host["os"]))
    lines.append("- Machine: " + ", ".join(hw))
    if m.get("command"):
        lines.append(f"- Command: `{m['command']}`")
    if m.get("created"):
        lines.append(f"- Created: {m['created']}")
    ev = f"- Evaluation: {bench.get('text', '?')}, ctx {bench.get('ctx', '?')}, "
    ev += f"{bench.get('chunks') if bench.get('chunks') is not None else 'all'} chunks, reference `{bench.get('reference', '?')}`"
    if bench.get("threads"):
        ev += f", {bench['threads']} threads"
    lines.append(ev + ". Perplexity is computed like `llama-perplexity` (the second half of every chunk is scored); "
                 "KLD and same top compare each file's next-token distributions with the reference's on the same tokens.")
    if bs.get("repetitions"):
        lines.append(f"- Speed: mean of {bs['repetitions']} runs per file and device; the deviations are in `bench.md`.")
    stages = m.get("stages") or {}
    timed = []
    for stage, s in stages.items():
        if isinstance(s, Mapping):
            t = _num(s.get("seconds"))
            timed.append(f"{stage} " + ("cached" if s.get("skipped") else (f"{t:.1f} s" if t is not None else "done")))
    if timed:
        lines.append("- Stages: " + ", ".join(timed))
    lines.append("")
    recipe = m.get("recipe")
    if recipe:
        from edgequant.release.recipe import to_toml

        try:
            text = to_toml(recipe)
            lang = "toml"
        except (TypeError, AttributeError, KeyError):
            text, lang = json.dumps(recipe, indent=2, ensure_ascii=False), "json"
        lines += ["The recipe (`edgequant release` reads it; every option also has a flag):", "", _fence(text, lang), ""]
    return lines


def _repro_section(m: Manifest) -> list[str]:
    lines = ["## Reproducibility", "",
             "`manifest.json` records the recipe, the source fingerprint, every tool version, every measurement and the "
             "SHA-256 of every file. Check a download with `sha256sum -c` on the lines below:", ""]
    sums = []
    folders = []
    for a in m.get("artifacts") or []:
        per_file = a.get("file_sha256")
        files = a.get("files") or [a.get("path")]
        if isinstance(per_file, Mapping):
            sums += [f"{h}  {f}" for f, h in per_file.items()]
        elif a.get("sha256") and len(files) == 1 and a.get("kind") != "gptq":
            sums.append(f"{a['sha256']}  {files[0]}")
        elif a.get("sha256"):
            folders.append(a)
    if sums:
        lines += [_fence("\n".join(sums), "text"), ""]
    for a in folders:
        lines.append(f"- `{a.get('path')}`: SHA-256 `{a['sha256']}` over its sorted file list and their hashes (see manifest.json).")
    if folders:
        lines.append("")
    return lines


# -- the Ollama Modelfile ------------------------------------------------------------------------------------

# Go templates for Ollama. The system prompt comes from .System (Ollama also fills it from SYSTEM and from
# system messages), so system messages in .Messages are skipped; a last assistant message stays open so
# Ollama can continue it. BOS is not written: Ollama adds it from the GGUF's tokenizer settings.
_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

# Mistral [INST]: the system prompt goes in front of the last user message (Mistral's v3 templates; the
# older ones reject system messages). CLOSE is " [/INST]" (v1/v2) or "[/INST]" (v3), read from the example.
_MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }}CLOSE
{{- else if eq .Role "assistant" }}SPACE{{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}"""

_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

OLLAMA_FAMILIES = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "mistral": ["[INST]", "[/INST]", "</s>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
}


def chat_family(chat_template: Mapping[str, Any] | None) -> str | None:
    """The manifest's family when we know it, else one recognised from the Jinja source; None otherwise."""
    if not chat_template:
        return None
    fam = chat_template.get("family")
    if fam:
        return str(fam).lower() if str(fam).lower() in OLLAMA_FAMILIES else None
    tpl = str(chat_template.get("template") or "")
    if "<|im_start|>" in tpl:
        return "chatml"
    if "<|start_header_id|>" in tpl and "Cutting Knowledge" not in tpl:  # 3.1+ add a dated system header
        return "llama3"
    if "[INST]" in tpl and "<<SYS>>" not in tpl:  # Llama 2's [INST] <<SYS>> is another format
        return "mistral"
    return None


def ollama_template(family: str, example: str | None = None) -> str:
    """The Go template for a family in ``OLLAMA_FAMILIES``."""
    if family == "chatml":
        return _CHATML
    if family == "llama3":
        return _LLAMA3
    if family == "mistral":
        spaced = example is None or " [/INST]" in example
        return _MISTRAL.replace("CLOSE", " [/INST]" if spaced else "[/INST]").replace("SPACE", "" if spaced else " ")
    raise ValueError(f"no Ollama template for {family!r}")


def default_system_prompt(manifest: Manifest) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (SmolLM2 does), or None.

    ``chat_template.default_system`` when the manifest has it; else, for ChatML, read from the template
    rendered with a lone user message."""
    ct = manifest.get("chat_template") or {}
    if "default_system" in ct:
        return ct.get("default_system") or None
    if chat_family(ct) != "chatml" or not ct.get("template"):
        return None
    try:
        from edgequant.export.template import render

        eos = (ct.get("eos_tokens") or ["<|im_end|>"])[0]
        text = render(str(ct["template"]), [SAMPLE_MESSAGES[1]], bos_token=ct.get("bos") or "", eos_token=eos)
    except Exception:  # a template that cannot render alone: no default system prompt to report
        return None
    mt = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return mt.group(1) if mt else None


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render_modelfile(manifest: Manifest, gguf_file: str) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a file name in the release folder)."""
    m = manifest
    name = m.get("name") or "model"
    ct = m.get("chat_template") or {}
    family = chat_family(ct)
    version = (m.get("versions") or {}).get("edgequant", "?")
    on = ollama_name(name)
    lines = [f"# Ollama Modelfile for {name}, written by edgequant {version}.",
             f"#   ollama create {on} -f Modelfile && ollama run {on}"]
    if re.search(r"-\d{5}-of-\d{5}\.gguf$", gguf_file):
        lines.append("# This GGUF is split in parts; if Ollama refuses it, merge the parts with llama-gguf-split --merge "
                     "and point FROM at the merged file.")
    lines.append(f"FROM ./{gguf_file}")
    if family:
        tpl = ollama_template(family, ct.get("example"))
        if '"""' in tpl:  # cannot happen with our templates; guard the quoting anyway
            raise EdgequantError("internal: Ollama template contains triple quotes")
        lines += ["", f"# Chat template ({family}), in Ollama's Go template syntax.", f'TEMPLATE """{tpl}"""']
    else:
        lines += ["", "# No TEMPLATE: this chat template is not one edgequant translates (" + ", ".join(OLLAMA_FAMILIES) + ");",
                  "# Ollama derives a template from the GGUF's tokenizer.chat_template metadata. If chat replies look",
                  "# wrong, add a TEMPLATE in Go template syntax (https://docs.ollama.com/template)."]
    stops = list(OLLAMA_FAMILIES.get(family or "", [])) + [t for t in ct.get("eos_tokens") or [] if t]
    if stops:
        lines.append("")
        lines += [f"PARAMETER stop {_quote(s)}" for s in dict.fromkeys(stops)]
    system = default_system_prompt(m)
    if system:
        lines.append("")
        if '"""' in system:
            lines.append("# The model's default system prompt contains triple quotes and is left out; set one with /set system.")
        else:
            lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
