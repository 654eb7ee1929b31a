"""Fault handling, one test per case of the fault-handling issue: every OS and input failure
ends in one clear line, nothing left behind blocks the next run, concurrent runs cannot mix.
Real files and real processes (`medpipe` as a user runs it)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages import download
from stages.lib.params import DataParams
from tests.conftest import BIN, ROOT, merge, write_params
from tests.test_fetch import make_zip, png_bytes, site, url_params  # noqa: F401 (fixture)
from tests.test_predict import checkpoint, chest, write_dicom  # noqa: F401 (fixture)
from tests.test_train import TRAIN_OVERRIDE, write_processed

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def medpipe(root: Path, env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [f"{BIN}/medpipe", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The failure as a user sees it: exit 1 and exactly one `error:` line, no traceback."""
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def split_project(tmp_path_factory, subprocess_env_module) -> Path:
    """A project after download and split (tiny synthetic data)."""
    root = tmp_path_factory.mktemp("project")
    write_params(root / "params.yaml")
    for stage in ("download", "split"):
        done = medpipe(root, subprocess_env_module, stage)
        assert done.returncode == 0, done.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def subprocess_env_module() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def project(split_project, tmp_path) -> Path:
    root = tmp_path / "p"
    shutil.copytree(split_project, root)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# 1 -------------------------------------------------------------------------------------
def test_leftovers_of_an_atomic_swap_never_block_a_stage(project, subprocess_env_module):
    env = subprocess_env_module
    (project / "data/processed").write_text("x")  # a file where the output folder goes
    assert medpipe(project, env, "preprocess").returncode == 0
    assert (project / "data/processed").is_dir()
    assert not (project / "data/.processed.old").exists()
    old = project / "data/.processed.old"  # what a kill during the swap leaves: a file ...
    old.write_text("x")
    assert medpipe(project, env, "preprocess").returncode == 0 and not old.exists()
    old.mkdir()  # ... or a read-only folder with files in it
    (old / "train_images.npy").write_bytes(b"stale")
    old.chmod(0o555)
    done = medpipe(project, env, "preprocess")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not old.exists() and (project / "data/processed/train_images.npy").stat().st_size > 5


# 2 -------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(folder: Path, size_kb: int, read_only: bool = False) -> Iterator[None]:
    """`folder` on a tmpfs of `size_kb` (root only), keeping its files; unmounted after."""
    saved = folder.with_name(folder.name + ".saved")
    shutil.copytree(folder, saved)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", folder])
    if done.returncode != 0:
        shutil.rmtree(saved)
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
        shutil.rmtree(saved)


def test_os_errors_are_one_line_naming_path_and_cause(project, subprocess_env_module, tmp_path):
    env = subprocess_env_module
    data = project / "data"
    before = snapshot(data)
    # a read-only data/ (a tmpfs remounted read-only as root, file modes otherwise)
    if IS_ROOT:
        with small_filesystem(data, 16384, read_only=True):
            line = one_error_line(medpipe(project, env, "split"))
        assert line.endswith("data/split: Read-only file system"), line
    else:
        data.chmod(0o555)
        try:
            line = one_error_line(medpipe(project, env, "split"))
        finally:
            data.chmod(0o755)
        assert line.endswith("data/split: Permission denied"), line
    assert snapshot(data) == before  # previous outputs intact
    # a full disk (a tiny tmpfs as root; a file-size limit otherwise: the same OS error path)
    if IS_ROOT:
        used = sum(len(b) for b in before.values()) // 1024
        with small_filesystem(data, used + 24):
            filler = data / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * (1 << 24))  # fill what is left
            line = one_error_line(medpipe(project, env, "split"))
            filler.unlink()
        assert "No space left on device" in line and line.startswith("error: data/"), line
    else:
        import resource

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

        line = one_error_line(medpipe(project, env, "split", preexec_fn=limit))
        assert "File too large" in line and line.startswith("error: data/"), line
    assert snapshot(data) == before
    # `data` being a file
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(project / "params.yaml", fresh / "params.yaml")
    (fresh / "data").write_text("not a folder")
    line = one_error_line(medpipe(fresh, env, "download"))
    assert line == "error: data/raw: data is a file, not a folder (move or delete it)", line


