"""Identity retrieval: does a face embedding find its own source among a gallery of sources?

REFace's ID-retrieval metric: embed each swapped face (query ``i``) and every source face
(gallery) with an identity encoder that training never saw (``E_id^eval``), rank the gallery by
cosine similarity and count how often the true source (gallery ``i``) is among the top k.
Host float64 numpy, like the other metrics evaluated once per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["identity_retrieval"]


def _unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def identity_retrieval(
    query: np.ndarray, gallery: np.ndarray, k: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k identity retrieval accuracy by cosine similarity.

    Query ``i``'s true match is gallery row ``i``; gallery rows beyond the N queries are
    distractors. The rank of the true match counts the other gallery rows whose similarity is
    at least as high (ties count against the query, so a collapsed encoder scores at chance or
    below, never perfectly).

    Args:
      query: (N, D) embeddings of the generated faces, N >= 1 (need not be normalised).
      gallery: (M, D) embeddings of the sources, M >= N.
      k: the cut-offs, ints in ``[1, M]``.

    Returns:
      ``{"top{k}": fraction of queries whose true match ranks within the top k, ...,
      "mean_cos": mean cosine of query i and gallery i}`` as Python floats.

    Example:
      >>> identity_retrieval(e_eval(swapped), e_eval(sources))  # {'top1': .., 'top5': .., ..}
    """
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"query must have shape (N, D) with N, D >= 1, got {q.shape}")
    if g.ndim != 2 or g.shape[1] != q.shape[1] or g.shape[0] < q.shape[0]:
        raise ValueError(
            f"gallery must have shape (M, D)=(M, {q.shape[1]}) with M >= N={q.shape[0]}, "
            f"got {g.shape}"
        )
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(g))):
        raise ValueError("query and gallery must be finite")
    ks = tuple(k)
    n, m = q.shape[0], g.shape[0]
    for kk in ks:
        if isinstance(kk, bool) or not isinstance(kk, int | np.integer) or not 1 <= kk <= m:
            raise ValueError(f"k must hold ints in [1, M={m}], got {ks}")
    if not ks:
        raise ValueError("k must hold at least one cut-off, got ()")

    sim = _unit_rows(q) @ _unit_rows(g).T  # (N, M)
    true = sim[np.arange(n), np.arange(n)]
    rank = np.sum(sim >= true[:, None], axis=1) - 1  # other rows at least as similar
    out = {f"top{int(kk)}": float(np.mean(rank < kk)) for kk in ks}
    out["mean_cos"] = float(np.mean(true))
    return out
