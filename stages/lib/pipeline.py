"""What each stage depends on, derived from the code instead of kept by hand.

- `code_files(module)`: the module's file and every project module it imports, however
  deeply (deferred imports inside functions included). dvc.yaml must list exactly these as
  the stage's code deps (tests/test_layout.py), and the train stage's resume fingerprint
  hashes the same list.
- `result_keys(section)`: the params keys of a section that can change a result (all but
  those marked operational in the schema), as dvc.yaml's `params:` lists them.
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
    """The keys of a params section that can change a result: the section's name alone when
    none of its keys is operational, else each result key (`data.source`, ...)."""
    model = Params.model_fields[section].annotation
    fields = model.model_fields  # type: ignore[union-attr]
    operational = {k for k, f in fields.items() if (f.json_schema_extra or {}).get("operational")}
    if not operational:
        return [section]
    return [f"{section}.{k}" for k in fields if k not in operational]


def stage_params(stage: str) -> list[str]:
    """dvc.yaml's `params:` entries for `stage`."""
    return [key for section in STAGE_SECTIONS[stage] for key in result_keys(section)]
