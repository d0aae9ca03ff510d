"""``edgequant release``: every artifact of a release from a recipe (or flags), and ``release merge`` of
CI shards. A failed quality gate still prints the summary, then exits with status 3."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from edgequant.cli.options import JsonOpt, RepackOpt, TrustOpt, VerboseOpt, llama_options, trust
from edgequant.cli.output import escape, fail, log_for, out, run, show
from edgequant.errors import EdgequantError

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}  # the recipe's flags pass through


def release(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A recipe (.toml), a model folder / hub id for a one-off release, or 'merge' followed by each shard's manifest.json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (overrides the recipe's)."),
    only: list[str] = typer.Option([], "--only", help="Make only these artifacts (a CI matrix shard); repeatable or comma-separated."),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe as TOML and exit (no work)."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that holds other files or a hand-edited card, replacing files with the release's names."),
    repack: Optional[str] = RepackOpt,
    verbose: bool = VerboseOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make every artifact of a release (GGUF types, imatrix, GPTQ, bench, model card, Modelfile, manifest) from a recipe.

    Every recipe key is also a flag (--gguf Q8_0 --gguf Q2_K:imatrix --gptq 4:64 --bench-chunks 8 ...; docs/recipe.md).
    Exit status: 0 done, 2 bad recipe or input, 3 a quality gate failed, 130 interrupted.
    """
    trust(trust_remote_code)
    from edgequant.release.pipeline import release_merge

    llama_options(repack, verbose)
    log = log_for(as_json)
    if target == "merge":
        if output is None:
            fail("release merge: pass -o OUTPUT_FOLDER")
        result = run(lambda: release_merge(list(ctx.args), output, log=log, force=force), as_json)
        return show(result, as_json, _render)
    recipe = run(lambda: _load_recipe(target, list(ctx.args), output, only), as_json)
    if print_recipe:
        print(recipe.to_toml())
        return
    show(run(lambda: _release(recipe, log, force, as_json), as_json), as_json, _render)


def _load_recipe(target: str, args: list[str], output: Optional[Path], only: list[str]):
    """The recipe file with the flags on top, or a one-off recipe from a model and the flags; ``--only`` selects."""
    from edgequant.release.recipe import load_recipe, recipe_from_options

    flags = parse_release_flags(args)
    if output is not None:
        flags["output"] = str(output.resolve())  # relative to where the command runs, not the recipe
    path = Path(target)
    if path.suffix == ".toml":
        if not path.is_file():
            raise EdgequantError(f"recipe {path} does not exist")
        r = load_recipe(path)
        r = r.with_overrides(**flags) if flags else r
    else:
        r = recipe_from_options(target, **flags)
    return r.select(only) if only else r


def _release(recipe, log, force: bool, as_json: bool):
    """Run the pipeline; on a failed gate print the summary first (CI reads it), then let exit status 3 out."""
    import shlex

    from edgequant.errors import GateFailed
    from edgequant.release.pipeline import release as do_release

    command = shlex.join(["edgequant", "release", *sys.argv[2:]]) if len(sys.argv) > 1 else None
    try:
        return do_release(recipe, log=log, command=command, force=force)
    except GateFailed as e:
        if getattr(e, "result", None) is not None:
            show(e.result, as_json, _render)
        raise


def _render(result) -> None:
    """The folder and status, each gate with pass/FAIL, where the card and manifest are."""
    out.print(f"[bold]release[/] {escape(str(result.folder))}: {result.status} in {result.seconds:.1f} s "
              f"(made {len(result.made)}, unchanged {len(result.skipped)})", highlight=False)
    for g in result.gates:
        mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        out.print(f"  gate {mark} {escape(str(g['gate']))} ({escape(str(g['artifact']))}: {escape(str(g['value']))})",
                  highlight=False)
    out.print(f"model card: {result.card}\nmanifest: {result.manifest}", markup=False, highlight=False)


_RELEASE_BOOL_FLAGS = {"keep_base", "template_gate", "imatrix_default", "bench_speed", "bench_flash_attn"}
_RELEASE_LIST_FLAGS = {"gguf", "gptq", "gates", "devices", "card_tags"}


def _flag_value(text: str) -> Any:
    """Flag text to the TOML value it stands for: true/false, integers, decimals, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_release_flags(args: list[str]) -> dict[str, Any]:
    """``--bench-ctx 256 --gguf Q8_0 --gguf Q2_K:imatrix --no-keep-base`` -> recipe flag keywords."""
    from edgequant.release.recipe import FLAGS

    flags: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise EdgequantError(f"unexpected argument {arg!r}; recipe options are --name VALUE (see docs/recipe.md)")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        key = {"device": "devices", "gate": "gates", "card_tag": "card_tags"}.get(key, key)
        negated = key.startswith("no_") and key[3:] in _RELEASE_BOOL_FLAGS
        if negated or (key in _RELEASE_BOOL_FLAGS and not eq and (i + 1 >= len(args) or args[i + 1].startswith("--"))):
            flags[key[3:] if negated else key] = not negated
            i += 1
            continue
        if key not in FLAGS:
            import difflib

            close = difflib.get_close_matches(key, list(FLAGS), n=1)
            hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
            raise EdgequantError(f"unknown option --{name}{hint}; every recipe key has a flag, see docs/recipe.md")
        if not eq:
            if i + 1 >= len(args):
                raise EdgequantError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if key in _RELEASE_LIST_FLAGS:
            flags.setdefault(key, []).append(value)
        else:
            flags[key] = _flag_value(value) if key not in ("name", "output", "source") else value
    return flags
