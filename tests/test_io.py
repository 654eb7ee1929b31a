import pickle
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.lib import images, io
from stages.lib.labels import count_classes
from tests.datasets import gradient, make_dicom, write_image_zoo


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert io.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "d"
    with io.atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("x")
    with pytest.raises(RuntimeError), io.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("y")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with io.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_read_image_references(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    io.save_npz(tmp_path / "arr.npz", {"img1": gray, "train_images": np.stack([gray, gray + 1])})
    assert np.array_equal(images.read_image(tmp_path, "a.png"), gray)
    assert np.array_equal(images.read_image(tmp_path, "arr.npz#img1"), gray)
    assert np.array_equal(images.read_image(tmp_path, "arr.npz#train/1"), gray + 1)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        images.read_image(tmp_path, "missing.png")


def test_read_csv_names_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['patient_id'\]"):
        io.read_csv(tmp_path / "m.csv", required=("image", "label", "patient_id"))


def test_safe_name():
    assert io.safe_name("viral") == "viral"
    assert io.safe_name("<script>alert(1)</script>") == "script_alert_1_script"


def test_image_zoo_decodes_or_names_the_reason(tmp_path):
    expected = write_image_zoo(tmp_path)
    for name, reason in expected.items():
        data = (tmp_path / name).read_bytes()
        if reason:
            with pytest.raises(images.ImageError, match=reason):
                images.decode_image(data, name)
            continue
        img = images.decode_image(data, name)
        assert img.ndim in (2, 3) and min(img.shape[:2]) >= 36, name
        assert img.dtype in (np.uint8, np.uint16), name
        if img.ndim == 3:
            assert img.shape[2] == 3, name  # RGBA, palette and CMYK become RGB


def test_sixteen_bit_png_and_tiff_keep_their_depth(tmp_path):
    write_image_zoo(tmp_path)
    png = images.read_image(tmp_path, "deep16.png")
    tif = images.read_image(tmp_path, "deep16.tif")
    assert png.dtype == np.uint16 and png.max() > 255 * 100
    assert np.array_equal(png, gradient(top=60000, dtype=np.uint16))
    assert np.array_equal(tif, gradient(top=40000, dtype=np.uint16)[::-1])


def test_monochrome1_dicom_is_inverted(tmp_path):
    stored = gradient(top=4000, dtype=np.uint16)  # stored values grow downwards
    make_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1")
    make_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2")
    m1, m2 = images.read_image(tmp_path, "m1.dcm"), images.read_image(tmp_path, "m2.dcm")
    assert m1.dtype == np.uint16 and m1.shape == stored.shape
    # MONOCHROME1: the lowest stored value is displayed white
    assert m1[0].mean() > 60000 and m1[-1].mean() < 5000
    assert m2[0].mean() < 5000 and m2[-1].mean() > 60000
    assert np.abs(m1.astype(int) - (65535 - m2.astype(int))).max() <= 1  # rounding


def test_dicom_window_is_applied(tmp_path):
    stored = gradient(top=4000, dtype=np.uint16)
    make_dicom(tmp_path / "w.dcm", stored, "MONOCHROME2", window=(2000, 1000))
    img = images.read_image(tmp_path, "w.dcm").astype(np.int64)
    low, high = stored < 1500, stored > 2500  # outside the window: clipped flat
    assert (img[low] == img.min()).all() and (img[high] == img.max()).all()
    inside = (stored > 1600) & (stored < 2400)
    assert len(np.unique(img[inside])) > 20  # contrast spread over the window


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(images.ImageError, match="too many pixels"):
        images.read_image(tmp_path, "big.png")


def test_zip_member_and_memory_mapped_npz_references(tmp_path):
    import zipfile

    gray = gradient()
    buffer = BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        zf.writestr("a/b c.png", buffer.getvalue())
    assert np.array_equal(images.read_image(tmp_path, "images.zip#a/b c.png"), gray)
    with pytest.raises(KeyError, match="no member"):
        images.read_image(tmp_path, "images.zip#missing.png")
    stack = np.stack([gray, gray + 1, gray + 2])
    io.save_npz(tmp_path / "m.npz", {"val_images": stack})
    assert isinstance(io.npz_array(tmp_path / "m.npz", "val_images"), np.memmap)
    assert np.array_equal(images.read_image(tmp_path, "m.npz#val/2"), gray + 2)
    io.save_npz(tmp_path / "c.npz", {"val_images": stack}, compress=True)
    assert np.array_equal(images.read_image(tmp_path, "c.npz#val/1"), gray + 1)


def test_thumbnail_ignores_size_depth_and_contrast():
    img = gradient(96, 80)
    small = np.ascontiguousarray(img[::2, ::2])
    deep = img.astype(np.uint16) * 200
    t = images.thumbnail(img)
    assert t.shape == (16, 16) and t.dtype == np.uint8 and t.min() == 0 and t.max() == 255
    for other in (small, deep, np.dstack([img] * 3)):
        assert np.sqrt(((images.thumbnail(other).astype(float) - t) ** 2).mean()) < 4


def test_count_classes_single_and_multi_label():
    labels = pd.Series(["a", "b", "a"])
    assert count_classes(labels, ["a", "b", "c"], False) == {"a": 2, "b": 1, "c": 0}
    multi = pd.Series(["a|c", "", "c"])
    assert count_classes(multi, ["a", "b", "c"], True) == {"a": 1, "b": 0, "c": 2}


def test_npy_writer_streams_rows_into_a_loadable_array(tmp_path):
    path = tmp_path / "x.npy"
    rows = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2)
    with io.npy_writer(path, (5, 3, 2)) as append:
        append(rows[:2])
        append(rows[2:])
    assert np.array_equal(np.load(path, mmap_mode="r"), rows)


