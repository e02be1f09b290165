"""Data sources and the batch iterator: shapes, ranges, determinism, resumption, sharding."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dpm.data import (
    SKIMAGE_COLOR_IMAGES,
    BatchIterator,
    folder_class_names,
    gaussian_mixture_samples,
    load_digits,
    load_image_folder,
    load_lfw_faces,
    load_npz,
    resize_images,
    skimage_patches,
    toy_2d,
    toy_2d_mixture,
)
from experiments._registry import make_dataset


def _toy_arrays(n=37):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "y": np.arange(n)}


# ------------------------------------------------------------------ BatchIterator


def test_iterator_epoch_is_a_permutation_and_order_depends_on_seed():
    data = _toy_arrays(40)
    it = BatchIterator(data, 8, seed=0, process_count=1, process_index=0)
    epoch0 = np.concatenate([next(it)["y"] for _ in range(5)])
    epoch1 = np.concatenate([next(it)["y"] for _ in range(5)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(40))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(40))
    assert not np.array_equal(epoch0, epoch1)  # fresh permutation per epoch
    other = BatchIterator(data, 8, seed=1, process_count=1, process_index=0)
    assert not np.array_equal(next(other)["y"], epoch0[:8])
    # rows stay aligned across keys
    batch = BatchIterator(data, 8, seed=3, process_count=1, process_index=0).get_batch(7)
    np.testing.assert_array_equal(batch["x"], data["x"][batch["y"]])


def test_iterator_deterministic_and_resumable_bitwise():
    data = _toy_arrays(37)
    kw = dict(seed=5, process_count=1, process_index=0)
    n_total, k = 23, 9  # crosses several epochs (4 batches of 8 per epoch)
    it = BatchIterator(data, 8, **kw)
    straight = [next(it) for _ in range(n_total)]
    first = BatchIterator(data, 8, **kw)
    head = [next(first) for _ in range(k)]
    saved = json.loads(json.dumps(first.state()))  # JSON round trip
    assert saved["step"] == k
    resumed = BatchIterator(data, 8, **kw)
    resumed.restore(saved)
    tail = [next(resumed) for _ in range(n_total - k)]
    via_ctor = BatchIterator(data, 8, **kw, state=saved)
    for a, b in zip(straight, head + tail, strict=True):
        for key in a:
            assert a[key].tobytes() == b[key].tobytes()
    assert next(via_ctor)["x"].tobytes() == straight[k]["x"].tobytes()


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_iterator_process_shards_union_is_global_batch(drop_remainder):
    data = _toy_arrays(44)  # 44 = 5 * 8 + 4: remainder 4 divisible by 4 processes
    glob = BatchIterator(
        data, 8, seed=2, drop_remainder=drop_remainder, process_count=1, process_index=0
    )
    shards = [
        BatchIterator(
            data, 8, seed=2, drop_remainder=drop_remainder, process_count=4, process_index=p
        )
        for p in range(4)
    ]
    assert shards[0].local_batch_size == 2
    sizes = []
    for _ in range(2 * glob.steps_per_epoch + 1):
        g = next(glob)
        parts = [next(s) for s in shards]
        sizes.append(len(g["y"]))
        for key in g:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), g[key])
    if drop_remainder:
        assert set(sizes) == {8}
    else:
        assert sorted(set(sizes)) == [4, 8]  # the last batch of each epoch is smaller
    # one epoch without drop_remainder visits every example once
    no_drop = BatchIterator(data, 8, seed=2, drop_remainder=False, process_count=1, process_index=0)
    epoch = np.concatenate([next(no_drop)["y"] for _ in range(no_drop.steps_per_epoch)])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(44))


def test_iterator_no_shuffle_is_natural_order():
    data = _toy_arrays(16)
    it = BatchIterator(data, 4, seed=0, shuffle=False, process_count=1, process_index=0)
    np.testing.assert_array_equal(np.concatenate([next(it)["y"] for _ in range(4)]), np.arange(16))


def test_iterator_validation():
    data = _toy_arrays(10)
    one = dict(process_count=1, process_index=0)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        BatchIterator(data, 0, seed=0, **one)
    with pytest.raises(ValueError, match="larger than the data set"):
        BatchIterator(data, 11, seed=0, **one)
    with pytest.raises(ValueError, match="divisible by process_count"):
        BatchIterator(data, 6, seed=0, process_count=4, process_index=0)
    with pytest.raises(ValueError, match="process_index"):
        BatchIterator(data, 4, seed=0, process_count=2, process_index=2)
    with pytest.raises(ValueError, match="leading"):
        BatchIterator({"x": np.zeros(10), "y": np.zeros(9)}, 2, seed=0, **one)
    with pytest.raises(ValueError, match="non-empty"):
        BatchIterator({}, 2, seed=0, **one)
    nan = {"x": np.where(np.arange(10)[:, None] < 3, np.nan, 0.0) * np.ones((10, 2))}
    with pytest.raises(ValueError, match=r"arrays\['x'\] holds 6 NaN or infinite value\(s\) of 20"):
        BatchIterator(nan, 2, seed=0, **one)
    with pytest.raises(ValueError, match="not divisible"):
        BatchIterator(data, 4, seed=0, drop_remainder=False, process_count=4, process_index=0)
    it = BatchIterator(data, 2, seed=0, **one)
    with pytest.raises(ValueError, match="seed"):
        it.restore({"step": 3, "seed": 1})
    # larger than N is fine without drop_remainder (one short batch per epoch)
    assert len(next(BatchIterator(data, 12, seed=0, drop_remainder=False, **one))["x"]) == 10


def test_iterator_defaults_to_jax_process():
    it = BatchIterator(_toy_arrays(8), 4, seed=0)
    assert (it.process_index, it.process_count) == (0, 1)


# ------------------------------------------------------------------ toy 2-D


@pytest.mark.parametrize("name", ["ring8", "grid25", "two_moons", "swiss_roll"])
def test_toy_2d_shapes_and_determinism(name):
    a = make_dataset(name, n=500, seed=3)
    b = toy_2d(name, 500, seed=3)
    assert a["x"].shape == (500, 2) and a["x"].dtype == np.float32
    assert a["y"].shape == (500,)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], toy_2d(name, 500, seed=4)["x"])
    assert np.all(np.abs(a["x"]) < 3.5)


def test_ring8_matches_its_mixture():
    means, stds, weights = toy_2d_mixture("ring8")
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 2.0)
    d = toy_2d("ring8", 20_000, seed=0)
    # each point is near its component mean, with the stated std per coordinate
    resid = d["x"] - means[d["y"]]
    np.testing.assert_allclose(resid.std(axis=0), stds[0], rtol=0.05)
    np.testing.assert_allclose(np.bincount(d["y"]) / 20_000, weights, atol=0.015)


def test_gaussian_mixture_samples_moments():
    means = np.array([[0.0, 0.0, 0.0], [5.0, -5.0, 1.0]])
    stds = np.array([[1.0, 2.0, 0.5], [0.1, 0.1, 0.1]])
    x, y = gaussian_mixture_samples(means, stds, np.array([3.0, 1.0]), 40_000, seed=1)
    assert abs(np.mean(y == 0) - 0.75) < 0.01
    np.testing.assert_allclose(x[y == 0].std(axis=0), stds[0], rtol=0.03)
    np.testing.assert_allclose(x[y == 1].mean(axis=0), means[1], atol=0.01)
    with pytest.raises(ValueError, match="stds"):
        gaussian_mixture_samples(means, np.ones(5), None, 10, seed=0)
    with pytest.raises(ValueError, match="weights"):
        gaussian_mixture_samples(means, 1.0, np.array([-1.0, 1.0]), 10, seed=0)


# ------------------------------------------------------------------ resize


def test_resize_matches_pillow_bilinear():
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, size=(9, 13)).astype(np.float32)
    for size in [(24, 31), (4, 5), (9, 13)]:
        ref = np.asarray(Image.fromarray(img).resize(size[::-1], Image.Resampling.BILINEAR))
        got = resize_images(img[None, :, :, None], size)[0, :, :, 0]
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_resize_preserves_constants_and_mean():
    img = np.full((2, 8, 8, 3), 0.3)
    np.testing.assert_allclose(resize_images(img, 32), 0.3, atol=1e-6)
    rng = np.random.default_rng(1)
    img = rng.uniform(size=(1, 16, 16, 1))
    # halving with the widened triangle keeps the mean up to the edge weights
    assert abs(resize_images(img, 8).mean() - img.mean()) < 0.02


def test_resize_reproduces_linear_ramps_in_the_interior():
    """A symmetric, normalised linear kernel maps a ramp in pixel-centre coordinates onto the
    same ramp at the output's centres, up- or downscaling, wherever it does not reach the edge."""
    h = w = 16
    r, c = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    img = (0.3 * r - 0.2 * c + 1.0)[None, :, :, None]
    for out in (40, 8):  # x2.5 up, x2 down (the kernel then spans 4 input pixels)
        s = h / out
        ro, co = np.meshgrid((np.arange(out) + 0.5) * s, (np.arange(out) + 0.5) * s, indexing="ij")
        got = resize_images(img, out)[0, :, :, 0]
        interior = (ro > 2.5) & (ro < h - 2.5) & (co > 2.5) & (co < w - 2.5)
        assert interior.sum() >= 16
        np.testing.assert_allclose(got[interior], (0.3 * ro - 0.2 * co + 1.0)[interior], atol=1e-5)
    with pytest.raises(ValueError, match="NHWC"):
        resize_images(img[0], 8)
    with pytest.raises(ValueError, match="size must be positive"):
        resize_images(img, (0, 4))


