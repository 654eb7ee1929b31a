"""`medpipe <stage>`: one Typer command per DVC stage, each reading its own params sections,
made from the stage table (`lib/pipeline.STAGES`); plus the tools outside the pipeline.

The whole params file is validated first (exit code 2 on any bad key, before anything is
written); then the stage's `run()` receives only its own section objects (the report: the
whole file), as its table row says.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import typer

from stages import __version__
from stages.lib import paths, pipeline
from stages.lib.console import error, track_stderr
from stages.lib.errors import MedpipeError, ToolFailed
from stages.lib.locks import stage_lock
from stages.lib.params import (
    EvaluateParams,
    Params,
    ParamsError,
    describe_params,
    load_params,
)

app = typer.Typer(
    help="Reproducible medical-image classification: one command per DVC stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold patient data
)
ParamsOption = typer.Option(paths.PARAMS, "--params", "-p", help="params.yaml to read.")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"medpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """Reproducible medical-image classification: one command per DVC stage."""
    track_stderr()


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as exc:
        error(str(exc))
        raise typer.Exit(2) from None


def describe(exc: OSError) -> str:
    """An OS error as `path: cause` (`[Errno 13] Permission denied: 'x'` reads worse)."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    target = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{exc.filename}{target}: {exc.strerror}"


def _run(step: Callable[[], str], stage: str | None = None) -> None:
    """Run a stage under its lock. Input errors (ValueError), what the machine refused
    (OSError: permissions, a full disk, a file where a folder should be) and failures
    medpipe explains (`MedpipeError`) become one line and exit code 1; anything else is a
    bug and keeps its traceback (without locals)."""
    try:
        with stage_lock(stage) if stage else contextlib.nullcontext():
            summary = step()
    except OSError as exc:
        error(describe(exc))
        raise typer.Exit(1) from None
    except ParamsError as exc:  # a params or search-space file the schema refuses
        error(str(exc))
        raise typer.Exit(2) from None
    except (ValueError, MedpipeError) as exc:
        error(str(exc))
        raise typer.Exit(1) from None
    typer.echo(summary)


def _run_stage(stage: pipeline.Stage, params_file: Path) -> None:
    """`medpipe <stage>`: validate the whole params file, then call the stage's `run()` with
    the arguments its table row names, under the stage's lock."""
    module = importlib.import_module(stage.module)
    p = _params(params_file)
    nproc = p.train.nproc_per_node
    if stage.torchrun and nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun
        from stages.lib import runtime  # deferred: imports torch

        raise typer.Exit(subprocess.call(runtime.torchrun_command(params_file, nproc)))
    arguments = stage.arguments(p, params_file)
    _run(lambda: module.run(*arguments), stage.name)


def _stage_command(stage: pipeline.Stage) -> Callable[[Path], None]:
    def command(params_file: Path = ParamsOption) -> None:
        _run_stage(stage, params_file)

    return command


for _stage in pipeline.STAGES.values():  # one command per row of the stage table
    app.command(_stage.name, help=_stage.help)(_stage_command(_stage))


