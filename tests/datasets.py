"""Real files for the data-source tests: MedMNIST-layout .npz, image files of every kind, DICOM."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def medmnist_arrays(
    kind: str = "gray", n: tuple[int, int, int] = (20, 6, 8), size: int = 28, seed: int = 0
) -> dict[str, np.ndarray]:
    """MedMNIST layout: `{split}_images` (N, S, S[, 3]) uint8 and `{split}_labels`.

    kind: gray (binary, N x 1), rgb (8 classes, N x 1), multilabel (14 flags, N x 14).
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size, 3) if kind == "rgb" else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if kind == "multilabel":
            labels = (rng.random((count, 14)) < 0.2).astype(np.uint8)
            labels[np.arange(count), np.arange(count) % 14] = 1  # every label present
            labels[0] = 0  # a "no finding" row
        else:
            labels = (np.arange(count) % (8 if kind == "rgb" else 2)).reshape(-1, 1)
        arrays[f"{split}_labels"] = labels
    return arrays


def write_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> bytes:
    """Write arrays as .npz; return the file's bytes."""
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def gradient(h: int = 48, w: int = 40, top: int = 255, dtype: type = np.uint8) -> np.ndarray:
    """Rows brighten from 0 (top) to `top` (bottom), with texture so thumbnails differ."""
    rows = np.linspace(0, top, h)[:, None] * np.ones((1, w))
    texture = (np.arange(w)[None, :] * 7 + np.arange(h)[:, None] * 3) % 11
    return np.clip(rows + texture * (top / 255), 0, top).astype(dtype)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    frames: int = 1,
) -> Path:
    """A minimal 12-bit CR DICOM file (pydicom), optionally windowed or multi-frame."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_bytes(img: np.ndarray, mode: str | None = None, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(img)
    (pil.convert(mode) if mode else pil).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_image_zoo(folder: Path, seed: int = 0) -> dict[str, str]:
    """One file of every kind into `folder`; returns {file name: expected rejection or ""}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def noise(h: int = 40, w: int = 36, c: int | None = None) -> np.ndarray:
        return rng.integers(0, 256, (h, w) if c is None else (h, w, c), dtype=np.uint8)

    Image.fromarray(noise()).save(folder / "gray.png")
    Image.fromarray(noise(c=4), "RGBA").save(folder / "rgba.png")
    Image.fromarray(noise(c=3)).convert("P").save(folder / "palette.png")
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(noise(c=3), "CMYK"))
    Image.fromarray(gradient(top=60000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(gradient(top=40000, dtype=np.uint16)[::-1].copy()).save(folder / "deep16.tif")
    make_dicom(folder / "mono1.dcm", gradient(top=4000, dtype=np.uint16), "MONOCHROME1")
    good = jpeg_bytes(noise(64, 64))
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    make_dicom(folder / "cine.dcm", gradient(top=4000, dtype=np.uint16), frames=3)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored, not rejected
    return {
        "gray.png": "",
        "rgba.png": "",
        "palette.png": "",
        "cmyk.jpg": "",
        "deep16.png": "",
        "deep16.tif": "",
        "mono1.dcm": "",
        "corrupt.jpg": "truncated or corrupt",
        "empty.png": "empty file",
        "notes.png": "not an image",
        "cine.dcm": "multi-frame DICOM",
    }
