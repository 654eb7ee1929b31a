"""Procedural chest-radiograph phantoms: the embedded, offline default dataset.

Each patient gets an anatomy (thorax, lungs, heart, spine, ribs, clavicles, diaphragm,
vessel tree) and a diagnosis: normal, bacterial (focal lobar consolidation in one lung) or
viral (bilateral interstitial/reticular pattern). Each of the patient's 1-3 studies re-images
the same chest with a new acquisition: exposure, gamma, noise, blur, rotation, scale,
collimation borders, a burned-in side marker and a new image size. Abnormal images come with
a lesion mask. Pixel values follow the radiograph convention: dense = bright.

Patients come from imaging sites (`SiteParams`): each site has its own case mix and renders
the chest its own way (display gain, detector gamma, noise, blur, resolution, collimation,
marker placement). The default holds one site out as the test population (`test_site`), the
shift a clinical test set usually has from its training data.

Everything is drawn at CANVAS x CANVAS in attenuation units (about 0..1) and then warped into
the acquired image, so a patient's anatomy stays fixed across studies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib.parallel import ordered_map
from stages.lib.params import SiteParams, SyntheticParams

CANVAS = 256
STUDIES_PER_PATIENT = (1, 2, 3)
STUDY_PROBS = (0.5, 0.3, 0.2)
PATIENT_CHUNK = 50  # patients per worker task
DEFAULT_SITE = SiteParams.model_construct(name="", share=1.0)  # the generator's own ranges


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in canvas pixels."""

    cx: float
    thorax_w: float
    lung_top: float
    lung_bottom: tuple[float, float]  # right, left (image left, image right)
    lung_cx: tuple[float, float]
    lung_w: float
    heart: tuple[float, float, float, float]  # cx, cy, rx, ry
    rib_y0: float
    rib_step: float
    vessels: tuple[np.ndarray, ...]  # polylines, (K, 2) float


@dataclass(frozen=True)
class Lesion:
    """The patient's disease; label 'normal' has severity 0."""

    label: str
    severity: float
    side: int  # bacterial: 0 = image-left lung, 1 = image-right lung
    centre: tuple[float, float]  # bacterial: blob centre in canvas px
    lobes: np.ndarray  # bacterial: (K, 4) offsets and radii of the blob's parts


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    c = CANVAS
    cx = c / 2 + rng.normal(0, 3)
    lung_w = rng.uniform(0.14, 0.175) * c
    spread = rng.uniform(0.18, 0.215) * c
    bottom_r = rng.uniform(0.68, 0.76) * c
    heart = (
        cx + rng.uniform(0.03, 0.08) * c,
        rng.uniform(0.6, 0.66) * c,
        rng.uniform(0.12, 0.17) * c,
        rng.uniform(0.09, 0.12) * c,
    )
    vessels = []
    for side in (-1, 1):
        hilum = np.array([cx + side * rng.uniform(0.08, 0.11) * c, rng.uniform(0.42, 0.48) * c])
        for _ in range(rng.integers(8, 14)):
            angle = rng.uniform(-0.6 * np.pi, 0.6 * np.pi) + (np.pi if side < 0 else 0.0)
            steps = rng.normal(0, 0.35, 6).cumsum() + angle
            seg = rng.uniform(0.02, 0.035) * c
            pts = hilum + np.stack([np.cos(steps), np.sin(steps)], 1).cumsum(0) * seg
            vessels.append(np.vstack([hilum, pts]))
    return Anatomy(
        cx=cx,
        thorax_w=rng.uniform(0.38, 0.45) * c,
        lung_top=rng.uniform(0.12, 0.17) * c,
        lung_bottom=(bottom_r, bottom_r + rng.uniform(0.0, 0.04) * c),
        lung_cx=(cx - spread, cx + spread),
        lung_w=lung_w,
        heart=heart,
        rib_y0=rng.uniform(0.13, 0.17) * c,
        rib_step=rng.uniform(0.062, 0.078) * c,
        vessels=tuple(vessels),
    )


def sample_lesion(
    rng: np.random.Generator, label: str, anatomy: Anatomy, difficulty: float
) -> Lesion:
    """Draw a patient's disease; `difficulty` lowers the floor of severity."""
    floor = 0.7 - 0.6 * difficulty
    severity = 0.0 if label == "normal" else float(rng.uniform(floor, 1.0))
    side = int(rng.integers(0, 2))
    top, bottom = anatomy.lung_top, anatomy.lung_bottom[side]
    centre = (
        anatomy.lung_cx[side] + (rng.uniform(-0.1, 0.5) * (1 if side else -1)) * anatomy.lung_w,
        rng.uniform(top + 0.35 * (bottom - top), bottom - 0.1 * (bottom - top)),
    )
    k = int(rng.integers(3, 7))
    lobes = np.column_stack(
        [rng.normal(0, 12, (k, 2)), rng.uniform(10, 24, k), rng.uniform(8, 18, k)]
    )
    return Lesion(label, severity, side, centre, lobes)


