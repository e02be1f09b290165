"""Motion loaders (HumanML3D / KIT-ML folders, a2m rot6d) and the text-to-motion metrics."""

import os

import numpy as np
import pytest

from dpm.data import BatchIterator, load_a2m_rot6d, load_humanml3d, load_kit_ml
from dpm.metrics import (
    bone_length_variance,
    diversity,
    foot_skate_ratio,
    matching_score,
    mm_dist,
    multimodality,
    r_precision,
)

D = 7  # feature dimension of the synthetic folders


def _motion(k: int, frames: int) -> np.ndarray:
    """(frames, D) features that name their clip and frame: 1000 k + frame + d / 10."""
    f = np.arange(frames, dtype=np.float32)[:, None]
    return 1000.0 * k + f + np.arange(D, dtype=np.float32)[None, :] / 10


def _write_folder(root, clips, texts, splits, d=D):
    """clips: {id: (F, d) array}; texts: {id: [lines]}; splits: {name: [ids]}."""
    os.makedirs(root / "new_joint_vecs")
    os.makedirs(root / "texts")
    for name, m in clips.items():
        np.save(root / "new_joint_vecs" / f"{name}.npy", m)
    for name, lines in texts.items():
        (root / "texts" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    np.save(root / "Mean.npy", np.arange(d, dtype=np.float32))
    np.save(root / "Std.npy", np.full(d, 2.0, np.float32))


@pytest.fixture
def hml(tmp_path):
    root = tmp_path / "hml"
    clips = {"a": _motion(1, 50), "b": _motion(2, 30), "c": _motion(3, 80), "d": _motion(4, 45)}
    texts = {
        "a": [
            "a person walks forward.#a/DET person/NOUN walk/VERB forward/ADV#0.0#0.0",
            "someone walks.#someone/PRON walk/VERB#0.0#0.0",
            "then the person stops#the/DET person/NOUN stop/VERB#0.5#2.5",
        ],
        "b": ["a short clip#a/DET short/ADJ clip/NOUN#0.0#0.0"],
        "c": ["a long clip#a/DET long/ADJ clip/NOUN#nan#nan"],
        "d": ["only a part#only/ADV a/DET part/NOUN#0.25#2.2"],
    }
    _write_folder(root, clips, texts, {"train": ["a", "b", "c", "d"], "test": ["c", "a"]})
    return root, clips


def _check_common(data, n, max_frames, d):
    assert set(data) == {"x", "mask", "length", "caption", "action"}
    assert data["x"].shape == (n, max_frames, d) and data["x"].dtype == np.float32
    assert data["mask"].dtype == bool and data["length"].dtype == np.int32
    np.testing.assert_array_equal(
        data["mask"], np.arange(max_frames)[None] < data["length"][:, None]
    )
    assert np.all(data["x"][~data["mask"]] == 0)
    assert data["caption"].shape == (n,) and data["action"].dtype == np.int32


# --------------------------------------------------------------------------------------------
# HumanML3D / KIT-ML
# --------------------------------------------------------------------------------------------


def test_humanml3d_folder(hml):
    root, clips = hml
    data, info = load_humanml3d(root, "train", max_frames=60, min_frames=40, feature_dim=D)
    # a (whole, 2 captions), a@0.5-2.5 (frames 10:50), b dropped (30 < 40), c (whole: NaN tags
    # mean the whole clip; 80 frames cropped to 60), d: sub-range only, frames 5:44 (39 < 40)
    assert info.ids == ["a", "a@0.5-2.5", "c"]
    _check_common(data, 3, 60, D)
    np.testing.assert_array_equal(data["length"], [50, 40, 60])
    np.testing.assert_array_equal(data["x"][0, :50], clips["a"])
    np.testing.assert_array_equal(data["x"][1, :40], clips["a"][10:50])
    np.testing.assert_array_equal(data["x"][2], clips["c"][:60])  # the first window
    assert info.captions == [
        ["a person walks forward.", "someone walks."],
        ["then the person stops"],
        ["a long clip"],
    ]
    assert info.tokens[0][0] == ["a/DET", "person/NOUN", "walk/VERB", "forward/ADV"]
    assert list(data["caption"]) == [c[0] for c in info.captions]
    np.testing.assert_array_equal(data["action"], [-1, -1, -1])
    assert (info.num_dropped_short, info.num_dropped_long, info.num_cropped) == (2, 0, 1)
    np.testing.assert_array_equal(info.mean, np.arange(D))
    np.testing.assert_array_equal(info.std, np.full(D, 2.0))
    assert info.fps == 20.0
    batch = next(BatchIterator(data, 2, seed=0))  # the common format feeds the iterator
    assert batch["x"].shape == (2, 60, D) and batch["caption"].shape == (2,)


def test_humanml3d_split_limit_and_dropping(hml):
    root, clips = hml
    data, info = load_humanml3d(root, "test", max_frames=100, min_frames=40)  # D inferred
    assert info.ids == ["c", "a", "a@0.5-2.5"]  # split order, whole clip before sub-ranges
    _check_common(data, 3, 100, D)
    np.testing.assert_array_equal(data["x"][0, :80], clips["c"])
    assert info.num_cropped == 0
    _, info = load_humanml3d(root, "train", max_frames=100, min_frames=40, limit=1)
    assert info.ids == ["a", "a@0.5-2.5"]
    # max_source_frames drops long samples (the original keeps lengths < 200)
    _, info = load_humanml3d(root, "train", max_frames=100, min_frames=30, max_source_frames=49)
    assert info.ids == ["a@0.5-2.5", "b", "d@0.25-2.2"]
    assert (info.num_dropped_short, info.num_dropped_long) == (0, 2)


def test_humanml3d_random_crop_window(hml):
    root, clips = hml
    data1, _ = load_humanml3d(root, "test", max_frames=20, min_frames=40, crop_seed=3)
    data2, _ = load_humanml3d(root, "test", max_frames=20, min_frames=40, crop_seed=3)
    np.testing.assert_array_equal(data1["x"], data2["x"])
    for i, src in enumerate([clips["c"], clips["a"], clips["a"][10:50]]):
        start = int(round(data1["x"][i, 0, 0] - src[0, 0]))  # features name their frame
        np.testing.assert_array_equal(data1["x"][i], src[start : start + 20])
    assert np.all(data1["mask"])


def test_kit_ml_fps_and_dim(tmp_path):
    root = tmp_path / "kit"
    m = np.random.default_rng(0).normal(size=(60, 251)).astype(np.float32)
    _write_folder(root, {"k": m}, {"k": ["a person jumps#a/DET#2.0#4.0"]}, {"test": ["k"]}, d=251)
    data, info = load_kit_ml(root, "test")
    np.testing.assert_array_equal(data["x"][0, :25], m[25:50])  # 12.5 fps: frames 25:50
    assert data["length"][0] == 25 and info.fps == 12.5
    with pytest.raises(ValueError, match=r"Mean\.npy.*\(251,\); expected \(263,\)"):
        load_humanml3d(root, "test", feature_dim=263)
    np.save(root / "Mean.npy", np.zeros(263, np.float32))
    np.save(root / "Std.npy", np.ones(263, np.float32))
    with pytest.raises(ValueError, match=r"k\.npy.*\(60, 251\); expected \(F, 263\)"):
        load_humanml3d(root, "test")


def test_humanml3d_errors(hml, tmp_path):
    root, clips = hml
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_humanml3d(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"val\.txt.*splits found in root: \['test', 'tr"):
        load_humanml3d(root, "val")
    (root / "val.txt").write_text("a\nzzz\n")
    with pytest.raises(FileNotFoundError, match=r"'zzz'.*new_joint_vecs.*zzz\.npy"):
        load_humanml3d(root, "val")
    np.save(root / "new_joint_vecs" / "zzz.npy", _motion(9, 50))
    with pytest.raises(FileNotFoundError, match=r"texts.*zzz\.txt"):
        load_humanml3d(root, "val")
    (root / "texts" / "zzz.txt").write_text("no tags here\n")
    with pytest.raises(ValueError, match=r"zzz\.txt.*line 1.*caption#tokens#start#end"):
        load_humanml3d(root, "val")
    (root / "texts" / "zzz.txt").write_text("ok#ok#0.0#0.0\n")
    np.save(root / "new_joint_vecs" / "zzz.npy", _motion(9, 50)[:, :5])
    with pytest.raises(ValueError, match=r"zzz\.npy.*\(50, 5\); expected \(F, 7\)"):
        load_humanml3d(root, "val")  # D inferred from Mean.npy, checked on every clip
    bad = _motion(9, 50)
    bad[3, 2] = np.nan
    np.save(root / "new_joint_vecs" / "zzz.npy", bad)
    with pytest.raises(ValueError, match=r"zzz\.npy.*NaN or infinite"):
        load_humanml3d(root, "val")
    with pytest.raises(ValueError, match="no samples left"):
        load_humanml3d(root, "test", min_frames=500)
    np.save(root / "Std.npy", np.zeros(D, np.float32))
    with pytest.raises(ValueError, match=r"Std\.npy.*<= 0"):
        load_humanml3d(root, "test")
    np.save(root / "Std.npy", np.ones(D, np.float32))
    np.save(root / "Mean.npy", np.zeros(D + 1, np.float32))
    with pytest.raises(ValueError, match=r"Mean\.npy.*expected \(7,\) \(feature_dim=7\)"):
        load_humanml3d(root, "test", feature_dim=D)
    with pytest.raises(ValueError, match=r"Std\.npy.*expected \(8,\) \(the shape of Mean"):
        load_humanml3d(root, "test")
    os.remove(root / "Mean.npy")
    with pytest.raises(FileNotFoundError, match=r"Mean\.npy"):
        load_humanml3d(root, "test")
    with pytest.raises(ValueError, match="max_frames"):
        load_humanml3d(root, "test", max_frames=0)
    (root / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no ids"):
        load_humanml3d(root, "empty")


# --------------------------------------------------------------------------------------------
# a2m rot6d
# --------------------------------------------------------------------------------------------


def _poses(lengths, j=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(f, j + 1, 6)).astype(np.float32) for f in lengths]


def test_a2m_list_npz(tmp_path):
    poses = _poses([5, 9, 3])
    obj = np.empty(3, dtype=object)
    for i, p in enumerate(poses):
        obj[i] = p
    path = tmp_path / "a2m.npz"
    np.savez(path, poses=obj, actions=np.array([2, 0, 1]))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_a2m_rot6d(path, num_joints=3)
    data, info = load_a2m_rot6d(
        path, num_joints=3, max_frames=6, action_names=["walk", "run", "jump"], allow_pickle=True
    )
    _check_common(data, 3, 6, 24)
    np.testing.assert_array_equal(data["length"], [5, 6, 3])
    for i, p in enumerate(poses):  # joint-major flattening of the (J + 1, 6) blocks
        f = min(p.shape[0], 6)
        np.testing.assert_array_equal(data["x"][i, :f], p[:f].reshape(f, 24))
    np.testing.assert_array_equal(data["action"], [2, 0, 1])
    assert list(data["caption"]) == ["jump", "walk", "run"]
    assert info.captions == [["jump"], ["walk"], ["run"]] and info.num_cropped == 1
    assert info.ids == ["0", "1", "2"] and info.mean is None


def test_a2m_padded_arrays_and_errors():
    poses = np.stack([np.pad(p, ((0, 4 - p.shape[0]), (0, 0), (0, 0))) for p in _poses([4, 2])])
    data, info = load_a2m_rot6d(
        {"poses": poses, "actions": np.array([1, 1]), "lengths": np.array([4, 2])},
        num_joints=3,
        max_frames=5,
        num_actions=2,
    )
    np.testing.assert_array_equal(data["length"], [4, 2])
    np.testing.assert_array_equal(data["x"][1, :2], poses[1, :2].reshape(2, 24))
    assert list(data["caption"]) == ["", ""] and info.captions == [[], []]
    # without lengths every frame is valid
    data, _ = load_a2m_rot6d({"poses": poses, "actions": np.array([0, 1])}, num_joints=3)
    np.testing.assert_array_equal(data["length"], [4, 4])

    with pytest.raises(ValueError, match=r"unknown action id 2 of sample 1.*\[0, 2\)"):
        load_a2m_rot6d({"poses": poses, "actions": np.array([0, 2])}, num_joints=3, num_actions=2)
    with pytest.raises(ValueError, match=r"unknown action id -1"):
        load_a2m_rot6d({"poses": poses, "actions": np.array([-1, 0])}, num_joints=3)
    with pytest.raises(ValueError, match=r"expected padded \(N, F, 25, 6\)"):
        load_a2m_rot6d({"poses": poses, "actions": np.array([0, 1])})  # num_joints=24
    with pytest.raises(ValueError, match=r"poses\[1\].*expected \(F, 4, 6\)"):
        load_a2m_rot6d({"poses": [poses[0], poses[1, :, :3]], "actions": [0, 0]}, num_joints=3)
    with pytest.raises(ValueError, match=r"actions.*\(2,\) integers"):
        load_a2m_rot6d({"poses": poses, "actions": np.array([0])}, num_joints=3)
    with pytest.raises(ValueError, match=r"lacks \['actions'\]"):
        load_a2m_rot6d({"poses": poses}, num_joints=3)
    with pytest.raises(ValueError, match=r"lengths.*\[1, 4\]"):
        load_a2m_rot6d(
            {"poses": poses, "actions": [0, 0], "lengths": np.array([4, 5])}, num_joints=3
        )
    with pytest.raises(TypeError, match="path_or_arrays"):
        load_a2m_rot6d(poses, num_joints=3)


# --------------------------------------------------------------------------------------------
# the Guo et al. protocol
# --------------------------------------------------------------------------------------------


def test_r_precision_perfect_known_ranks_and_chance():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(100, 8))
    assert r_precision(e, e) == {"top1": 1.0, "top2": 1.0, "top3": 1.0}
    # one pool of 4 in 1-D: own-motion ranks 0, 1, 1, 3
    motion = np.array([[0.0], [10.0], [20.0], [30.0]])
    text = np.array([[0.0], [19.0], [31.0], [1.0]])
    r = r_precision(text, motion, pool=4, top_k=(1, 2, 3, 4))
    assert r == {"top1": 0.25, "top2": 0.75, "top3": 0.75, "top4": 1.0}
    # ties count against: a collapsed motion encoder ranks last
    r = r_precision(e, np.zeros_like(e), pool=32, top_k=(1, 31, 32))
    assert r == {"top1": 0.0, "top31": 0.0, "top32": 1.0}
    # independent random embeddings: chance k / pool, within 4 binomial sd
    n = 32 * 64
    r = r_precision(rng.normal(size=(n, 4)), rng.normal(size=(n, 4)), top_k=(1, 3, 8))
    for k in (1, 3, 8):
        p = k / 32
        assert abs(r[f"top{k}"] - p) < 4 * np.sqrt(p * (1 - p) / n), (k, r)


