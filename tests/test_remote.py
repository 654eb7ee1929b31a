"""A shared DVC remote on S3, for real: a moto S3 server on loopback, a bare git repository
as the shared git remote, and several clones standing in for several machines.

- `dvc push`, then a fresh clone + `dvc pull` has nothing to run;
- `dvc push --run-cache`, then another clone's `dvc exp run` of a param set run before
  restores every stage from the run-cache except train (its `persist` output, the resume
  checkpoint, keeps DVC from run-caching it) — and train, retrained, gives the same bytes;
- the pull-request workflow's shell steps, run in order, with and without the secrets;
- one queued grid split across two clones, `dvc exp push`, and a third clone that
  `dvc exp pull`s and compares all runs.

Credentials come from the environment only; a test checks none lands in the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, child_env, write_params
from tests.test_pipeline import AFTER_TRAIN, STAGES, ran

pytestmark = pytest.mark.slow
BUCKET = "lab"
REMOTE_URL = f"s3://{BUCKET}/medpipe"
SECRET = "medpipe-test-secret-key"  # must never be written into a repository
CACHED = re.compile(r"Stage '([^']+)' is cached - skipping run")


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def timed(cwd: Path, env: dict, *cmd: str) -> tuple[str, float]:
    start = time.perf_counter()
    out = sh(cwd, env, *cmd)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def s3() -> dict[str, str]:
    """A moto S3 server on 127.0.0.1 with an empty bucket; the credentials it accepts."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    creds = {
        "AWS_ACCESS_KEY_ID": "medpipe-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield {"endpoint": endpoint, **creds}
    server.stop()


