"""Tests for digit captions (dpm.data.captions), the text encoder and contrastive model
(nets.text, nets.clip) and CLIP's loss (dpm.losses.contrastive).

Compilation dominates on CPU: networks are initialised with `nets.init_params` (one compiled
program per config) and applied through the tests' fast-compiling `jit`, one program per config.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fastjit import jit
from flax import nnx

from dpm.data import (
    CAPTION_MAX_TOKENS,
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    BatchIterator,
    CaptionVocab,
    attribute_thresholds,
    attribute_words,
    caption_dataset,
    caption_digit,
    digit_attributes,
    digit_captions,
    digit_forms,
    load_digits,
    normalize_caption,
    train_test_split,
)
from dpm.data.captions import _SLOTS, _render
from dpm.losses import clip_loss, contrastive_logits_loss
from nets import ContrastiveConfig, ContrastiveModel, TextEncoder, TextEncoderConfig, init_params
from nets.text import EOS_ID, PAD_ID

VOCAB = CaptionVocab()
L = CAPTION_MAX_TOKENS


@functools.cache
def _digits(size):
    data = load_digits(size)
    return train_test_split(data, 0.2, seed=0)


def _random_categories(n, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, 3, n) for k in ("thickness", "slant", "size")}


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_special_ids_match_the_text_encoder():
    assert (VOCAB.pad_id, VOCAB.bos_id, VOCAB.eos_id, VOCAB.unk_id) == (0, 1, 2, 3)
    assert (PAD_ID, EOS_ID) == (VOCAB.pad_id, VOCAB.eos_id)
    assert VOCAB == CaptionVocab()  # deterministic: built from the grammar, not from data


def test_vocab_round_trip_of_generated_captions():
    labels = np.arange(2000) % 10
    captions = digit_captions(labels, _random_categories(2000, 0), seed=1)
    tokens = VOCAB.encode(captions, L)
    assert tokens.shape == (2000, L) and tokens.dtype == np.int32
    assert np.all(tokens[:, 0] == VOCAB.bos_id)
    assert not np.any(tokens == VOCAB.unk_id)
    assert VOCAB.decode(tokens) == [normalize_caption(c) for c in captions]
    # layout [bos, words..., eos, pad...]
    for row, caption in zip(tokens[:50], captions[:50], strict=True):
        n = len(normalize_caption(caption).split())
        assert row[n + 1] == VOCAB.eos_id and np.all(row[n + 2 :] == VOCAB.pad_id)
    # the grammar's longest caption fits CAPTION_MAX_TOKENS exactly
    longest = max(len(normalize_caption(c).split()) for c in captions)
    assert longest + 2 <= L


def test_normalisation_lowercases_and_drops_commas():
    assert normalize_caption("  The Seven,  Leaning LEFT. ") == "the seven leaning left"
    tokens = VOCAB.encode(["The Seven, leaning left"], 8)
    assert VOCAB.decode(tokens) == ["the seven leaning left"]


def test_vocab_too_long_and_unknown_words():
    with pytest.raises(ValueError, match=r"captions\[1\].*5 words, 7 tokens.*max_len=6"):
        VOCAB.encode(["a 7", "a small bold 7 upright"], 6)
    # unknown words become unk by default, or raise with strict=True
    tokens = VOCAB.encode(["a purple 7"], 6)
    assert tokens[0, 2] == VOCAB.unk_id
    assert VOCAB.decode(tokens) == ["a <unk> 7"]
    with pytest.raises(ValueError, match=r"\['purple'\] outside the vocabulary"):
        VOCAB.encode(["a purple 7"], 6, strict=True)
    with pytest.raises(TypeError, match="sequence of strings, got str"):
        VOCAB.encode("a 7", 6)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        VOCAB.encode(["a 7"], 1)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 57\)"):
        VOCAB.decode(np.array([[1, 99, 2]]))


def test_empty_caption():
    e = VOCAB.empty(3, L)
    assert e.shape == (3, L) and e.dtype == np.int32
    np.testing.assert_array_equal(e[:, :2], [[1, 2]] * 3)
    assert not e[:, 2:].any()
    np.testing.assert_array_equal(VOCAB.encode([""] * 3, L), e)
    assert VOCAB.decode(e) == ["", "", ""]


# ----------------------------------------------------------------------------- grammar


def test_every_template_and_synonym_names_its_digit():
    """caption_digit round trip on every template x digit form x digit x slot word."""
    n = 0
    for template in CAPTION_TEMPLATES:
        for d in range(10):
            for form in digit_forms(d):
                for category in range(3):
                    for k in range(4):  # cycles through every synonym of every slot
                        fills = {"digit": form}
                        for slot, synonyms in _SLOTS.items():
                            fills[slot] = synonyms[category][k % len(synonyms[category])]
                        caption = _render(template, fills)
                        assert caption_digit(caption) == d, caption
                        assert "  " not in caption and not caption.startswith(",")
                        assert not re.search(r"\ba [ae8]", caption), caption  # "an eight"
                        tokens = VOCAB.encode([caption], L, strict=True)
                        assert VOCAB.decode(tokens) == [normalize_caption(caption)]
                        n += 1
    assert n == len(CAPTION_TEMPLATES) * 10 * 6 * 12
    assert caption_digit("A BOLD 7, leaning right") == 7
    assert caption_digit("the number one") == 1
    with pytest.raises(ValueError, match="exactly one digit"):
        caption_digit("a handwritten digit")
    with pytest.raises(ValueError, match=r"exactly one digit, got \[3, 7\]"):
        caption_digit("a 7 or a three")


def test_digit_captions_follow_labels_and_categories():
    labels = np.arange(300) % 10
    cats = _random_categories(300, 1)
    captions = digit_captions(labels, cats, seed=0, per_image=3)
    assert len(captions) == 900
    assert captions == digit_captions(labels, cats, seed=0, per_image=3)  # deterministic
    assert captions != digit_captions(labels, cats, seed=1, per_image=3)
    assert [caption_digit(c) for c in captions] == list(np.repeat(labels, 3))
    words = {
        slot: [{w for s in syn for w in s.split()} for syn in synonyms]
        for slot, synonyms in _SLOTS.items()
    }
    slant_words = {0: {"left"}, 1: {"upright", "straight"}, 2: {"right"}}
    for j, caption in enumerate(captions):
        i, ws = j // 3, set(normalize_caption(caption).split())
        for slot in ("thickness", "size"):  # no word of another category of the slot
            for c in range(3):
                if c != cats[slot][i]:
                    assert not ws & words[slot][c] - {""}, (caption, slot)
        for c, w in slant_words.items():
            if c != cats["slant"][i]:
                assert not ws & w, caption
    # digits are named by name and by numeral
    assert any(w in c.split() for c in captions for w in DIGIT_NAMES)
    assert any(w in c.split() for c in captions for w in "0123456789")
    with pytest.raises(ValueError, match="labels must be digits"):
        digit_captions(np.array([10]), _random_categories(1, 0), seed=0)
    with pytest.raises(ValueError, match=r"categories\['slant'\]"):
        digit_captions(labels, {**cats, "slant": cats["slant"][:5]}, seed=0)
    with pytest.raises(ValueError, match="per_image must be an int >= 1, got 0"):
        digit_captions(labels, cats, seed=0, per_image=0)


# ----------------------------------------------------------------------------- attributes


def _bar(offset_per_row, size=16, half_width=1, rows=range(2, 14)):
    """A 1-channel image in [-1, 1] with a stroke whose column moves by offset_per_row."""
    img = -np.ones((size, size), np.float32)
    for r in rows:
        c = size / 2 + offset_per_row * (r - size / 2)
        img[r, int(round(c)) - half_width : int(round(c)) + half_width + 1] = 1.0
    return img[..., None]


def test_slant_sign_and_ink_and_size_are_measured():
    # column decreasing with row = top to the right ("/"): positive slant
    right, upright, left = _bar(-0.4), _bar(0.0), _bar(0.4)
    a = digit_attributes(np.stack([right, upright, left]))
    assert a["slant"][0] > 0.3 and abs(a["slant"][1]) < 1e-6 and a["slant"][2] < -0.3
    np.testing.assert_allclose(a["slant"][0], -a["slant"][2], rtol=1e-5)
    # a dilated (thicker) stroke has more ink; a longer stroke is larger
    thick = _bar(0.0, half_width=2)
    long = _bar(0.0, rows=range(0, 16))
    b = digit_attributes(np.stack([upright, thick, long]))
    assert b["ink"][1] > b["ink"][0] and b["size"][2] > b["size"][0]
    # real digits: a 3x3 dilation adds ink to every digit; a sheared digit slants more
    x = _digits(16)[1]["x"][:50, :, :, 0]
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    dilated = np.max([pad[:, i : i + 16, j : j + 16] for i in range(3) for j in range(3)], 0)
    shear = np.stack([np.roll(row, -(r - 8) // 3, axis=-1) for r, row in
                      enumerate(np.moveaxis(x, 1, 0))], 1)  # shift up rows to the right
    base, dil, sh = digit_attributes(x), digit_attributes(dilated), digit_attributes(shear)
    assert np.all(dil["ink"] > base["ink"])
    assert np.mean(sh["slant"] > base["slant"]) > 0.9
    # the same digit measures alike at 8x8 and 16x16 (sizes in units of the image side)
    a8 = digit_attributes(load_digits(8)["x"][:200])
    a16 = digit_attributes(load_digits(16)["x"][:200])
    assert np.corrcoef(a8["slant"], a16["slant"])[0, 1] > 0.9
    assert np.corrcoef(a8["size"], a16["size"])[0, 1] > 0.9
    # no ink: zero slant and size, no NaN
    blank = digit_attributes(-np.ones((1, 8, 8, 1), np.float32))
    assert blank["slant"][0] == 0 and blank["size"][0] == 0 and blank["ink"][0] == 0
    with pytest.raises(ValueError, match=r"images must have shape \(N, H, W, 1\)"):
        digit_attributes(np.zeros((2, 8, 8, 3), np.float32))


def test_train_thresholds_caption_the_test_split():
    train, test = _digits(16)
    thr = attribute_thresholds(digit_attributes(train["x"]))
    assert set(thr) == {"ink", "slant", "size"} and all(lo < hi for lo, hi in thr.values())
    test_attrs = digit_attributes(test["x"])
    cats = attribute_words(test_attrs, thr)
    for key, slot in (("ink", "thickness"), ("slant", "slant"), ("size", "size")):
        lo, hi = thr[key]
        expect = (test_attrs[key] >= lo).astype(int) + (test_attrs[key] >= hi)
        np.testing.assert_array_equal(cats[slot], expect)
        share = np.bincount(cats[slot], minlength=3) / len(cats[slot])
        assert np.all((share > 0.2) & (share < 0.47)), (slot, share)  # terciles carry over
    with pytest.raises(ValueError, match="thresholds must be a dict with keys"):
        attribute_words(test_attrs, {"ink": (0, 1)})


def test_caption_dataset_feeds_the_batch_iterator():
    train, test = _digits(16)
    thr = attribute_thresholds(digit_attributes(train["x"]))
    data, captions = caption_dataset(test["x"], test["y"], seed=0, per_image=2, thresholds=thr)
    n = 2 * len(test["y"])
    assert len(captions) == n and all(v.shape[0] == n for v in data.values())
    np.testing.assert_array_equal(data["x"], np.repeat(test["x"], 2, axis=0))
    np.testing.assert_array_equal(data["y"], np.repeat(test["y"], 2))
    np.testing.assert_array_equal(data["image_index"], np.repeat(np.arange(n // 2), 2))
    assert VOCAB.decode(data["tokens"]) == [normalize_caption(c) for c in captions]
    assert [caption_digit(c) for c in captions] == list(data["y"])
    # caption ids: equal exactly for identical (normalised) captions
    same_id = data["caption_id"][:, None] == data["caption_id"][None, :]
    text = np.array([normalize_caption(c) for c in captions], object)
    same_text = text[:, None] == text[None, :]
    np.testing.assert_array_equal(same_id, same_text)
    batch = next(BatchIterator(data, 32, seed=0))
    assert batch["tokens"].shape == (32, L) and batch["x"].shape == (32, 16, 16, 1)


# ----------------------------------------------------------------------------- text encoder

TEXT = TextEncoderConfig(len(VOCAB), L, width=32, depth=2, num_heads=4)


@functools.cache
def _text_apply():
    graphdef, params = init_params(TextEncoder, TEXT, seed=0)
    encode = chex.assert_max_traces(lambda p, t: nnx.merge(graphdef, p)(t), n=1)  # one compile
    return graphdef, params, jit(encode)


def test_text_encoder_shapes_masking_and_pooling():
    graphdef, params, apply = _text_apply()
    captions = ["a bold 7", "the three, leaning left", "a small thin digit 8 upright"]
    tokens = jnp.asarray(VOCAB.encode(captions, L))
    features, mask, pooled = apply(params, tokens)
    chex.assert_shape(features, (3, L, 32))
    chex.assert_shape(pooled, (3, 32))
    assert features.dtype == pooled.dtype == jnp.float32 and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask, tokens != 0)
    eos = np.argmax(np.asarray(tokens) == 2, axis=1)
    np.testing.assert_array_equal(pooled, np.asarray(features)[np.arange(3), eos])

    # padding invariance: what sits at pad positions (the pad embedding, the positions after
    # eos) must not reach the real tokens or the pooled feature
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, init_params(TextEncoder, TEXT, seed=0)[1])  # a fresh copy
    model.token_embed.value = model.token_embed[...].at[0].set(rng.normal(size=32))
    model.pos_embed.value = model.pos_embed[...].at[5:].add(rng.normal(size=(L - 5, 32)))
    perturbed = nnx.state(model, nnx.Param)
    f2, _, p2 = apply(perturbed, tokens)  # "a bold 7" = 5 tokens: positions >= 5 are pads
    chex.assert_trees_all_close(p2[0], pooled[0], atol=1e-5)
    chex.assert_trees_all_close(f2[0, :5], features[0, :5], atol=1e-5)
    assert float(jnp.max(jnp.abs(p2[2] - pooled[2]))) > 1e-2  # the perturbation reaches 8 tokens
    # a caption among other captions: identical
    _, _, shuffled = apply(params, tokens[jnp.array([2, 0, 1])])
    chex.assert_trees_all_close(shuffled, pooled[jnp.array([2, 0, 1])], atol=1e-5)
    # a different word changes the pooled feature
    other = tokens.at[0, 3].set(VOCAB.encode(["3"], 3)[0, 1])
    _, _, p3 = apply(params, other)
    assert float(jnp.max(jnp.abs(p3[0] - pooled[0]))) > 1e-2
    chex.assert_trees_all_close(p3[1:], pooled[1:], atol=1e-5)


def test_text_encoder_errors():
    with pytest.raises(TypeError, match="config must be a TextEncoderConfig"):
        TextEncoder({}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width \\(30\\) must be divisible by num_heads \\(4\\)"):
        TextEncoderConfig(57, 12, width=30)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        TextEncoderConfig(0, 12)
    graphdef, params = init_params(TextEncoder, TEXT, seed=0)
    model = nnx.merge(graphdef, init_params(TextEncoder, TEXT, seed=0)[1])  # a fresh copy
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, L\)"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="tokens must be integer ids, got dtype float32"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=57\)"):
        model(jnp.array([[1, 2, 99]]))
    with pytest.raises(ValueError, match="must contain the eos id 2"):
        model(jnp.array([[1, 5, 0]]))


# ----------------------------------------------------------------------------- CLIP model


def _random_params(abstract, seed=0):
    """Parameters drawn in numpy (no initialiser to compile), nonzero everywhere."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "log_logit_scale" in name:
            return np.float32(np.log(1 / 0.07))
        if len(s.shape) >= 2:  # kernels, embeddings: unit-variance fan-in scaling
            return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
        centre = 1.0 if "scale" in name else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))


