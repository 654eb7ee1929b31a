import numpy as np
import pytest

from stages.lib.params import SyntheticParams
from stages.lib.sources import synthetic


@pytest.fixture(scope="module")
def dataset():
    return synthetic.generate(SyntheticParams(n_patients=40, image_size=(96, 140), seed=3))


def test_same_seed_same_images(dataset):
    images, masks, frame = dataset
    again, again_masks, again_frame = synthetic.generate(
        SyntheticParams(n_patients=40, image_size=(96, 140), seed=3)
    )
    assert frame.equals(again_frame)
    assert all(np.array_equal(images[k], again[k]) for k in images)
    assert all(np.array_equal(masks[k], again_masks[k]) for k in masks)


def test_other_seed_other_images(dataset):
    images, _, _ = dataset
    other, _, _ = synthetic.generate(SyntheticParams(n_patients=40, image_size=(96, 140), seed=4))
    key = next(iter(images))
    assert key not in other or not np.array_equal(images[key], other[key])


def test_patients_have_one_to_three_studies_of_one_class(dataset):
    _, _, frame = dataset
    per_patient = frame.groupby("patient_id")
    assert per_patient.size().between(1, 3).all()
    assert (per_patient["label"].nunique() == 1).all()
    assert per_patient.size().max() > 1  # some patients are imaged repeatedly


def test_sizes_vary_within_bounds(dataset):
    images, _, _ = dataset
    shapes = {img.shape for img in images.values()}
    assert len(shapes) > 5
    assert all(96 <= side <= 140 for shape in shapes for side in shape)
    assert all(img.dtype == np.uint8 for img in images.values())


def test_abnormal_images_have_lesion_masks(dataset):
    images, masks, frame = dataset
    abnormal = frame[frame["label"] != "normal"]["key"]
    assert set(masks) == set(abnormal)
    for key in abnormal:
        assert masks[key].shape == images[key].shape
        assert masks[key].any(), key


def test_lesions_are_denser_than_the_same_region_in_normals():
    """A lesion adds attenuation inside its mask."""
    rng = np.random.default_rng(0)
    anatomy = synthetic.sample_anatomy(rng)
    _, lungs = synthetic.render_anatomy(anatomy)
    for label in ("bacterial", "viral"):
        lesion = synthetic.sample_lesion(rng, label, anatomy, difficulty=0.0)
        added, mask = synthetic.render_lesion(lesion, lungs, rng)
        assert mask.sum() > 50
        assert added[mask > 0].mean() > 0.02


def test_prevalence_is_followed():
    _, _, frame = synthetic.generate(
        SyntheticParams(n_patients=300, image_size=(64, 64), prevalence=(0.7, 0.2, 0.1))
    )
    share = frame.drop_duplicates("patient_id")["label"].value_counts(normalize=True)
    assert share["normal"] > share["bacterial"] > share["viral"]


def test_parallel_generation_equals_serial(monkeypatch):
    monkeypatch.setattr(synthetic, "PATIENT_CHUNK", 4)
    params = SyntheticParams(n_patients=20, image_size=(64, 80), seed=5)
    serial = list(synthetic.iter_phantoms(params, parallel=False))
    parallel = list(synthetic.iter_phantoms(params, parallel=True))
    assert [p.key for p in serial] == [p.key for p in parallel]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(serial, parallel, strict=True))