def base_env() -> dict[str, str]:
    """The tests' child environment without any AWS_ variable of this machine."""
    return {k: v for k, v in child_env().items() if not k.startswith("AWS_")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, s3) -> dict:
    """The shared git remote (bare repo) and a first machine that ran the tiny pipeline on
    main and pushed code, results and data."""
    root = tmp_path_factory.mktemp("lab")
    env = {**base_env(), **{k: v for k, v in s3.items() if k.startswith("AWS_")}}
    origin = root / "origin.git"
    sh(root, env, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    work = root / "work"
    work.mkdir()
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    write_params(work / "params.yaml")
    for cmd in (
        ("git", "init", "-q", "-b", "main"),
        ("dvc", "init", "-q"),
        ("dvc", "remote", "add", "-d", "shared", REMOTE_URL),
        ("dvc", "remote", "modify", "shared", "endpointurl", s3["endpoint"]),
        ("git", "remote", "add", "origin", str(origin)),
    ):
        sh(work, env, *cmd)
    sh(work, env, "dvc", "repro")
    sh(work, env, "git", "add", "-A")
    sh(work, env, "git", "commit", "-qm", "tiny baseline")
    _, push_seconds = timed(work, env, "dvc", "push")
    sh(work, env, "git", "push", "-q", "origin", "main")
    print(f"\ndvc push of the tiny run: {push_seconds:.1f} s")
    return {"root": root, "origin": origin, "work": work, "env": env, "s3": s3}


def reset(path: Path, env: dict) -> None:
    """Back to the commit's params and outputs (`dvc exp run` leaves its own in place)."""
    sh(path, env, "git", "checkout", "-q", "--", ".")
    sh(path, env, "dvc", "checkout", "-q")


def clone(lab: dict, name: str, branch: str = "main") -> Path:
    path = lab["root"] / name
    sh(lab["root"], lab["env"], "git", "clone", "-q", "-b", branch, str(lab["origin"]), str(path))
    return path


def test_fresh_clone_pulls_everything_and_has_nothing_to_run(lab):
    env = lab["env"]
    path = clone(lab, "fresh")
    _, seconds = timed(path, env, "dvc", "pull")
    print(f"\ndvc pull into a fresh clone: {seconds:.1f} s")
    out = sh(path, env, "dvc", "repro")
    assert ran(out) == set() and "up to date" in out, out
    assert (path / "models/model.pt").stat().st_size > 1e6
    for tracked in sh(path, env, "git", "ls-files").split():  # no credential in the repo
        assert SECRET not in (path / tracked).read_text(errors="ignore"), tracked
    assert SECRET not in (path / ".dvc/config").read_text()


def test_run_cache_from_the_remote_in_another_clone(lab):
    """What `dvc push --run-cache` gives another machine. DVC transfers the run records;
    a stage is restored from them only when every output is in the remote: download (its
    data is DVC-cached) is. train never is (its `persist` resume checkpoint keeps DVC from
    run-caching it), and the stages after it write git-tracked metrics and plots
    (`cache: false`, for `dvc metrics diff`), which no push uploads: they rerun."""
    env, work = lab["env"], lab["work"]
    sh(work, env, "dvc", "exp", "run", "-S", "data.synthetic.seed=2", "download")
    sh(work, env, "dvc", "push", "--run-cache")
    reset(work, env)
    sh(work, env, "dvc", "exp", "run", "-S", "train.lr=0.005")
    sh(work, env, "dvc", "push", "--run-cache")
    model = (work / "models/model.pt").read_bytes()
    reset(work, env)
    path = clone(lab, "other-machine")
    sh(path, env, "dvc", "pull", "--run-cache")
    out = sh(path, env, "dvc", "exp", "run", "--pull", "-S", "data.synthetic.seed=2", "download")
    print(f"\nrun-cache, data.synthetic.seed=2: restored {CACHED.findall(out)}")
    assert CACHED.findall(out) == ["download"] and ran(out) == set(), out
    reset(path, env)
    out = sh(path, env, "dvc", "exp", "run", "--pull", "-S", "train.lr=0.005")
    print(f"run-cache, train.lr=0.005: ran {sorted(ran(out))}, restored {CACHED.findall(out)}")
    assert ran(out) == AFTER_TRAIN, out  # download, split, preprocess: unchanged, pulled
    assert (path / "models/model.pt").read_bytes() == model  # the same bytes, recomputed


def workflow_steps() -> list[dict]:
    workflow = yaml.safe_load((ROOT / ".github/workflows/pr.yml").read_text())
    job = workflow["jobs"]["pipeline"]
    return job["env"], job["steps"]


def expression(text: str, values: dict[str, str]) -> str:
    """GitHub's `${{ ... }}` replaced by the values a run would give."""
    return re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", lambda m: values.get(m.group(1), ""), text)


def run_workflow(path: Path, secrets: dict[str, str]) -> dict[str, str]:
    """The workflow's shell steps in order, as GitHub runs them (bash -eo pipefail), with
    `secrets`; returns each step's output by name. `uses:` steps are GitHub's (checkout,
    setup-python, the comment), and `make install` is what `make test` just did: the
    clone's .venv points at this environment instead."""
    job_env, steps = workflow_steps()
    values = {f"secrets.{k}": v for k, v in secrets.items()} | {"github.base_ref": "main"}
    env = base_env() | {k: expression(v, values) for k, v in job_env.items()}
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    os.symlink(sys.prefix, path / ".venv")
    outputs: dict[str, dict[str, str]] = {}
    logs = {}
    for step in steps:
        if "run" not in step:
            continue
        if step["run"].strip() == "make install":
            continue
        condition = step.get("if", "")
        if condition.startswith("steps."):  # e.g. steps.summary.outputs.gate != '0'
            ref, op, value = condition.split()
            _, sid, _, key = ref.split(".")
            actual = outputs.get(sid, {}).get(key, "")
            if (actual != value.strip("'")) != (op == "!="):
                continue
        output_file, summary_file = path / ".gh-output", path / ".gh-summary"
        output_file.write_text("")
        own = {k: expression(v, values) for k, v in (step.get("env") or {}).items()}
        step_env = (
            env
            | own
            | {
                "GITHUB_OUTPUT": str(output_file),
                "GITHUB_STEP_SUMMARY": str(summary_file),
            }
        )
        script = expression(step["run"], values)
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=path, env=step_env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        logs[step["name"]] = done.stdout + done.stderr
        assert done.returncode == 0, f"step {step['name']!r} failed:\n{logs[step['name']]}"
        pairs = (line.split("=", 1) for line in output_file.read_text().splitlines() if "=" in line)
        outputs[step.get("id", step["name"])] = dict(pairs)
    logs["outputs"] = outputs
    return logs


def pull_request(lab: dict, branch: str) -> None:
    """A pull request that changes only the evaluation (evaluate.bootstrap)."""
    env, work = lab["env"], lab["work"]
    sh(work, env, "git", "checkout", "-q", "-b", branch, "main")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = 30
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(work, env, "git", "commit", "-qam", "fewer resamples")
    sh(work, env, "git", "push", "-q", "origin", branch)
    sh(work, env, "git", "checkout", "-q", "main")


def test_pull_request_workflow_with_the_remote_restores_unchanged_stages(lab):
    pull_request(lab, "pr-remote")
    path = clone(lab, "ci-with-secrets", "pr-remote")
    s3 = lab["s3"]
    secrets = {
        "MEDPIPE_REMOTE_URL": REMOTE_URL,
        "MEDPIPE_REMOTE_ENDPOINT": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
    }
    logs = run_workflow(path, secrets)
    repro = next(v for k, v in logs.items() if k.startswith("Run the pipeline"))
    assert ran(repro) == {"evaluate", "report"}, repro  # the rest came from the remote
    summary = (path / "summary.md").read_text()
    assert summary.startswith("## medpipe: results against `origin/main`"), summary
    assert logs["outputs"]["summary"]["gate"] == "0"
    assert "Fail when the gate metric dropped" not in logs
    assert SECRET not in (path / ".dvc/config").read_text()  # only in config.local's absence
    assert "ci" in sh(path, lab["env"], "dvc", "remote", "list", "--local")
    # the keys reach the pull and push steps only, never the pipeline (the PR's code)
    _, steps = workflow_steps()
    for step in steps:
        keys = set(step.get("env") or {})
        assert ("AWS_SECRET_ACCESS_KEY" in keys) == ("dvc p" in step.get("run", "")), step["name"]


def test_pull_request_workflow_without_secrets_computes_everything(lab):
    pull_request(lab, "pr-fork")
    path = clone(lab, "ci-without-secrets", "pr-fork")
    logs = run_workflow(path, {})
    repro = next(v for k, v in logs.items() if k.startswith("Run the pipeline"))
    # everything is computed; embed's outputs are all git-tracked, so once the retrained
    # model comes out byte-identical, its inputs and outputs match dvc.lock and DVC skips it
    assert set(STAGES) - {"embed"} <= ran(repro), repro
    pull = next(v for k, v in logs.items() if k.startswith("Pull from"))
    assert "no MEDPIPE_REMOTE_URL secret" in pull
    assert (path / "summary.md").read_text().startswith("## medpipe")


def test_a_grid_split_across_two_machines_is_compared_on_a_third(lab):
    env = lab["env"]
    # none equal to the default lr: an experiment identical to main's run is no new run
    for machine, lrs in (("machine-1", "0.0005"), ("machine-2", "0.01")):
        path = clone(lab, machine)
        sh(path, env, "dvc", "pull", "--run-cache")
        sh(path, env, "dvc", "exp", "run", "--queue", "-S", f"train.lr={lrs}")
        sh(path, env, "dvc", "exp", "run", "--run-all", "-j", "1")
        sh(path, env, "dvc", "exp", "push", "origin")
    path = clone(lab, "machine-3")
    sh(path, env, "dvc", "exp", "pull", "origin")
    shown = json.loads(sh(path, env, "dvc", "exp", "show", "--json"))
    runs = [e["revs"][0] for commit in shown for e in commit.get("experiments") or []]
    lrs = {r["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for r in runs}
    assert lrs == {0.0005, 0.01}, lrs
    out = sh(path, env, "medpipe", "compare", "--out", "compare.html", "--param", "train.lr")
    assert re.search(r"^compare: 3 runs", out, re.M), out  # the grid and main's own run
    page = (path / "compare.html").read_text()
    for lr in ("0.0005", "0.01"):
        assert f"<td>{lr}</td>" in page, lr
    # the pulled experiments' outputs came too: one is checked out without computing
    sh(path, env, "dvc", "exp", "apply", runs[0].get("name") or runs[0]["rev"])
    assert (path / "models/model.pt").stat().st_size > 1e6