# ------------------------------------------------------------------ built-in image sources


def test_digits_shapes_ranges_labels():
    d = load_digits()
    assert d["x"].shape == (1797, 8, 8, 1) and d["x"].dtype == np.float32
    assert d["x"].min() == -1.0 and d["x"].max() == 1.0
    np.testing.assert_array_equal(np.unique(d["y"]), np.arange(10))
    from sklearn.datasets import load_digits as sk

    np.testing.assert_allclose((d["x"][..., 0] + 1) * 8, sk().images, atol=1e-5)
    up = make_dataset("digits", image_size=16)
    assert up["x"].shape == (1797, 16, 16, 1)
    assert -1.0 <= up["x"].min() and up["x"].max() <= 1.0
    # bilinear upsampling keeps the per-image mean up to edge effects
    np.testing.assert_allclose(up["x"].mean(axis=(1, 2, 3)), d["x"].mean(axis=(1, 2, 3)), atol=0.05)
    padded = load_digits(32, method="pad")
    assert padded["x"].shape == (1797, 32, 32, 1)
    np.testing.assert_array_equal(padded["x"][:, 12:20, 12:20], d["x"])
    assert np.all(padded["x"][:, :12] == -1.0)
    with pytest.raises(ValueError, match="method"):
        load_digits(16, method="nearest")


