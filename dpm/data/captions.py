"""Text captions for handwritten digits: measured attributes, a template grammar, a vocabulary.

The captions of RG-LCD's text-to-image setting, in miniature. Each image gets attributes
measured from its pixels (:func:`digit_attributes`: ink mass, slant, size), turned into three
categories by tercile thresholds of a reference set (:func:`attribute_thresholds`,
:func:`attribute_words`), and is captioned by a small template grammar with synonyms
(:func:`digit_captions`), e.g. ``"a small bold 7 leaning right"`` or ``"the number three"``.
Every caption names its digit exactly once, so :func:`caption_digit` reads it back.

Captions become token ids through :class:`CaptionVocab`, a word-level vocabulary of every word
the grammar can produce (it never depends on data): ``[bos, words..., eos, pad...]`` with
``pad = 0, bos = 1, eos = 2, unk = 3``; ``CaptionVocab.empty`` is the empty caption, the null
condition of classifier-free guidance. Text is normalised before tokenising: lowercase,
commas and sentence punctuation (``, . ; : ! ?``) dropped, whitespace collapsed
(:func:`normalize_caption`); decoding returns this normalised form.

Example:
  >>> data = dpm.data.load_digits(16)
  >>> train, test = dpm.data.train_test_split(data, 0.2, seed=0)
  >>> thr = attribute_thresholds(digit_attributes(train["x"]))
  >>> ds, captions = caption_dataset(test["x"], test["y"], seed=0, thresholds=thr)
  >>> ds["tokens"].shape  # (N, CAPTION_MAX_TOKENS) int32
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

__all__ = [
    "ATTRIBUTE_CATEGORIES",
    "CAPTION_MAX_TOKENS",
    "CAPTION_TEMPLATES",
    "DIGIT_NAMES",
    "CaptionVocab",
    "attribute_thresholds",
    "attribute_words",
    "caption_dataset",
    "caption_digit",
    "digit_attributes",
    "digit_captions",
    "digit_forms",
    "normalize_caption",
]

# ----------------------------------------------------------------------------- attributes

# measured attribute -> caption category it decides
ATTRIBUTE_CATEGORIES = {"ink": "thickness", "slant": "slant", "size": "size"}


def _check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (N, H, W, 1) or (N, H, W) with N >= 1 (grey images), "
            f"got {np.shape(images)}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point in [-1, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(x)))} NaN/inf")
    return x.astype(np.float64)


def digit_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Ink mass, slant and size of each digit, measured from its pixels.

    Ink is ``m = clip((x + 1) / 2, 0, 1)`` (background -1 -> 0, full stroke 1 -> 1). With rows
    ``r`` (0 at the top) and columns ``c`` in units of the image side (so 8x8 and 16x16 versions
    of a digit measure alike), and the ink as a distribution over pixels, ``p = m / sum(m)``:

    * ``ink``: mean ink per pixel, ``mean(m)``; thick strokes have more.
    * ``slant``: the shear ``-cov(c, r) / var(r)``, the least-squares slope ``dc / d(-r)`` of
      the stroke. **Positive = the top leans right** (like ``/``; column grows upwards),
      negative = the top leans left (``\\``), 0 = upright.
    * ``size``: the ink's spatial spread ``sqrt(var(r) + var(c))`` (in image sides).

    An image without ink gets ``slant = size = 0``.

    Args:
      images: (N, H, W, 1) or (N, H, W) float images in ``[-1, 1]``.

    Returns:
      ``{"ink", "slant", "size"}``: each a float32 array of shape (N,).
    """
    x = _check_images(images)
    _, h, w = x.shape
    m = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    mass = m.sum(axis=(1, 2))
    p = m / np.maximum(mass, 1e-12)[:, None, None]
    r = (np.arange(h) / h)[None, :, None]
    c = (np.arange(w) / w)[None, None, :]
    mr = np.sum(p * r, axis=(1, 2))
    mc = np.sum(p * c, axis=(1, 2))
    dr = r - mr[:, None, None]
    dc = c - mc[:, None, None]
    var_r = np.sum(p * dr**2, axis=(1, 2))
    var_c = np.sum(p * dc**2, axis=(1, 2))
    cov = np.sum(p * dr * dc, axis=(1, 2))
    has_ink = mass > 1e-12
    slant = np.where(has_ink & (var_r > 1e-12), -cov / np.maximum(var_r, 1e-12), 0.0)
    size = np.where(has_ink, np.sqrt(var_r + var_c), 0.0)
    return {
        "ink": m.mean(axis=(1, 2)).astype(np.float32),
        "slant": slant.astype(np.float32),
        "size": size.astype(np.float32),
    }