def test_r_precision_errors():
    e = np.zeros((40, 3))
    with pytest.raises(ValueError, match="N >= pool=32"):
        r_precision(e[:10], e[:10])
    with pytest.raises(ValueError, match="same shape"):
        r_precision(e, e[:, :2])
    with pytest.raises(ValueError, match=r"top_k.*\[1, pool=32\]"):
        r_precision(e, e, top_k=(0,))
    with pytest.raises(ValueError, match=r"text_emb must have shape \(N, E\)"):
        r_precision(e[None], e[None])


def test_mm_dist_and_diversity_against_numpy():
    rng = np.random.default_rng(1)
    t, m = rng.normal(size=(50, 5)), rng.normal(size=(50, 5))
    direct = np.mean([np.sqrt(np.sum((t[i] - m[i]) ** 2)) for i in range(50)])
    assert mm_dist(t, m) == pytest.approx(direct, rel=1e-12)
    assert matching_score is mm_dist

    f = rng.normal(size=(40, 6))
    r = np.random.default_rng(7)  # the documented draws: two choices without replacement
    a, b = r.choice(40, 30, replace=False), r.choice(40, 30, replace=False)
    direct = np.mean([np.sqrt(np.sum((f[i] - f[j]) ** 2)) for i, j in zip(a, b, strict=True)])
    assert diversity(f, num_pairs=30, seed=7) == pytest.approx(direct, rel=1e-12)
    # expectation over seeds: the mean over all ordered pairs (a sample may meet itself)
    full = np.mean(np.linalg.norm(f[:, None] - f[None], axis=-1))
    est = np.mean([diversity(f, num_pairs=40, seed=s) for s in range(1500)])
    assert est == pytest.approx(full, rel=0.01)
    with pytest.raises(ValueError, match="N >= num_pairs=300"):
        diversity(f)


