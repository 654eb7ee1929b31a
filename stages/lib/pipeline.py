"""The stage table, and what each stage depends on, derived from the code instead of kept
by hand.

- `STAGES`: one row per DVC stage, in pipeline order: its name, help line, the params
  sections it reads and how its `run()` is called. The CLI makes one command per row and
  `medpipe dvc-yaml` writes a missing row's dvc.yaml block; adding a stage is its module,
  its paths in `lib/paths.py` and one row here.
- `code_files(module)`: the module's file and every project module it imports, however
  deeply (deferred imports inside functions included). dvc.yaml must list exactly these as
  the stage's code deps (tests/test_layout.py), and the train stage's resume fingerprint
  hashes the same list.
- `result_keys(section)`: the params keys of a section that can change a result (all but
  those marked operational in the schema), as dvc.yaml's `params:` lists them, key by key.
- `run_paths(stage)`: the paths a stage's `run()` takes as defaults (read from its source,
  without importing it): a new stage's data deps and outputs.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.lib import paths
from stages.lib.params import Params

PACKAGE = "stages"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../stages
ROOT = PACKAGE_DIR.parent  # the repository root when installed in editable mode
WHOLE_PARAMS, PARAMS_FILE = "params", "params_file"  # run() arguments besides sections


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    `sections`: the params sections the stage's result depends on (dvc.yaml's `params:`, key
    by key). `takes`: `run()`'s leading arguments, in order: section names, `params` (the
    whole validated file) or `params_file` (its path); default: `sections`. `torchrun`: the
    command relaunches itself under torchrun when train.nproc_per_node > 1.
    """

    name: str
    help: str  # `medpipe <name> --help`
    sections: tuple[str, ...]
    takes: tuple[str, ...] | None = None
    torchrun: bool = False

    @property
    def module(self) -> str:
        return stage_module(self.name)

    def arguments(self, params: Params, params_file: Path) -> list[Any]:
        """`run()`'s leading arguments for this stage."""
        special = {WHOLE_PARAMS: params, PARAMS_FILE: params_file}
        names = self.sections if self.takes is None else self.takes
        return [special[n] if n in special else getattr(params, n) for n in names]


# every stage before the report, in pipeline order (a new stage: a row here)
_PIPELINE = (
    Stage(
        "download",
        "Fetch or generate the dataset into data/raw (manifest.csv + dataset.json).",
        ("data",),
    ),
    Stage("split", "Split data/raw by patient into data/split/{train,val,test}.csv.", ("split",)),
    Stage(
        "preprocess",
        "Crop, equalise and resize every split into uint8 arrays in data/processed.",
        ("preprocess",),
    ),
    Stage(
        "train",
        "Train the model; write models/model.pt and metrics/train.json (torchrun: DDP).",
        ("model", "train", "augment"),
        torchrun=True,
    ),
    Stage(
        "evaluate",
        "Score the model on the test split; write metrics/evaluate.json and plots.",
        ("evaluate",),
    ),
    Stage(
        "export",
        "Export models/model.ts (TorchScript) and models/model.onnx, checked against PyTorch.",
        ("export",),
    ),
    Stage("embed", "t-SNE/UMAP/PCA map of the test set's penultimate features.", ("embed",)),
    Stage(
        "explain",
        "Grad-CAM gallery per class and, where lesion masks exist, the pointing game.",
        ("explain",),
    ),
)
# the report shows the results of all of them: it reads every section they read
_REPORT = Stage(
    "report",
    "Build reports/report.html from the metrics and plots of the other stages.",
    tuple(s for stage in _PIPELINE for s in stage.sections),
    takes=(WHOLE_PARAMS, PARAMS_FILE),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in (*_PIPELINE, _REPORT)}


