import json
import os

from experiments import bench_train


def test_bench_train_smoke(tmp_path):
    r = bench_train.main(["--train-batch", "8", "--sample-batch", "8", "--nfe", "2",
                          "--iters", "1", "--peak-tflops", "1.0", "--fast-compile",
                          "--channel-mult", "1", "--base-channels", "16", "--per-leaf",
                          "--out", str(tmp_path)])
    assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0
    # XLA's FLOP count of the one-level, 16-channel tiny U-Net's forward pass (~3.8 MFLOP:
    # mostly the 3x3 convolutions, 2 * 9 * 16 * 16 * 64 = 0.3 MFLOP each) is in range
    assert 1e-3 < r["forward_gflop_per_image"] < 1.5e-2
    assert r["channel_mult"] == [1] and r["base_channels"] == 16 and r["params"] < 100_000
    assert 0 < r["train_fraction_of_peak"] < 1
    # the optimizer on one raveled vector lowers to fewer lines than one per leaf
    assert 0 < r["train_hlo_lines"] < r["per_leaf_train_hlo_lines"]
    assert r["per_leaf_train_images_per_s"] > 0 and r["per_leaf_train_compile_s"] > 0
    assert r["distill_images_per_s"] > 0 and r["distill_compile_s"] > 0
    assert r["lcd_images_per_s"] > 0 and r["lcd_compile_s"] > 0
    files = os.listdir(tmp_path)
    assert len(files) == 1
    with open(tmp_path / files[0]) as f:
        saved = json.load(f)
    assert saved["preset"] == "tiny" and saved["fast_compile"] is True and saved["nfe"] == 2
    assert saved["train_images_per_s"] == r["train_images_per_s"]
