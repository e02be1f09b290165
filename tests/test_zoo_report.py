"""The reporting helpers (mean +- sd over seeds, tables, report files, curves) and the zoo's
configs and cache names (no training here: the quickstart test trains through the zoo)."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments import _report, _zoo


def test_over_seeds_mean_sd_values():
    out = _report.over_seeds(lambda s: {"a": s * 2.0, "b": 1.0 / (s + 1)}, [0, 1, 5])
    np.testing.assert_allclose(out["a"]["values"], [0.0, 2.0, 10.0])
    np.testing.assert_allclose(out["a"]["mean"], 4.0)
    # sample sd, ddof = 1: sqrt(((0-4)^2 + (2-4)^2 + (10-4)^2) / 2) = sqrt(28)
    np.testing.assert_allclose(out["a"]["sd"], np.sqrt(28.0))
    np.testing.assert_allclose(out["b"]["mean"], np.mean([1.0, 0.5, 1 / 6]))
    assert _report.over_seeds(lambda s: {"a": 3.0}, [7])["a"]["sd"] == 0.0
    with pytest.raises(ValueError, match="seeds"):
        _report.over_seeds(lambda s: {"a": 1.0}, [])
    with pytest.raises(ValueError, match="same metrics"):
        _report.over_seeds(lambda s: {"a": 1.0} if s else {"b": 1.0}, [0, 1])


def test_markdown_table_formats_mean_sd():
    rows = {"DDIM": {"kid": {"mean": 0.01234, "sd": 0.00056, "values": []}, "nfe": 10,
                     "acc": 0.98765},
            "noise": {"kid": 1.5, "nfe": 0}}
    md = _report.markdown_table(rows, ["nfe", ("kid", "KID"), ("acc", "accuracy")],
                                row_header="sampler")
    lines = md.strip().split("\n")
    assert lines[0] == "| sampler | nfe | KID | accuracy |"
    assert lines[2] == "| DDIM | 10 | 0.0123 ± 0.00056 | 0.988 |"
    assert lines[3] == "| noise | 0 | 1.5 | - |"


def test_write_report_and_plot(tmp_path):
    png = _report.plot_curves(str(tmp_path / "fig" / "kid.png"), [5, 10, 20],
                              {"DDIM": [3.0, 2.0, 1.0],
                               "DPM++": [{"mean": 2.0, "sd": 0.1, "values": []}] * 3},
                              "NFE", "KID", "KID vs NFE", logx=True)
    with Image.open(png) as im:
        assert im.size == (600, 400)
    md, js = _report.write_report(str(tmp_path), "demo", "| a |\n|---|\n", {"x": np.float32(1.5)},
                                  [png], judge="Judge: a test network (proxy).", notes="note")
    with open(md) as f:
        text = f.read()
    assert text.startswith("# demo") and "Judge: a test network" in text
    assert "![kid.png](fig/kid.png)" in text and "note" in text
    with open(js) as f:
        saved = json.load(f)
    assert saved == {"judge": "Judge: a test network (proxy).", "data": {"x": 1.5}}
    with pytest.raises(ValueError, match="judge"):
        _report.write_report(str(tmp_path), "demo", "", {}, judge="")
    with pytest.raises(ValueError, match="curve 'x'"):
        _report.plot_curves(str(tmp_path / "b.png"), [1, 2], {"x": [1.0]}, "a", "b", "c")


def test_zoo_configs_and_names():
    eps, edm = _zoo.digits_config("eps", 8), _zoo.digits_config("edm", 16)
    assert eps.data.test_fraction == 0.5 and eps.data.split_seed == 0
    assert eps.model.num_classes == 10 and eps.model.label_dropout == 0.1
    assert eps.diffusion.schedule == "linear" and eps.diffusion.prediction == "eps"
    assert edm.diffusion.schedule == "edm" and edm.diffusion.preconditioning == "edm"
    assert _zoo.zoo_name(eps) == f"digits8_eps_{eps.train.steps}"
    assert _zoo.zoo_name(edm) == f"digits16_edm_{edm.train.steps}"
    train, test = _zoo.digits_data(eps)
    assert len(train["x"]) == 899 and len(test["x"]) == 898
    assert not set(map(bytes, train["x"])) & set(map(bytes, test["x"][:50]))
    short = _zoo.digits_config("edm", 8, train_steps=3, fast_compile=True)
    assert short.train.steps == 3 and short.train.ckpt_every == 3 and short.train.fast_compile
    assert short.optim.warmup_steps == 2 and _zoo.zoo_name(short) == "digits8_edm_3"
    assert eps.train.fast_compile is False and eps.train.steps > 3
    with pytest.raises(ValueError, match="train_steps"):
        _zoo.digits_config("eps", 8, train_steps=-1)
    with pytest.raises(ValueError, match="kind"):
        _zoo.digits_config("v")
    with pytest.raises(ValueError, match="image_size"):
        _zoo.digits_config("eps", 32)
    with pytest.raises(ValueError, match="test_fraction"):
        c = _zoo.digits_config()
        c.data.test_fraction = 0.0
        _zoo.digits_model(c, root="unused")


class _PixelJudge:
    """A stand-in judge: features are the pixels, the prediction decodes the label that the
    test writes into an image's mean value."""

    def features(self, x):
        return np.asarray(x, np.float64).reshape(len(x), -1)

    def predict(self, x):
        return np.rint(2.0 * self.features(x).mean(axis=1) + 1.0).astype(np.int64)

    def features_and_labels(self, x):
        return self.features(x), self.predict(x)

    reference_features = features


