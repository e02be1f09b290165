"""The YONOS-SR experiment: bad configs fail before any work; a smoke run trains every network
(autoencoder, x2 teacher, distilled and direct x4 / x8 students, decoder fine-tuning), resumes
them for free and writes a report with every table; ``upscale`` runs on an odd-sized image of
the user's, tiled, and refuses bad input clearly."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import yonos_sr as Y


def _read(path):
    with open(path) as f:
        return f.read()


def _smoke_config():
    c = Y.get_config()
    c.fast_compile = True
    c.seeds = (0,)
    c.data.num_train = 64
    c.data.num_test = 16
    c.autoencoder.steps = 2
    c.autoencoder.batch_size = 8
    c.autoencoder.base_channels = 8
    c.autoencoder.attention = False
    c.autoencoder.factor = 2  # two levels: half the compile of the f = 4 preset
    c.unet.base_channels = 8
    c.unet.channel_mult = (1,)
    c.unet.attention = False
    # the teacher and the students share one optimiser setting: one compiled direct step
    for sec in (c.teacher, c.student):
        sec.steps = 3
        sec.batch_size = 8
        sec.learning_rate = 1e-3
        sec.warmup_steps = 0
        sec.ema_decay = 0.9
    c.curve.points = ()  # the curve's segments: test_learning_curve_segments_resume
    c.curve.data_sizes = (16,)
    c.decoder.steps = 2
    c.decoder.batch_size = 8
    c.sample.many_steps = (2,)
    c.sample.figure_patches = 2
    return c


@pytest.mark.parametrize("key, value, match", [
    ("space", "wavelet", "config.space"),
    ("student.scales", (4, 16), "double"),
    ("student.scales", (3,), "power of two"),
    ("teacher.scale", 1, "teacher.scale"),
    ("data.test_images", ("camera", "moon"), "disjoint"),
    ("data.test_images", ("lena",), "test_images"),
    ("data.channels", 2, "data.channels"),
    ("diffusion.prediction", "eps", "prediction"),
    ("decoder.ssim_window", 6, "ssim_window"),
    ("curve.points", (0,), "curve.points"),
    ("student.batch_size", 12, "multiple of the 8 devices"),
    ("diffusion.t_one_fraction", 1.0, "t_one_fraction"),
])
def test_bad_config_is_named_before_any_work(tmp_path, key, value, match):
    c = Y.get_config()
    if key == "data.test_images" and value == ("camera", "moon"):
        c.data.train_images = ("moon", "brick")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        Y.train_and_evaluate(c, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_time_sampler_puts_its_share_at_t_one():
    import jax

    t = np.asarray(Y.time_sampler(0.25)(jax.random.key(0), 8000))
    share = np.mean(t == 1.0)
    assert abs(share - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 8000)
    rest = t[t < 1.0]
    assert rest.min() >= 1e-5 and abs(rest.mean() - 0.5) < 0.02  # the others uniform


def test_tiles_blend_to_the_identity_on_odd_sizes():
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (9, 70), (32, 32)):
        img = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
        calls = []

        def fn(t, calls=calls):
            calls.append(t.shape)
            return t

        out = Y.tiled(fn, img, 32, 8)
        assert out.shape == img.shape
        np.testing.assert_allclose(out, img, atol=1e-6)
        assert all(s[1:] == (32, 32, 3) for s in calls)
    # a tile-dependent map is blended, not pasted: a constant per tile gives values between
    out = Y.tiled(lambda t: np.ones_like(t) * np.arange(len(t))[:, None, None, None],
                  np.zeros((40, 40, 1), np.float32), 32, 8)
    assert out.min() == 0.0 and out.max() == 3.0 and len(np.unique(out)) > 4
    with pytest.raises(ValueError, match="overlap"):
        Y.tiled(lambda t: t, np.zeros((40, 40, 1), np.float32), 32, 20)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    c = _smoke_config()
    work = str(tmp_path_factory.mktemp("yonos") / "run")
    return c, work, Y.train_and_evaluate(c, work, progress=False, log=lambda *_: None)


def test_yonos_sr_experiment_smoke(smoke_run):
    c, work, report = smoke_run
    for s in (4, 8):
        rows = report["quality"][f"x{s}"]
        assert {"bicubic", "direct, 2 steps", "direct, 1 step", "scale-distilled, 1 step",
                "scale-distilled, 1 step + decoder FT", "HR (ground truth)"} <= set(rows)
        cell = rows["scale-distilled, 1 step"]
        assert len(cell["psnr"]["values"]) == 1 and np.isfinite(cell["psnr"]["mean"])
        assert 0 < rows["bicubic"]["ssim"]["mean"] <= 1
    # degradation gets worse with the scale: the bicubic baseline's PSNR falls from x4 to x8
    assert (report["quality"]["x8"]["bicubic"]["psnr"]["mean"]
            < report["quality"]["x4"]["bicubic"]["psnr"]["mean"])
    assert set(report["curve_steps"]["distill"]) == {3}
    assert set(report["curve_data"]["direct"]) == {16, 64}
    md = _read(os.path.join(work, "report.md"))
    for heading in ("### x4", "### x8", "vs training steps", "vs training patches", "Verdict",
                    "--config.data.num_train=64"):
        assert heading in md, heading
    data = json.loads(_read(os.path.join(work, "report.json")))["data"]
    assert data["quality"]["x4"]["bicubic"]["psnr"]["mean"] == pytest.approx(
        report["quality"]["x4"]["bicubic"]["psnr"]["mean"])
    for f in ("samples_x4.png", "curve_steps.png", "curve_data.png"):
        assert os.path.getsize(os.path.join(work, f)) > 0


def test_rerun_restores_every_network(smoke_run):
    c, work, report = smoke_run
    logs = {d: _read(os.path.join(work, d, "metrics.jsonl"))
            for d in ("teacher_x2", "distill_x8_seed0", "direct_x4_seed0",
                      "data16_distill_x4_seed0", "decoder_x4_seed0")}
    again = Y.train_and_evaluate(c, work, progress=False, log=lambda *_: None)
    for d, text in logs.items():
        assert _read(os.path.join(work, d, "metrics.jsonl")) == text, d
    assert again["quality"] == report["quality"]
    # a changed training setting is refused, not silently reused
    c2 = _smoke_config()
    c2.student.learning_rate = 3e-3
    with pytest.raises(ValueError, match="another config"):
        Y.train_and_evaluate(c2, work, progress=False, log=lambda *_: None)


def test_upscale_an_odd_sized_image_and_refuse_bad_input(smoke_run, tmp_path, capsys):
    _, work, _ = smoke_run
    src, dst = str(tmp_path / "in.png"), str(tmp_path / "out.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (11, 13), dtype=np.uint8), "L").save(src)
    out = Y.upscale(work, src, dst, 4)
    assert out.shape == (44, 52, 1) and np.all(np.isfinite(out))
    with Image.open(dst) as im:
        assert im.size == (52, 44)
    rgb = str(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8), "RGB").save(rgb)
    with pytest.raises(ValueError, match="RGB image but the model was trained on grayscale"):
        Y.upscale(work, rgb, dst, 4)
    for bad in (3, 16):
        with pytest.raises(ValueError, match=r"scale must be one of \(2, 4, 8\)"):
            Y.upscale(work, src, dst, bad)
    with pytest.raises(ValueError, match="no finished yonos_sr run"):
        Y.upscale(str(tmp_path / "empty"), src, dst, 4)
    # the command line: one line, no traceback
    with pytest.raises(SystemExit) as e:
        Y.main(["upscale", rgb, dst, "--scale", "4", "--workdir", work])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "grayscale" in err and "Traceback" not in err


def test_decoder_finetuning_with_the_patch_discriminator(smoke_run, tmp_path):
    # config.decoder.discriminator: the hinge patch-GAN term joins L1 + SSIM; the discriminator
    # trains beside the decoder, the encoder stays bitwise unchanged and the result differs
    # from the same fine-tuning without the adversarial term
    import jax

    from nets import split_decoder

    _, work, _ = smoke_run
    config, run = Y.load_run(work)
    s = config.student.scales[0]
    z1 = Y.super_resolve(config, run.graphdef, run.students["distill", s, 0],
                         run.inputs["train"][s], 1, 0)
    outs = {}
    for disc in (False, True):
        config.decoder.discriminator = disc
        outs[disc] = Y.finetune_decoder(config, run.space, z1, run.train_hr, 0,
                                        str(tmp_path / f"disc{disc}"), progress=False)
    g, before, _ = run.space.ae
    dec0, rest0 = split_decoder(before)
    for after in outs.values():
        dec, rest = split_decoder(after)
        for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(rest0), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(dec))
        assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(dec0), strict=True))
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(split_decoder(outs[True])[0]),
        jax.tree.leaves(split_decoder(outs[False])[0]), strict=True))