def test_programming_errors_keep_their_traceback(project, subprocess_env_module):
    """A KeyError from our own code is a bug, not an input error: the traceback stays."""
    manifest = project / "data/raw/manifest.csv"
    card = project / "data/raw/dataset.json"
    card.write_text(card.read_text().replace('"classes"', '"klasses"'))
    done = medpipe(project, subprocess_env_module, "split")
    assert done.returncode != 0 and "KeyError" in done.stderr and manifest.exists()
    assert "Traceback" in done.stderr


# 3 and 4 -------------------------------------------------------------------------------
def train_project(root: Path, epochs: int) -> Path:
    write_processed(root, ["a", "b"], n=96)
    run = {"train": {"epochs": epochs, "patience": epochs}}
    write_params(root / "params.yaml", merge(TRAIN_OVERRIDE, run))
    return root


def start_train(root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [f"{BIN}/medpipe", "train"],
        cwd=root,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert predicate(), "the run ended before the moment the test needs"


def test_killed_train_leaves_nothing_that_survives_the_next_run(tmp_path, subprocess_env_module):
    root, env = train_project(tmp_path, 4), subprocess_env_module
    proc = start_train(root, env)
    wait_for(lambda: (root / "models/last.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    leftovers = list((root / "plots").glob(".train.*.tmp"))
    assert leftovers, "the kill left no temporary folder: nothing to test"
    # the project's .gitignore hides such leftovers from `git status` (a copy of their
    # names in a scratch repository: DVCLive would set up DVC in a git repository here)
    scratch = root.parent / "scratch"
    for path in leftovers:
        name = scratch / path.relative_to(root) / "history.csv"
        name.parent.mkdir(parents=True)
        name.write_text("x")
    shutil.copy(ROOT / ".gitignore", scratch / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=scratch, check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=scratch,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.strip() == "?? .gitignore", status.stdout
    done = medpipe(root, env, "train")
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((root / "plots").glob(".*.tmp")) == []
    assert list((root / "models").glob(".*.tmp")) == []


def test_a_second_train_in_the_same_workspace_is_refused(tmp_path, subprocess_env_module):
    root, env = train_project(tmp_path, 25), subprocess_env_module
    first = start_train(root, env)
    lock = root / ".medpipe/locks/train.lock"
    wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), first)
    second = medpipe(root, env, "train")
    line = one_error_line(second)
    assert f"another `medpipe train` is running in this workspace (pid {first.pid}" in line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert (root / "models/model.pt").exists()
    history = pd.read_csv(root / "plots/train/history.csv")
    assert len(history) == 25  # one run's outputs, whole
    assert medpipe(root, env, "train").returncode == 0  # the lock is free again


# 5 -------------------------------------------------------------------------------------
def test_predict_finds_dicom_by_content_and_lists_every_skipped_file(checkpoint, tmp_path):  # noqa: F811
    from stages.tools import predict

    folder = tmp_path / "scans"
    folder.mkdir()
    write_dicom(folder / "IM000001", chest(0))  # no suffix, as PACS exports often are
    write_dicom(folder / "IM000002", chest(1))
    (folder / "DICOMDIR.txt").write_text("an index, not an image")
    out = tmp_path / "p.csv"
    summary = predict.run([str(folder)], checkpoint, out)
    assert [Path(p).name for p in pd.read_csv(out)["path"]] == ["IM000001", "IM000002"]
    assert "2 image(s)" in summary and "1 skipped" in summary
    assert "DICOMDIR.txt (not an image" in summary
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files in this folder"):
        predict.run([str(only_text)], checkpoint, out)


# 6 -------------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_messages_say_what_the_file_is(checkpoint, tmp_path, subprocess_env_module):  # noqa: F811
    from stages.lib.checkpoint import load_checkpoint

    tampered = tmp_path / "tampered.pt"  # a checkpoint whose pickle would run a command
    torch.save({"format": 1, "state_dict": {}, "meta": Payload()}, tampered)
    raw = tmp_path / "raw.pkl"  # a bare pickle (protocol 4) of the same
    raw.write_bytes(pickle.dumps(Payload(), protocol=4))
    for path, reason in ((tampered, "asks to import posix.system"), (raw, "more than weights")):
        with pytest.raises(ValueError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert reason in message and "never running code from the file" in message, message
        assert "weights_only" not in message  # the wrong advice for an untrusted file

    scripted = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.rand(1, 2)), str(scripted))
    with pytest.raises(ValueError, match="a TorchScript file"):
        load_checkpoint(scripted)

    plain = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match=r"a plain state dict .* model\.weights"):
        load_checkpoint(plain)

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    done = medpipe(tmp_path, subprocess_env_module, "predict", str(image), "--model", str(plain))
    line = one_error_line(done)
    assert "a plain state dict" in line and "'meta'" not in line


