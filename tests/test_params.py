from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.lib.params import Params, ParamsError, describe_params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_file_matches_schema_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_committed_params_file_spells_out_every_key():
    """DVC reads the keys a stage depends on from the file itself: a key the schema fills
    in silently is 'missing from params.yaml' to `dvc repro`."""

    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert keys(written) == keys(Params().model_dump(mode="json"))


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"lrr": 0.1}})
    msg = str(err.value)
    assert "train.lrr: unknown key (did you mean lr?)" in msg
    assert "batch_size" in msg and "epochs" in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="trian: unknown key"):
        parse_params({"trian": {}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
        ({"train": {"optimizer": "lion"}}, "'adamw', 'adam' or 'sgd'"),
        ({"split": {"strategy": "random"}}, "split.strategy"),
        ({"data": {"source": "npz"}}, "needs data.path"),
        ({"data": {"synthetic": {"prevalence": [1, 1]}}}, "one share per class"),
    ],
)
def test_bad_values_are_named(raw, expected):
    with pytest.raises(ParamsError, match="invalid params") as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ParamsError) as err:
        parse_params({"model": {"name": "resnet19"}})
    assert "model.name: unknown timm model 'resnet19'" in str(err.value)
    assert "resnet18" in str(err.value)


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValueError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_every_key_is_documented():
    rows = describe_params()
    assert {"train.lr", "data.synthetic.seed", "preprocess.size"} <= {k for k, _, _ in rows}
    assert all(doc for _, _, doc in rows)


def test_cli_bad_params_exits_2_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    result = CliRunner().invoke(app, ["train", "--params", str(bad)])
    assert result.exit_code == 2
    assert "train.epochz: unknown key" in result.output
    assert list(tmp_path.iterdir()) == [bad]


def test_cli_missing_params_file_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["split", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "params file not found" in result.output


def test_cli_params_lists_keys():
    result = CliRunner().invoke(app, ["params", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0
    assert "train.lr" in result.output and "Peak learning rate" in result.output


def test_timm_names_are_cached_on_disk(tmp_path, monkeypatch):
    from stages.lib import catalog as module

    monkeypatch.setenv("MEDPIPE_CACHE", str(tmp_path))
    module.timm_model_names.cache_clear()
    try:
        names = module.timm_model_names()
        cached = list(tmp_path.glob("timm-*-models.txt"))
        assert len(cached) == 1 and "resnet18" in names
        cached[0].write_text("only_this_model")  # proves the second call reads the file
        module.timm_model_names.cache_clear()
        assert module.timm_model_names() == frozenset({"only_this_model"})
    finally:
        module.timm_model_names.cache_clear()


def test_the_params_reference_page_is_current():
    """docs/params.md is `medpipe params --markdown`: regenerate it after changing the schema."""
    from stages.tools.reference import params_reference

    page = (ROOT / "docs" / "params.md").read_text()
    assert page == params_reference(), "run: medpipe params --markdown > docs/params.md"
    for key, _, _ in describe_params():
        assert f"| `{key}` |" in page
    assert "| `train.lr` | `0.001` | > 0.0 and <= 10.0 |" in page  # default and valid range
    assert "`adamw`, `adam`, `sgd`" in page