@app.command("predict")
def predict_files(
    paths: list[str] = typer.Argument(
        ..., help="Image files (PNG, JPEG, TIFF, DICOM), folders, or file.npz#key references."
    ),
    model: Path = typer.Option(paths.MODEL, "--model", "-m", help="Checkpoint."),
    out: Path = typer.Option(paths.PREDICT_OUTPUT, "--out", "-o", help="CSV to write."),
    cam: Path | None = typer.Option(None, "--cam", help="Folder for Grad-CAM overlays."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch."),
    tta: bool = typer.Option(
        EvaluateParams.model_fields["tta"].default,
        "--tta/--no-tta",
        help="Average over small shifts and a zoom, as the evaluate stage does by default "
        "(evaluate.tta); --no-tta for one pass per image.",
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        min=0.0,
        max=1.0,
        help="Binary models: call the positive class when its probability reaches this "
        "(e.g. evaluate's threshold.value in metrics/detail/evaluate.json); default: the "
        "most likely class.",
    ),
) -> None:
    """Classify new images with the preprocessing stored in the checkpoint."""
    from stages.tools import predict as stage

    _run(lambda: stage.run(paths, model, out, cam, batch_size, tta, threshold))


@app.command()
def compare(
    out: Path = typer.Option(paths.COMPARE, help="HTML page to write."),
    metric: str = typer.Option("f1_macro", help="Metric to compare (a key of evaluate.json)."),
    param: str | None = typer.Option(None, help="Param for the x axis (default: first changed)."),
    rev: list[str] | None = typer.Option(
        None, "--rev", help="Experiments derived from this commit (repeatable; default HEAD)."
    ),
    num: int = typer.Option(1, "-n", "--num", help="Also the N-1 commits before each --rev."),
    all_commits: bool = typer.Option(
        False, "-A", "--all-commits", help="Experiments of every commit (as dvc exp show -A)."
    ),
) -> None:
    """Compare DVC experiments on one page: table, seed means, metric vs param, curves."""
    from stages.tools import compare as stage

    revs, n = list(rev or []), -1 if all_commits else num
    _run(lambda: stage.run(out, metric, param, Path("."), revs, n))


@app.command("diff")
def diff(
    base: str = typer.Argument(..., help="Git revision of the base run (e.g. main)."),
    head: str | None = typer.Argument(None, help="Git revision of the head (default: workspace)."),
    params_file: Path = ParamsOption,
) -> None:
    """Paired comparison of two runs on the same test images: differences with patient-level
    bootstrap intervals, McNemar for accuracy, DeLong for ROC-AUC."""
    from stages.tools import diff as tool

    p = _params(params_file)
    level = p.report.gate_level
    _run(lambda: tool.run(base, head, p.evaluate.bootstrap, p.evaluate.seed, level, Path(".")))


@app.command("pr-summary")
def pr_summary(
    base: str = typer.Option("main", help="Git revision to compare against."),
    params_file: Path = ParamsOption,
) -> None:
    """Markdown for a pull request: paired results, metrics and params diffs against BASE;
    exit 1 if report.gate_metric drops beyond report.gate_tolerance and beyond both test and
    training noise (the latter from BASE's `medpipe spread`)."""
    from stages.tools import review

    p = _params(params_file)
    try:
        markdown, gate = review.summarize(Path("."), base, p.report, p.evaluate)
    except (ToolFailed, ValueError, OSError) as exc:
        error(str(exc))
        raise typer.Exit(1) from None
    typer.echo(markdown)
    if not gate.passed:
        typer.echo(f"pr-summary: gate failed: {gate.describe(p.report.gate_level)}", err=True)
        raise typer.Exit(1)


@app.command("spread")
def spread_command(
    seeds: int = typer.Option(3, "--seeds", "-k", min=2, help="Trainings (seeds) to record."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Trainings at a time."),
    check: bool = typer.Option(
        False, "--check", help="Only say whether metrics/spread/ is current (exit 1 if not)."
    ),
    params_file: Path = ParamsOption,
) -> None:
    """Record the recipe's training noise: train it with K seeds and keep each one's figures
    and test predictions in metrics/spread/ (commit them); pr-summary, diff and compare
    then tell another seed or CPU from a real change."""
    from stages.tools import spread

    if check:
        current, line = spread.check()
        typer.echo(line)
        raise typer.Exit(0 if current else 1)
    p = _params(params_file)
    _run(lambda: spread.run(p, seeds, jobs), "spread")


@app.command("tune")
def tune_command(
    space: Path = typer.Argument(..., help="Search-space YAML (study, metric, trials, space)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Trials at a time, each on its cores."),
    storage: str = typer.Option(
        None,
        "--storage",
        help="Where the study lives: a journal file (shared folder: several machines) or a "
        "database URL. Default .medpipe/tune/<study>.journal.",
    ),
    no_confirm: bool = typer.Option(
        False, "--no-confirm", help="Only run trials (a worker joining another's search)."
    ),
    apply: bool = typer.Option(
        False, "--apply", help="Write the confirmed setting into params.yaml; train nothing."
    ),
    params_file: Path = ParamsOption,
) -> None:
    """Hyperparameter search: sampled trials as DVC experiments, pruned early when hopeless,
    the best settings confirmed over seeds; metrics/tune/<study>.json and
    reports/tune-<study>.html. Run again to resume."""
    from stages.tools import tune

    if apply:
        _run(lambda: tune.apply(space, params_file))
    else:
        _run(lambda: tune.run(space, jobs, storage, not no_confirm, params_file), "tune")


@app.command("dvc-yaml")
def dvc_yaml(
    check: bool = typer.Option(False, "--check", help="Only report drift (exit 1), write nothing."),
    path: Path = typer.Option(Path("dvc.yaml"), help="The pipeline file."),
) -> None:
    """Rewrite dvc.yaml's code deps and params keys from the code (after adding a module or
    a param) and write the block of a stage new to the stage table; --check reports drift
    instead."""
    import difflib

    from stages.lib import pipeline
    from stages.lib.io import atomic_path

    text = path.read_text()
    synced = pipeline.sync_dvc_yaml(text)
    if synced == text:
        typer.echo(f"dvc-yaml: {path} matches the code")
        return
    diff = difflib.unified_diff(text.splitlines(True), synced.splitlines(True), str(path), "code")
    typer.echo("".join(diff), nl=False)
    if check:
        error(f"{path} drifted from the code; run `medpipe dvc-yaml`")
        raise typer.Exit(1)
    with atomic_path(path) as tmp:
        tmp.write_text(synced)
    typer.echo(f"dvc-yaml: {path} updated")


@app.command("params")
def show_params(
    params_file: Path = ParamsOption,
    markdown: bool = typer.Option(
        False, "--markdown", help="Print the reference page (docs/params.md) instead."
    ),
) -> None:
    """Validate params.yaml and list every key with its default and meaning."""
    if markdown:
        from stages.tools.reference import params_reference

        typer.echo(params_reference(), nl=False)
        return
    if params_file.exists():
        _params(params_file)
    width = max(len(k) for k, _, _ in describe_params())
    for key, default, doc in describe_params():
        typer.echo(f"{key:<{width}}  {doc} [default {default}]")


recipe_app = typer.Typer(
    help="The studies medpipe was made for, as params overlays in recipes/.",
    no_args_is_help=True,
)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("list")
def recipe_list() -> None:
    """List the recipes with their titles."""
    from stages.tools import recipe

    _run(recipe.listing)


@recipe_app.command("show")
def recipe_show(name: str = typer.Argument(..., help="Recipe name, e.g. 001-mura.")) -> None:
    """Print a recipe: the study, the data it expects, the figures to read, the overlay."""
    from stages.tools import recipe

    _run(lambda: recipe.show(name))


@recipe_app.command("apply")
def recipe_apply(
    name: str = typer.Argument(..., help="Recipe name, e.g. 001-mura."),
    set_: list[str] = typer.Option(
        [], "--set", "-S", help="KEY=VALUE: a key the recipe requires (data.path=...) or any other."
    ),
    params_file: Path = ParamsOption,
) -> None:
    """Rewrite params.yaml as schema defaults + the recipe + your --set values (refuses,
    leaving params.yaml as it was, until the data keys the recipe requires are given)."""
    from stages.tools import recipe

    _run(lambda: recipe.apply(name, set_, params_file))
