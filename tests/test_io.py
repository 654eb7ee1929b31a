import numpy as np
import pytest
from PIL import Image

from stages import io


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
    assert np.array_equal(io.read_image(tmp_path, "a.png"), gray)
    assert np.array_equal(io.read_image(tmp_path, "arr.npz#img1"), gray)
    assert np.array_equal(io.read_image(tmp_path, "arr.npz#train/1"), gray + 1)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        io.read_image(tmp_path, "missing.png")


def test_read_csv_names_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['patient_id'\]"):
        io.read_csv(tmp_path / "m.csv", required=("image", "label", "patient_id"))


def test_safe_name():
    assert io.safe_name("viral") == "viral"
    assert io.safe_name("<script>alert(1)</script>") == "script_alert_1_script"
