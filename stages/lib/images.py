"""Images: decode files (PNG, JPEG, TIFF, BMP, DICOM) into arrays, read manifest
references, and prepare an image the way the model sees it (crop, equalise, resize)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.lib.errors import MissingItem
from stages.lib.io import npz_array, open_npz, open_zip
from stages.lib.params import PreprocessParams

MIN_CLAHE_TILE = 16  # px; smaller tiles amplify noise on low-resolution inputs


def to_uint8(img: np.ndarray, channels: int) -> np.ndarray:
    """Any 2-D/3-D image -> (H, W) uint8 gray for channels=1, (H, W, 3) otherwise."""
    if img.dtype != np.uint8:
        lo, hi = np.percentile(img, (0.5, 99.5))
        img = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
        img = img.astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1 and img.ndim == 3:
        return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2GRAY)
    if channels == 3 and img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def content_box(img: np.ndarray, threshold: int) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of pixels brighter than threshold; whole image if none."""
    gray = img if img.ndim == 2 else img.max(axis=2)
    rows = np.flatnonzero((gray > threshold).any(axis=1))
    cols = np.flatnonzero((gray > threshold).any(axis=0))
    h, w = gray.shape
    if len(rows) == 0 or rows[-1] - rows[0] < h // 4 or cols[-1] - cols[0] < w // 4:
        return 0, h, 0, w  # nothing sensible to crop to
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def equalize(img: np.ndarray, how: str, clip: float, grid: int) -> np.ndarray:
    """Histogram equalisation of a uint8 image (each channel of RGB alike, via luminance)."""
    if how == "none":
        return img
    if img.ndim == 3:
        ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
        ycc[:, :, 0] = equalize(ycc[:, :, 0], how, clip, grid)
        return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    if how == "global":
        return cv2.equalizeHist(img)
    tiles = max(1, min(grid, min(img.shape) // MIN_CLAHE_TILE))
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img)


def prepare_image(
    img: np.ndarray, params: PreprocessParams, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One raw image -> (size, size, channels) uint8, and its mask cropped/resized alike."""
    img = to_uint8(img, params.channels)
    if params.crop_borders:
        y0, y1, x0, x1 = content_box(img, params.border_threshold)
        img = img[y0:y1, x0:x1]
        mask = None if mask is None else mask[y0:y1, x0:x1]
    img = equalize(img, params.equalize, params.clahe_clip, params.clahe_grid)
    size = (params.size, params.size)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if params.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), params.blur)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return img.reshape(params.size, params.size, params.channels), mask


DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MAGIC = (128, b"DICM")  # offset and bytes of the DICOM preamble's magic
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)


def is_dicom(data: bytes) -> bool:
    """DICOM by content: files often have no suffix (IM000123) or another one."""
    offset, magic = DICOM_MAGIC
    return data[offset : offset + len(magic)] == magic


def image_kind(path: Path) -> str | None:
    """Why `path` looks like an image (its suffix, or a DICOM preamble); None if it does not."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path.suffix.lower()
    with open(path, "rb") as handle:
        return "DICOM" if is_dicom(handle.read(DICOM_MAGIC[0] + 4)) else None


ORIENTATION_TAG = 0x0112  # EXIF


THUMB_SHAPE = (16, 16)


def read_image(root: Path | str, ref: str) -> np.ndarray:
    """Read one image given by a manifest reference relative to `root`.

    References: `file.png` (PNG, JPEG, TIFF, DICOM, ...: see `decode_image`),
    `file.npz#name` (array `name`), `file.npz#split/index` (row `index` of
    `<split>_images`, the MedMNIST layout) or `file.zip#member` (an image file packed
    in an uncompressed zip, as the download stage stores folder and CSV sources).

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16.
    """
    file, _, key = ref.partition("#")
    path = Path(root) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found (manifest entry {ref!r})")
    if key and path.suffix == ".zip":
        try:
            data = open_zip(path).read(key)
        except KeyError:
            raise MissingItem(f"{path}: no member {key!r} (manifest entry {ref!r})") from None
        return decode_image(data, key)
    if key:
        if "/" in key:
            split, index = key.split("/", 1)
            return np.asarray(npz_array(path, f"{split}_images")[int(index)])
        arrays = open_npz(path)
        if key not in arrays.files:
            raise MissingItem(f"{path}: no array {key!r} (manifest entry {ref!r})")
        return np.asarray(arrays[key])
    return decode_image(path.read_bytes(), path.name)


class ImageError(ValueError):
    """A file that is not a readable 2-D image; the message is the reason."""


def decode_image(data: bytes, name: str = "") -> np.ndarray:
    """Decode one image file's bytes: PNG, JPEG, TIFF (8/16 bit), BMP, ... or DICOM.

    Gray stays (H, W) uint8/uint16; colour (RGB, RGBA, palette, CMYK, ...) becomes
    (H, W, 3) uint8. Raises ImageError with the reason for empty, truncated, multi-frame
    or unknown files; PIL's decompression-bomb guard stays on.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if is_dicom(data) or name.lower().endswith(DICOM_SUFFIXES):
        return _decode_dicom(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ImageError(f"multi-frame image ({frames} frames); save one frame per file")
            img.load()
            if img.getexif().get(ORIENTATION_TAG, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return _pil_to_array(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused, too many pixels: {exc}") from None
    except (OSError, SyntaxError, EOFError, struct.error, ValueError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "i" and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return _to_uint16(arr.astype(np.float64))
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif img.mode not in ("L", "RGB"):  # RGBA, P, PA, CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    return np.asarray(img)


def _to_uint16(arr: np.ndarray) -> np.ndarray:
    """Linear min-max scaling of any real array to the full uint16 range."""
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 65535 if hi > lo else np.zeros_like(arr)
    return np.round(scaled).astype(np.uint16)


def _decode_dicom(data: bytes) -> np.ndarray:
    """DICOM pixels after the modality LUT (rescale) and VOI LUT/window, as a viewer shows them.

    MONOCHROME1 (low values white) is inverted so that every image is bright-is-dense.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageError(f"not a readable DICOM file: {exc}") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM without pixel data (not an image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames); export single frames")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if Image.MAX_IMAGE_PIXELS and rows * cols > 2 * Image.MAX_IMAGE_PIXELS:
        raise ImageError(f"refused, too many pixels: {rows} x {cols} DICOM")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError) as exc:
        raise ImageError(f"DICOM pixel data not decodable: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour (RGB; pydicom converts YBR to RGB)
        return pixels if pixels.dtype == np.uint8 else (_to_uint16(pixels) >> 8).astype(np.uint8)
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return _to_uint16(values)


def thumbnail(img: np.ndarray) -> np.ndarray:
    """(16, 16) uint8 gray, contrast-stretched: the fingerprint for near-duplicate search."""
    if img.ndim == 3:
        img = img[:, :, :3].mean(axis=2) if img.shape[2] >= 3 else img[:, :, 0]
    small = cv2.resize(np.asarray(img, np.float32), THUMB_SHAPE, interpolation=cv2.INTER_AREA)
    lo, hi = float(small.min()), float(small.max())
    if hi <= lo:
        return np.zeros(THUMB_SHAPE, np.uint8)
    return np.round((small - lo) / (hi - lo) * 255).astype(np.uint8)
