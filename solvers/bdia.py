"""BDIA (Zhang, Lewis & Kleijn, ECCV 2024, "Exact Diffusion Inversion via Bi-directional
Integration Approximation"): a time-reversible two-step update and its exact inversion.

With states ``z_{i+1}, z_i`` (``z_{i+1}`` the noisier) and a one-step integrator
``Phi(t_i -> t_j | z_i) = z_i + Delta(t_i -> t_j | z_i)`` built from the model at ``z_i`` only,

    z_{i-1} = z_{i+1} - (1 - gamma)(z_{i+1} - z_i) - gamma Delta(t_i -> t_{i+1} | z_i)
              + Delta(t_i -> t_{i-1} | z_i)
            = Phi(t_i -> t_{i-1} | z_i) + gamma (z_{i+1} - Phi(t_i -> t_{i+1} | z_i)),

``gamma in [0, 1]`` (``gamma = 0``: the plain one-step sampler). The update is linear in
``z_{i+1}``, so for ``gamma > 0``

    z_{i+1} = Phi(t_i -> t_{i+1} | z_i) + (z_{i-1} - Phi(t_i -> t_{i-1} | z_i)) / gamma

recovers it exactly: :func:`bdia_invert` runs this from data to noise and returns the pair
``(z_N, z_{N-1})``, from which the sampler, started with ``x_next``, regenerates the data up to
float round-off, for any model. The first sampling step (no ``z_{i+1}``) is a plain step; the
first inversion step (data -> ``z_1``) is a plain inversion step, whose accuracy does not
matter for exactness.

In the index of a grid ``ts`` (``ts[0]`` noisiest), ``z_i`` is the state at ``ts[S - i]``.

The stability of the two-step recurrence (why inversion with small ``gamma`` grows like
``gamma^-S``) is analysed in ``solvers/NOTES.md``, next to the tests that measure it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser
from solvers._common import (
    EDM_SOLVERS,
    Array,
    GridCoeffs,
    check_choice,
    check_x,
    ddim_map,
    edm_denoise,
    edm_point,
    edm_step,
    prepare,
    run_scan,
)

__all__ = ["BDIAPair", "bdia_ddim", "bdia_invert", "bdia_edm", "bdia_edm_invert"]


class BDIAPair(NamedTuple):
    """The pair of states BDIA sampling starts from, as returned by the inversions.

    Attributes:
      x_T: ``(B, ...)`` the state at ``ts[0]``.
      x_next: ``(B, ...)`` the state at ``ts[1]``.
    """

    x_T: Array
    x_next: Array


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_gamma(gamma, *, invert: bool) -> None:
    if jnp.ndim(gamma) != 0:
        raise ValueError(f"gamma must be a scalar; got shape {jnp.shape(gamma)}")
    if isinstance(gamma, jax.core.Tracer):
        return
    g = float(np.asarray(gamma))
    if invert and not 0.0 < g <= 1.0:
        raise ValueError(
            f"exact inversion divides by gamma: gamma must lie in (0, 1]; got gamma={g!r}"
        )
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0 = plain sampler); got gamma={g!r}")


def _check_x_next(x, x_next) -> None:
    if x_next is not None:
        check_x(x_next, "x_next")
        if x_next.shape != x.shape or x_next.dtype != x.dtype:
            raise ValueError(
                f"x_next must match x_T: got {x_next.shape} {x_next.dtype}, "
                f"x_T is {x.shape} {x.dtype}"
            )


# ----------------------------------------------------------------------------------------------
# The bi-directional scan, written once for every one-step map
# ----------------------------------------------------------------------------------------------

# maps(y, cur, down, up, last) -> (Phi(cur -> down | y), Phi(cur -> up | y), model outputs)
Maps = Callable[..., tuple[Array, Array, tuple[Array, Array]]]


def _triples(g: GridCoeffs):
    """Per-step (cur, down, up) points for the BDIA steps at ``ts[1] .. ts[S - 1]``."""
    S = g.t.shape[0] - 1
    sl = lambda a, b: jax.tree.map(lambda v: v[a:b], g)
    return sl(1, S), sl(2, S + 1), sl(0, S - 1)


def _at(tree, i):
    return jax.tree.map(lambda v: v[i], tree)


def _nfe(S: int, heun_down: bool, heun_up: bool, g: GridCoeffs, first: str):
    """Model evaluations: one per step at ``z_i`` plus the Heun predictors (none for the
    down map onto ``t = 0``); ``first``: ``"down"`` (plain sampling step), ``"up"`` (plain
    inversion step) or ``"pair"`` (none)."""
    to_zero = (g.t[-1] == 0).astype(jnp.int32)
    n = (S - 1) * (1 + heun_up + heun_down) - (heun_down * to_zero if S >= 2 else 0)
    if first == "down":
        n = n + 1 + heun_down * (1 - to_zero if S == 1 else 1)
    elif first == "up":
        n = n + 1 + heun_down
    return n


def _bdia_sample(
    maps: Maps, y_T, y_next, g: GridCoeffs, gamma, *, to_x, heun, out_dtype, return_trajectory
):
    """Sampling: ``y_{k+1} = Phi(k -> k+1 | y_k) + gamma (y_{k-1} - Phi(k -> k-1 | y_k))``.

    ``y`` are the states in the maps' variables (``to_x(y, point)`` maps back), ``heun`` the
    pair (down, up) of "the map makes a Heun predictor evaluation", for the NFE count."""
    S = g.t.shape[0] - 1
    nfe = _nfe(S, *heun, g, "down" if y_next is None else "pair")
    cdt = g.t.dtype
    y_T = y_T.astype(cdt)
    y_next = None if y_next is None else y_next.astype(cdt)

    def step(carry, pts, *, last):
        y_prev, y = carry
        cur, down, up = pts
        phi_down, phi_up, out = maps(y, cur, down, up, last)
        y_new = (phi_down + gamma * (y_prev - phi_up)).astype(cdt)
        return (y, y_new), (to_x(y_new, down), *out)

    outs = []
    if y_next is None:  # first step: no z_{i+1} yet, plain one-step map
        phi, _, out = maps(y_T, _at(g, 0), _at(g, 1), None, S == 1)
        y_next = phi
        outs.append((to_x(phi, _at(g, 1)), *out))
    carry = (y_T, y_next)
    triples = _triples(g)
    carry, traj = run_scan(
        lambda c, p: step(c, p, last=False),
        carry,
        jax.tree.map(lambda v: v[:-1], triples),
        return_trajectory=return_trajectory,
    )
    if S >= 2:
        carry, out_last = step(carry, _at(triples, -1), last=True)
    y_0 = carry[1]
    x_0 = to_x(y_0, _at(g, S)).astype(out_dtype)
    if not return_trajectory:
        return x_0
    pieces = [[o[None] for o in out] for out in outs] + [list(traj)]
    if S >= 2:
        pieces.append([o[None] for o in out_last])
    x, x0, eps = (jnp.concatenate(p) for p in zip(*pieces, strict=True))
    x_start = [to_x(y_T, _at(g, 0))[None]] + ([] if outs else [to_x(y_next, _at(g, 1))[None]])
    return x_0, {"x": jnp.concatenate([*x_start, x]), "x0": x0, "eps": eps, "nfe": nfe}


def _bdia_invert(
    maps: Maps, first_up, y_0, g: GridCoeffs, gamma, *, to_x, heun, out_dtype, return_trajectory
):
    """Inversion: ``y_{k-1} = Phi(k -> k-1 | y_k) + (y_{k+1} - Phi(k -> k+1 | y_k)) / gamma``,
    after ``y_{S-1} = first_up(y_S)``; arguments as :func:`_bdia_sample`."""
    S = g.t.shape[0] - 1
    nfe = _nfe(S, *heun, g, "up")
    cdt = g.t.dtype
    y_0 = y_0.astype(cdt)

    def step(carry, pts, *, last):
        y_next, y = carry
        cur, down, up = pts
        phi_down, phi_up, _ = maps(y, cur, down, up, last)
        y_new = (phi_up + (y_next - phi_down) / gamma).astype(cdt)
        return (y, y_new), to_x(y_new, up)

    y_1 = first_up(y_0).astype(cdt)  # plain inversion step ts[S] -> ts[S - 1]
    carry, xs = (y_0, y_1), []
    triples = _triples(g)
    if S >= 2:
        carry, x_last = step(carry, _at(triples, -1), last=True)
        xs.append(x_last[None])
    carry, traj = run_scan(
        lambda c, p: step(c, p, last=False),
        carry,
        jax.tree.map(lambda v: v[:-1][::-1], triples),
        return_trajectory=return_trajectory,
    )
    y_T, y_next = carry[1], carry[0]
    pair = BDIAPair(
        to_x(y_T, _at(g, 0)).astype(out_dtype), to_x(y_next, _at(g, 1)).astype(out_dtype)
    )
    if not return_trajectory:
        return pair
    # states in the order of ts: x[k] at ts[k]
    up_x = jnp.concatenate([*xs, traj])[::-1] if S >= 2 else jnp.zeros((0,) + y_0.shape, y_0.dtype)
    x = jnp.concatenate([up_x, to_x(y_1, _at(g, S - 1))[None], to_x(y_0, _at(g, S))[None]])
    return pair, {"x": x, "nfe": nfe}


def _identity(y, p):
    return y


def _first_eval_time(g: GridCoeffs):
    """Where the first inversion step evaluates the model: at the data's time ``ts[-1]``, or,
    where ``ts[-1] = 0`` (no noise prediction exists at ``sigma = 0``), at ``ts[-2]`` with the
    clean state (the convention of diffusers' ``DDIMInverseScheduler``)."""
    return jnp.where(g.t[-1] > 0, g.t[-1], g.t[-2])


# ----------------------------------------------------------------------------------------------
# BDIA-DDIM
# ----------------------------------------------------------------------------------------------


def _ddim_maps(den: Denoiser) -> Maps:
    def maps(y, cur, down, up, last):
        del last
        x0, eps = den.predict(y, cur.t)  # the one evaluation at (z_i, t_i)
        phi_up = None if up is None else ddim_map(y, x0, eps, up.alpha, up.sigma)
        return ddim_map(y, x0, eps, down.alpha, down.sigma), phi_up, (x0, eps)

    return maps


def bdia_ddim(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    gamma: float | Array = 1.0,
    x_next: Array | None = None,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """BDIA-DDIM sampler (Zhang, Lewis & Kleijn 2024, eq. of BDIA-DDIM).

    ``z_{i-1} = gamma z_{i+1} - gamma D_{i->i+1}(z_i) + D_{i->i-1}(z_i)`` with the DDIM map
    ``D_{i->j}(z_i) = alpha_j x0_hat + sigma_j eps_hat`` from ONE evaluation at ``(z_i, t_i)``.
    Without ``x_next`` the first step is plain DDIM (NFE = S); with ``x_next`` (e.g. from
    :func:`bdia_invert`) every step is a BDIA step (NFE = S - 1). ``gamma = 0`` is DDIM.
    Global order [measured]: 1 for ``gamma < 1``, 2 for ``gamma = 1``.

    Args:
      denoiser: the model.
      x_T: ``(B, ...)`` the state at ``ts[0]``.
      ts: ``(S + 1,)`` descending times; may end at 0.
      gamma: scalar in ``[0, 1]`` (traced values allowed). SD text-to-image: 0.5 for ~10 steps,
        1.0 for ~40 steps; exact editing: 0.92-1.0.
      x_next: optional ``(B, ...)`` state at ``ts[1]``: sampling starts from the pair
        ``(x_T, x_next)``. Regenerate inverted data with
        ``bdia_ddim(den, pair.x_T, ts, gamma=g, x_next=pair.x_next)``.
      key: unused (deterministic).
      return_trajectory: also return ``{"x": (S + 1, B, ...) states at ts, "x0", "eps":
        (n, B, ...) model outputs at the n evaluated states (n = S, or S - 1 from a pair),
        "nfe"}``.

    Returns:
      ``x_0`` of shape ``x_T.shape`` (and the trajectory dict if asked).
    """
    del key
    _, g, _, _ = prepare(
        denoiser, x_T, ts, sampler="bdia_ddim", return_trajectory=return_trajectory
    )
    _check_x_next(x_T, x_next)
    _check_gamma(gamma, invert=False)
    gamma = jnp.asarray(gamma, g.t.dtype)
    return _bdia_sample(
        _ddim_maps(denoiser),
        x_T,
        x_next,
        g,
        gamma,
        to_x=_identity,
        heun=(False, False),
        out_dtype=x_T.dtype,
        return_trajectory=return_trajectory,
    )


def bdia_invert(
    denoiser: Denoiser,
    x_0: Array,
    ts: Array,
    *,
    gamma: float | Array = 1.0,
    return_trajectory: bool = False,
) -> BDIAPair | tuple[BDIAPair, dict]:
    """Exact BDIA-DDIM inversion (Zhang, Lewis & Kleijn 2024): data -> the pair ``(z_N, z_{N-1})``.

    ``z_{i+1} = D_{i->i+1}(z_i) + (z_{i-1} - D_{i->i-1}(z_i)) / gamma``, after one plain DDIM
    inversion step ``x_0 -> z_1``. ``bdia_ddim(den, pair.x_T, ts, gamma=gamma,
    x_next=pair.x_next)`` returns ``x_0`` up to float round-off, for any model. NFE = S.

    Args:
      denoiser: the model.
      x_0: ``(B, ...)`` the data (the state at ``ts[-1]``).
      ts: ``(S + 1,)`` the sampler's descending grid (``ts[0]`` noisiest); may end at 0, in which
        case the first inversion step evaluates the model at ``ts[-2]``.
      gamma: scalar in ``(0, 1]``, the same as for sampling.
      return_trajectory: also return ``{"x": (S + 1, B, ...), "nfe"}``, the states at ``ts``.

    Returns:
      ``BDIAPair(x_T, x_next)``: the states at ``ts[0]`` and ``ts[1]`` (and the trajectory).
    """
    _, g, _, _ = prepare(
        denoiser, x_0, ts, sampler="bdia_invert", x_name="x_0", return_trajectory=return_trajectory
    )
    _check_gamma(gamma, invert=True)
    gamma = jnp.asarray(gamma, g.t.dtype)

    def first_up(x):  # plain DDIM inversion step (eps-form of the DDIM map)
        _, eps = denoiser.predict(x, _first_eval_time(g))
        return g.alpha[-2] * (x / g.alpha[-1] + (g.sigma_bar[-2] - g.sigma_bar[-1]) * eps)

    return _bdia_invert(
        _ddim_maps(denoiser),
        first_up,
        x_0,
        g,
        gamma,
        to_x=_identity,
        heun=(False, False),
        out_dtype=x_0.dtype,
        return_trajectory=return_trajectory,
    )


# ----------------------------------------------------------------------------------------------
# BDIA-EDM
# ----------------------------------------------------------------------------------------------


def _edm_maps(den: Denoiser, solver: str, backward_solver: str) -> Maps:
    def maps(y, cur, down, up, last):
        cur, down, up = edm_point(cur), edm_point(down), edm_point(up)
        x0, d = edm_denoise(den, y, cur)  # evaluation at (z_i, t_i), shared by both maps
        phi_down = edm_step(den, y, d, cur, down, solver, may_end_at_zero=last)
        phi_up = (
            None
            if up is None
            else edm_step(den, y, d, cur, up, backward_solver, may_end_at_zero=False)
        )
        return phi_down, phi_up, (x0, d)

    return maps


def _check_solvers(solver: str, backward_solver: str | None, sampler: str) -> str:
    check_choice(solver, "solver", EDM_SOLVERS, sampler)
    backward_solver = solver if backward_solver is None else backward_solver
    check_choice(backward_solver, "backward_solver", EDM_SOLVERS, sampler)
    return backward_solver


def _to_x(y, p):
    return p.alpha * y


def bdia_edm(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    gamma: float | Array = 1.0,
    solver: str = "heun",
    backward_solver: str | None = None,
    x_next: Array | None = None,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """BDIA-EDM sampler (Zhang, Lewis & Kleijn 2024): the BDIA update with EDM's one-step map.

    In EDM's variables ``x_bar = x / alpha``, ``sigma_bar = sigma / alpha`` (see
    :mod:`solvers.edm`): ``x_bar_{i-1} = Phi(t_i -> t_{i-1}) + gamma (x_bar_{i+1} -
    Phi(t_i -> t_{i+1}))`` with ``Phi`` EDM's one-step integrator from ``x_bar_i`` (``solver``;
    Heun is an Euler step onto ``sigma_bar = 0``), used in both directions unless
    ``backward_solver`` names another one for ``Phi(t_i -> t_{i+1})``. Both maps start from the
    one evaluation at ``z_i``, and Heun's second evaluation sits at the Euler point from ``z_i``,
    so both depend on ``z_i`` only and the update stays exactly invertible
    (:func:`bdia_edm_invert`). NFE with ``ts[-1] = 0``: Heun both ways 3S - 2 (the backward
    predictor costs one evaluation per BDIA step); ``backward_solver="euler"`` 2S - 1, as EDM;
    Euler both ways S. The paper gives no code for BDIA-EDM.

    Global order [measured on a Gaussian, lambda-uniform grid]: Heun both ways 2; Euler both ways
    2 for ``gamma = 1`` (the leapfrog-like symmetric scheme), 1 for ``0 < gamma < 1``; Heun with
    a backward Euler map 1 for every ``gamma > 0`` (the Euler map's O(h^2) local error enters with
    weight ``gamma``). ``gamma = 0`` is :func:`solvers.edm.edm_heun` (or ``edm_euler``). The
    combination is taken in ``x_bar``, so it differs from :func:`bdia_ddim` (taken in ``x``)
    unless ``alpha = 1`` and ``solver="euler"``.

    Args:
      denoiser: the model.
      x_T: ``(B, ...)`` the state ``x`` at ``ts[0]``.
      ts: ``(S + 1,)`` descending times; may end at 0.
      gamma: scalar in ``[0, 1]`` (traced values allowed).
      solver: ``"heun"`` or ``"euler"``: EDM's one-step map (static).
      backward_solver: None (= ``solver``), ``"euler"`` or ``"heun"``: the map from ``z_i`` back
        to ``t_{i+1}`` (static).
      x_next: optional ``(B, ...)`` state ``x`` at ``ts[1]`` (from :func:`bdia_edm_invert`).
      key: unused (deterministic).
      return_trajectory: also return ``{"x": (S + 1, B, ...) states x at ts, "x0", "eps":
        (n, B, ...) model outputs at the n states the steps start from (n = S, or S - 1 from a
        pair; ``eps`` is EDM's ``d``), "nfe"}``.

    Returns:
      ``x_0`` of shape ``x_T.shape`` (and the trajectory dict if asked).
    """
    del key
    _, g, _, _ = prepare(denoiser, x_T, ts, sampler="bdia_edm", return_trajectory=return_trajectory)
    _check_x_next(x_T, x_next)
    _check_gamma(gamma, invert=False)
    backward_solver = _check_solvers(solver, backward_solver, "bdia_edm")
    gamma = jnp.asarray(gamma, g.t.dtype)
    y_next = None if x_next is None else x_next / g.alpha[1]
    return _bdia_sample(
        _edm_maps(denoiser, solver, backward_solver),
        x_T / g.alpha[0],
        y_next,
        g,
        gamma,
        to_x=_to_x,
        heun=(solver == "heun", backward_solver == "heun"),
        out_dtype=x_T.dtype,
        return_trajectory=return_trajectory,
    )


def bdia_edm_invert(
    denoiser: Denoiser,
    x_0: Array,
    ts: Array,
    *,
    gamma: float | Array = 1.0,
    solver: str = "heun",
    backward_solver: str | None = None,
    return_trajectory: bool = False,
) -> BDIAPair | tuple[BDIAPair, dict]:
    """Exact BDIA-EDM inversion (Zhang, Lewis & Kleijn 2024): data -> the pair ``(x_T, x_next)``.

    ``x_bar_{i+1} = Phi(t_i -> t_{i+1}) + (x_bar_{i-1} - Phi(t_i -> t_{i-1})) / gamma`` with the
    maps of :func:`bdia_edm`, after one plain EDM step (``solver``) from the data up to ``ts[-2]``.
    ``bdia_edm(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next)`` (same solvers) returns
    ``x_0`` up to float round-off.

    Args:
      denoiser: the model.
      x_0: ``(B, ...)`` the data (the state at ``ts[-1]``).
      ts: ``(S + 1,)`` the sampler's descending grid; may end at 0.
      gamma: scalar in ``(0, 1]``, the same as for sampling.
      solver, backward_solver: the same as for sampling (static).
      return_trajectory: also return ``{"x": (S + 1, B, ...), "nfe"}``: the states ``x`` at
        ``ts`` and the model evaluations.

    Returns:
      ``BDIAPair(x_T, x_next)`` (and the trajectory dict if asked).
    """
    _, g, _, _ = prepare(
        denoiser, x_0, ts, sampler="bdia_edm_invert", x_name="x_0",
        return_trajectory=return_trajectory,
    )  # fmt: skip
    _check_gamma(gamma, invert=True)
    backward_solver = _check_solvers(solver, backward_solver, "bdia_edm_invert")
    gamma = jnp.asarray(gamma, g.t.dtype)

    def first_up(x_bar):  # plain EDM step from the data up to ts[-2]
        _, d = denoiser.predict(g.alpha[-1] * x_bar, _first_eval_time(g))
        return edm_step(
            denoiser, x_bar, d, edm_point(_at(g, -1)), edm_point(_at(g, -2)), solver,
            may_end_at_zero=False,
        )  # fmt: skip

    return _bdia_invert(
        _edm_maps(denoiser, solver, backward_solver),
        first_up,
        x_0 / g.alpha[-1],
        g,
        gamma,
        to_x=_to_x,
        heun=(solver == "heun", backward_solver == "heun"),
        out_dtype=x_0.dtype,
        return_trajectory=return_trajectory,
    )