def test_lfw_faces():
    d = load_lfw_faces()
    assert d["x"].shape == (100, 25, 25, 1)
    assert -1.0 <= d["x"].min() < 0.0 < d["x"].max() <= 1.0
    assert load_lfw_faces(32)["x"].shape == (100, 32, 32, 1)


def test_skimage_patches():
    d = skimage_patches(32, 20, seed=0, images=SKIMAGE_COLOR_IMAGES[:3], downscale=4)
    assert d["x"].shape == (20, 32, 32, 3) and d["x_low"].shape == (20, 8, 8, 3)
    assert -1.0 <= d["x"].min() and d["x"].max() <= 1.0
    np.testing.assert_allclose(d["x_low"][:, 0, 0], d["x"][:, :4, :4].mean(axis=(1, 2)), atol=1e-6)
    again = make_dataset(
        "skimage_patches",
        patch_size=32,
        num_patches=20,
        seed=0,
        images=SKIMAGE_COLOR_IMAGES[:3],
        downscale=4,
    )
    np.testing.assert_array_equal(d["x"], again["x"])
    # every patch is an exact crop of one of the source images
    import skimage.data

    astro = skimage.data.astronaut().astype(np.float32) / 127.5 - 1.0
    one = skimage_patches(16, 3, seed=1, images=["astronaut"])["x"]
    for p in one:
        hits = np.argwhere(np.all(np.abs(astro[:, :, 0:1] - p[0, 0, 0]) < 1e-6, axis=-1))
        assert any(
            np.allclose(astro[i : i + 16, j : j + 16], p, atol=1e-6)
            for i, j in hits
            if i + 16 <= 512 and j + 16 <= 512
        )
    gray = skimage_patches(8, 4, images=["camera", "astronaut"], grayscale=True)
    assert gray["x"].shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match="images"):
        skimage_patches(8, 2, images=["not_an_image"])
    with pytest.raises(ValueError, match="downscale"):
        skimage_patches(8, 2, downscale=3)


