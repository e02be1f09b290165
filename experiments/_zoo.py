"""The shared model zoo and evaluation protocol of the paper experiments and the quickstart.

Every sampler experiment grades samples of the same trained networks the same way, so each
network is trained once and cached under a root directory (``runs/zoo`` by default):

* ``digits_config(kind, image_size)`` / ``digits_model(config, root)``: a class-conditional
  tiny U-Net on scikit-learn's digits, trained on the *train split only* (half of the 1,797
  images, ``data.split_seed = 0``), with label dropout 0.1 for classifier-free guidance.
  ``kind="eps"``: discrete linear VP (DDPM's 1000 steps) with eps-prediction; ``kind="edm"``:
  EDM's schedule, preconditioning, loss weighting and log-normal noise levels.
* ``judges(train_data, root, test_data)``: two classifiers trained on the *test* split (the
  reference every sample set is compared with) with different seeds. ``primary`` is for tuning
  and development, ``judge`` for reports, so no setting is tuned to the network that grades it.
  Training them on the reference makes the comparison symmetric: samples and the real train
  images of the floor are both unseen by the judge. (A judge trained on the train split maps
  the images it was trained on differently from unseen ones, and every decent sampler then
  scored *better* than real data: floor feature-FD 0.54 against 0.20-0.37 for the samplers.)
* ``evaluate(samples, labels, judge, test_data)``: the metrics every report uses, samples
  against the held-out test split; ``floor(train_data, test_data, judge, n)`` the same metrics
  for ``n`` real training images (the real-vs-real floor: a sampler scoring better than it is
  suspect, e.g. of memorising the train split).

All feature metrics are *in-project proxies*: the features are a small classifier's, trained
here on the digits train split, not Inception's.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from dpm.data import train_test_split
from dpm.metrics import (
    frechet_distance_from_features,
    hfer,
    kid,
    label_accuracy,
    precision_recall,
)
from experiments._registry import make_dataset
from experiments._runner import Trained, base_config, train_denoiser
from experiments.features import Judge, train_classifier

__all__ = [
    "DEFAULT_ROOT",
    "JUDGE_STEPS",
    "KINDS",
    "digits_config",
    "digits_data",
    "digits_model",
    "evaluate",
    "floor",
    "judge_description",
    "judges",
    "report_fields",
    "zoo_name",
]

DEFAULT_ROOT = "runs/zoo"
KINDS = ("eps", "edm")
JUDGE_STEPS = 800  # classifier optimizer steps
# the digits U-Net per image size (tiny preset): train steps, batch size, base channels. The
# 16x16 model trains at 3.15 steps/s on 2 CPU cores (measured: 1,000 steps in ~5.5 min); the
# 8x8 settings (24 channels, batch 128) would cost about 2.25 x 2 = 4.5x as much per step at
# 16x16 (an estimate from the FLOPs, not run)
_TRAIN = {8: dict(steps=1200, batch_size=128, base_channels=None),
          16: dict(steps=1000, batch_size=64, base_channels=16)}


def digits_config(
    kind: str = "eps", image_size: int = 8, *, train_steps: int = 0, fast_compile: bool = False
) -> ml_collections.ConfigDict:
    """The training config of a zoo digits model.

    Args:
      kind: ``"eps"`` (DiscreteVP linear, 1000 steps, eps-prediction and eps-MSE) or
        ``"edm"`` (EDM schedule sigma in [0.002, 80], EDM preconditioning with
        sigma_data = 0.5, EDM loss weighting, log-normal noise levels).
      image_size: 8 (the originals) or 16 (bilinear upsampling, a harder task).
      train_steps: 0 for the zoo's own training length (the shared cache); > 0 overrides it
        (smoke runs; the model is then cached under another name).
      fast_compile: compile the train step with XLA backend optimisations off (smoke runs).

    Returns:
      A ``ConfigDict`` for ``experiments._runner.train_denoiser`` (test_fraction 0.5,
      split_seed 0: the model never sees the test split).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if image_size not in _TRAIN:
        raise ValueError(f"image_size must be one of {sorted(_TRAIN)}; got {image_size!r}")
    c = base_config()
    c.name = f"zoo_digits{image_size}_{kind}"
    c.data.kwargs = ml_collections.ConfigDict(dict(image_size=image_size))
    c.data.test_fraction = 0.5
    c.data.split_seed = 0
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
    if kind == "edm":
        c.diffusion.schedule = "edm"
        c.diffusion.prediction = "x0"
        c.diffusion.preconditioning = "edm"
        c.diffusion.weighting = "edm"
        c.diffusion.time_sampler = "lognormal"
        c.diffusion.sigma_data = 0.5
    c.train.steps = _TRAIN[image_size]["steps"]
    c.train.batch_size = _TRAIN[image_size]["batch_size"]
    c.model.base_channels = _TRAIN[image_size]["base_channels"]
    c.train.ckpt_every = 400
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    if train_steps:
        n = int(train_steps)
        if n < 1:
            raise ValueError(f"train_steps must be >= 0; got {train_steps!r}")
        c.train.steps, c.train.ckpt_every, c.train.log_every = n, n, max(1, n // 2)
        c.optim.warmup_steps = min(c.optim.warmup_steps, n - 1)
    c.train.fast_compile = bool(fast_compile)
    return c


def zoo_name(config: ml_collections.ConfigDict) -> str:
    """The cache directory name of a zoo config: ``digits<size>_<kind>_<steps>``."""
    kind = "edm" if config.diffusion.get("preconditioning") == "edm" else "eps"
    size = config.data.kwargs.get("image_size", 8)
    return f"{config.data.name}{size}_{kind}_{int(config.train.steps)}"


def digits_model(
    config: ml_collections.ConfigDict, root: str = DEFAULT_ROOT, progress: bool = True
) -> Trained:
    """Trains the zoo model of ``config`` once under ``root/zoo_name(config)`` (resumes, and
    costs nothing when finished); returns ``Trained`` with ``data`` = train split and
    ``test_data`` = held-out split."""
    if not config.data.get("test_fraction", 0.0) > 0:
        raise ValueError(
            "config.data.test_fraction must be > 0 for a zoo model (train split only); "
            f"got {config.data.get('test_fraction')!r}"
        )
    return train_denoiser(config, os.path.join(root, zoo_name(config)), progress=progress)


def digits_data(
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(train, test)`` splits of a zoo config's data (the same split the model was trained
    on), without training anything."""
    return train_test_split(
        make_dataset(config.data.name, **config.data.kwargs.to_dict()),
        config.data.test_fraction, seed=config.data.split_seed,
    )


def judges(
    train_data: dict[str, np.ndarray],
    root: str = DEFAULT_ROOT,
    test_data: dict[str, np.ndarray] | None = None,
    *,
    steps: int = JUDGE_STEPS,
) -> tuple[Judge, Judge]:
    """The ``(primary, judge)`` classifiers (seeds 0 and 1), trained on the reference split and
    cached under ``root/classifiers/<shape>_n<N>_<steps>_<which>/{primary,judge}``.

    With ``test_data`` both classifiers train on all of it (the reference that samples and the
    floor are compared with, so both compared sets are unseen by them) and their
    ``held_out_accuracy`` is measured on ``train_data``. Without it they train on
    ``train_data`` with 15% held out.

    Args:
      train_data: the train split, ``{"x": (N, H, W, C), "y": (N,)}``.
      root: cache root.
      test_data: the held-out split, ``{"x": (M, H, W, C), "y": (M,)}``, or None.
      steps: optimizer steps of each classifier.

    Returns:
      ``(primary, judge)``: tune with ``primary``, report with ``judge``.
    """
    if test_data is None:
        x, y, test, tag = train_data["x"], train_data["y"], None, "ho15"
    else:
        x, y, tag = test_data["x"], test_data["y"], "ontest"
        test = (train_data["x"], train_data["y"])
    n, h, w, c = x.shape
    sub = os.path.join(root, "classifiers", f"{h}x{w}x{c}_n{n}_{steps}_{tag}")
    return tuple(
        train_classifier(x, y, seed=seed, workdir=os.path.join(sub, name), steps=steps, test=test)
        for seed, name in ((0, "primary"), (1, "judge"))
    )


def report_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the evaluation fields every judged paper experiment shares to ``c`` (and returns
    it): ``zoo_root`` (where the judges are cached), ``judge_steps``, ``seeds`` (0, 1, 2),
    ``fast_compile`` (:func:`dpm.training.fast_compile_options`, for smoke runs) and
    ``kid_subsets``."""
    c.zoo_root = DEFAULT_ROOT
    c.judge_steps = JUDGE_STEPS
    c.seeds = (0, 1, 2)
    c.fast_compile = False
    c.kid_subsets = 100
    return c


def judge_description(judge: Judge, steps: int = JUDGE_STEPS) -> str:
    """One sentence for reports: which network judges, how it was trained, and that its
    metrics are proxies."""
    return (
        "Judge: a small CNN classifier (nets.Classifier, width 32, 128-d penultimate features) "
        f"trained in-project with seed 1 for {steps} steps on the digits test split (the "
        "reference; the diffusion model never saw it), so samples and the real-data floor are "
        f"both unseen by it; accuracy on the train split {judge.held_out_accuracy:.3f}. "
        "KID, feature-FD, precision and recall are computed in its features against the "
        "test split: in-project proxies of the Inception-based metrics, comparable "
        "only within this project. The primary classifier (seed 0) is used for tuning only."
    )


def _clean(samples: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    x = np.asarray(samples, dtype=np.float64)
    finite = np.all(np.isfinite(x), axis=tuple(range(1, x.ndim)))
    stats = {
        "frac_nonfinite": float(np.mean(~finite)),
        # samples with a finite pixel more than half the data range outside [-1, 1]
        "frac_saturated": float(np.mean(
            finite & np.any(np.abs(np.where(np.isfinite(x), x, 0.0)) > 2.0, axis=tuple(
                range(1, x.ndim))))),
        "frac_pixels_out_of_range": float(np.mean(np.where(np.isfinite(x), np.abs(x), 0.0) > 1.0)),
    }
    # a diverged sample counts as a blank (mid-grey) image, so it hurts every metric
    x = np.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    return np.clip(x, -1.0, 1.0).astype(np.float32), stats


def evaluate(
    samples: np.ndarray,
    labels: np.ndarray | None,
    judge: Judge,
    test_data: dict[str, np.ndarray],
    *,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """The report metrics of ``samples`` against the held-out ``test_data``, in ``judge``'s
    features.

    Samples are taken as produced by the sampler (unclipped): a sample with a non-finite pixel
    counts in ``frac_nonfinite`` and is replaced by a blank image; all are then clipped to
    [-1, 1] for the feature metrics.

    Args:
      samples: (N, H, W, C) generated images, nominally in [-1, 1].
      labels: (N,) labels the samples were conditioned on (None: no label accuracy).
      judge: the grading classifier.
      test_data: the held-out split, ``{"x": (M, H, W, C), "y": (M,)}``.
      kid_subsets: KID subsets, each of ``min(N, M) // 2`` real and fake features (the sd is
        that of a half-size estimate: about sqrt(2) times the full estimate's).
      seed: KID subset seed.

    Returns:
      dict with ``kid`` and ``kid_sd`` (KID over subsets), ``fd`` (Fréchet distance of judge
      features), ``precision``, ``recall`` (k = 3), ``accuracy`` (label adherence; NaN-free,
      absent when ``labels`` is None), ``hfer`` (mean high-frequency energy ratio),
      ``frac_nonfinite``, ``frac_saturated`` (finite samples with a pixel beyond +-2) and
      ``frac_pixels_out_of_range`` (pixels beyond +-1), and ``n``.
    """
    x, stats = _clean(samples)
    if x.ndim != 4 or x.shape[1:] != test_data["x"].shape[1:]:
        raise ValueError(f"samples must have shape (N,) + {test_data['x'].shape[1:]}; "
                         f"got {np.shape(samples)}")
    if labels is not None:
        f_fake, predicted = judge.features_and_labels(x)
    else:
        f_fake = judge.features(x)
    f_real = judge.reference_features(test_data["x"])
    # subsets of half the smaller set, so that they differ and the sd measures something
    k_mean, k_sd = kid(f_real, f_fake, subset_size=max(2, min(len(f_real), len(f_fake)) // 2),
                       num_subsets=kid_subsets, seed=seed)
    precision, recall = precision_recall(f_real, f_fake, k=3)
    out = {
        "n": len(x),
        "kid": k_mean,
        "kid_sd": k_sd,
        "fd": frechet_distance_from_features(f_real, f_fake),
        "precision": precision,
        "recall": recall,
        "hfer": float(np.mean(hfer(x))),
        **stats,
    }
    if labels is not None:
        out["accuracy"] = label_accuracy(predicted, np.asarray(labels))
    return out


def floor(
    train_data: dict[str, np.ndarray],
    test_data: dict[str, np.ndarray],
    judge: Judge,
    n: int,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """:func:`evaluate` of ``n`` random *real* train-split images (with their true labels)
    against the test split: the real-vs-real floor at sample size ``n``. A sampler that scores
    better than this is suspect (memorising the train split, or a metric artefact); its
    ``accuracy`` is the judge's accuracy on real images it never saw.

    Pass the ``labels`` the samples were conditioned on: the floor then draws, for each, a
    train image of that label, so both sets have the same class counts. This matters: a
    class-balanced set (``arange(n) % 10``) is not an i.i.d. draw, and its unbiased KID
    against the test split is biased low (measured with the zoo judge at n = 800: +0.0037
    for an i.i.d. train subsample, -0.0077 for a class-balanced one).

    Args:
      train_data, test_data: the splits, ``{"x": (N, H, W, C), "y": (N,)}``.
      judge: the grading classifier.
      n: the number of real images (the samples' n).
      labels: optional ``(n,)`` class labels to match; None draws ``n`` images uniformly.
        A class asked for more often than the train split holds it repeats images; their
        count is returned as ``floor_repeats``.
      seed: the draw's and KID's seed.
    """
    if not 2 <= n <= len(train_data["x"]):
        raise ValueError(f"n must be in [2, {len(train_data['x'])}] (the train split); got {n!r}")
    rng = np.random.default_rng(seed)
    if labels is None:
        idx = rng.choice(len(train_data["x"]), n, replace=False)
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {labels.shape}")
        idx = np.empty(n, np.int64)
        for k in np.unique(labels):
            pool = np.flatnonzero(train_data["y"] == k)
            want = np.flatnonzero(labels == k)
            if not len(pool):
                raise ValueError(f"labels asks for class {k}, which the train split lacks")
            # without replacement while the class lasts, then repeats (counted in the result)
            take = rng.permutation(pool)[: len(want)]
            idx[want] = np.concatenate([take, rng.choice(pool, len(want) - len(take))])
    out = evaluate(train_data["x"][idx], train_data["y"][idx], judge, test_data, seed=seed,
                   **kwargs)
    return {**out, "floor_repeats": int(n - len(np.unique(idx)))}
