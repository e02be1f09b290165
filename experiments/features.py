"""Feature metrics with classifiers trained in the project (Inception weights cannot be
downloaded here): the Fréchet distance in a classifier's penultimate features ("feature-FD")
and the accuracy of class-conditional samples as judged by the classifier.

Two classifiers are trained on the data with different seeds and data splits: ``primary``
(for development and tuning) and ``judge`` (for reports), so no sampler setting is tuned to the
network that grades it. Both are cached as checkpoints and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nets
from dpm.data import BatchIterator
from dpm.metrics import frechet_distance_from_features
from dpm.training import Checkpointer, init_train_state, make_optimizer, make_train_step


@dataclasses.dataclass
class Judge:
    """A trained classifier used as a feature extractor and label predictor."""

    graphdef: nnx.GraphDef
    params: nnx.State
    held_out_accuracy: float
    _ref: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def _apply(self, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        # one program gives both features and logits (evaluation needs both of the same
        # images); chunks padded to a power of two (at most ``batch``): a few compiled shapes
        # serve every sample count
        f = _jitted(self.graphdef)
        size = min(batch, 1 << max(0, int(len(x)) - 1).bit_length())
        feats, logits = [], []
        for i in range(0, len(x), size):
            chunk = np.asarray(x[i : i + size], np.float32)
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            a, b = f(self.params, jnp.asarray(chunk))
            feats.append(np.asarray(a)[: size - pad])
            logits.append(np.asarray(b)[: size - pad])
        return np.concatenate(feats, 0), np.concatenate(logits, 0)

    def features_and_labels(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, W, C)`` images in ``[-1, 1]`` -> penultimate features ``(N, F)`` and
        predicted labels ``(N,)``, from one pass."""
        feats, logits = self._apply(x)
        return feats, logits.argmax(-1)

    def features(self, x: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` images in ``[-1, 1]`` -> ``(N, F)`` penultimate features."""
        return self._apply(x)[0]

    def reference_features(self, x: np.ndarray) -> np.ndarray:
        """:meth:`features` of a fixed reference set (the test split every sample set is
        compared with), computed once per array: the last array is kept and matched by
        identity, shape and a checksum, so a changed array is never served stale features."""
        key = (id(x), np.shape(x), float(np.sum(x, dtype=np.float64)))
        if self._ref is None or self._ref[0] != key:
            self._ref = (key, x, self.features(x))  # x kept alive: its id stays unique
        return self._ref[2]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels, ``(N,)``."""
        return self._apply(x)[1].argmax(-1)


_JIT_CACHE: dict = {}


def _features_and_logits(graphdef, params, x):
    model = nnx.merge(graphdef, params)
    f = model.features(x)
    return f, model.head(f)  # the classifier's logits at evaluation (no dropout)


def _jitted(graphdef):
    key = id(graphdef)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(functools.partial(_features_and_logits, graphdef))
    return _JIT_CACHE[key]


def train_classifier(
    x: np.ndarray, y: np.ndarray, *, seed: int, workdir: str | None = None, steps: int = 800,
    batch_size: int = 128, width: int = 32, held_out: float = 0.15,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Judge:
    """Trains a :class:`nets.Classifier` on ``(x, y)``, or restores it from ``workdir`` when
    trained before.

    Args:
      x: (N, H, W, C) images in [-1, 1].
      y: (N,) integer labels.
      seed: initialisation, data order and (without ``test``) held-out draw.
      workdir: checkpoint directory (None: not cached).
      steps: optimizer steps.
      batch_size: batch size.
      width: the classifier's first-stage width (features are ``4 * width`` wide).
      held_out: without ``test``, the random fraction of ``(x, y)`` kept aside to measure the
        held-out accuracy.
      test: ``(x_test, y_test)``: train on all of ``(x, y)`` and measure the held-out accuracy
        on this set instead (``held_out`` is then unused).

    Returns:
      The :class:`Judge` (EMA parameters) with its held-out accuracy.
    """
    n, H, W, C = x.shape
    num_classes = int(y.max()) + 1
    if test is None:
        perm = np.random.default_rng(seed).permutation(n)
        n_test = int(round(held_out * n))
        if n_test < 1:
            raise ValueError(f"held_out must leave at least one test image; got {held_out!r}")
        idx_test, train = perm[:n_test], perm[n_test:]
        x_test, y_test = x[idx_test], y[idx_test]
    else:
        train = np.arange(n)
        x_test, y_test = test
        if len(x_test) < 1 or x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"test images must have shape (M, {H}, {W}, {C}) with M >= 1; "
                             f"got {np.shape(x_test)}")
    graphdef, params = nets.init_params(nets.Classifier, num_classes, C, H, width, dropout=0.1,
                                        seed=seed)

    def loss_fn(p, batch, key):
        # light augmentation: random 1-pixel shifts keep the features from memorising pixels
        k1, k2 = jax.random.split(key)
        shift = jax.random.randint(k1, (2,), -1, 2)
        xb = jnp.roll(batch["x"], shift, axis=(1, 2))
        logits = nnx.merge(graphdef, p)(xb, train=True, key=k2)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    opt = make_optimizer(3e-3, total_steps=steps, warmup_steps=min(50, steps - 1),
                         weight_decay=1e-4)
    state = init_train_state(params, opt, jax.random.key(seed))
    step_fn = jax.jit(make_train_step(loss_fn, opt, ema_decay=0.99))
    it = BatchIterator({"x": x[train], "y": y[train]}, batch_size, seed=seed)
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(workdir, save_every=steps, keep=1,
                            config=dict(seed=seed, shape=[H, W, C], classes=num_classes,
                                        width=width, steps=steps))
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
        if restored is not None:
            state = restored[0]
    for _ in range(int(state.step), steps):
        state, _ = step_fn(state, next(it))
    if ckpt is not None:
        ckpt.save(steps, state)
        ckpt.wait_until_finished()
        ckpt.close()
    judge = Judge(graphdef, state.ema_params, 0.0)
    judge.held_out_accuracy = float(np.mean(judge.predict(x_test) == y_test))
    return judge


def primary_and_judge(x, y, workdir: str | None, **kwargs) -> tuple[Judge, Judge]:
    """The two independently trained classifiers (seeds 0 and 1)."""
    sub = (lambda s: None) if workdir is None else (lambda s: os.path.join(workdir, s))
    return (train_classifier(x, y, seed=0, workdir=sub("primary"), **kwargs),
            train_classifier(x, y, seed=1, workdir=sub("judge"), **kwargs))


def feature_fd(judge: Judge, samples: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between the judge's features of ``samples`` and of ``reference``."""
    return frechet_distance_from_features(judge.features(samples), judge.features(reference))
