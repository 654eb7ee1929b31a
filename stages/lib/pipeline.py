"""What each stage depends on, derived from the code instead of kept by hand.

- `code_files(module)`: the module's file and every project module it imports, however
  deeply (deferred imports inside functions included). dvc.yaml must list exactly these as
  the stage's code deps (tests/test_layout.py), and the train stage's resume fingerprint
  hashes the same list.
- `result_keys(section)`: the params keys of a section that can change a result (all but
  those marked operational in the schema), as dvc.yaml's `params:` lists them, key by key.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from stages.lib.params import Params

PACKAGE = "stages"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../stages
ROOT = PACKAGE_DIR.parent  # the repository root when installed in editable mode
# stage -> the params sections its run() reads (the report shows the results of all of them)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "download": ("data",),
    "split": ("split",),
    "preprocess": ("preprocess",),
    "train": ("model", "train", "augment"),
    "evaluate": ("evaluate",),
    "export": ("export",),
    "embed": ("embed",),
    "explain": ("explain",),
}
STAGE_SECTIONS["report"] = tuple(s for v in STAGE_SECTIONS.values() for s in v)


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
    return [key for section in STAGE_SECTIONS[stage] for key in result_keys(section)]


def sync_dvc_yaml(text: str) -> str:
    """dvc.yaml `text` with each stage's code deps and params rewritten from the code.

    Only the `stages/...` entries of `deps:` and the entries of `params:` change; data deps,
    comments and everything else stay as written.
    """
    out: list[str] = []
    stage = None
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        header = line.rstrip("\n")
        if header.startswith("  ") and not header.startswith("   ") and header.endswith(":"):
            name = header.strip()[:-1]
            stage = name if name in STAGE_SECTIONS else None
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