def test_multimodality():
    rng = np.random.default_rng(2)
    base = 100.0 * rng.normal(size=(6, 1, 4))  # prompts far apart
    same = np.repeat(base, 12, axis=1)
    assert multimodality(same) == 0.0  # identical generations: no distance across prompts
    f = base + rng.normal(size=(6, 12, 4))
    r = np.random.default_rng(3)
    a, b = r.choice(12, 10, replace=False), r.choice(12, 10, replace=False)
    pairs = list(zip(a, b, strict=True))
    direct = np.mean([np.linalg.norm(f[p, i] - f[p, j]) for p in range(6) for i, j in pairs])
    assert multimodality(f, seed=3) == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="R >= num_pairs=10"):
        multimodality(f[:, :5])
    with pytest.raises(ValueError, match=r"features must have shape \(P, R, E\)"):
        multimodality(f[0])


# --------------------------------------------------------------------------------------------
# physics checks
# --------------------------------------------------------------------------------------------


def _walker(frames, foot_speed, foot_height=0.0, fps=20.0):
    """(1, F, 3, 3): a root moving at 1 m/s, a foot at ``foot_height`` moving at
    ``foot_speed`` along x and z (split evenly), a head above the root."""
    t = np.arange(frames) / fps
    root = np.stack([t, np.full_like(t, 0.9), np.zeros_like(t)], -1)
    s = foot_speed * t / np.sqrt(2)
    foot = np.stack([s, np.full_like(t, foot_height), s], -1)
    head = root + np.array([0.0, 0.8, 0.0])
    return np.stack([root, foot, head], 1)[None]