def module_file(name: str) -> Path | None:
    """The source file of project module `name` (`stages.lib.io`), None if it is not one."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    base = PACKAGE_DIR.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(name: str) -> set[str]:
    """Project modules that module `name` imports anywhere in its body."""
    path = module_file(name)
    assert path is not None, name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from stages.lib import io` imports the submodule io
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if module_file(m) is not None}


@functools.cache
def project_imports(name: str) -> frozenset[str]:
    """`name` and every project module it imports, transitively."""
    seen, todo = {name}, [name]
    while todo:
        for imported in direct_imports(todo.pop()) - seen:
            seen.add(imported)
            todo.append(imported)
    return frozenset(seen)


def code_files(module: str) -> list[Path]:
    """Source files a stage module runs, sorted, relative to the repository root.
    Package `__init__.py` files are left out: they hold no logic (keep it so)."""
    files = {module_file(m) for m in project_imports(module)}
    return sorted(f.relative_to(ROOT) for f in files if f is not None and f.name != "__init__.py")


def stage_module(stage: str) -> str:
    return f"{PACKAGE}.{stage}"


def result_keys(section: str) -> list[str]:
    """The keys of a params section that can change a result (`data.source`, ...): all but
    those marked operational in the schema.

    Always key by key, never the section's name alone: besides leaving operational keys out,
    this keeps keys named `size` visible to DVC's run-cache. DVC drops every key named
    `size` or `nfiles` from the run-cache key (file metadata to it, treeverse/dvc#10296), so
    a section-level `preprocess` entry would let `preprocess.size=96` restore 64 px outputs;
    the flat `preprocess.size` entry is hashed like any other.
    """
    model = Params.model_fields[section].annotation
    fields = model.model_fields  # type: ignore[union-attr]
    return [
        f"{section}.{k}"
        for k, f in fields.items()
        if not (f.json_schema_extra or {}).get("operational")
    ]


def stage_params(stage: str) -> list[str]:
    """dvc.yaml's `params:` entries for `stage`."""
    return [key for section in STAGES[stage].sections for key in result_keys(section)]


def sync_dvc_yaml(text: str) -> str:
    """dvc.yaml `text` with each stage's code deps and params rewritten from the code, and a
    block added for each stage of the table that it lacks (`stage_block`), in table order.

    Only the `stages/...` entries of `deps:` and the entries of `params:` of existing blocks
    change; data deps, outputs, comments and everything else stay as written.
    """
    return add_missing_stages(sync_stage_blocks(text))


def sync_stage_blocks(text: str) -> str:
    """dvc.yaml `text` with the code deps and params of its stages rewritten from the code."""
    out: list[str] = []
    stage = None
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        header = line.rstrip("\n")
        if header.startswith("  ") and not header.startswith("   ") and header.endswith(":"):
            name = header.strip()[:-1]
            stage = name if name in STAGES else None
        block = header.strip().split(":")[0]
        at_stage_key = header.startswith("    ") and not header.startswith("     ")
        if stage and at_stage_key and block in ("deps", "params"):
            out.append(line)
            i += 1
            kept = []
            while i < len(lines) and lines[i].startswith("      "):
                entry = lines[i].strip().removeprefix("- ")
                if block == "deps" and not entry.startswith(f"{PACKAGE}/"):
                    kept.append(lines[i])
                i += 1
            if block == "deps":
                code = [f"      - {f.as_posix()}\n" for f in code_files(stage_module(stage))]
                out.extend(code + kept)
            else:
                out.extend(f"      - {key}\n" for key in stage_params(stage))
            continue
        out.append(line)
        i += 1
    return "".join(out)


OUTPUT_KEYS = ("outs", "metrics", "plots")


def _path_default(node: ast.expr | None) -> Path | None:
    """The path of a default written `paths.NAME`, else None."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "paths"
        and isinstance(getattr(paths, node.attr, None), Path)
    ):
        return getattr(paths, node.attr)
    return None


def run_paths(stage: str) -> dict[str, Path]:
    """The paths `run()` of `stage` takes as defaults, by argument name, read from its source:
    `arg: Path = paths.NAME`, and the fields of a dataclass default (`out: Outputs =
    Outputs()`, a class of the stage module whose fields default to `paths.NAME`)."""
    path = module_file(stage_module(stage))
    assert path is not None, stage
    tree = ast.parse(path.read_text(), str(path))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    args = [*run.args.args, *run.args.kwonlyargs]
    defaults = [None] * (len(run.args.args) - len(run.args.defaults))
    defaults += [*run.args.defaults, *run.args.kw_defaults]
    found: dict[str, Path] = {}
    for arg, default in zip(args, defaults, strict=True):
        if (value := _path_default(default)) is not None:
            found[arg.arg] = value
        elif isinstance(default, ast.Call) and isinstance(default.func, ast.Name):
            for field in getattr(classes.get(default.func.id), "body", []):
                if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
                    continue
                if (value := _path_default(field.value)) is not None:
                    found[f"{arg.arg}.{field.target.id}"] = value
    return found


def declared_outputs(stages: dict) -> set[Path]:
    """Every output (outs, metrics, plots) of the parsed dvc.yaml `stages` mapping."""
    return {
        Path(entry if isinstance(entry, str) else next(iter(entry)))
        for block in stages.values()
        for key in OUTPUT_KEYS
        for entry in block.get(key) or []
    }


def output_kind(path: Path) -> str:
    """Where dvc.yaml declares an output (ARCHITECTURE.md's DVC conventions): a headline
    `metrics/*.json` under `metrics`, a file or folder under plots/ under `plots` (both
    git-tracked, `cache: false`), anything else (data, models, detail files) under `outs`."""
    if path.parent == paths.METRICS and path.suffix == ".json":
        return "metrics"
    return "plots" if paths.PLOTS in path.parents else "outs"


def stage_block(stage: str, produced: set[Path]) -> str:
    """A dvc.yaml block for `stage`: its code deps, the `run()` paths that other stages
    produce (or lie inside what they produce) as data deps, its params keys, and its other
    `run()` paths as outputs. Refine it by hand as needed; `medpipe dvc-yaml` keeps the
    hand-kept parts from then on."""
    data_deps, outputs = [], {kind: [] for kind in OUTPUT_KEYS}
    for value in run_paths(stage).values():
        if any(value == p or p in value.parents for p in produced):
            data_deps.append(value)
        else:
            outputs[output_kind(value)].append(value)
    lines = [f"  {stage}:\n", f"    cmd: python -m stages {stage}\n", "    deps:\n"]
    lines += [f"      - {f.as_posix()}\n" for f in code_files(stage_module(stage))]
    lines += [f"      - {p.as_posix()}\n" for p in data_deps]
    if keys := stage_params(stage):
        lines += ["    params:\n", *(f"      - {key}\n" for key in keys)]
    for kind, entries in outputs.items():
        if entries:
            lines.append(f"    {kind}:\n")
        for entry in entries:
            lines.append(f"      - {entry.as_posix()}" + (":\n" if kind != "outs" else "\n"))
            lines += ["          cache: false\n"] if kind != "outs" else []
    return "".join(lines)


def _stage_headers(lines: list[str]) -> tuple[dict[str, int], int]:
    """Line numbers of the stage headers under `stages:`, and where that mapping ends (its
    last content line + 1)."""
    headers: dict[str, int] = {}
    inside, end = False, len(lines)
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith((" ", "#")):  # a top-level key
            if inside:
                break
            inside = line.startswith("stages:")
            continue
        key = line.rstrip("\n")
        if inside and key.startswith("  ") and key[2:3] not in (" ", "#") and key.endswith(":"):
            headers[key.strip()[:-1]] = i
        if inside and line.strip():
            end = i + 1
    return headers, end


def add_missing_stages(text: str) -> str:
    """dvc.yaml `text` with a block (`stage_block`) for each stage of the table it lacks,
    placed before the next stage of the table that it has (after its comment lines), or at
    the end of `stages:`."""
    order = list(STAGES)
    for stage in order:
        declared = (yaml.safe_load(text) or {}).get("stages") or {}
        if stage in declared:
            continue
        block = stage_block(stage, declared_outputs(declared))
        lines = text.splitlines(keepends=True)
        headers, end = _stage_headers(lines)
        later = [headers[s] for s in order[order.index(stage) + 1 :] if s in headers]
        if later:
            at = later[0]
            while at > 0 and lines[at - 1].lstrip().startswith("#"):
                at -= 1  # a comment above a header belongs to that stage
            lines[at:at] = [block, "\n"]
        else:
            if end and not lines[end - 1].endswith("\n"):
                lines[end - 1] += "\n"
            lines[end:end] = ["\n", block]
        text = "".join(lines)
    return text
