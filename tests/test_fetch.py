"""Downloads against a real HTTP server on 127.0.0.1, and safe archive extraction."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages import download
from stages.lib.images import read_image
from stages.lib.labels import encode_labels
from stages.lib.params import DataParams, ParamsError, parse_params
from stages.lib.sources import archives, medmnist, remote
from tests.datasets import medmnist_arrays, write_npz


class Site:
    """What the test server serves: files by path, and a plan of failures per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: dict[str, list] = {}  # path -> behaviours for the next requests
        self.hits: Counter = Counter()
        self.url = ""
        self.release = threading.Event()  # ends "stall" transfers


@pytest.fixture
def site():
    state = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            state.hits[path] += 1
            plan = state.plan.get(path) or []
            behaviour = plan.pop(0) if plan else "ok"
            body = state.files.get(path)
            if body is None or behaviour == 404:
                self.send_error(404)
                return
            if behaviour == 500:
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if behaviour == "truncate":  # announce everything, send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            if behaviour == "stall":  # send half, then hold the connection open
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                state.release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve_medmnist(site, tmp_path, monkeypatch, flag, kind="gray", size=28, patch_md5=True):
    arrays = medmnist_arrays(kind, size=size)
    body = write_npz(tmp_path / "served.npz", arrays)
    url, _ = medmnist.medmnist_source(flag, size)
    path = urlsplit(url).path
    site.files[path] = body
    if patch_md5:  # our file stands in for the real one: INFO must expect its hash
        key = "MD5" if size == 28 else f"MD5_{size}"
        monkeypatch.setitem(medmnist.medmnist_info()[flag], key, md5(body))
    return arrays, body, path


def medmnist_params(site, tmp_path, flag, size=28, retries=0):
    return DataParams(
        source="medmnist",
        flag=flag,
        size=size,
        mirror=site.url,
        cache=str(tmp_path / "cache"),
        retries=retries,
    )


def cached_files(tmp_path) -> list[Path]:
    """Files in the download cache, other than the lock downloads take turns on."""
    files = (tmp_path / "cache").rglob("*")
    return [p for p in files if p.is_file() and p.name != ".medpipe.lock"]


@pytest.mark.parametrize(
    ("flag", "kind", "size", "task", "channels"),
    [
        ("pneumoniamnist", "gray", 28, "binary", 1),
        ("bloodmnist", "rgb", 64, "multiclass", 3),
        ("chestmnist", "multilabel", 28, "multilabel", 1),
    ],
)
def test_medmnist_through_mirror(site, tmp_path, monkeypatch, flag, kind, size, task, channels):
    arrays, _, path = serve_medmnist(site, tmp_path, monkeypatch, flag, kind, size)
    params = medmnist_params(site, tmp_path, flag, size)
    line = download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    info = medmnist.medmnist_info()[flag]
    assert card["task"] == task and card["channels"] == channels and card["source"] == "medmnist"
    assert card["classes"] == [info["label"][str(i)] for i in range(len(info["label"]))]
    assert card["name"] == (flag if size == 28 else f"{flag}_{size}")
    assert manifest["source_split"].value_counts().to_dict() == {"train": 20, "test": 8, "val": 6}
    labels = np.concatenate([arrays[f"{s}_labels"] for s in ("train", "val", "test")])
    multilabel = task == "multilabel"
    encoded = encode_labels(manifest["label"], card["classes"], multilabel)
    assert np.array_equal(encoded, labels if multilabel else labels[:, 0])
    if multilabel:
        assert manifest["label"].iloc[0] == ""  # no positive label
    img = read_image(tmp_path / "raw", "source.npz#val/5")
    assert np.array_equal(img, arrays["val_images"][5])
    assert line.startswith("download: 34 images")
    # the second run uses the verified cache: no new request
    download.run(params, tmp_path / "raw")
    assert site.hits[path] == 1


def test_mirror_and_cache_from_environment(site, tmp_path, monkeypatch):
    _, body, path = serve_medmnist(site, tmp_path, monkeypatch, "pneumoniamnist")
    monkeypatch.setenv(remote.MIRROR_ENV, site.url + "/")
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "envcache"))
    params = DataParams(source="medmnist", flag="pneumoniamnist", size=28)
    download.run(params, tmp_path / "raw")
    assert site.hits[path] == 1
    assert (tmp_path / "envcache/medmnist/pneumoniamnist.npz").read_bytes() == body


def test_mirror_url_keeps_path_and_query(monkeypatch):
    monkeypatch.delenv(remote.MIRROR_ENV, raising=False)
    url = "https://zenodo.org/records/1/files/x.npz?download=1"
    assert remote.mirror_url(url, "http://10.0.0.2:8080/zenodo/") == (
        "http://10.0.0.2:8080/zenodo/records/1/files/x.npz?download=1"
    )
    assert remote.mirror_url(url, None) == url
    with pytest.raises(ValueError, match="not a base URL"):
        remote.mirror_url(url, "mirror.local")


