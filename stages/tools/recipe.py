"""`medpipe recipe list | show NAME | apply NAME`: the studies medpipe was made for, as
params overlays in `recipes/`.

A recipe file is a params overlay (the keys that differ from the defaults) with a header
comment (the study, the data it expects, the figures to read) and one extra section,
`recipe.requires`: the keys the user must give (where their data is), each with what it
must point at. `apply` writes params.yaml = schema defaults + the overlay + the required
keys (from `--set`, else kept from the current params.yaml) + any other `--set`, validated
through the schema, so `dvc repro` and `dvc exp run` work unchanged. It refuses, saying
which keys to set and how, until every required key is given and points at something that
exists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.lib import paths
from stages.lib.io import atomic_path
from stages.lib.params import Params, ParamsError, parse_params, read_yaml
from stages.lib.spread import flat_keys

REQUIRES_KINDS = ("file", "folder", "value")


@dataclass(frozen=True)
class Requirement:
    key: str  # dotted params key
    kind: str  # file, folder (must exist) or value
    what: str  # what the user must give, in words


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    title: str  # the header's first line
    header: str  # the header comment, without the `#`
    requires: tuple[Requirement, ...]
    overlay: dict[str, Any]


def recipes_dir(start: Path | None = None) -> Path:
    """`recipes/` of the project in the working directory, else the one beside this package
    (an editable install used from elsewhere)."""
    local = (start or Path.cwd()) / paths.RECIPES
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / paths.RECIPES


def available(folder: Path | None = None) -> list[str]:
    folder = folder or recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def load_recipe(name: str, folder: Path | None = None) -> Recipe:
    """Read and check `recipes/NAME.yaml` (the overlay must pass the schema).

    Raises:
        ValueError: unknown name (listing the recipes), or a malformed recipe file.
    """
    folder = folder or recipes_dir()
    path = folder / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = ", ".join(available(folder)) or "none"
        raise ValueError(f"recipe {name!r} not found in {folder}; recipes: {names}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of params sections")
    meta = raw.pop("recipe", None) or {}
    requires = []
    for key, spec in (meta.get("requires") or {}).items():
        if not isinstance(spec, dict) or spec.get("kind") not in REQUIRES_KINDS:
            raise ValueError(
                f"{path}: recipe.requires.{key} needs kind ({REQUIRES_KINDS}) and what"
            )
        requires.append(Requirement(key, spec["kind"], str(spec.get("what", ""))))
    trial = copy.deepcopy(raw)
    for req in requires:  # the overlay must pass the schema once the user's keys are given
        _set(trial, req.key, "given-by-the-user")
    try:
        parse_params(trial, str(path))
    except ParamsError as exc:
        raise ValueError(str(exc)) from None
    header = _header(text)
    title = header.splitlines()[0].removeprefix(f"{path.stem}: ") if header else name
    return Recipe(path.stem, path, title, header, tuple(requires), raw)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values read as YAML, as `dvc exp run -S` reads them)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. data.path=/data/mura.csv")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return values


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if nested else value
    return out


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
    tree[leaf] = value


def missing_requirements(recipe: Recipe, values: dict, base: Path) -> list[str]:
    """One line per required key that is unset or names a path that does not exist; the
    paths that exist are written back absolute (`~` expanded, relative to `base`), so
    they hold wherever DVC runs the stage (queued experiments run in .dvc/tmp/exps)."""
    problems = []
    for req in recipe.requires:
        value = _get(values, req.key)
        if value in (None, ""):
            problems.append(f"{req.key}: not set ({req.what})")
        elif req.kind in ("file", "folder"):
            target = Path(str(value)).expanduser()
            target = (target if target.is_absolute() else base / target).resolve()
            exists = target.is_file() if req.kind == "file" else target.is_dir()
            if not exists:
                problems.append(f"{req.key}: {value} is not an existing {req.kind} ({req.what})")
            else:
                _set(values, req.key, str(target))
    return problems


def apply(name: str, sets: list[str], params_file: Path = paths.PARAMS) -> str:
    """Write params.yaml from the recipe; return the summary line.

    Raises:
        ValueError: an unknown recipe, a malformed `--set`, a required key that is unset or
            points nowhere (saying how to set it), or params the schema rejects; params.yaml
            is then left as it was.
    """
    recipe = load_recipe(name)
    given = parse_sets(sets)
    current: dict = {}
    if params_file.exists():
        try:
            current = read_yaml(params_file) or {}
        except ParamsError as exc:
            raise ValueError(f"{exc}; fix it or move it away, then apply the recipe") from None
        if not isinstance(current, dict):
            current = {}
    values = _merge(Params().model_dump(mode="json"), recipe.overlay)
    kept = []
    for req in recipe.requires:  # the user's data location survives switching recipes
        if req.key not in given and _get(current, req.key) not in (None, ""):
            _set(values, req.key, _get(current, req.key))
            kept.append(req.key)
    for key, value in given.items():
        _set(values, key, value)
    problems = missing_requirements(recipe, values, params_file.parent.resolve())
    if problems:
        example = " ".join(f"--set {r.key}=..." for r in recipe.requires)
        raise ValueError(
            f"recipe {recipe.name} needs data you bring; params.yaml left unchanged:\n  "
            + "\n  ".join(problems)
            + f"\nGive them: medpipe recipe apply {recipe.name} {example}"
        )
    try:
        params = parse_params(values, f"recipe {recipe.name}")
    except ParamsError as exc:
        raise ValueError(f"{exc}\nparams.yaml left unchanged") from None
    full = params.model_dump(mode="json")
    with atomic_path(params_file) as tmp:
        tmp.write_text(yaml.safe_dump(full, sort_keys=False, default_flow_style=None))
    before, after = flat_keys(current), flat_keys(full)
    changed = sorted(k for k in after if before.get(k) != after[k]) if current else list(after)
    kept_text = f"; kept {', '.join(kept)} from {params_file}" if kept else ""
    return (
        f"recipe: {recipe.name} ({recipe.title}) -> {params_file}: {len(changed)} key(s) "
        f"changed{kept_text}; next: dvc repro (or dvc exp run)"
    )


def listing() -> str:
    names = available()
    rows = [f"{n:<20} {load_recipe(n).title}" for n in names]
    return "\n".join(rows) if rows else f"no recipes in {recipes_dir()}"


def show(name: str) -> str:
    return load_recipe(name).path.read_text().rstrip()
