"""REFace's data source: the procedural face renderer, region masks, mask and source
augmentation, and the CelebAMask-HQ loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from PIL import Image

from dpm.data import (
    FACE_LABELS,
    FACE_REGION,
    IDENTITY_TRAIT_NAMES,
    LANDMARK_NAMES,
    NUISANCE_NAMES,
    augment_source,
    face_dataset,
    face_only,
    load_celebamask_hq,
    region_mask,
    render_faces,
    sample_identities,
    sample_nuisance,
    tps_warp,
)

HAIR = FACE_LABELS["hair"]
BACKGROUND = FACE_LABELS["background"]


@pytest.fixture(scope="module")
def data():
    return face_dataset(n_identities=12, images_per_identity=6, size=32, seed=0)


def _nuisance(n, **fixed):
    """Nuisance draws with some attributes fixed to one value for all images."""
    nuis = sample_nuisance(n, seed=5)
    for k, v in fixed.items():
        nuis[k] = np.broadcast_to(np.asarray(v, np.float32), nuis[k].shape).copy()
    return nuis


def _one_identity(n, seed=3):
    ids = sample_identities(1, seed)
    return {k: np.repeat(v, n, axis=0) for k, v in ids.items()}


# ------------------------------------------------------------------ renderer


def test_face_dataset_shapes_dtypes_range_and_determinism(data):
    n, s, k = 72, 32, len(LANDMARK_NAMES)
    shapes = {
        "x": ((n, s, s, 3), np.float32),
        "labels": ((n, s, s), np.uint8),
        "landmarks": ((n, k, 2), np.float32),
        "identity": ((n,), np.int32),
        "traits": ((n, len(IDENTITY_TRAIT_NAMES)), np.float32),
        "pose": ((n, 2), np.float32),
        "expression": ((n, 3), np.float32),
        "hair_color": ((n, 3), np.float32),
        "lighting": ((n, 2), np.float32),
        "attributes": ((n, len(NUISANCE_NAMES)), np.float32),
    }
    assert set(data) == set(shapes)
    for key, (shape, dtype) in shapes.items():
        assert data[key].shape == shape and data[key].dtype == dtype, key
        assert np.all(np.isfinite(data[key])), key
    assert data["x"].min() >= -1.0 and data["x"].max() <= 1.0
    assert np.all(np.abs(data["landmarks"]) <= 1.0)
    assert set(np.unique(data["labels"])) <= set(FACE_LABELS.values())
    np.testing.assert_array_equal(data["identity"], np.repeat(np.arange(12), 6))
    assert np.all(np.abs(data["pose"]) <= 1.0)
    assert np.all((data["hair_color"] >= 0) & (data["hair_color"] <= 1))
    # standardised by the sampling laws: roughly zero-mean, unit-variance
    assert np.all(np.abs(data["attributes"].mean(0)) < 0.8)
    assert np.all((data["attributes"].std(0) > 0.4) & (data["attributes"].std(0) < 1.6))

    again = face_dataset(n_identities=12, images_per_identity=6, size=32, seed=0)
    for key in data:
        np.testing.assert_array_equal(again[key], data[key], err_msg=key)
    other = face_dataset(n_identities=12, images_per_identity=6, size=32, seed=1)
    assert not np.array_equal(other["x"], data["x"])
    assert not np.array_equal(other["traits"], data["traits"])


def test_traits_fixed_per_identity_and_distinct_across_identities(data):
    traits = data["traits"].reshape(12, 6, -1)
    np.testing.assert_array_equal(traits, np.broadcast_to(traits[:, :1], traits.shape))
    per_id = traits[:, 0]
    gaps = np.abs(per_id[:, None] - per_id[None]).max(-1)
    assert np.all(gaps[~np.eye(12, dtype=bool)] > 0.1)
    # the images of one identity still differ (nuisance)
    x = data["x"].reshape(12, 6, -1)
    assert np.all(np.abs(x[:, 1:] - x[:, :1]).max(-1) > 0.1)


def test_region_masks_match_the_label_maps(data):
    labels = data["labels"]
    face, head = region_mask(labels, "face"), region_mask(labels, "head")
    assert face.shape == labels.shape + (1,) and face.dtype == np.float32
    np.testing.assert_array_equal(face[..., 0] == 0, np.isin(labels, FACE_REGION))
    assert set(np.unique(face)) <= {0.0, 1.0}
    # the head region contains the face region and adds exactly the hair
    assert np.all(head <= face)
    np.testing.assert_array_equal((face - head)[..., 0] == 1, labels == HAIR)
    # every image shows a face, hair and background
    for label_set in (FACE_REGION, (HAIR,), (BACKGROUND,)):
        assert np.all(np.isin(labels, label_set).any(axis=(1, 2))), label_set
    # masks of JAX arrays are JAX arrays, also under jit
    jf = jit(lambda lab: region_mask(lab, "face"))(jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(jf), face)


def test_skin_colour_tracks_the_identity_skin_tone():
    d = face_dataset(n_identities=30, images_per_identity=2, size=32, seed=2)
    tone = sample_identities(30, 2)["skin_tone"]
    colour = (d["x"] + 1.0) / 2.0
    skin = (d["labels"] == FACE_LABELS["skin"])[..., None]
    mean = (colour * skin).sum((1, 2)) / skin.sum((1, 2))  # (N, 3)
    mean = mean.reshape(30, 2, 3).mean(1)
    for ch in range(3):
        assert np.corrcoef(mean[:, ch], tone[:, ch])[0, 1] > 0.9, ch


def test_yaw_shifts_the_nose_toward_its_sign():
    yaw = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32)
    out = render_faces(_one_identity(5), _nuisance(5, roll=0.0, yaw=yaw), 32)
    nose = out["landmarks"][:, LANDMARK_NAMES.index("nose_tip"), 0]
    assert np.all(np.sign(nose[[0, 1, 3, 4]]) == np.sign(yaw[[0, 1, 3, 4]]))
    assert np.all(np.diff(nose) > 0)
    # the drawn nose follows: its pixels' mean column moves with the yaw
    cols = np.arange(32)[None, None, :]
    is_nose = out["labels"] == FACE_LABELS["nose"]
    centre = (is_nose * cols).sum((1, 2)) / is_nose.sum((1, 2))
    assert centre[-1] - centre[0] > 1.0


def test_roll_rotates_the_eye_line_by_the_roll_angle():
    roll = np.array([-20.0, -8.0, 0.0, 12.0, 20.0], np.float32)
    out = render_faces(_one_identity(5), _nuisance(5, roll=roll, eye_open=1.0), 64)
    lm = out["landmarks"]
    l_eye, r_eye = lm[:, LANDMARK_NAMES.index("l_eye")], lm[:, LANDMARK_NAMES.index("r_eye")]
    d = r_eye - l_eye
    np.testing.assert_allclose(np.degrees(np.arctan2(d[:, 1], d[:, 0])), roll, atol=0.5)
    # the drawn eyes follow: the angle between the centroids of the l_eye and r_eye pixels
    rows, cols = np.mgrid[:64, :64]

    def centroid(label):
        m = out["labels"] == label
        return (
            np.stack([(m * cols).sum((1, 2)), (m * rows).sum((1, 2))], -1) / m.sum((1, 2))[:, None]
        )

    d = centroid(FACE_LABELS["r_eye"]) - centroid(FACE_LABELS["l_eye"])
    np.testing.assert_allclose(np.degrees(np.arctan2(d[:, 1], d[:, 0])), roll, atol=4.0)


def test_render_windows_do_not_cut_the_drawing(monkeypatch):
    """The renderer draws each part inside a window around it; drawing everywhere (the
    windows set to the whole image) gives the same images, for extreme poses and hair."""
    import dpm.data.faces as faces

    n = 48
    extremes = {
        "yaw": np.tile([-1.0, 1.0], n // 2),
        "roll": np.repeat([-20.0, 20.0], n // 2),
        "hair_volume": np.tile([0.0, 0.0, 1.0, 1.0], n // 4),
        "hair_length": np.tile([0.0, 1.0, 1.0, 0.0], n // 4),
        "mouth_open": 1.0,
        "mouth_curve": np.tile([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0], n // 6),
    }
    ids, nuis = sample_identities(n, 9), _nuisance(n, **extremes)
    windowed = render_faces(ids, nuis, 32)
    monkeypatch.setattr(faces, "_window", lambda box, grid: (slice(0, len(grid)),) * 2)
    full = render_faces(ids, nuis, 32)
    np.testing.assert_array_equal(windowed["labels"], full["labels"])
    np.testing.assert_array_equal(windowed["x"], full["x"])


def test_render_faces_checks_its_inputs():
    ids, nuis = sample_identities(3, 0), sample_nuisance(3, 0)
    with pytest.raises(ValueError, match="identity lacks"):
        render_faces({k: v for k, v in ids.items() if k != "jaw_width"}, nuis)
    with pytest.raises(ValueError, match="rows"):
        render_faces(ids, sample_nuisance(4, 0))
    with pytest.raises(ValueError, match="size"):
        render_faces(ids, nuis, 4)
    with pytest.raises(ValueError, match="supersample"):
        render_faces(ids, nuis, 16, supersample=2)
    with pytest.raises(ValueError, match="n_identities"):
        face_dataset(n_identities=0)


# ------------------------------------------------------------------ masks, augmentation


def test_region_mask_checks_kind_and_shape(data):
    with pytest.raises(ValueError, match="kind"):
        region_mask(data["labels"], "hair")
    with pytest.raises(ValueError, match="labels"):
        region_mask(data["labels"][..., None], "face")
    with pytest.raises(ValueError, match="labels"):
        region_mask(data["labels"].astype(np.float32), "face")


def test_tps_warp(data):
    keep = region_mask(data["labels"][:16], "face")
    warp = jit(lambda m, k, s: tps_warp(m, k, strength=s))
    np.testing.assert_array_equal(np.asarray(warp(keep, jax.random.key(0), 0.0)), keep)
    a, b = warp(keep, jax.random.key(1), 0.1), warp(keep, jax.random.key(2), 0.1)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == keep.shape and a.dtype == np.float32
    assert set(np.unique(a)) <= {0.0, 1.0}
    area, warped = (1 - keep).sum((1, 2, 3)), (1 - a).sum((1, 2, 3))
    assert np.all(np.abs(warped / area - 1.0) < 0.3)
    assert not np.array_equal(a, b) and not np.array_equal(a, keep)
    with pytest.raises(ValueError, match="grid"):
        tps_warp(keep, jax.random.key(0), grid=1)
    with pytest.raises(ValueError, match="strength"):
        tps_warp(keep, jax.random.key(0), strength=-0.1)


def test_augment_source(data):
    x = jnp.asarray(data["x"][:8])
    aug = jit(augment_source)  # the probabilities and the angle are traced: one compile
    off = dict(flip_p=0.0, max_rotation=0.0, blur_p=0.0, elastic_p=0.0)
    np.testing.assert_allclose(aug(x, jax.random.key(0), **off), x, atol=1e-6)
    flipped = aug(x, jax.random.key(0), **{**off, "flip_p": 1.0})
    np.testing.assert_allclose(flipped, x[:, :, ::-1], atol=1e-6)
    # the defaults: per example, deterministic for a key, different for another
    defaults = dict(flip_p=0.5, max_rotation=20.0, blur_p=0.3, elastic_p=0.3)
    y1, y2 = aug(x, jax.random.key(1), **defaults), aug(x, jax.random.key(1), **defaults)
    assert y1.shape == x.shape and bool(jnp.all(jnp.isfinite(y1)))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(aug(x, jax.random.key(2), **defaults), y1)
    # a rotation alone brings the fill in at the corners of a white image, not at its centre
    ones = jnp.ones_like(x)
    rot = np.asarray(aug(ones, jax.random.key(3), **{**off, "max_rotation": 20.0}))
    assert np.all(rot[:, [0, 0, -1, -1], [0, -1, 0, -1]] < 0.99)
    np.testing.assert_allclose(rot[:, 14:18, 14:18], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        augment_source(x[0], jax.random.key(0))


def test_augment_source_and_tps_warp_under_vmap(data):
    x = jnp.asarray(data["x"][:4]).reshape(2, 2, 32, 32, 3)
    keep = jnp.asarray(region_mask(data["labels"][:4], "face")).reshape(2, 2, 32, 32, 1)
    keys = jax.random.split(jax.random.key(0), 2)
    both = jit(jax.vmap(lambda xi, mi, k: (augment_source(xi, k), tps_warp(mi, k))))
    y, w = both(x, keep, keys)
    assert y.shape == x.shape and w.shape == keep.shape
    assert not np.allclose(y[0], y[1])


def test_face_only(data):
    x, labels = data["x"][:4], data["labels"][:4]
    keep = region_mask(labels, "face")
    src = np.asarray(face_only(x, keep, fill=-1.0))
    inside = keep[..., 0] == 0
    np.testing.assert_array_equal(src[inside], x[inside])
    assert np.all(src[~inside] == -1.0)
    np.testing.assert_array_equal(np.asarray(face_only(x, labels)), src)
    np.testing.assert_array_equal(np.asarray(jit(face_only)(x, keep)), src)
    no_face = keep.copy()
    no_face[2] = 1.0
    with pytest.raises(ValueError, match=r"no face pixel in example\(s\) \[2\]"):
        face_only(x, no_face)
    with pytest.raises(ValueError, match="labels_or_keep"):
        face_only(x, keep[:, :16])
    with pytest.raises(ValueError, match="labels_or_keep"):
        face_only(x, labels.astype(np.float32))


# ------------------------------------------------------------------ CelebAMask-HQ


def _write_celebamask(root, ids, size=64, with_masks=True):
    img_dir, mask_dir = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i in ids:
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(img_dir / f"{i}.jpg", quality=95)
        lab = rng.integers(0, 19, (size // 2, size // 2), dtype=np.uint8)  # masks are 512 for 1024
        labels[i] = lab
        if with_masks:
            Image.fromarray(lab).save(mask_dir / f"{i}.png")
    return labels


def test_load_celebamask_hq_round_trip(tmp_path):
    labels = _write_celebamask(tmp_path, [0, 2, 10])
    d = load_celebamask_hq(tmp_path, size=16)
    assert d["x"].shape == (3, 16, 16, 3) and d["x"].dtype == np.float32
    assert d["labels"].shape == (3, 16, 16) and d["labels"].dtype == np.uint8
    np.testing.assert_array_equal(d["ids"], [0, 2, 10])  # numeric order, not "0, 10, 2"
    assert d["x"].min() >= -1.0 and d["x"].max() <= 1.0
    for k, i in enumerate([0, 2, 10]):
        want = Image.open(tmp_path / "CelebA-HQ-img" / f"{i}.jpg").convert("RGB")
        want = np.asarray(want.resize((16, 16), Image.Resampling.BOX), np.float32) / 127.5 - 1
        np.testing.assert_allclose(d["x"][k], want, atol=1e-6)
        lab = Image.fromarray(labels[i]).resize((16, 16), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(d["labels"][k], np.asarray(lab))
    assert len(load_celebamask_hq(tmp_path, 16, limit=2)["ids"]) == 2
    np.testing.assert_array_equal(load_celebamask_hq(tmp_path, 16, ids=[10])["ids"], [10])
    keep = region_mask(d["labels"], "face")  # the real data shares the renderer's mask code
    assert keep.shape == (3, 16, 16, 1)


def test_load_celebamask_hq_errors(tmp_path):
    with pytest.raises(ValueError, match="CelebA-HQ-img"):
        load_celebamask_hq(tmp_path)
    _write_celebamask(tmp_path, [0, 1])
    (tmp_path / "CelebAMask-HQ-mask" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"without a label map: \[1\]"):
        load_celebamask_hq(tmp_path)
    with pytest.raises(ValueError, match=r"without an image: \[7\]"):
        load_celebamask_hq(tmp_path, ids=[0, 7])
    Image.fromarray(np.full((8, 8), 19, np.uint8)).save(tmp_path / "CelebAMask-HQ-mask" / "1.png")
    with pytest.raises(ValueError, match="holds id 19"):
        load_celebamask_hq(tmp_path)
    with pytest.raises(ValueError, match="size"):
        load_celebamask_hq(tmp_path, size=0)