def test_foot_skate_planted_sliding_and_air():
    mask = np.ones((1, 30), bool)
    r = foot_skate_ratio(_walker(30, 0.0), mask, [1])
    assert r == {"ratio": 0.0, "mean_speed": 0.0, "num_contacts": 29}
    r = foot_skate_ratio(_walker(30, 1.0), mask, [1])
    assert r["ratio"] == 1.0 and r["mean_speed"] == pytest.approx(1.0, rel=1e-12)
    r = foot_skate_ratio(_walker(30, 0.3), mask, [1])  # below the 0.5 m/s threshold
    assert r["ratio"] == 0.0 and r["mean_speed"] == pytest.approx(0.3, rel=1e-12)
    r = foot_skate_ratio(_walker(30, 1.0, foot_height=0.3), mask, [1])  # in the air
    assert r["num_contacts"] == 0 and np.isnan(r["ratio"])
    # half the clip sliding, half planted: a quarter of the two-feet steps skate
    j = np.concatenate([_walker(20, 1.0), _walker(20, 0.0)], axis=1)
    j[:, 20:, 1] = j[:, 19:20, 1]  # the foot stops where it was
    r = foot_skate_ratio(j, np.ones((1, 40), bool), [1, 0])
    assert r["num_contacts"] == 39  # the root (joint 0) is high: no contact
    assert r["ratio"] == pytest.approx(19 / 39)
    # another up axis: swap y and z
    r2 = foot_skate_ratio(j[..., [0, 2, 1]], np.ones((1, 40), bool), [1, 0], up_axis=2)
    assert r2 == r