@functools.cache
def _clip(image_size, channels):
    cfg = ContrastiveConfig(image_size, channels, TEXT, image_width=8, embed_dim=16)
    model = nnx.eval_shape(lambda: ContrastiveModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model, nnx.Param)
    params = _random_params(abstract)

    def run(p, x, t):
        m = nnx.merge(graphdef, p)
        return m(x, t), m.score(x, t)

    return params, jit(run)


@pytest.mark.parametrize("shape", [(16, 16, 1), (4, 4, 4)])
def test_contrastive_model_embeddings_and_score(shape):
    params, run = _clip(shape[0], shape[-1])
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (5, *shape)).astype(np.float32)
    tokens = VOCAB.encode(digit_captions(np.arange(5), _random_categories(5, 0), seed=0), L)
    (img, txt, scale), score = run(params, x, tokens)
    chex.assert_shape([img, txt], (5, 16))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(score, np.diag(np.asarray(img) @ np.asarray(txt).T), atol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, "):
        run(params, x[:, :2], tokens)


def test_logit_scale_is_clipped():
    cfg = ContrastiveConfig(4, 4, TEXT, image_width=8, embed_dim=16, init_logit_scale=1.0,
                            max_logit_scale=5.0)
    model = nnx.eval_shape(lambda: ContrastiveModel(cfg, rngs=nnx.Rngs(0)))
    model.log_logit_scale.value = jnp.asarray(3.0)
    assert float(model.logit_scale()) == 5.0
    model.log_logit_scale.value = jnp.asarray(1.0)
    np.testing.assert_allclose(float(model.logit_scale()), math.e, rtol=1e-6)
    with pytest.raises(ValueError, match="init_logit_scale must be finite"):
        ContrastiveConfig(4, 4, TEXT, init_logit_scale=5.0)
    with pytest.raises(TypeError, match="text must be a TextEncoderConfig, got dict"):
        ContrastiveConfig(4, 4, {})


# ----------------------------------------------------------------------------- CLIP loss


def _loss_of(img, txt, scale, caption_id=None):
    apply = lambda p, x, t: (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
    batch = {"x": jnp.zeros((len(img), 1)), "tokens": jnp.zeros((len(img), 2), jnp.int32)}
    if caption_id is not None:
        batch["caption_id"] = jnp.asarray(caption_id)
    return np.asarray(clip_loss(apply)(None, batch, jax.random.key(0)))


def test_clip_loss_closed_forms(x64):
    b = 6
    eye = np.eye(b)
    # perfect orthogonal pairs and a large scale: the loss vanishes
    assert np.max(_loss_of(eye, eye, 100.0)) < 1e-30
    # all embeddings equal: softmax is uniform, loss = log B exactly
    same = np.ones((b, b)) / np.sqrt(b)
    np.testing.assert_allclose(_loss_of(same, same, 7.0), np.log(b), rtol=1e-12)
    # orthogonal pairs, scale s: loss = log(e^s + B - 1) - s for every pair
    s = 2.0
    np.testing.assert_allclose(_loss_of(eye, eye, s), np.log(np.exp(s) + b - 1) - s, rtol=1e-12)
    # three pairs, captions 0 and 1 identical: uniform target over {0, 1} for pairs 0 and 1,
    # CE = log(e^s + 2) - s/2 (both rows and columns); pair 2 keeps log(e^s + 2) - s
    e3 = np.eye(3)
    expect = [np.log(np.exp(s) + 2) - s / 2] * 2 + [np.log(np.exp(s) + 2) - s]
    np.testing.assert_allclose(_loss_of(e3, e3, s, [5, 5, 9]), expect, rtol=1e-12)
    np.testing.assert_allclose(_loss_of(e3, e3, s), [np.log(np.exp(s) + 2) - s] * 3, rtol=1e-12)
    # asymmetric logits: row and column terms differ, the loss is their mean
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, -2.0, 0.5]])
    row = -np.diag(logits - np.log(np.exp(logits).sum(1, keepdims=True)))
    col = -np.diag(logits - np.log(np.exp(logits).sum(0, keepdims=True)))
    np.testing.assert_allclose(contrastive_logits_loss(jnp.asarray(logits)), (row + col) / 2,
                               rtol=1e-12)
    with pytest.raises(ValueError, match="caption_id must be"):
        contrastive_logits_loss(jnp.asarray(logits), jnp.zeros(2, jnp.int32))