# 7 -------------------------------------------------------------------------------------
def test_csv_patient_ids_written_as_nan_count_as_missing(tmp_path):
    rows = []
    for i, patient in enumerate(["p1", "p1", "p2", "NaN", "nan", "NA", "", "p3"]):
        name = f"{i}.png"
        Image.fromarray(np.full((24, 24), 40 * i % 256, np.uint8)).save(tmp_path / name)
        rows.append({"image": name, "label": "ab"[i % 2], "patient": patient})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    params = DataParams(
        source="csv",
        path=str(tmp_path / "t.csv"),
        columns={"patient_id": "patient"},
        positive_class="b",  # neither a nor b says "normal"
    )
    line = download.run(params, tmp_path / "raw")
    assert "WARNING: 4 image(s) without a patient id count as their own patient" in line
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    ids = manifest.set_index("image")["patient_id"]
    assert ids["images.zip#0.png"] == ids["images.zip#1.png"] == "p1"
    missing = [ids[f"images.zip#{i}.png"] for i in (3, 4, 5, 6)]
    assert all(p.startswith("image:") for p in missing) and len(set(missing)) == 4


# 8 -------------------------------------------------------------------------------------
def test_an_empty_params_file_is_refused(tmp_path, subprocess_env_module):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    done = medpipe(tmp_path, subprocess_env_module, "split", "--params", "empty.yaml")
    assert done.returncode == 2
    assert "empty.yaml: the params file is empty; expected the sections data, split" in done.stderr


# 9 -------------------------------------------------------------------------------------
def test_a_wrong_sha256_fails_after_one_download(site, tmp_path):  # noqa: F811
    params = url_params(site, tmp_path, make_zip({"a/x.png": png_bytes(0)}), "a.zip")
    params = params.model_copy(update={"retries": 3})
    body = make_zip({"a/x.png": png_bytes(1)})  # the file changed since the hash was taken
    site.files["/lab/a.zip"] = body
    with pytest.raises(ValueError) as err:
        download.run(params, tmp_path / "raw")
    assert site.hits["/lab/a.zip"] == 1  # a hash mismatch is not a network error
    assert params.sha256 in str(err.value)
    assert hashlib.sha256(body).hexdigest() in str(err.value)


# 10 ------------------------------------------------------------------------------------
def test_empty_class_folders_and_links_leaving_the_tree_are_reported(tmp_path):
    root = tmp_path / "xray"
    for label in ("NORMAL", "PNEUMONIA"):
        for i in range(3):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, 24), 30 * i, np.uint8)).save(root / label / f"{i}.png")
    (root / "COVID").mkdir()  # empty: no class
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.full((24, 24), 200, np.uint8)).save(outside)
    (root / "NORMAL" / "link.png").symlink_to(outside)
    params = DataParams(source="folder", path=str(root))
    line = download.run(params, tmp_path / "raw")
    assert "NOTE: 1 empty folder(s) ignored: COVID" in line
    assert "1 rejected" in line
    rejected = pd.read_csv(tmp_path / "raw/rejected.csv")
    assert rejected["path"].tolist() == ["NORMAL/link.png"]
    assert "outside" in rejected["reason"][0] and "data.follow_links" in rejected["reason"][0]
    followed = params.model_copy(update={"follow_links": True})
    line = download.run(followed, tmp_path / "raw2")
    assert "rejected" not in line and "7 images" in line


# Round 3 ===============================================================================
def error_lines_stand_alone(stderr: str) -> None:
    """Every `error:` starts a line of its own (never glued to a progress bar's end)."""
    for line in stderr.split("\n"):
        assert "error: " not in line or line.startswith("error: "), repr(line[-300:])