# ------------------------------------------------------------------ image folder


def _write_image(path, h, w, value, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def test_image_folder_with_labels(tmp_path):
    _write_image(tmp_path / "cat" / "a.png", 20, 30, 0)
    _write_image(tmp_path / "cat" / "sub" / "b.jpg", 40, 16, 255)
    _write_image(tmp_path / "dog" / "c.PNG", 16, 16, 51, mode="L")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path, 16, labels=True)
    assert d["x"].shape == (3, 16, 16, 3) and d["x"].dtype == np.float32
    np.testing.assert_array_equal(d["y"], [0, 0, 1])
    assert folder_class_names(tmp_path) == ["cat", "dog"]
    np.testing.assert_allclose(d["x"][0], -1.0)  # value 0 -> -1
    np.testing.assert_allclose(d["x"][1], 1.0, atol=2 / 255)  # 255 -> 1 (JPEG)
    np.testing.assert_allclose(d["x"][2], 51 / 127.5 - 1.0, atol=1e-6)
    gray = make_dataset("folder", path=str(tmp_path), image_size=8, grayscale=True)
    assert gray["x"].shape == (3, 8, 8, 1) and "y" not in gray


def test_image_folder_center_crop(tmp_path):
    # 10 x 30 image: left third 0, middle third 255, right third 0 -> centre crop is white
    img = np.zeros((10, 30), np.uint8)
    img[:, 10:20] = 255
    Image.fromarray(img).save(tmp_path / "x.png")
    d = load_image_folder(tmp_path, 10, grayscale=True)
    np.testing.assert_allclose(d["x"][0, :, 2:8], 1.0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(empty, 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(bad, 8)
    loose = tmp_path / "loose"
    _write_image(loose / "a.png", 8, 8, 0)
    with pytest.raises(ValueError, match="sub-folder"):
        load_image_folder(loose, 8, labels=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "file.txt", 8)


# ------------------------------------------------------------------ npz


def test_npz_uint8_nchw_and_keys(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8)
    labels = np.arange(6)
    np.savez(tmp_path / "c.npz", images=images, labels=labels)
    d = load_npz(tmp_path / "c.npz", channels_first=True)
    assert d["x"].shape == (6, 4, 4, 3)
    np.testing.assert_allclose(d["x"], np.transpose(images, (0, 2, 3, 1)) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(d["y"], labels)
    np.savez(tmp_path / "f.npz", data=rng.uniform(size=(5, 8, 8)), cls=np.zeros(5))
    f = make_dataset(
        "npz",
        path=tmp_path / "f.npz",
        x_key="data",
        y_key="cls",
        value_range=(0.0, 1.0),
        image_size=16,
    )
    assert f["x"].shape == (5, 16, 16, 1) and f["y"].dtype == np.int32
    assert -1.0 <= f["x"].min() and f["x"].max() <= 1.0


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "a.npz", foo=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="x_key"):
        load_npz(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="'bar'"):
        load_npz(tmp_path / "a.npz", x_key="foo", y_key="bar")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 4, 4)), y=np.zeros(2))
    with pytest.raises(ValueError, match="leading size 3"):
        load_npz(tmp_path / "b.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")


