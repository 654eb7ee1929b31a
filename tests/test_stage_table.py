"""The stage table (`lib/pipeline.STAGES`): the CLI makes one command per row and calls `run()`
as the row says; `medpipe dvc-yaml` writes the block of a row that dvc.yaml lacks."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.lib import paths, pipeline
from stages.lib.params import Params, SplitParams
from tests.conftest import ROOT, write_params

runner = CliRunner()
TOOLS = {
    "predict",
    "compare",
    "diff",
    "pr-summary",
    "spread",
    "tune",
    "dvc-yaml",
    "params",
    "recipe",
}


def test_cli_has_a_command_per_row_and_the_tools():
    commands = list(typer.main.get_command(app).commands)  # as `medpipe --help` lists them
    stage_commands = [c for c in commands if c not in TOOLS]
    assert stage_commands == list(pipeline.STAGES)  # in pipeline order
    assert set(commands) - set(pipeline.STAGES) == TOOLS
    listing = runner.invoke(app, ["--help"]).output
    for stage in pipeline.STAGES.values():
        help_page = runner.invoke(app, [stage.name, "--help"])
        assert help_page.exit_code == 0
        assert stage.help in " ".join(help_page.output.split())  # rich wraps long lines
        assert f" {stage.name} " in listing
        assert "--params" in help_page.output and "-p" in help_page.output


def leading_parameters(stage: str) -> list[str]:
    """`run()`'s parameters without a default, read from the stage's source."""
    source = pipeline.module_file(pipeline.stage_module(stage)).read_text()
    run = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "run")
    return [a.arg for a in run.args.args[: len(run.args.args) - len(run.args.defaults)]]


@pytest.mark.parametrize("stage", list(pipeline.STAGES))
def test_each_row_says_how_to_call_run(stage):
    row = pipeline.STAGES[stage]
    takes = row.sections if row.takes is None else row.takes
    assert len(takes) == len(leading_parameters(stage)), (
        f"stages/{stage}.py run() takes {leading_parameters(stage)}: fix its row's `takes`"
    )
    valid = set(Params.model_fields) | {pipeline.WHOLE_PARAMS, pipeline.PARAMS_FILE}
    assert set(takes) <= valid and set(row.sections) <= set(Params.model_fields)


def test_report_row_reads_every_section_of_the_stages_before_it():
    before = [s for name, s in pipeline.STAGES.items() if name != "report"]
    assert pipeline.STAGES["report"].sections == tuple(x for s in before for x in s.sections)
    assert list(pipeline.STAGES)[-1] == "report"


def test_stage_command_passes_the_rows_sections_and_maps_errors(in_tmp, monkeypatch):
    from stages import report, split

    write_params(in_tmp / "params.yaml")
    seen = []

    def fake_run(*args):
        seen.append(args)
        return "split: fake"

    monkeypatch.setattr(split, "run", fake_run)
    result = runner.invoke(app, ["split"])
    assert result.exit_code == 0 and result.output.strip() == "split: fake"
    assert len(seen[0]) == 1 and isinstance(seen[0][0], SplitParams)

    def refuse(*args):
        raise ValueError("bad input")

    monkeypatch.setattr(split, "run", refuse)
    result = runner.invoke(app, ["split"])
    assert result.exit_code == 1 and "error: bad input" in result.output

    monkeypatch.setattr(report, "run", lambda *args: seen.append(args) or "report: fake")
    assert runner.invoke(app, ["report", "-p", "params.yaml"]).exit_code == 0
    params, params_file = seen[-1]
    assert isinstance(params, Params) and params_file == Path("params.yaml")


def test_bug_keeps_its_traceback(in_tmp, monkeypatch):
    from stages import embed

    write_params(in_tmp / "params.yaml")
    monkeypatch.setattr(embed, "run", lambda *args: 1 / 0)
    result = runner.invoke(app, ["embed"])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_train_relaunches_under_torchrun(in_tmp, monkeypatch):
    write_params(in_tmp / "params.yaml", {"train": {"nproc_per_node": 2}})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 3)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 3  # torchrun's exit code
    assert "--nproc_per_node=2" in calls[0]
    assert calls[0][-3:] == ["train", "--params", "params.yaml"]


def block_of(text: str, stage: str) -> str:
    """The lines of `stage`'s block in dvc.yaml `text` (header to the blank line after it)."""
    start = text.index(f"\n  {stage}:\n") + 1
    return text[start : text.index("\n\n", start) + 1]