def test_404_fails_at_once_with_a_clear_error(site, tmp_path):
    params = medmnist_params(site, tmp_path, "pneumoniamnist", retries=3)
    with pytest.raises(FileNotFoundError, match=r"HTTP 404 .*data\.flag/data\.size"):
        download.run(params, tmp_path / "raw")
    assert sum(site.hits.values()) == 1  # a client error is not retried
    assert not (tmp_path / "raw").exists()


def test_500_then_200_is_retried(site, tmp_path, monkeypatch):
    _, _, path = serve_medmnist(site, tmp_path, monkeypatch, "pneumoniamnist")
    site.plan[path] = [500]
    download.run(medmnist_params(site, tmp_path, "pneumoniamnist", retries=2), tmp_path / "raw")
    assert site.hits[path] == 2
    assert (tmp_path / "raw/manifest.csv").exists()


def test_server_error_after_all_retries(site, tmp_path, monkeypatch):
    _, _, path = serve_medmnist(site, tmp_path, monkeypatch, "pneumoniamnist")
    site.plan[path] = [500, 500]
    params = medmnist_params(site, tmp_path, "pneumoniamnist", retries=1)
    with pytest.raises(RuntimeError, match=r"failed after 2 attempt\(s\).*500"):
        download.run(params, tmp_path / "raw")
    assert site.hits[path] == 2 and cached_files(tmp_path) == []


def test_wrong_checksum_names_both_hashes_and_leaves_nothing(site, tmp_path, monkeypatch):
    _, body, path = serve_medmnist(site, tmp_path, monkeypatch, "pneumoniamnist", patch_md5=False)
    expected = medmnist.medmnist_info()["pneumoniamnist"]["MD5"]
    params = medmnist_params(site, tmp_path, "pneumoniamnist")
    with pytest.raises(ValueError) as err:
        download.run(params, tmp_path / "raw")
    assert expected in str(err.value) and md5(body) in str(err.value)
    assert cached_files(tmp_path) == []  # no file, not even a temporary one
    with pytest.raises(ValueError, match=md5(body)):  # a rerun downloads and checks again
        download.run(params, tmp_path / "raw")
    assert site.hits[path] == 2


def test_interrupted_transfer_is_not_taken_for_complete(site, tmp_path, monkeypatch):
    _, body, path = serve_medmnist(site, tmp_path, monkeypatch, "pneumoniamnist")
    site.plan[path] = ["truncate", "truncate"]
    params = medmnist_params(site, tmp_path, "pneumoniamnist", retries=1)
    with pytest.raises((RuntimeError, ValueError), match="failed after 2 attempt"):
        download.run(params, tmp_path / "raw")
    assert cached_files(tmp_path) == [] and not (tmp_path / "raw").exists()
    site.plan[path] = ["truncate"]  # one broken transfer, then a good one
    download.run(params, tmp_path / "raw")
    assert (tmp_path / "cache/medmnist/pneumoniamnist.npz").read_bytes() == body
    assert site.hits[path] == 4


def test_medmnist_flag_is_validated_against_info():
    with pytest.raises(ParamsError, match=r"needs data\.flag, one of .*pneumoniamnist"):
        parse_params({"data": {"source": "medmnist", "flag": "organmnist3d"}})
    with pytest.raises(ParamsError, match=r"needs data\.flag"):
        parse_params({"data": {"source": "medmnist"}})
    flags = medmnist.medmnist_flags()
    assert "chestmnist" in flags and "nodulemnist3d" not in flags


# --- url source and archive safety -------------------------------------------------------


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    img = np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(img).save(buffer, "PNG")
    return buffer.getvalue()


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # symlink mode bits
            zf.writestr(info, target)
    return buffer.getvalue()


def url_params(site, tmp_path, body: bytes, name: str, **extra) -> DataParams:
    site.files[f"/lab/{name}"] = body
    return DataParams(
        source="url",
        url=f"https://data.example.org/lab/{name}",
        sha256=hashlib.sha256(body).hexdigest(),
        mirror=site.url,
        cache=str(tmp_path / "cache"),
        retries=0,
        **extra,
    )


def test_url_tar_gz_read_as_folder(site, tmp_path):
    members = [
        file_member(f"chest_xray/train/{cls}/person{i}_{cls}.png", png_bytes(10 * k + i))
        for k, cls in enumerate(("NORMAL", "PNEUMONIA"))
        for i in range(4)
    ]
    members += [
        file_member(f"chest_xray/test/{cls}/x{cls}.png", png_bytes(k + 99))
        for k, cls in enumerate(("NORMAL", "PNEUMONIA"))
    ]
    members.append(link_member("chest_xray/train/NORMAL/copy.png", "person0_NORMAL.png"))
    params = url_params(
        site, tmp_path, make_tar(members), "xray.tar.gz", patient_regex=r"(person\d+)_"
    )
    line = download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    assert card["source"] == "url" and card["sha256"] == params.sha256 and card["name"] == "xray"
    assert card["classes"] == ["NORMAL", "PNEUMONIA"] and len(manifest) == 11
    assert set(manifest["source_split"]) == {"train", "test"}
    assert "images.zip#train/NORMAL/copy.png" in set(manifest["image"])  # in-archive link
    extracted = tmp_path / "cache/extracted" / params.sha256[:16]
    assert not any(p.is_symlink() for p in extracted.rglob("*"))  # links became copies
    assert "3 image(s) without a patient id" in line  # test files and the copy: no match