def file_size_limit(limit: int):
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# R3.1 ----------------------------------------------------------------------------------
def test_a_full_disk_during_train_is_one_line_and_keeps_the_model(tmp_path, subprocess_env_module):
    root, env = train_project(tmp_path, 2), subprocess_env_module
    done = medpipe(root, env, "train")
    assert done.returncode == 0, done.stderr[-2000:]
    model = (root / "models/model.pt").read_bytes()
    write_params(root / "params.yaml", merge(TRAIN_OVERRIDE, {"train": {"epochs": 3}}))
    # the per-epoch resume checkpoint (weights + optimiser state) cannot be written whole
    done = medpipe(root, env, "train", preexec_fn=file_size_limit(len(model) // 2))
    assert one_error_line(done) == "error: models/last.pt: File too large"
    error_lines_stand_alone(done.stderr)
    assert (root / "models/model.pt").read_bytes() == model
    assert list((root / "models").glob(".*.tmp")) == []


# R3.2 ----------------------------------------------------------------------------------
def test_predict_says_what_a_file_that_is_not_a_checkpoint_is(tmp_path, subprocess_env_module):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    (tmp_path / "notes.pt").write_text("trained on the March data\nlr 0.001\n")
    (tmp_path / "blob.pt").write_bytes(b"\x00\x01\xfe" * 100)
    expected = {
        "/etc/passwd": "a text file",
        "notes.pt": "a text file",
        "blob.pt": "a binary file of another format",
        "x.png": "a PNG image",
    }
    for model, what in expected.items():
        done = medpipe(tmp_path, subprocess_env_module, "predict", "x.png", "--model", model)
        line = one_error_line(done)
        assert line.startswith(f"error: {model}: {what}, not a checkpoint"), line
        assert "`medpipe train` writes" in line, line


# R3.3 ----------------------------------------------------------------------------------
def test_a_params_file_that_is_not_utf8_is_named(tmp_path, subprocess_env_module):
    env = subprocess_env_module
    (tmp_path / "bad.yaml").write_bytes(b"data:\n  source: synth\xe9tic\n\xff\xfe" * 20)
    for stage in ("download", "train", "report"):
        done = medpipe(tmp_path, env, stage, "--params", "bad.yaml")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "error: bad.yaml: not UTF-8 text (byte 0xe9 at offset 21)" in done.stderr
    (tmp_path / "params.yaml").write_bytes((tmp_path / "bad.yaml").read_bytes())
    done = medpipe(tmp_path, env, "recipe", "apply", "003-cxr-pneumonia", "-S", "data.path=.")
    line = one_error_line(done)
    assert line.startswith("error: params.yaml: not UTF-8 text"), line
    assert "move it away" in line
    assert (tmp_path / "params.yaml").read_bytes() == (tmp_path / "bad.yaml").read_bytes()


# R3.4 ----------------------------------------------------------------------------------
def test_comparison_tools_outside_git_say_so_and_leave_no_clone(tmp_path, subprocess_env_module):
    import tempfile

    env = subprocess_env_module
    clones = lambda: set(Path(tempfile.gettempdir()).glob("tmp*dvc-clone"))  # noqa: E731
    before = clones()
    folder = tmp_path / "plain"
    folder.mkdir()
    write_params(folder / "params.yaml")
    for args in (["compare"], ["diff", "main"], ["pr-summary"]):
        line = one_error_line(medpipe(folder, env, *args))
        assert f"{folder}: not a git repository; `medpipe {args[0]}`" in line, line
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([f"{BIN}/dvc", "init", "-q"], cwd=folder, check=True)
    for args in (["compare"], ["diff", "main"], ["pr-summary"]):
        line = one_error_line(medpipe(folder, env, *args))
        assert "the git repository has no commits yet" in line, line
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x"]
    subprocess.run([*git, "add", "-A"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=folder, check=True)
    line = one_error_line(medpipe(folder, env, "diff", "mian"))
    assert line.startswith("error: 'mian': no such git revision"), line
    assert clones() <= before


# R3.5 ----------------------------------------------------------------------------------
def test_a_training_split_without_a_class_is_refused(tmp_path, subprocess_env_module):
    env = subprocess_env_module
    greedy = {"split": {"val": 0.49, "test": 0.49, "strategy": "patient"}}
    synthetic = {"data": {"synthetic": {"test_site": None, "seed": 0}}}  # 60 patients
    write_params(tmp_path / "params.yaml", merge(synthetic, greedy))
    assert medpipe(tmp_path, env, "download").returncode == 0
    line = one_error_line(medpipe(tmp_path, env, "split"))
    assert line.startswith("error: split: the train split has no image of class"), line
    assert "the model could never learn it" in line and "now 0.49/0.49" in line, line
    assert not (tmp_path / "data/split").exists()


def test_a_val_or_test_split_without_a_class_is_a_warning_with_numbers():
    from stages.split import describe_gaps, missing_classes

    counts = {"train": {"a": 5, "b": 3}, "val": {"a": 2, "b": 0}, "test": {"a": 1, "b": 1}}
    report = {s: {"class_counts": c} for s, c in counts.items()}
    gaps = missing_classes(report, ["a", "b"])
    assert gaps == {"train": [], "val": ["b"], "test": []}
    assert describe_gaps(report, gaps["val"]) == "class 'b' (3 in train, 1 in test)"


# R3.6 ----------------------------------------------------------------------------------
def test_a_killed_download_leaves_nothing_a_later_run_keeps(site, tmp_path, subprocess_env_module):  # noqa: F811
    images = {f"normal/{i}.png": png_bytes(i) for i in range(3)}
    body = make_zip(images | {"tumor/x.png": png_bytes(9)})
    params = url_params(site, tmp_path, body, "set.zip")
    write_params(tmp_path / "params.yaml", {"data": params.model_dump(mode="json")})
    cache = tmp_path / "cache"
    site.plan["/lab/set.zip"] = ["stall"]
    proc = subprocess.Popen(
        [f"{BIN}/medpipe", "download"],
        cwd=tmp_path,
        env=subprocess_env_module,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = lambda: [p for p in cache.rglob("tmp*") if p.is_file()]  # noqa: E731
    try:
        wait_for(lambda: site.hits["/lab/set.zip"] == 1 and partial(), proc)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1][-2000:]) from None
    proc.kill()
    proc.wait(timeout=60)
    assert partial(), "the kill left no partial download: nothing to test"
    done = medpipe(tmp_path, subprocess_env_module, "download")
    assert done.returncode == 0, done.stderr[-2000:]
    assert partial() == [] and "4 images" in done.stdout


# R3.7 ----------------------------------------------------------------------------------
def test_predict_with_an_onnx_export_says_so(tmp_path, subprocess_env_module):
    import onnx
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [value("x")], [value("y")]
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    line = one_error_line(
        medpipe(tmp_path, subprocess_env_module, "predict", "x.png", "--model", "model.onnx")
    )
    assert line.startswith("error: model.onnx: an ONNX export"), line
    assert "onnxruntime.InferenceSession" in line and "could run code" not in line


# R3.8 ----------------------------------------------------------------------------------
def test_messages_name_the_right_thing_on_a_line_of_their_own(
    site,  # noqa: F811
    project,
    tmp_path,
    subprocess_env_module,
):
    env = subprocess_env_module
    # a folder given as the params file
    done = medpipe(tmp_path, env, "split", "--params", str(tmp_path))
    assert done.returncode == 2
    assert f"error: {tmp_path}: a folder, not a params file" in done.stderr
    # recipe apply when params.yaml is a folder: named, never a temporary file
    where = tmp_path / "recipe"
    (where / "params.yaml").mkdir(parents=True)
    line = one_error_line(
        medpipe(where, env, "recipe", "apply", "003-cxr-pneumonia", "-S", "data.path=.")
    )
    assert line.startswith("error: params.yaml: a folder, not a params file"), line
    assert ".tmp" not in line
    # a plain pickle as the model: the error alone, no torch warning before it
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=4))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    done = medpipe(tmp_path, env, "predict", "x.png", "--model", "plain.pkl")
    one_error_line(done)
    assert "Warning" not in done.stderr, done.stderr
    # a truncated download and a full disk in preprocess, after their progress bars
    body = make_zip({f"a/{i}.png": png_bytes(i) for i in range(2)} | {"b/x.png": png_bytes(9)})
    params = url_params(site, tmp_path, body, "t.zip")
    fetch_root = tmp_path / "fetch"
    fetch_root.mkdir()
    write_params(fetch_root / "params.yaml", {"data": params.model_dump(mode="json")})
    site.plan["/lab/t.zip"] = ["truncate"]
    done = medpipe(fetch_root, env, "download")
    assert "failed after 1 attempt" in one_error_line(done)
    error_lines_stand_alone(done.stderr)
    done = medpipe(project, env, "preprocess", preexec_fn=file_size_limit(4096))
    assert "File too large" in one_error_line(done)
    assert "%|" in done.stderr  # a progress bar was drawn before the error
    error_lines_stand_alone(done.stderr)


def test_the_gate_says_when_the_base_has_no_metrics():
    from stages.tools.review import Gate

    assert "None" not in Gate("f1_macro", None, 0.339, 0.01).describe(0.95)
    assert "the base has no value to compare with" in Gate("f1_macro", None, 0.339, 0.01).describe(
        0.95
    )
    assert "missing here (base 0.3390)" in Gate("f1_macro", 0.339, None, 0.01).describe(0.95)