def test_dvc_yaml_writes_a_dropped_block_back_in_pipeline_order(tmp_path):
    text = pipeline.sync_dvc_yaml((ROOT / "dvc.yaml").read_text())
    path = tmp_path / "dvc.yaml"
    path.write_text(text.replace(block_of(text, "explain") + "\n", ""))
    fixed = runner.invoke(app, ["dvc-yaml", "--path", str(path)])
    assert fixed.exit_code == 0, fixed.output
    written = path.read_text()
    stages = yaml.safe_load(written)["stages"]
    assert list(stages) == list(pipeline.STAGES)  # between embed and report
    explain = stages["explain"]
    assert explain["cmd"] == "python -m stages explain"
    code = [str(f) for f in pipeline.code_files("stages.explain")]
    assert explain["deps"] == [*code, "data/processed", "models/model.pt"]
    assert explain["params"] == pipeline.stage_params("explain")
    assert explain["metrics"] == [{"metrics/explain.json": {"cache": False}}]
    assert explain["plots"] == [{"plots/explain": {"cache": False}}]
    assert "outs" not in explain  # run() takes no detail file: added by hand
    unchanged = text.replace(block_of(text, "explain") + "\n", "")
    assert written.replace(block_of(written, "explain") + "\n", "") == unchanged
    assert pipeline.sync_dvc_yaml(written) == written  # the hand-kept parts are kept from now
    assert runner.invoke(app, ["dvc-yaml", "--check", "--path", str(path)]).exit_code == 0


AUDIT = '''"""audit stage: a tiny stage for the test."""

from pathlib import Path

from stages.lib import paths


def run(
    params,
    processed_dir: Path = paths.PROCESSED,
    model_file: Path = paths.MODEL,
    metrics_file: Path = paths.AUDIT_METRICS,
    outputs: Outputs = Outputs(),
) -> str:
    return "audit: done"


class Outputs:
    plots_dir: Path = paths.AUDIT_PLOTS
    detail_file: Path = paths.AUDIT_DETAIL
'''


@pytest.fixture
def audit_row(tmp_path, monkeypatch):
    """A new stage `audit` (module, paths, one row after explain) in a copy of the package."""
    package = tmp_path / "stages"
    (package / "lib").mkdir(parents=True)
    (package / "audit.py").write_text(AUDIT)
    shutil.copy(ROOT / "stages/lib/paths.py", package / "lib/paths.py")
    monkeypatch.setattr(paths, "AUDIT_METRICS", Path("metrics/audit.json"), raising=False)
    monkeypatch.setattr(paths, "AUDIT_PLOTS", Path("plots/audit"), raising=False)
    monkeypatch.setattr(paths, "AUDIT_DETAIL", Path("metrics/detail/audit.json"), raising=False)
    monkeypatch.setattr(pipeline, "PACKAGE_DIR", package)
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    rows = list(pipeline.STAGES.values())
    rows.insert(
        rows.index(pipeline.STAGES["explain"]) + 1, pipeline.Stage("audit", "A.", ("embed",))
    )
    monkeypatch.setattr(pipeline, "STAGES", {row.name: row for row in rows})
    pipeline.project_imports.cache_clear()
    yield
    pipeline.project_imports.cache_clear()


def test_a_new_row_gets_its_block(audit_row):
    text = (ROOT / "dvc.yaml").read_text()
    written = pipeline.add_missing_stages(text)
    keys = "".join(f"      - {k}\n" for k in pipeline.stage_params("embed"))
    block = (
        "  audit:\n"
        "    cmd: python -m stages audit\n"
        "    deps:\n"
        "      - stages/audit.py\n"
        "      - stages/lib/paths.py\n"
        "      - data/processed\n"
        "      - models/model.pt\n"
        f"    params:\n{keys}"
        "    outs:\n"
        "      - metrics/detail/audit.json\n"
        "    metrics:\n"
        "      - metrics/audit.json:\n"
        "          cache: false\n"
        "    plots:\n"
        "      - plots/audit:\n"
        "          cache: false\n"
    )
    assert block in written
    assert list(yaml.safe_load(written)["stages"])[-3:] == ["explain", "audit", "report"]
    assert written.replace(block + "\n", "", 1) == text  # nothing else changed
    assert pipeline.add_missing_stages(written) == written


def test_a_new_last_row_goes_to_the_end_of_stages(audit_row, monkeypatch):
    rows = [r for r in pipeline.STAGES.values() if r.name != "audit"]
    rows.append(pipeline.Stage("audit", "A.", ()))
    monkeypatch.setattr(pipeline, "STAGES", {row.name: row for row in rows})
    text = (ROOT / "dvc.yaml").read_text()
    written = pipeline.add_missing_stages(text)
    parsed = yaml.safe_load(written)
    assert list(parsed["stages"])[-2:] == ["report", "audit"]
    assert "params" not in parsed["stages"]["audit"]
    assert parsed["artifacts"] == yaml.safe_load(text)["artifacts"]
    assert "\n\n  audit:\n" in written and "cache: false\n\nartifacts:" in written


def overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@pytest.mark.parametrize("stage", list(pipeline.STAGES))
def test_run_paths_are_what_dvc_yaml_declares(stage):
    """What `stage_block` derives for a new stage holds for the existing ones: a run() path
    another stage produces is a dep, any other is one of the stage's outputs (dvc.yaml may
    name a file inside a folder, or the folder of a file)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    others = pipeline.declared_outputs({k: v for k, v in stages.items() if k != stage})
    own = pipeline.declared_outputs({stage: stages[stage]})
    deps = {Path(d) for d in stages[stage]["deps"]}
    for name, path in pipeline.run_paths(stage).items():
        if any(path == p or p in path.parents for p in others):
            assert any(overlaps(path, d) for d in deps), f"{stage} {name}: {path} is no dep"
        else:
            assert any(overlaps(path, o) for o in own), f"{stage} {name}: {path} is no output"