def test_url_zip_with_csv(site, tmp_path):
    files = {f"set/img/{i}.png": png_bytes(i) for i in range(4)}
    files["set/labels.csv"] = "image,label\n" + "".join(
        f"img/{i}.png,{('normal', 'lesion')[i % 2]}\n" for i in range(4)
    )
    params = url_params(site, tmp_path, make_zip(files), "set.zip", path="set/labels.csv")
    download.run(params, tmp_path / "raw")
    manifest = pd.read_csv(tmp_path / "raw/manifest.csv", dtype=str, keep_default_na=False)
    assert manifest["image"].tolist() == [f"images.zip#img/{i}.png" for i in range(4)]
    assert manifest["label"].tolist() == ["normal", "lesion", "normal", "lesion"]
    card = json.loads((tmp_path / "raw/dataset.json").read_text())
    assert card["positive_class"] == "lesion"  # the other one is normal


def test_url_wrong_sha256_is_refused(site, tmp_path):
    params = url_params(site, tmp_path, make_zip({"a/x.png": png_bytes(0)}), "a.zip")
    site.files["/lab/a.zip"] = make_zip({"a/x.png": png_bytes(1)})  # the file changed
    with pytest.raises(ValueError, match=params.sha256):
        download.run(params, tmp_path / "raw")
    assert cached_files(tmp_path) == []


def test_sha256_is_required_for_url():
    with pytest.raises(ParamsError, match=r"needs data\.url and data\.sha256"):
        parse_params({"data": {"source": "url", "url": "https://x.org/a.zip"}})
    with pytest.raises(ParamsError, match="64 hexadecimal digits"):
        parse_params({"data": {"source": "url", "url": "https://x.org/a.zip", "sha256": "abc"}})


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (make_zip({"ok/a.png": b"x", "../evil.txt": b"owned"}), "'..'"),
        (make_zip({"/tmp/evil.txt": b"owned"}), "absolute path"),
        (make_zip({"ok/a.png": b"x"}, {"ok/link": "../../evil.txt"}), "leaves the archive"),
        (make_tar([file_member("a/../../evil.txt", b"owned")]), "'..'"),
        (make_tar([link_member("a/link", "/etc/passwd")]), "leaves the archive"),
        (make_tar([link_member("a/link", "../../../evil.txt")]), "leaves the archive"),
        (make_tar([link_member("a/hard", "../evil.txt", hard=True)]), "leaves the archive"),
    ],
    ids=[
        "zip-slip",
        "zip-absolute",
        "zip-symlink",
        "tar-slip",
        "tar-abs-link",
        "tar-symlink",
        "tar-hardlink",
    ],
)
def test_unsafe_archives_are_refused_and_nothing_is_written(tmp_path, archive, message):
    (tmp_path / "archive").write_bytes(archive)
    target = tmp_path / "cache/extracted/abc"
    with pytest.raises(ValueError, match=message):
        archives.extract_archive(tmp_path / "archive", target, max_bytes=1e9)
    assert tree(tmp_path) == {"archive", "cache", "cache/extracted"}


def test_special_files_and_oversized_archives_are_refused(tmp_path):
    fifo = tarfile.TarInfo("a/pipe")
    fifo.type = tarfile.FIFOTYPE
    (tmp_path / "fifo.tar").write_bytes(make_tar([(fifo, None)], gz=False))
    with pytest.raises(ValueError, match="special file"):
        archives.extract_archive(tmp_path / "fifo.tar", tmp_path / "out", 1e9)
    (tmp_path / "big.zip").write_bytes(make_zip({"a/big.bin": bytes(2_000_000)}))
    with pytest.raises(ValueError, match=r"data\.max_extract_mb"):
        archives.extract_archive(tmp_path / "big.zip", tmp_path / "out", 1e6)
    assert not (tmp_path / "out").exists()


def test_url_source_surfaces_unsafe_archive(site, tmp_path):
    archive = make_zip({"x/a.png": png_bytes(0), "../evil.png": png_bytes(1)})
    params = url_params(site, tmp_path, archive, "bad.zip")
    with pytest.raises(ValueError, match=r"archive member '\.\./evil\.png'"):
        download.run(params, tmp_path / "raw")
    assert not list(tmp_path.rglob("evil.png")) and not (tmp_path / "raw").exists()