def test_npz_refuses_non_finite_data(tmp_path):
    x = np.full((3, 4, 4), np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", images=x)
    with pytest.raises(ValueError, match=r"array 'images' .* holds 48 NaN or infinite value"):
        load_npz(tmp_path / "nan.npz")
    x = np.zeros((3, 4, 4), np.float32)
    x[1, 2, 3] = np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    with pytest.raises(ValueError, match="holds 1 NaN or infinite value"):
        load_npz(tmp_path / "inf.npz", value_range=(0, 1))
    np.savez(tmp_path / "y.npz", x=np.zeros((3, 2)), y=np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"labels 'y' .* holds 1 NaN"):
        load_npz(tmp_path / "y.npz")
    np.savez(tmp_path / "yf.npz", x=np.zeros((3, 2)), y=np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="must be integers"):
        load_npz(tmp_path / "yf.npz")


def test_npz_refuses_values_outside_the_range_and_says_how_to_pass_it(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 5, 5, 3)).astype(np.float32)  # float images in 0..255
    np.savez(tmp_path / "f255.npz", x=x)
    with pytest.raises(ValueError, match=r"outside \[-1, 1\] .* value_range=\(0, 255\)"):
        load_npz(tmp_path / "f255.npz")
    d = load_npz(tmp_path / "f255.npz", value_range=(0, 255))
    np.testing.assert_allclose(d["x"], x / 127.5 - 1.0, atol=1e-6)
    # an explicit range the data exceed is refused too, naming value_range
    u8 = x.astype(np.uint8)
    np.savez(tmp_path / "u8.npz", x=u8)
    with pytest.raises(ValueError, match=r"\[0, 1\] \(value_range\)"):
        load_npz(tmp_path / "u8.npz", value_range=(0, 1))
    # 16-bit integers exceed the integer default (0, 255)
    np.savez(tmp_path / "u16.npz", x=(x * 257).astype(np.uint16))
    with pytest.raises(ValueError, match=r"default for uint16 data"):
        load_npz(tmp_path / "u16.npz")
    np.testing.assert_allclose(
        load_npz(tmp_path / "u16.npz", value_range=(0, 65535))["x"], x / 127.5 - 1.0, atol=1e-6
    )
    # data saved at the ends of the range with float round-off pass and stay in [-1, 1]
    edge = np.array([[-1.0 - 1e-7, 1.0 + 1e-7]], np.float32)
    np.savez(tmp_path / "edge.npz", x=edge)
    e = load_npz(tmp_path / "edge.npz")["x"]
    assert e.min() == -1.0 and e.max() == 1.0
    with pytest.raises(ValueError, match="lo < hi"):
        load_npz(tmp_path / "u8.npz", value_range=(255, 0))
    with pytest.raises(ValueError, match="pair"):
        load_npz(tmp_path / "u8.npz", value_range=255)


def test_image_folder_refuses_16_bit_and_float_images(tmp_path):
    f = np.full((6, 6), np.nan, np.float32)
    Image.fromarray(f).save(tmp_path / "float.tif")  # Pillow mode "F"
    with pytest.raises(ValueError, match=r"float.tif.*mode 'F'.*load_npz"):
        load_image_folder(tmp_path, 4)
    other = tmp_path / "sixteen"
    other.mkdir()
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(other / "a.png")
    with pytest.raises(ValueError, match=r"a.png.*16-bit"):
        load_image_folder(other, 4)


def test_make_dataset_unknown_name():
    with pytest.raises(ValueError, match="cifar"):
        make_dataset("cifar")


def test_train_test_split_disjoint_deterministic():
    from dpm.data import train_test_split

    data = {"x": np.arange(100.0)[:, None], "y": np.arange(100)}
    train, test = train_test_split(data, 0.3, seed=1)
    assert len(test["x"]) == 30 and len(train["x"]) == 70
    assert set(train["y"]).isdisjoint(test["y"])
    assert set(train["y"]) | set(test["y"]) == set(range(100))
    np.testing.assert_array_equal(train["x"][:, 0], train["y"])  # rows stay aligned
    again, _ = train_test_split(data, 0.3, seed=1)
    np.testing.assert_array_equal(again["y"], train["y"])
    other, _ = train_test_split(data, 0.3, seed=2)
    assert not np.array_equal(other["y"], train["y"])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(data, 1.0)
    with pytest.raises(ValueError, match="leading dimension"):
        train_test_split({"x": np.zeros(3), "y": np.zeros(4)}, 0.5)