def _check_attrs(attrs: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    if not isinstance(attrs, Mapping) or set(attrs) != set(ATTRIBUTE_CATEGORIES):
        keys = sorted(attrs) if isinstance(attrs, Mapping) else type(attrs).__name__
        raise ValueError(
            f"{name} must be a dict with keys {sorted(ATTRIBUTE_CATEGORIES)} (from "
            f"digit_attributes), got {keys}"
        )
    out = {k: np.asarray(v, np.float64).reshape(-1) for k, v in attrs.items()}
    sizes = {k: v.shape[0] for k, v in out.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name} arrays must share their length N, got {sizes}")
    return out


def attribute_thresholds(attrs: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Tercile thresholds of each attribute on a reference set (the train split).

    Args:
      attrs: ``digit_attributes(reference_images)``, N >= 3.

    Returns:
      ``{"ink", "slant", "size"}`` -> ``(lo, hi)``, the 1/3 and 2/3 quantiles. Caption every
      split with the thresholds of the train split, so the words mean the same everywhere.
    """
    a = _check_attrs(attrs, "attrs")
    n = next(iter(a.values())).shape[0]
    if n < 3:
        raise ValueError(f"attrs must describe at least 3 images to have terciles, got N={n}")
    return {k: tuple(float(q) for q in np.quantile(v, [1 / 3, 2 / 3])) for k, v in a.items()}


def attribute_words(
    attrs: Mapping[str, np.ndarray], thresholds: Mapping[str, tuple[float, float]]
) -> dict[str, np.ndarray]:
    """Caption category of each attribute: 0 below ``lo``, 1 in ``[lo, hi)``, 2 from ``hi`` up.

    Args:
      attrs: ``digit_attributes(images)``, arrays of shape (N,).
      thresholds: ``attribute_thresholds(reference_attrs)``.

    Returns:
      int32 arrays of shape (N,): ``"thickness"`` (from ink; 0 thin, 1 unmarked, 2 bold),
      ``"slant"`` (0 left, 1 upright, 2 right), ``"size"`` (0 small, 1 unmarked, 2 large).
    """
    a = _check_attrs(attrs, "attrs")
    if not isinstance(thresholds, Mapping) or set(thresholds) != set(ATTRIBUTE_CATEGORIES):
        raise ValueError(
            f"thresholds must be a dict with keys {sorted(ATTRIBUTE_CATEGORIES)} (from "
            f"attribute_thresholds), got {thresholds!r:.200}"
        )
    out = {}
    for key, category in ATTRIBUTE_CATEGORIES.items():
        lo, hi = (float(t) for t in thresholds[key])
        if not lo <= hi:
            raise ValueError(f"thresholds[{key!r}] must be (lo, hi) with lo <= hi, got {(lo, hi)}")
        out[category] = np.digitize(a[key], [lo, hi]).astype(np.int32)
    return out


# ----------------------------------------------------------------------------- grammar

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_forms(d: int) -> tuple[str, ...]:
    """The ways a caption names digit ``d``: ``"seven"``, ``"7"``, ``"number seven"``, ..."""
    name, numeral = DIGIT_NAMES[d], str(d)
    return (name, numeral, f"number {name}", f"number {numeral}", f"digit {name}",
            f"digit {numeral}")


# category -> synonyms; "" is the unmarked middle category (the slot stays empty)
_THICKNESS = (("thin", "light", "fine-stroked"), ("",), ("bold", "thick", "heavy", "thick-stroked"))
_SLANT = (
    ("leaning left", "slanted to the left", "tilted to the left"),
    ("upright", "standing straight", "written upright"),
    ("leaning right", "slanted to the right", "tilted to the right"),
)
_SIZE = (("small", "little", "tiny"), ("",), ("large", "big", "wide"))
_SLOTS = {"thickness": _THICKNESS, "slant": _SLANT, "size": _SIZE}

CAPTION_TEMPLATES = (
    "the {digit}",
    "a handwritten {digit}",
    "a {thickness} handwritten {digit}",
    "a {size} {digit}, {slant}",
    "a {size} {thickness} {digit} {slant}",
    "a {thickness} {digit} that is {slant}",
    "a picture of a {size} handwritten {digit}",
    "the {digit}, {slant}",
)
_FIELD = re.compile(r"\{(\w+)\}")
_PUNCT = re.compile(r"[,.;:!?]")
_DIGIT_WORDS = {**{n: d for d, n in enumerate(DIGIT_NAMES)}, **{str(d): d for d in range(10)}}


def normalize_caption(caption: str) -> str:
    """Lowercase, ``, . ; : ! ?`` dropped, whitespace collapsed: the form tokens decode to."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r:.80}")
    return " ".join(_PUNCT.sub(" ", caption.lower()).split())


def _render(template: str, fills: Mapping[str, str]) -> str:
    """Fill a template, drop empty slots, and write ``an`` before a vowel sound (an 8)."""
    words = template.format(**fills).replace(" ,", ",").split()
    for i in range(len(words) - 1):
        nxt = words[i + 1]
        if words[i] == "a" and nxt[0] in "aeiu8":  # not "o": "a one"
            words[i] = "an"
    return " ".join(words).replace(" ,", ",")


def _template_words() -> set[str]:
    words = {"a", "an"}
    for t in CAPTION_TEMPLATES:
        words.update(normalize_caption(_FIELD.sub(" ", t)).split())
    for d in range(10):
        for form in digit_forms(d):
            words.update(form.split())
    for categories in _SLOTS.values():
        for synonyms in categories:
            for s in synonyms:
                words.update(s.split())
    return words


def _max_caption_words() -> int:
    longest = {k: max(len(s.split()) for syn in v for s in syn) for k, v in _SLOTS.items()}
    longest["digit"] = max(len(f.split()) for d in range(10) for f in digit_forms(d))
    return max(
        len(normalize_caption(_FIELD.sub(" ", t)).split())
        + sum(longest[f] for f in _FIELD.findall(t))
        for t in CAPTION_TEMPLATES
    )


# bos + the longest caption the grammar can produce + eos
CAPTION_MAX_TOKENS = _max_caption_words() + 2


def digit_captions(
    labels: np.ndarray,
    categories: Mapping[str, np.ndarray],
    *,
    seed: int,
    per_image: int = 1,
) -> list[str]:
    """Captions drawn from the template grammar: template and synonyms uniformly at random.

    Args:
      labels: (N,) digits 0-9.
      categories: ``attribute_words(...)`` for the same N images (``"thickness"``, ``"slant"``,
        ``"size"``: (N,) ints in {0, 1, 2}).
      seed: numpy seed; the captions are a pure function of the arguments.
      per_image: captions per image, >= 1.

    Returns:
      ``N * per_image`` captions, image-major: captions ``[i * per_image, (i + 1) * per_image)``
      describe image ``i``. Each names its digit exactly once (:func:`caption_digit`).
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D int array, got {y.dtype}{y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"labels must be digits in [0, 9], got range [{y.min()}, {y.max()}]")
    if not isinstance(categories, Mapping) or set(categories) != set(_SLOTS):
        raise ValueError(
            f"categories must be a dict with keys {sorted(_SLOTS)} (from attribute_words), "
            f"got {categories!r:.200}"
        )
    cats = {k: np.asarray(v).reshape(-1) for k, v in categories.items()}
    for k, v in cats.items():
        if v.shape != y.shape or (v.size and (v.min() < 0 or v.max() > 2)):
            raise ValueError(
                f"categories[{k!r}] must be (N,)={y.shape} ints in {{0, 1, 2}}, got "
                f"{v.dtype}{v.shape}"
            )
    if isinstance(per_image, bool) or not isinstance(per_image, (int, np.integer)) or per_image < 1:
        raise ValueError(f"per_image must be an int >= 1, got {per_image!r}")
    rng = np.random.default_rng(seed)
    n = y.size * per_image
    template = rng.integers(len(CAPTION_TEMPLATES), size=n)
    form = rng.integers(len(digit_forms(0)), size=n)
    pick = {k: rng.integers(1 << 30, size=n) for k in _SLOTS}  # index modulo the synonym count
    captions = []
    for j in range(n):
        i = j // per_image
        fills = {"digit": digit_forms(int(y[i]))[form[j]]}
        for k, synonyms in _SLOTS.items():
            options = synonyms[int(cats[k][i])]
            fills[k] = options[pick[k][j] % len(options)]
        captions.append(_render(CAPTION_TEMPLATES[template[j]], fills))
    return captions


def caption_digit(caption: str) -> int:
    """The digit a caption names (by name or numeral, e.g. ``"a bold 7"`` -> 7).

    Raises:
      ValueError: if the caption names no digit, or two different digits.
    """
    found = {_DIGIT_WORDS[w] for w in normalize_caption(caption).split() if w in _DIGIT_WORDS}
    if len(found) != 1:
        raise ValueError(
            f"caption must name exactly one digit, got {sorted(found)} in {caption!r}"
        )
    return found.pop()


# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class CaptionVocab:
    """Word-level vocabulary of the caption grammar, with ``pad=0, bos=1, eos=2, unk=3``.

    ``CaptionVocab()`` holds every word :func:`digit_captions` can produce, sorted after the
    four special tokens, so it is the same in every run and never depends on data. Words
    outside it (e.g. in a hand-written prompt) encode to ``unk`` unless ``strict=True``.

    Attributes:
      words: the tokens by id, ``words[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")``.

    Example:
      >>> vocab = CaptionVocab()
      >>> tokens = vocab.encode(["a bold 7, leaning right"], max_len=12)  # (1, 12) int32
      >>> vocab.decode(tokens)  # ["a bold 7 leaning right"]
    """

    words: tuple[str, ...] = ()
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    unk_id: ClassVar[int] = 3
    SPECIALS: ClassVar[tuple[str, ...]] = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __post_init__(self):
        words = tuple(self.words) or (*self.SPECIALS, *sorted(_template_words()))
        if words[:4] != self.SPECIALS:
            raise ValueError(f"words must begin with {self.SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError(f"words must be distinct, got {len(words) - len(set(words))} repeats")
        for w in words[4:]:
            if not isinstance(w, str) or not w or w != normalize_caption(w) or " " in w:
                raise ValueError(f"words must be single normalised words, got {w!r}")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(words)})

    def __len__(self) -> int:
        return len(self.words)

    def _check_max_len(self, max_len: int) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2 (bos and eos), got {max_len!r}")

    def encode(self, captions: Sequence[str], max_len: int, *, strict: bool = False) -> np.ndarray:
        """Token ids ``[bos, words..., eos, pad...]`` of normalised captions.

        Args:
          captions: N caption strings (a list, not a single string).
          max_len: L, the row length; a caption of ``n`` words needs ``n + 2 <= L``.
          strict: raise on words outside the vocabulary instead of encoding them as ``unk``.

        Returns:
          (N, L) int32.
        """
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(
                f"captions must be a sequence of strings, got {type(captions).__name__}: "
                f"{captions!r:.80}"
            )
        self._check_max_len(max_len)
        out = np.zeros((len(captions), max_len), np.int32)
        for i, caption in enumerate(captions):
            words = normalize_caption(caption).split()
            if len(words) + 2 > max_len:
                raise ValueError(
                    f"captions[{i}] = {caption!r} has {len(words)} words, {len(words) + 2} "
                    f"tokens with bos and eos, more than max_len={max_len}"
                )
            ids = [self._index.get(w, self.unk_id) for w in words]
            if strict and self.unk_id in ids:
                unknown = sorted({w for w in words if w not in self._index})
                raise ValueError(
                    f"captions[{i}] = {caption!r} has words {unknown} outside the vocabulary"
                )
            out[i, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out

    def decode(self, tokens: np.ndarray) -> list[str]:
        """The normalised captions of token rows: the words between ``bos`` and the first ``eos``.

        Args:
          tokens: (N, L) ids, as from :meth:`encode`.

        Returns:
          N strings; ``unk`` decodes to ``"<unk>"``.
        """
        t = np.asarray(tokens)
        if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"tokens must be a (N, L) int array, got {t.dtype}{t.shape}")
        if t.size and (t.min() < 0 or t.max() >= len(self)):
            raise ValueError(
                f"tokens must lie in [0, {len(self)}), got range [{t.min()}, {t.max()}]"
            )
        out = []
        for row in t.tolist():
            start = 1 if row and row[0] == self.bos_id else 0
            stop = row.index(self.eos_id) if self.eos_id in row else len(row)
            out.append(" ".join(self.words[i] for i in row[start:stop] if i != self.pad_id))
        return out

    def empty(self, n: int, max_len: int) -> np.ndarray:
        """(n, max_len) int32 rows of the empty caption ``[bos, eos, pad...]`` (the CFG null)."""
        self._check_max_len(max_len)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        out = np.zeros((n, max_len), np.int32)
        out[:, 0], out[:, 1] = self.bos_id, self.eos_id
        return out


# ----------------------------------------------------------------------------- data set


def caption_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    per_image: int = 1,
    thresholds: Mapping[str, tuple[float, float]] | None = None,
    max_len: int = CAPTION_MAX_TOKENS,
    vocab: CaptionVocab | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Captioned images as a data set for :class:`dpm.data.BatchIterator`.

    Args:
      images: (N, H, W, 1) float images in ``[-1, 1]``.
      labels: (N,) digits.
      seed: seed of the caption draws.
      per_image: captions per image; each image appears ``per_image`` times in a row.
      thresholds: attribute thresholds; None = the terciles of these images. Pass the train
        split's (``attribute_thresholds(digit_attributes(train["x"]))``) for other splits.
      max_len: token row length L (default: the grammar's longest caption).
      vocab: default ``CaptionVocab()``.

    Returns:
      ``(data, captions)``. ``data`` has arrays sharing the leading dimension
      ``M = N * per_image``: ``"x"`` (M, H, W, 1) images, ``"y"`` (M,) int32 labels,
      ``"tokens"`` (M, L) int32, ``"image_index"`` (M,) int32 row of ``images``,
      ``"caption_id"`` (M,) int32, equal exactly for identical (normalised) captions (for
      :func:`dpm.losses.clip_loss`'s multi-positive targets), and the categories
      ``"thickness"``, ``"slant"``, ``"size"`` (M,) int32. ``captions`` is the list of the M
      caption strings, in the same order.
    """
    x = np.asarray(images)
    _check_images(x)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape (N,)=({x.shape[0]},), got {y.shape}")
    vocab = CaptionVocab() if vocab is None else vocab
    if not isinstance(vocab, CaptionVocab):
        raise TypeError(f"vocab must be a CaptionVocab, got {type(vocab).__name__}")
    attrs = digit_attributes(x)
    thresholds = attribute_thresholds(attrs) if thresholds is None else thresholds
    cats = attribute_words(attrs, thresholds)
    captions = digit_captions(y, cats, seed=seed, per_image=per_image)
    tokens = vocab.encode(captions, max_len)
    index = np.repeat(np.arange(x.shape[0], dtype=np.int32), per_image)
    _, caption_id = np.unique(tokens, axis=0, return_inverse=True)
    data = {
        "x": x[index],
        "y": y[index].astype(np.int32),
        "tokens": tokens,
        "image_index": index,
        "caption_id": caption_id.reshape(-1).astype(np.int32),
        **{k: v[index] for k, v in cats.items()},
    }
    return data, captions