def test_foot_skate_mask_and_errors():
    j = _walker(30, 1.0)
    ref = foot_skate_ratio(j[:, :18], np.ones((1, 18), bool), [1])
    garbage = 50 * np.random.default_rng(0).normal(size=(1, 12, 3, 3))
    padded = np.concatenate([j[:, :18], garbage], 1)
    padded[:, 18:, :, 1] = 0.0  # padded garbage on the ground, sliding wildly
    mask = np.arange(30)[None] < 18
    r = foot_skate_ratio(padded, mask, [1])
    assert r["ratio"] == ref["ratio"] and r["num_contacts"] == ref["num_contacts"] == 17
    assert r["mean_speed"] == pytest.approx(ref["mean_speed"], rel=1e-12)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, F\)=\(1, 30\)"):
        foot_skate_ratio(padded, mask[:, :10], [1])
    with pytest.raises(ValueError, match=r"feet must be distinct joint indices in \[0, J=3\)"):
        foot_skate_ratio(padded, mask, [3])
    with pytest.raises(ValueError, match=r"joints must have shape \(N, F, J, 3\)"):
        foot_skate_ratio(padded[0], mask, [1])


def _rotations(n, seed):
    q = np.random.default_rng(seed).normal(size=(n, 3, 3))
    return np.linalg.qr(q)[0]