# ----------------------------------------------------------------------------- learning


def test_clip_learns_which_digit_a_caption_names():
    """100 Adam steps on 8x8 digits: held-out images pick the caption "a handwritten d" of
    their own digit among the ten far more often than chance (10%; about 75-92% over seeds)."""
    train, test = _digits(8)
    thr = attribute_thresholds(digit_attributes(train["x"]))
    data, _ = caption_dataset(train["x"], train["y"], seed=0, per_image=2, thresholds=thr)
    data = {k: data[k] for k in ("x", "tokens", "caption_id")}
    text = TextEncoderConfig(len(VOCAB), L, width=32, depth=1, num_heads=2)
    cfg = ContrastiveConfig(8, 1, text, image_width=8, embed_dim=32)
    graphdef, params = init_params(ContrastiveModel, cfg, seed=0)
    apply = lambda p, x, t: nnx.merge(graphdef, p)(x, t)
    loss_fn = clip_loss(apply)
    opt = optax.adam(3e-3)

    @jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch, None)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    it = BatchIterator(data, 32, seed=0)
    losses = []
    for _ in range(100):
        params, opt_state, loss = step(params, opt_state, next(it))
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5

    prompts = VOCAB.encode([f"a handwritten {d}" for d in range(10)], L)
    img, txt, _ = jit(apply)(params, test["x"], np.resize(prompts, (len(test["x"]), L)))
    top1 = np.argmax(np.asarray(img) @ np.asarray(txt[:10]).T, axis=1)
    accuracy = np.mean(top1 == test["y"])
    assert accuracy > 0.4, accuracy