def test_floor_matches_the_samples_labels():
    rng = np.random.default_rng(0)
    y_train = np.repeat(np.arange(3), [10, 6, 20])
    # image of label k: constant (k - 1) / 2 plus a tag in one pixel naming the train image
    x_train = np.repeat((y_train[:, None] - 1.0) / 2.0, 4, 1)
    x_train[:, 0] += np.arange(len(y_train)) * 1e-3
    train = {"x": x_train.reshape(-1, 2, 2, 1), "y": y_train}
    test = {"x": rng.normal(size=(30, 2, 2, 1)), "y": rng.integers(0, 3, 30)}
    judge = _PixelJudge()
    labels = np.array([0] * 5 + [1] * 9 + [2] * 4)  # class 1 asked 9 times, the split holds 6
    out = _zoo.floor(train, test, judge, len(labels), labels=labels, seed=1)
    assert out["accuracy"] == 1.0  # every drawn image has the asked-for label
    assert out["floor_repeats"] == 3
    iid = _zoo.floor(train, test, judge, 18, seed=1)
    assert iid["floor_repeats"] == 0
    with pytest.raises(ValueError, match="labels must have shape"):
        _zoo.floor(train, test, judge, 5, labels=labels)
    with pytest.raises(ValueError, match="class 7"):
        _zoo.floor(train, test, judge, 2, labels=np.array([0, 7]))


def test_judge_one_pass_equals_separate_passes_and_reference_features_are_fresh():
    import jax.numpy as jnp
    from flax import nnx

    import nets
    from experiments.features import Judge

    g, p = nets.init_params(nets.Classifier, 10, 1, 8, 8, seed=0)
    judge = Judge(g, p, 0.0)
    x = np.random.default_rng(0).uniform(-1, 1, (37, 8, 8, 1)).astype(np.float32)
    feats, labels = judge.features_and_labels(x)
    model = nnx.merge(g, p)
    np.testing.assert_allclose(feats, np.asarray(model.features(jnp.asarray(x))), atol=1e-5)
    np.testing.assert_array_equal(labels, np.asarray(model(jnp.asarray(x))).argmax(-1))
    np.testing.assert_array_equal(judge.predict(x), labels)
    ref = judge.reference_features(x)
    assert judge.reference_features(x) is ref  # computed once
    y = x.copy()
    y[0, 0, 0, 0] += 0.5  # another array, and the same array changed in place
    assert not np.allclose(judge.reference_features(y)[0], ref[0])
    x[1, 0, 0, 0] += 0.5
    np.testing.assert_allclose(judge.reference_features(x), judge.features(x), atol=0)
