"""The house rules: dvc.yaml's deps and params are derived from the code, paths have one home,
the schema sits at the bottom, stage modules stay apart from the library."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib import paths, pipeline
from tests.conftest import ROOT

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGE_NAMES = list(pipeline.STAGES)


def declared(stage: str, key: str) -> list[str]:
    """A stage's entries under `key` (deps, params, outs, metrics, plots) as plain paths."""
    entries = DVC_YAML["stages"][stage].get(key, [])
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def test_dvc_yaml_has_exactly_the_stages_the_code_knows():
    assert list(DVC_YAML["stages"]) == STAGE_NAMES
    for stage in STAGE_NAMES:
        # `python -m stages`: the code of the folder DVC runs in (a queued experiment's copy)
        assert DVC_YAML["stages"][stage]["cmd"] == f"python -m stages {stage}"


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_code_deps_are_the_modules_the_stage_imports(stage):
    """Each stage depends on its module and every project module it imports (deferred
    imports included), and on no other code: a change anywhere it runs reruns it."""
    derived = {str(f) for f in pipeline.code_files(pipeline.stage_module(stage))}
    code = {d for d in declared(stage, "deps") if d.startswith("stages/")}
    fix = "; `medpipe dvc-yaml` rewrites them"
    assert derived - code == set(), f"dvc.yaml {stage} lacks {sorted(derived - code)}{fix}"
    assert code - derived == set(), f"dvc.yaml {stage} lists unused {sorted(code - derived)}{fix}"


def test_sync_restores_a_dropped_dep_and_keeps_the_rest():
    text = (ROOT / "dvc.yaml").read_text()
    assert pipeline.sync_dvc_yaml(text) == text  # dvc.yaml is what the code says
    broken = text.replace("      - stages/lib/splitting.py\n", "", 1).replace(
        "      - embed.seed\n", ""
    )
    assert broken != text and pipeline.sync_dvc_yaml(broken) == text


def test_derivation_follows_deferred_and_from_package_imports(tmp_path):
    files = {str(f) for f in pipeline.code_files("stages.embed")}
    assert "stages/lib/splitting.py" in files  # `from stages.lib.splitting import rarest_label`
    assert "stages/split.py" not in files  # a stage never imports another stage
    assert "stages/lib/cam.py" in {str(f) for f in pipeline.code_files("stages.tools.predict")}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_params_are_the_result_keys_of_the_stage_sections(stage):
    assert declared(stage, "params") == pipeline.stage_params(stage)


def test_operational_keys_are_no_stage_params():
    everything = {k for s in STAGE_NAMES for k in declared(s, "params")}
    for key in (
        "train.num_workers",
        "evaluate.batch_size",
        "evaluate.latency_runs",
        "explain.batch_size",
        "data.retries",
        "data.mirror",
        "data.cache",
    ):
        assert key not in everything, key
    assert {"train.lr", "train.seed", "evaluate.bootstrap", "model.name"} <= everything


def test_no_param_hides_from_the_run_cache():
    """DVC leaves keys named size/nfiles out of its run-cache key (treeverse/dvc#10296): such
    a key may only be declared flat (`preprocess.size`), never inside a declared mapping."""
    from stages.lib.params import Params

    defaults = Params().model_dump()

    def nested_keys(value) -> set[str]:
        if not isinstance(value, dict):
            return set()
        return set(value) | {k for v in value.values() for k in nested_keys(v)}

    for stage in STAGE_NAMES:
        for key in declared(stage, "params"):
            value = defaults
            for part in key.split("."):
                value = value[part]
            assert not nested_keys(value) & {"size", "nfiles"}, f"{stage}: {key}"


def test_report_depends_on_every_result_key():
    keys = set(declared("report", "params"))
    for stage in STAGE_NAMES[:-1]:
        assert set(declared(stage, "params")) <= keys, stage


def test_train_fingerprint_hashes_the_declared_code(monkeypatch, tmp_path):
    """The resume fingerprint reads the same list as dvc.yaml's train deps."""
    from stages import train
    from stages.lib import runtime

    seen = {}

    def spy(params, data_files, code_files):
        seen["code"] = {str(Path(f).relative_to(pipeline.ROOT)) for f in code_files}
        raise SystemExit(0)  # stop before any training

    monkeypatch.setattr(runtime, "fingerprint", spy)
    from tests.test_train import write_processed

    processed = write_processed(tmp_path, ["a", "b"])
    from stages.lib.params import AugmentParams, ModelParams, TrainParams

    with pytest.raises(SystemExit):
        train.run(
            ModelParams(pretrained=False, name="resnet10t"),
            TrainParams(),
            AugmentParams(),
            processed,
        )
    code = {d for d in declared("train", "deps") if d.startswith("stages/")}
    assert seen["code"] == code