def _lung_mask(a: Anatomy) -> np.ndarray:
    mask = np.zeros((CANVAS, CANVAS), np.float32)
    for side in (0, 1):
        cy = (a.lung_top + a.lung_bottom[side]) / 2
        ry = (a.lung_bottom[side] - a.lung_top) / 2
        centre = (round(a.lung_cx[side] * 4), round(cy * 4))
        axes = (round(a.lung_w * 4), round(ry * 4))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
    return mask


def render_anatomy(a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Normal chest in attenuation units, and the lung field (both CANVAS x CANVAS)."""
    c = CANVAS
    att = np.full((c, c), 0.04, np.float32)
    body = np.zeros_like(att)
    cv2.ellipse(
        body,
        (round(a.cx), round(0.62 * c)),
        (round(a.thorax_w), round(0.62 * c)),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
    )
    att += 0.46 * cv2.GaussianBlur(body, (0, 0), 6)
    lungs = _lung_mask(a)
    heart = np.zeros_like(att)
    hx, hy, rx, ry = a.heart
    cv2.ellipse(
        heart, (round(hx), round(hy)), (round(rx), round(ry)), -15, 0, 360, 1.0, -1, cv2.LINE_AA
    )
    lungs = np.clip(lungs - heart, 0, 1)
    att -= 0.3 * cv2.GaussianBlur(lungs, (0, 0), 2.5)
    att += 0.1 * cv2.GaussianBlur(heart, (0, 0), 3)
    spine = np.zeros_like(att)
    half = 0.035 * c
    cv2.rectangle(spine, (round(a.cx - half), 0), (round(a.cx + half), c), 1.0, -1)
    for y in np.arange(a.rib_y0, c, a.rib_step):  # disc spaces between vertebrae
        cv2.line(spine, (round(a.cx - half), round(y)), (round(a.cx + half), round(y)), 0.6, 2)
    att += 0.12 * cv2.GaussianBlur(spine, (0, 0), 1.5)
    bones = np.zeros_like(att)
    t = np.linspace(0, 1, 24)
    for i in range(9):
        y0 = a.rib_y0 + i * a.rib_step
        for side in (-1, 1):  # posterior ribs: up from the spine, then down laterally
            x = a.cx + side * (0.04 * c + t * (a.thorax_w - 0.04 * c))
            y = y0 - 0.06 * c * t + 0.17 * c * t**2
            cv2.polylines(
                bones, [np.int32(np.column_stack([x, y]) * 4)], False, 1.0, 3, cv2.LINE_AA, shift=2
            )
    for side in (-1, 1):  # clavicles
        p0 = (round(a.cx + side * 0.04 * c), round(0.2 * c))
        p1 = (round(a.cx + side * 0.3 * c), round(0.12 * c))
        cv2.line(bones, p0, p1, 1.0, 5, cv2.LINE_AA)
    att += 0.08 * cv2.GaussianBlur(bones, (0, 0), 0.8) * cv2.GaussianBlur(body, (0, 0), 3)
    vessels = np.zeros_like(att)
    for line in a.vessels:
        cv2.polylines(vessels, [np.int32(line * 4)], False, 1.0, 2, cv2.LINE_AA, shift=2)
    att += 0.07 * cv2.GaussianBlur(vessels, (0, 0), 0.7) * lungs
    return att, lungs


def render_lesion(
    lesion: Lesion, lungs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Added attenuation of the disease and its binary mask (CANVAS x CANVAS)."""
    c = CANVAS
    if lesion.label == "normal":
        return np.zeros((c, c), np.float32), np.zeros((c, c), np.uint8)
    severity = lesion.severity * rng.uniform(0.85, 1.15)  # same disease, new day
    if lesion.label == "bacterial":
        blob = np.zeros((c, c), np.float32)
        cx, cy = lesion.centre
        for dx, dy, rx, ry in lesion.lobes:
            centre = (round((cx + dx) * 4), round((cy + dy) * 4))
            cv2.ellipse(
                blob,
                centre,
                (round(rx * 4), round(ry * 4)),
                float(rng.uniform(0, 180)),
                0,
                360,
                1.0,
                -1,
                cv2.LINE_AA,
                shift=2,
            )
        rough = cv2.GaussianBlur(rng.standard_normal((c, c)).astype(np.float32), (0, 0), 3)
        blob = cv2.GaussianBlur(blob, (0, 0), 4) + 0.6 * rough
        region = (blob > 0.5).astype(np.float32) * (lungs > 0.5)
        added = 0.32 * severity * cv2.GaussianBlur(region, (0, 0), 2.5)
        return added, (region > 0).astype(np.uint8)
    # viral: bilateral reticular (net-like) pattern, perihilar and basal predominance
    noise = rng.standard_normal((c, c)).astype(np.float32)
    band = cv2.GaussianBlur(noise, (0, 0), 2.2) - cv2.GaussianBlur(noise, (0, 0), 5.5)
    net = np.clip(1.0 - np.abs(band) / (band.std() * 0.6 + 1e-6), 0, 1)
    yy, xx = np.mgrid[0:c, 0:c].astype(np.float32) / c
    envelope = np.clip(0.35 + 1.2 * (yy - 0.35), 0, 1) * (
        0.6 + 0.8 * np.exp(-(((xx - 0.5) / 0.22) ** 2))
    )
    envelope = np.clip(envelope, 0, 1) * cv2.GaussianBlur(lungs, (0, 0), 3)
    added = severity * envelope * (0.22 * net + 0.08)
    return added.astype(np.float32), (envelope > 0.45).astype(np.uint8)


def acquire(
    att: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    out_hw: tuple[int, int],
    difficulty: float,
    site: SiteParams = DEFAULT_SITE,
) -> tuple[np.ndarray, np.ndarray]:
    """Image the chest: pose, size, exposure, gamma, blur, resolution, noise, collimation,
    marker. The site scales the random ranges; the draws are the same whatever the site, so
    one patient imaged at two sites differs only in how the site renders."""
    h, w = out_hw
    angle = rng.uniform(-6, 6)
    scale = rng.uniform(0.92, 1.08) * min(h, w) / CANVAS
    matrix = cv2.getRotationMatrix2D((CANVAS / 2, CANVAS / 2), angle, scale)
    matrix[:, 2] += (w / 2 - CANVAS / 2, h / 2 - CANVAS / 2)
    matrix[:, 2] += rng.normal(0, 0.03, 2) * (w, h)
    img = cv2.warpAffine(att, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.04)
    out_mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST)
    img = np.clip(img * rng.uniform(0.8, 1.25) + rng.uniform(-0.05, 0.05), 0, None)
    img = img ** (rng.uniform(0.7, 1.4) * site.gamma)
    sigma = rng.uniform(0.0, 1.2) + 0.6 * difficulty * rng.uniform() + site.blur
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    detector = (max(8, round(w * site.resolution)), max(8, round(h * site.resolution)))
    if site.resolution < 1:  # a coarser detector: fewer pixels, each with its own noise
        img = cv2.resize(img, detector, interpolation=cv2.INTER_AREA)
    noise_sd = rng.uniform(0.01, 0.03) * (1 + 1.5 * difficulty) * site.noise
    noise = rng.normal(0, noise_sd, (h, w)).astype(np.float32)
    img = img + noise[: img.shape[0], : img.shape[1]]
    if site.resolution < 1:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img * 1.4 * site.exposure, 0, 1)  # attenuation ~0..0.7 -> display range
    collimate = rng.uniform() < site.collimation  # black borders of random width
    top, bottom, left, right = (rng.uniform(0, 0.08, 4) * (h, h, w, w)).astype(int)
    if collimate:
        img[:top], img[h - bottom :], img[:, :left], img[:, w - right :] = 0, 0, 0, 0
    img = (img * 255 + 0.5).astype(np.uint8)
    burn, text_draw, place, offset = rng.uniform(size=4)
    if burn < site.marker:  # burned-in side marker
        text = "L" if text_draw < 0.5 else "R"
        left_side = {"either": place < 0.5, "left": True, "right": False}[site.marker_side]
        x = int((0.05 + 0.1 * offset) * w) if left_side else int(0.85 * w)
        cv2.putText(
            img,
            text,
            (x, int(0.12 * h)),
            cv2.FONT_HERSHEY_SIMPLEX,
            h / 300,
            255,
            max(1, h // 150),
            cv2.LINE_AA,
        )
    return img, out_mask


@dataclass(frozen=True)
class Phantom:
    """One generated study."""

    key: str
    label: str
    patient_id: str
    study: int
    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray | None  # (H, W) uint8 lesion mask; None for normal studies
    site: str = ""  # imaging site ("" without sites)


def _draw_labels(
    rng: np.random.Generator, prevalence: tuple[float, ...], n: int, n_classes: int
) -> np.ndarray:
    """Class index per patient with the given prevalence (>= 2 per class when n allows)."""
    shares = np.asarray(prevalence) / np.sum(prevalence)
    labels = rng.choice(n_classes, size=n, p=shares)
    for k in range(n_classes):  # so that any split can hold every class
        counts = np.bincount(labels, minlength=n_classes)
        largest = int(counts.argmax())
        if counts[k] < 2 and counts[largest] >= 4:  # two from the largest class
            donors = np.flatnonzero(labels == largest)
            labels[rng.choice(donors, 2 - counts[k], replace=False)] = k
    return labels


def patient_labels(params: SyntheticParams) -> np.ndarray:
    """Class index per patient, drawn with the given prevalence (>= 2 patients per class)."""
    return patient_assignments(params)[1]


def patient_assignments(params: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    """Site index and class index per patient.

    Sites get their share of the patients (each at least 2 per class, so every split can
    hold every class), patients in site order; each site draws its labels with its own
    prevalence. Without sites, one site with the global prevalence.
    """
    rng = np.random.default_rng(params.seed)
    n, n_classes = params.n_patients, len(params.classes)
    if not params.sites:
        labels = _draw_labels(rng, params.prevalence, n, n_classes)
        return np.zeros(n, np.int64), labels
    shares = np.array([site.share for site in params.sites])
    counts = np.floor(n * shares / shares.sum()).astype(int)
    counts[: n - counts.sum()] += 1  # the remainder, one each from the first site on
    sites, labels = [], []
    for i, (site, count) in enumerate(zip(params.sites, counts, strict=True)):
        sites.append(np.full(count, i))
        labels.append(_draw_labels(rng, site.prevalence or params.prevalence, count, n_classes))
    return np.concatenate(sites), np.concatenate(labels)


def render_patient(
    params: SyntheticParams, pid: int, label: str, site: SiteParams = DEFAULT_SITE
) -> list[Phantom]:
    """All studies of one patient, from the patient's own generator (seed, pid)."""
    prng = np.random.default_rng([params.seed, pid])
    anatomy = sample_anatomy(prng)
    lesion = sample_lesion(prng, label, anatomy, params.difficulty)
    base, lungs = render_anatomy(anatomy)
    lo, hi = params.image_size
    studies = []
    for study in range(int(prng.choice(STUDIES_PER_PATIENT, p=STUDY_PROBS))):
        added, mask = render_lesion(lesion, lungs, prng)
        h = int(prng.integers(lo, hi + 1))
        w = int(np.clip(h * prng.uniform(0.85, 1.15), lo, hi))
        img, out_mask = acquire(base + added, mask, prng, (h, w), params.difficulty, site)
        studies.append(
            Phantom(
                f"p{pid:06d}_s{study}",
                label,
                f"p{pid:06d}",
                study,
                img,
                None if label == "normal" else out_mask,
                site.name,
            )
        )
    return studies


def source_split(params: SyntheticParams, site: str) -> str:
    """The manifest's source_split: "test" for the held-out site, "train" for the others
    (validation is carved from them by patient), "" when no site is held out."""
    if params.test_site is None:
        return ""
    return "test" if site == params.test_site else "train"


def _render_patients(job: tuple[SyntheticParams, list[tuple[int, str, int]]]) -> list[Phantom]:
    params, patients = job
    cv2.setNumThreads(1)  # one process per core already
    sites = params.sites or (DEFAULT_SITE,)
    return [
        ph
        for pid, label, site in patients
        for ph in render_patient(params, pid, label, sites[site])
    ]


def iter_phantoms(params: SyntheticParams, parallel: bool = True) -> Iterator[Phantom]:
    """Yield every study in patient order. Patients are rendered in parallel chunks; each has
    its own seeded generator, so the result is the same however the work is divided, and
    memory stays flat however many patients are asked for."""
    sites, labels = patient_assignments(params)
    patients = [
        (pid, params.classes[k], int(site))
        for pid, (site, k) in enumerate(zip(sites, labels, strict=True))
    ]
    jobs = [
        (params, patients[i : i + PATIENT_CHUNK]) for i in range(0, len(patients), PATIENT_CHUNK)
    ]
    bar = tqdm(total=len(patients), desc="phantoms", unit="patient", leave=False, mininterval=2)
    for studies in ordered_map(_render_patients, jobs, parallel and len(jobs) > 1):
        bar.update(len({ph.patient_id for ph in studies}))
        yield from studies
    bar.close()


def generate(
    params: SyntheticParams,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pd.DataFrame]:
    """The whole dataset in memory (for small sets and tests; the download stage streams).

    Returns:
        images {key: (H, W) uint8}, masks {key: (H, W) uint8, abnormal images only},
        and a manifest frame (key, label, patient_id, study, has_mask, site).
    """
    images, masks, rows = {}, {}, []
    for ph in iter_phantoms(params):
        images[ph.key] = ph.image
        if ph.mask is not None:
            masks[ph.key] = ph.mask
        rows.append((ph.key, ph.label, ph.patient_id, ph.study, ph.mask is not None, ph.site))
    columns = ["key", "label", "patient_id", "study", "has_mask", "site"]
    frame = pd.DataFrame(rows, columns=columns)
    return images, masks, frame