def test_npy_writer_short_or_misshapen_writes_leave_no_file(tmp_path):
    path = tmp_path / "x.npy"
    with (
        pytest.raises(ValueError, match="3 rows written, 5 expected"),
        io.npy_writer(path, (5, 2)) as append,
    ):
        append(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="do not fit"), io.npy_writer(path, (5, 2)) as append:
        append(np.zeros((3, 4)))
    assert list(tmp_path.iterdir()) == []


def test_model_scored_on_other_classes_is_a_clear_error():
    model = {"classes": ["a", "b"], "task": "binary"}
    io.check_model_matches_data(model, dict(model), "data/processed")
    with pytest.raises(ValueError, match=r"classes \['b', 'a'\] differ .* rerun `medpipe train`"):
        io.check_model_matches_data(model, {"classes": ["b", "a"], "task": "binary"}, "p")


def test_a_kill_between_the_two_renames_puts_the_previous_output_back(tmp_path):
    """atomic_dir moves the old output to .<name>.old, then the new one in: a kill between
    the two leaves only .old. The next run restores it before anything else."""
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "kept.csv").write_text("previous")
    io.remove_stale(tmp_path / "out")
    assert (tmp_path / "out/kept.csv").read_text() == "previous" and not old.exists()


def test_a_broken_link_where_a_folder_goes_is_named(tmp_path):
    (tmp_path / "metrics").symlink_to(tmp_path / "unmounted")
    with pytest.raises(NotADirectoryError, match="metrics is a broken link, not a folder"):
        io.write_json(tmp_path / "metrics/x.json", {})


def mapped_mb(path: Path) -> int:
    """Resident MB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(parts[1])
    return total // 1024


def test_array_rows_read_the_same_rows_without_mapping_the_file(tmp_path):
    path = tmp_path / "images.npy"
    data = np.random.default_rng(0).integers(0, 255, (24_000, 64, 64, 1), np.uint8)
    np.save(path, data)
    images = np.asarray(np.load(path, mmap_mode="r"))  # as load_split hands it on
    rows = io.ArrayRows(images)
    assert rows.path == str(path)
    order = np.random.default_rng(1).permutation(len(data))
    for first in range(0, len(order), 512):  # a shuffled epoch
        chosen = order[first : first + 512]
        assert np.array_equal(rows.take(chosen), data[chosen])
    assert np.array_equal(rows.slice(23_990, 24_100), data[23_990:])
    if Path("/proc/self/smaps").exists():
        assert mapped_mb(path) == 0  # through the map, one shuffled batch maps ~all 94 MB
    # arrays in memory, and views that are not the whole file, are indexed as usual
    assert io.ArrayRows(data).path is None and io.ArrayRows(images[5:]).path is None
    assert np.array_equal(io.ArrayRows(images[5:]).take([0, 3]), data[[5, 8]])
    mapped = np.load(path, mmap_mode="r")  # a memmap's slices are memmaps with its offset
    assert io.ArrayRows(mapped).path == str(path) and io.ArrayRows(mapped[5:]).path is None
    assert np.array_equal(io.ArrayRows(mapped[5:]).slice(0, 2), data[5:7])
    clone = pickle.loads(pickle.dumps(rows))  # a spawned loader worker gets the path only
    assert clone.array is None and np.array_equal(clone.take([7, 2]), data[[7, 2]])


def test_array_rows_name_a_truncated_file(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((10, 4, 4, 1), np.uint8))
    rows = io.ArrayRows(np.asarray(np.load(path, mmap_mode="r")))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 40)
    with pytest.raises(OSError, match=r"images\.npy: ends before byte"):
        rows.take([9])