def test_schema_imports_no_stage_module():
    probe = (
        "import sys, stages.lib.params, stages.lib.pipeline\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('stages'))))"
    )
    loaded = set(subprocess.check_output([sys.executable, "-c", probe], text=True).split())
    stage_modules = {pipeline.stage_module(s) for s in STAGE_NAMES} | {"stages.cli"}
    assert loaded & stage_modules == set()
    assert not any(m.startswith("stages.tools") for m in loaded)
    assert (
        "torch"
        not in subprocess.check_output(
            [sys.executable, "-c", "import sys, stages.lib.params; print(' '.join(sys.modules))"],
            text=True,
        ).split()
    )  # validating params stays light


def test_library_imports_no_stage_module():
    for path in (ROOT / "stages/lib").rglob("*.py"):  # subpackages too (lib/sources)
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        stages = {pipeline.stage_module(s) for s in STAGE_NAMES}
        assert pipeline.direct_imports(module) & stages == set(), module


PIPELINE_FOLDER = re.compile(r"^(data|models|metrics|plots|reports|dvclive)/")
DATA_SUFFIX = re.compile(r"\.(csv|json|npy|npz|png|pt|onnx|ts|html)$")
PROSE = {"help", "description", "epilog", "short_help"}  # keyword arguments for people


def inter_stage_names() -> set[str]:
    """The file names passed between stages, as stages/lib/paths.py defines them."""
    named = {v for k, v in vars(paths).items() if k.endswith("_NAME") and isinstance(v, str)}
    files = {v.name for v in vars(paths).values() if isinstance(v, Path) and v.suffix}
    templated = {f(Path(), "{}").name for f in (paths.split_images, paths.split_masks)}
    return named | files | templated


def path_spellings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in `source` that spells a pipeline path by itself: a
    known inter-stage file name, a path under a pipeline folder, or an f-string file name
    joined with `/`. Docstrings, help texts and messages (text with spaces) are left out."""
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.keyword) and node.arg in PROSE:
            skip |= {id(n) for n in ast.walk(node.value)}
        if isinstance(node, ast.JoinedStr):
            skip |= {id(v) for v in node.values}  # judged as the whole f-string
    joined = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp)}
    names, found = inter_stage_names(), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        else:
            continue
        if re.search(r"\s", text):
            continue
        fstring_file = isinstance(node, ast.JoinedStr) and id(node) in joined
        if (
            PIPELINE_FOLDER.match(text)
            or set(re.split(r"[/#:`'\"(),]", text)) & names
            or (fstring_file and DATA_SUFFIX.search(text))
        ):
            found.append((node.lineno, text))
    return found


def test_path_spellings_are_found():
    bad = (
        'a = raw_dir / "manifest.csv"\n'
        'b = Path("data/processed")\n'
        'c = out / f"{split}_images.npy"\n'
        'd = folder / f"{name}.csv"\n'
        'e = f"metrics/evaluate.json:{key}"\n'
        'f = f"images.npz#{key}"\n'
    )
    assert sorted(line for line, _ in path_spellings(bad)) == [1, 2, 3, 4, 5, 6]
    good = (
        '"""Reads manifest.csv from data/raw."""\n'
        "a = raw_dir / paths.MANIFEST_NAME\n"
        'b = typer.Option(1, help="write metrics/train.json")\n'
        'c = f"{path}: no manifest.csv here; run `medpipe download`"\n'
        'd = cache / f"{name}.lock"\n'
    )
    assert path_spellings(good) == []


def test_every_pipeline_path_is_spelled_only_in_paths_module():
    hits = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for p in sorted((ROOT / "stages").rglob("*.py"))
        if p.name != "paths.py"
        for line, text in path_spellings(p.read_text())
    ]
    assert hits == [], "use the names in stages/lib/paths.py:\n" + "\n".join(hits)


def test_dvc_yaml_outputs_are_the_paths_module():
    known = {str(v) for v in vars(paths).values() if isinstance(v, Path)}
    for stage in STAGE_NAMES:
        for key in ("outs", "metrics", "plots"):
            for out in declared(stage, key):
                assert out in known, f"{stage} {key}: {out} is not defined in stages/lib/paths.py"


def test_stage_modules_stay_thin():
    for stage in STAGE_NAMES:
        lines = (ROOT / "stages" / f"{stage}.py").read_text().count("\n")
        assert lines < 420, f"stages/{stage}.py has {lines} lines: move logic to stages/lib"


MAX_PARAMETERS = 8  # more, and a call site cannot be read without the signature beside it


def test_no_function_takes_more_than_eight_parameters():
    """Group what travels together (a params section, a dataclass) instead of a long list;
    self/cls are not counted, *args/**kwargs are."""
    long = []
    for path in sorted((ROOT / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
            names = names[1:] if names[:1] in (["self"], ["cls"]) else names
            if len(names) > MAX_PARAMETERS:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(names)})")
    assert long == [], f"over {MAX_PARAMETERS} parameters: {long}"