def test_bone_length_variance():
    parents = [-1, 0, 1, 2]
    offsets = np.array([[0, 0, 0], [0, 0.5, 0], [0.3, 0.2, 0], [0, 0, 0.4]])
    rest = np.cumsum(offsets, axis=0)  # a chain
    rot = _rotations(10, 0)
    rigid = np.einsum("fab,jb->fja", rot, rest) + np.arange(10)[:, None, None]  # moving too
    mask = np.ones((1, 10), bool)
    assert bone_length_variance(rigid[None], mask, parents) == pytest.approx(0.0, abs=1e-24)
    # two clips of different (rigid) skeletons: the variance is per clip
    both = np.stack([rigid, 2 * rigid])
    assert bone_length_variance(both, np.ones((2, 10), bool), parents) == pytest.approx(
        0.0, abs=1e-24
    )
    # stretch bone 2 -> 3 to lengths 0.4 and 0.6 in alternate frames: var 0.01, mean over 3
    stretched = rest[None].repeat(10, 0)
    stretched[1::2, 3, 2] = rest[2, 2] + 0.6
    assert bone_length_variance(stretched[None], mask, parents) == pytest.approx(0.01 / 3)
    # padded frames (garbage) change nothing
    pad = np.concatenate([stretched, np.random.default_rng(1).normal(size=(6, 4, 3))])
    m = np.arange(16)[None] < 10
    assert bone_length_variance(pad[None], m, parents) == pytest.approx(0.01 / 3, rel=1e-12)
    with pytest.raises(ValueError, match=r"parents must be \(4,\) integers"):
        bone_length_variance(pad[None], m, [-1, 0, 1])
    with pytest.raises(ValueError, match="none its own parent"):
        bone_length_variance(pad[None], m, [-1, 1, 1, 2])
    with pytest.raises(ValueError, match="no valid frame"):
        bone_length_variance(pad[None], np.zeros_like(m), parents)
