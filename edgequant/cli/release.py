"""``edgequant release``: every artifact of a release from a recipe (or flags), and ``release merge`` of
CI shards. A failed quality gate still prints the summary, then exits with status 3."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

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
    from edgequant.release.recipe import load_recipe, parse_flag_args, recipe_from_options

    flags = parse_flag_args(args)
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
