"""Motion networks of EMDM and MDM: the generator transformer, the discriminator and the
evaluator's motion encoder. Frames are ``(B, F, D)``: F frames of D features, channels last.

:class:`MotionTransformer` is MDM's transformer encoder (Tevet et al. 2023, ``model/mdm.py``) with
EMDM's additions (Zhou et al. 2024): a latent ``z`` through a mapping MLP as an extra token, and
the condition as a token of its own. The token sequence is::

    EMDM (separate_cond_token):  [t_emb, cond_emb, z_emb, f_1 ... f_F]
    MDM:                         [t_emb + cond_emb, f_1 ... f_F]

with ``t_emb = Linear(SiLU(Linear(pe(t))))`` (the positional-encoding row of ``t``),
``cond_emb`` a ``Linear(cond_dim -> d)`` of a text feature array or a learned action embedding,
``z_emb`` the mapping MLP of ``z`` and ``f_k = Linear(D -> d)`` of frame k; the sinusoidal
positional encoding is added over the whole sequence, then dropout, post-LN encoder layers
(PyTorch's ``nn.TransformerEncoderLayer``), and ``Linear(d -> D)`` of the frame tokens (the
predicted ``x0``).

:class:`MotionDiscriminator` is EMDM's ``DiscriminatorMDM_MLP`` on ``(x_{t-1}, x_t, t, cond)``
(flatten, GroupNorm, SELU), optionally with a per-frame channel reduction before the flatten
(the CPU-sized variant), or a small transformer over frame tokens.

:class:`MotionEncoder` is the evaluator's motion encoder (the Guo et al. analogue): a transformer
over frames, masked mean pooling and a projection to unit-norm embeddings.

Masks are ``(B, F)`` bool, True = a real frame. Padded frames are masked out as attention keys
and zeroed on input, so their content changes no output at a real frame. The networks embed the
time input ``t`` as given (like :class:`nets.UNet`): the caller chooses its scale (MDM and EMDM
feed the integer step index).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nets._layers import (
    TransformerBlock,
    default_init,
    dense,
    dropout,
    l2_normalize,
    layer_norm,
    sinusoidal_embedding,
    zeros_init,
)
from nets.text import TextEncoder, TextEncoderConfig

__all__ = [
    "ACTIVATIONS",
    "CONDITIONS",
    "DISCRIMINATOR_KINDS",
    "MotionDiscriminator",
    "MotionDiscriminatorConfig",
    "MotionEncoder",
    "MotionEncoderConfig",
    "MotionTextConfig",
    "MotionTextModel",
    "MotionTransformer",
    "MotionTransformerConfig",
    "ddgan_mlp_paper",
    "emdm_paper",
    "mdm_paper",
    "motion_disc_small",
    "motion_small",
]

ACTIVATIONS = ("gelu", "selu", "relu")
CONDITIONS = ("text", "action", "none")
DISCRIMINATOR_KINDS = ("mlp", "transformer")

_action_init = nnx.initializers.normal(1.0)  # MDM's EmbedAction: torch.randn(num_actions, d)


def _activation(name: str):
    return {"gelu": lambda x: jax.nn.gelu(x, approximate=False),  # PyTorch's exact GELU
            "selu": jax.nn.selu, "relu": jax.nn.relu}[name]


# ---------------------------------------------------------------------------------- validation


def _check_ints(config, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_cond_fields(config) -> None:
    """cond "text" needs cond_dim >= 1 (and no num_actions), "action" num_actions >= 1 (and no
    cond_dim), "none" neither."""
    _check_choice("cond", config.cond, CONDITIONS)
    _check_ints(config, ("cond_dim", "num_actions"), minimum=0)
    need = {"text": ("cond_dim",), "action": ("num_actions",), "none": ()}[config.cond]
    for name in ("cond_dim", "num_actions"):
        value = getattr(config, name)
        if name in need and value < 1:
            raise ValueError(f"{name} must be >= 1 when cond={config.cond!r}, got {value}")
        if name not in need and value != 0:
            raise ValueError(f"{name} must be 0 when cond={config.cond!r}, got {value}")


def _check_width(name: str, width: int, heads_name: str, heads: int) -> None:
    if width % 2:
        raise ValueError(f"{name} must be even (sinusoidal encoding), got {width}")
    if width % heads:
        raise ValueError(f"{name} ({width}) must be divisible by {heads_name} ({heads})")


def _concrete(a) -> bool:
    """Whether the values of `a` can be read on the host (not a tracer, fully addressable)."""
    return not isinstance(a, jax.core.Tracer) and getattr(a, "is_fully_addressable", True)


def _check_frames(name: str, x, feature_dim: int, max_frames: int, batch: int | None = None,
                  frames: int | None = None) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[2] != feature_dim:
        raise ValueError(
            f"{name} must have shape (B, F, feature_dim={feature_dim}), got {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    b, f, _ = x.shape
    if not 1 <= f <= max_frames:
        raise ValueError(
            f"{name} has F={f} frames, expected 1 <= F <= max_frames={max_frames}"
        )
    if (batch is not None and b != batch) or (frames is not None and f != frames):
        raise ValueError(f"{name} must have shape {(batch, frames, feature_dim)}, got {x.shape}")
    return x


def _check_mask(mask, b: int, f: int, *, need_frame: bool = False) -> jax.Array:
    """(B, F) bool, all True when None; with `need_frame`, a concrete mask must hold a real
    frame in every row."""
    if mask is None:
        return jnp.ones((b, f), jnp.bool_)
    mask = jnp.asarray(mask)
    if mask.shape != (b, f) or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array of shape {(b, f)} (True = real frame), got "
                         f"{mask.dtype}{tuple(mask.shape)}")
    if need_frame and _concrete(mask):
        empty = np.flatnonzero(~np.asarray(mask).any(axis=1))
        if empty.size:
            raise ValueError(f"mask rows {empty.tolist()} have no real (True) frame; every row "
                             "needs at least one")
    return mask


def _check_t(t, b: int) -> jax.Array:
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
        raise ValueError(f"t must have shape () or ({b},), got {tuple(t.shape)}")
    if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
        raise TypeError(f"t must be a float (or int) array, got dtype {t.dtype}")
    return jnp.broadcast_to(t.astype(jnp.float32), (b,))


def _check_cond(config, cond, b: int) -> jax.Array | None:
    """Validated condition: (B, cond_dim) float for text, (B,) int for actions (concrete ids
    are range-checked), None for cond="none"."""
    kind = config.cond
    if kind == "none":
        if cond is not None:
            raise ValueError(f"cond must be None when cond='none', got {type(cond).__name__}")
        return None
    if cond is None:
        want = f"({b}, {config.cond_dim}) text features" if kind == "text" else f"({b},) ids"
        raise ValueError(f"cond is required when cond={kind!r}: {want}; got None")
    cond = jnp.asarray(cond)
    if kind == "text":
        if cond.shape != (b, config.cond_dim):
            raise ValueError(f"cond must have shape (B, cond_dim) = {(b, config.cond_dim)} for "
                             f"text features, got {tuple(cond.shape)}")
        if not jnp.issubdtype(cond.dtype, jnp.floating):
            raise TypeError(f"cond must be float text features, got dtype {cond.dtype}")
        return cond.astype(jnp.float32)
    if cond.shape != (b,):
        raise ValueError(f"cond must have shape ({b},) (action ids), got {tuple(cond.shape)}")
    if not jnp.issubdtype(cond.dtype, jnp.integer):
        raise TypeError(f"cond must be integer action ids, got dtype {cond.dtype}")
    if _concrete(cond):
        ids = np.asarray(cond)
        bad = ids[(ids < 0) | (ids >= config.num_actions)]
        if bad.size:
            raise ValueError(f"cond holds unknown action ids {sorted(set(bad.tolist()))}; "
                             f"expected ids in [0, num_actions={config.num_actions})")
    return cond


def _action_valid(ids: jax.Array, num_actions: int) -> jax.Array:
    return (ids >= 0) & (ids < num_actions)


# ---------------------------------------------------------------------------------- layers


def _sinusoid(pos: jax.Array, d: int) -> jax.Array:
    """MDM's (the PyTorch tutorial's) positional encoding at real positions ``pos``:
    ``pe[2i] = sin(pos w_i)``, ``pe[2i+1] = cos(pos w_i)``, ``w_i = 10000^(-2i/d)``.

    pos: (...) -> (..., d) float32.
    """
    w = jnp.exp(jnp.arange(0, d, 2, dtype=jnp.float32) * (-math.log(10_000.0) / d))
    arg = jnp.asarray(pos, jnp.float32)[..., None] * w
    return jnp.stack([jnp.sin(arg), jnp.cos(arg)], axis=-1).reshape(*arg.shape[:-1], d)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class _PostLNLayer(nnx.Module):
    """PyTorch's ``nn.TransformerEncoderLayer`` (``norm_first=False``): post-LN.

    ``x = LN1(x + drop(Attn(x)))``, then ``x = LN2(x + drop(W2 drop(act(W1 x))))``; dropout
    also on the attention weights. The residual stream and normalisation are float32, the dense
    layers compute in ``dtype``, logits and softmax in float32.
    """

    def __init__(self, d: int, num_heads: int, ff_dim: int, rate: float, activation: str, *,
                 dtype, rngs: nnx.Rngs):
        self.num_heads, self.rate, self.activation, self.dtype = num_heads, rate, activation, dtype
        self.qkv = dense(d, 3 * d, dtype=dtype, rngs=rngs)
        self.out = dense(d, d, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(d, rngs)
        self.fc1 = dense(d, ff_dim, dtype=dtype, rngs=rngs)
        self.fc2 = dense(ff_dim, d, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(d, rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """x: (B, L, d) float32, key_mask: (B, L) bool (True = attendable), key: dropout key or
        None -> (B, L, d) float32."""
        b, l, d = x.shape
        n, r = self.num_heads, self.rate
        qkv = self.qkv(x.astype(self.dtype)).reshape(b, l, 3, n, d // n)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(d // n)
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        w = dropout(jax.nn.softmax(logits, axis=-1), r, _fold(key, 0))
        h = jnp.einsum("bhqk,bkhc->bqhc", w.astype(v.dtype), v).reshape(b, l, d)
        x = self.norm1(x + dropout(self.out(h), r, _fold(key, 1)).astype(jnp.float32))
        h = dropout(_activation(self.activation)(self.fc1(x.astype(self.dtype))), r, _fold(key, 2))
        h = dropout(self.fc2(h), r, _fold(key, 3))
        return self.norm2(x + h.astype(jnp.float32)).astype(jnp.float32)


# ---------------------------------------------------------------------------------- generator


@dataclasses.dataclass(frozen=True)
class MotionTransformerConfig:
    """Static description of a :class:`MotionTransformer` (hashable).

    Attributes:
      feature_dim: per-frame features D (263 for HumanML3D, 251 for KIT).
      max_frames: longest sequence F accepted (196 for HumanML3D).
      d_model: token width d; even and divisible by ``num_heads``.
      num_layers: post-LN encoder layers.
      num_heads: attention heads.
      ff_dim: hidden width of the feed-forward blocks.
      dropout: rate after the positional encoding and inside every layer (active only when a
        key is passed).
      activation: feed-forward activation, one of ``ACTIVATIONS``.
      cond: ``"text"`` (a (B, cond_dim) feature array, e.g. CLIP's), ``"action"`` (ids into a
        learned table) or ``"none"``.
      cond_dim: width of the text features (cond="text" only, else 0).
      num_actions: action classes (cond="action" only, else 0).
      latent_dim: width nz of EMDM's latent z (a token of its own, after a mapping MLP);
        0 = no z (MDM).
      separate_cond_token: EMDM's ``[t_emb, cond_emb, (z_emb), frames]`` (True) or MDM's
        single token ``t_emb + cond_emb`` (False).
      dtype: compute dtype of the dense layers; parameters, normalisation and output are
        float32.
    """

    feature_dim: int
    max_frames: int
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ff_dim: int = 256
    dropout: float = 0.1
    activation: str = "gelu"
    cond: str = "none"
    cond_dim: int = 0
    num_actions: int = 0
    latent_dim: int = 0
    separate_cond_token: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_ints(self, ("feature_dim", "max_frames", "d_model", "num_layers", "num_heads",
                           "ff_dim"))
        _check_ints(self, ("latent_dim",), minimum=0)
        _check_width("d_model", self.d_model, "num_heads", self.num_heads)
        _check_rate("dropout", self.dropout)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_cond_fields(self)
        if not isinstance(self.separate_cond_token, bool):
            raise ValueError(f"separate_cond_token must be a bool, got "
                             f"{self.separate_cond_token!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")

    @property
    def num_prefix(self) -> int:
        """Tokens before the frames: t (+ cond when separate and present) (+ z)."""
        separate = self.separate_cond_token and self.cond != "none"
        return 1 + int(separate) + int(self.latent_dim > 0)


class MotionTransformer(nnx.Module):
    """MDM / EMDM generator: ``(x, t, cond, z) -> x0`` of shape (B, F, D), float32.

    Sub-modules: ``time_0``, ``time_1`` (the time MLP), ``cond_proj`` (text) or
    ``action_table`` (actions), ``z_layers`` (the mapping MLP; empty without z), ``frame_proj``,
    ``layers`` (post-LN encoder), ``out_proj``.

    Args:
      config: a :class:`MotionTransformerConfig`.

    Example:
      >>> cfg = motion_small(feature_dim=191, max_frames=120, cond_dim=64, latent_dim=32,
      ...                    separate_cond_token=True)
      >>> g = MotionTransformer(cfg, rngs=nnx.Rngs(0))
      >>> x0 = g(x_t, t, text_features, mask=mask, z=z)   # (B, F, 191)
    """

    def __init__(self, config: MotionTransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MotionTransformerConfig):
            raise TypeError(
                f"config must be a MotionTransformerConfig, got {type(config).__name__}"
            )
        self.config = cfg = config
        d, dt = cfg.d_model, cfg.dtype
        self.time_0 = dense(d, d, rngs=rngs)
        self.time_1 = dense(d, d, rngs=rngs)
        self.cond_proj = dense(cfg.cond_dim, d, rngs=rngs) if cfg.cond == "text" else None
        self.action_table = (
            nnx.Param(_action_init(rngs.params(), (cfg.num_actions, d)))
            if cfg.cond == "action" else None
        )
        nz = cfg.latent_dim
        self.z_layers = nnx.List(
            [dense(nz, d, rngs=rngs)] + [dense(d, d, rngs=rngs) for _ in range(4)] if nz else []
        )
        self.frame_proj = dense(cfg.feature_dim, d, dtype=dt, rngs=rngs)
        self.layers = nnx.List([
            _PostLNLayer(d, cfg.num_heads, cfg.ff_dim, cfg.dropout, cfg.activation, dtype=dt,
                         rngs=rngs)
            for _ in range(cfg.num_layers)
        ])
        self.out_proj = dense(d, cfg.feature_dim, rngs=rngs)

    def _cond_embedding(self, cond: jax.Array | None, cond_drop: jax.Array | None):
        """(B, d) float32 condition embedding, or None for cond="none"."""
        cfg = self.config
        if cfg.cond == "text":
            if cond_drop is not None:  # MDM's mask_cond: the null condition is a zero feature
                cond = jnp.where(cond_drop[:, None], 0.0, cond)
            return self.cond_proj(cond)
        if cfg.cond == "action":
            # out-of-range ids (only possible under jit) embed as NaN instead of a wrong row
            e = jnp.take(self.action_table[...], cond, axis=0, mode="fill", fill_value=jnp.nan)
            if cond_drop is not None:  # MDM masks the action embedding itself
                e = jnp.where(cond_drop[:, None], 0.0, e)
            return e
        return None

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        z: jax.Array | None = None,
        cond_drop: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Predict x0.

        Args:
          x: (B, F, D) float, ``1 <= F <= max_frames``, ``D = feature_dim``.
          t: () or (B,) float (or int), the time input, embedded as given.
          cond: (B, cond_dim) float text features (cond="text"), (B,) int action ids in
            ``[0, num_actions)`` (cond="action"), None (cond="none"). Concrete ids are
            range-checked (ValueError); under ``jit`` an out-of-range id embeds as NaN, so that
            example's output is NaN rather than silently another action's.
          mask: (B, F) bool, True = real frame; None = all real. Padded frames are masked out
            of attention as keys and zeroed on input, so their content changes no output at a
            real frame.
          z: (B, latent_dim) float, required iff ``latent_dim > 0`` (EMDM), else None.
          cond_drop: (B,) bool; True replaces the condition by the null condition (MDM's
            masking: a zero text feature, a zero action embedding) for classifier-free
            guidance and condition dropout. Only with cond != "none".
          key: PRNG key for dropout; None = deterministic (no dropout).

        Returns:
          (B, F, D) float32, exactly zero at padded frames.
        """
        cfg = self.config
        x = _check_frames("x", x, cfg.feature_dim, cfg.max_frames)
        b, f, _ = x.shape
        t = _check_t(t, b)
        cond = _check_cond(cfg, cond, b)
        mask = _check_mask(mask, b, f)
        if cfg.latent_dim and z is None:
            raise ValueError(f"z of shape ({b}, latent_dim={cfg.latent_dim}) is required when "
                             f"latent_dim > 0, got None")
        if not cfg.latent_dim and z is not None:
            raise ValueError(f"z must be None when latent_dim=0 (no latent), got shape "
                             f"{tuple(jnp.shape(z))}")
        if z is not None:
            z = jnp.asarray(z)
            if z.shape != (b, cfg.latent_dim) or not jnp.issubdtype(z.dtype, jnp.floating):
                raise ValueError(f"z must be a float array of shape {(b, cfg.latent_dim)}, got "
                                 f"{z.dtype}{tuple(z.shape)}")
        if cond_drop is not None:
            if cfg.cond == "none":
                raise ValueError("cond_drop given but cond='none' (nothing to drop)")
            cond_drop = jnp.asarray(cond_drop)
            if cond_drop.shape != (b,) or cond_drop.dtype != jnp.bool_:
                raise ValueError(f"cond_drop must be a bool array of shape ({b},), got "
                                 f"{cond_drop.dtype}{tuple(cond_drop.shape)}")
        d, dt = cfg.d_model, cfg.dtype

        # prefix tokens, float32: [t_emb, cond_emb, z_emb] or [t_emb + cond_emb, z_emb]
        t_emb = self.time_1(nnx.silu(self.time_0(_sinusoid(t, d))))
        c_emb = self._cond_embedding(cond, cond_drop)
        if c_emb is None:
            prefix = [t_emb]
        elif cfg.separate_cond_token:
            prefix = [t_emb, c_emb]
        else:
            prefix = [t_emb + c_emb]
        if cfg.latent_dim:
            h = z.astype(jnp.float32)
            for layer in self.z_layers:
                h = jax.nn.leaky_relu(layer(h), 0.2)
            prefix.append(h)
        p = len(prefix)

        frames = self.frame_proj(jnp.where(mask[..., None], x, 0).astype(dt))
        h = jnp.concatenate([jnp.stack(prefix, axis=1), frames.astype(jnp.float32)], axis=1)
        h = h + _sinusoid(jnp.arange(p + f), d)
        h = dropout(h, cfg.dropout, _fold(key, 0))
        key_mask = jnp.concatenate([jnp.ones((b, p), jnp.bool_), mask], axis=1)
        for i, layer in enumerate(self.layers):
            h = layer(h, key_mask, _fold(key, i + 1))
        out = self.out_proj(h[:, p:])
        return jnp.where(mask[..., None], out, 0.0).astype(jnp.float32)


def _with_cond(cond: str, cond_dim: int, num_actions: int) -> dict:
    """The condition fields of a preset: cond_dim only for text, num_actions only for actions."""
    return dict(cond=cond, cond_dim=cond_dim if cond == "text" else 0,
                num_actions=num_actions if cond == "action" else 0)


def emdm_paper(feature_dim: int = 263, max_frames: int = 196, cond: str = "text",
               cond_dim: int = 512, num_actions: int = 0, **overrides) -> MotionTransformerConfig:
    """EMDM's generator (spec §3.5): 12 post-LN layers, d 1024, 32 heads, ff 1024, dropout
    0.1, SELU, z in R^64 as a separate token after the condition token.

    ``cond_dim`` applies to cond="text" only, ``num_actions`` to cond="action" only.
    """
    base = dict(feature_dim=feature_dim, max_frames=max_frames, d_model=1024, num_layers=12,
                num_heads=32, ff_dim=1024, dropout=0.1, activation="selu", latent_dim=64,
                separate_cond_token=True, **_with_cond(cond, cond_dim, num_actions))
    return MotionTransformerConfig(**{**base, **overrides})


def mdm_paper(feature_dim: int = 263, max_frames: int = 196, cond: str = "text",
              cond_dim: int = 512, num_actions: int = 0, **overrides) -> MotionTransformerConfig:
    """MDM's transformer encoder (spec §4): 8 post-LN layers, d 512, 4 heads, ff 1024,
    dropout 0.1, GELU, one token ``t_emb + cond_emb``, no z."""
    base = dict(feature_dim=feature_dim, max_frames=max_frames, d_model=512, num_layers=8,
                num_heads=4, ff_dim=1024, dropout=0.1, activation="gelu", latent_dim=0,
                separate_cond_token=False, **_with_cond(cond, cond_dim, num_actions))
    return MotionTransformerConfig(**{**base, **overrides})


def motion_small(feature_dim: int = 191, max_frames: int = 120, cond: str = "text",
                 cond_dim: int = 64, num_actions: int = 0, **overrides
                 ) -> MotionTransformerConfig:
    """The CPU-sized generator (spec §7.3): 4 layers, d 128, 4 heads, ff 256, dropout 0.1,
    GELU, MDM's layout without z. EMDM-mini: ``latent_dim=32, separate_cond_token=True``
    (and ``activation="selu"``)."""
    base = dict(feature_dim=feature_dim, max_frames=max_frames, d_model=128, num_layers=4,
                num_heads=4, ff_dim=256, dropout=0.1, activation="gelu", latent_dim=0,
                separate_cond_token=False, **_with_cond(cond, cond_dim, num_actions))
    return MotionTransformerConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------- discriminator


@dataclasses.dataclass(frozen=True)
class MotionDiscriminatorConfig:
    """Static description of a :class:`MotionDiscriminator` (hashable).

    Attributes:
      feature_dim: per-frame features D.
      max_frames: F of the flattened inputs (kind="mlp": shorter inputs are zero-padded to it,
        as a mask would zero them); the longest sequence (kind="transformer").
      cond: ``"text"`` (a (B, cond_dim) feature array), ``"action"`` (ids, one-hot encoded,
        as the paper) or ``"none"``.
      cond_dim: width of the text features (cond="text" only, else 0).
      num_actions: action classes (cond="action" only, else 0).
      time_dim: width of the time embedding (sinusoidal, then Linear -> act -> Linear).
      kind: ``"mlp"`` (the paper's ``DiscriminatorMDM_MLP``) or ``"transformer"``.
      hidden: widths of the MLP's hidden layers (each followed by its norm, if any, and the
        activation; a final Linear -> 1).
      norm_groups: one entry per hidden layer: the groups of a GroupNorm after that layer's
        Linear, 0 = none (paper: GN(32) after the 2nd, GN(16) after the 4th).
      reduce_channels: None = the paper's flatten of both inputs (2 F D values); an int c =
        first project each frame's ``[x_prev, x_t]`` (2D values) to c channels with a 1-D
        convolution (linear, kernel ``reduce_kernel``), then flatten F c values (kind="mlp").
      reduce_kernel: odd kernel size of that convolution ("SAME" zero padding).
      activation: activation of the MLP, the time embedding and the transformer's
        feed-forward blocks, one of ``ACTIVATIONS`` (paper: SELU).
      d_model, num_layers, num_heads, ff_dim: the post-LN transformer (kind="transformer").
    """

    feature_dim: int
    max_frames: int
    cond: str = "none"
    cond_dim: int = 0
    num_actions: int = 0
    time_dim: int = 128
    kind: str = "mlp"
    hidden: tuple[int, ...] = (1024, 1024, 512, 512, 256, 64)
    norm_groups: tuple[int, ...] = (0, 32, 0, 16, 0, 0)
    reduce_channels: int | None = None
    reduce_kernel: int = 1
    activation: str = "selu"
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ff_dim: int = 256

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "norm_groups", tuple(self.norm_groups))
        _check_ints(self, ("feature_dim", "max_frames", "time_dim", "reduce_kernel", "d_model",
                           "num_layers", "num_heads", "ff_dim"))
        _check_cond_fields(self)
        _check_choice("kind", self.kind, DISCRIMINATOR_KINDS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.time_dim % 2 or self.time_dim < 4:
            raise ValueError(f"time_dim must be even and >= 4, got {self.time_dim}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                  for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive ints, got "
                             f"{self.hidden!r}")
        if len(self.norm_groups) != len(self.hidden):
            raise ValueError(f"norm_groups must have one entry per hidden layer "
                             f"({len(self.hidden)}), got {self.norm_groups!r}")
        for h, g in zip(self.hidden, self.norm_groups, strict=True):
            if isinstance(g, bool) or not isinstance(g, int) or g < 0 or (g and h % g):
                raise ValueError(f"norm_groups entries must be 0 or ints dividing their hidden "
                                 f"width; got {g!r} for width {h} in {self.norm_groups!r}")
        if self.reduce_channels is not None:
            if self.kind != "mlp":
                raise ValueError(f"reduce_channels applies to kind='mlp' only, got "
                                 f"{self.reduce_channels!r} with kind={self.kind!r}")
            _check_ints(self, ("reduce_channels",))
        if self.reduce_kernel % 2 == 0:
            raise ValueError(f"reduce_kernel must be odd, got {self.reduce_kernel}")
        if self.kind == "transformer":
            _check_width("d_model", self.d_model, "num_heads", self.num_heads)

    @property
    def cond_width(self) -> int:
        """Width of the raw condition input: cond_dim, num_actions (one-hot) or 0."""
        return self.cond_dim + self.num_actions

    @property
    def mlp_in_dim(self) -> int:
        """Width of the MLP's input: the flattened frames, the time embedding, the condition."""
        per_frame = 2 * self.feature_dim if self.reduce_channels is None else self.reduce_channels
        return self.max_frames * per_frame + self.time_dim + self.cond_width


class _VectorGroupNorm(nnx.Module):
    """PyTorch's ``nn.GroupNorm(groups, C)`` on (B, C) vectors (eps 1e-5), float32."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        del rngs
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape
        h = x.astype(jnp.float32).reshape(b, self.groups, c // self.groups)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, c)
        return h * self.scale[...] + self.bias[...]


class MotionDiscriminator(nnx.Module):
    """EMDM's discriminator ``D(x_prev, x_t, t, cond) -> (B,)`` logits (spec §3.6).

    kind="mlp": ``MLP([flatten(x_prev), flatten(x_t), temb, cond])`` with GroupNorm and SELU
    (or the per-frame reduction first); kind="transformer": post-LN layers over the tokens
    ``[t, (cond), Linear([x_prev_k, x_t_k]) for each frame]`` with the positional encoding,
    masked mean pooling, ``Linear(d -> 1)``. Sub-modules: ``time_0``, ``time_1``, and
    ``reduce`` / ``mlp`` / ``norms`` / ``head`` (mlp) or ``time_token``, ``cond_token``,
    ``frame_proj``, ``layers``, ``head`` (transformer).

    Args:
      config: a :class:`MotionDiscriminatorConfig`.

    Example:
      >>> d = MotionDiscriminator(motion_disc_small(191, 120, cond_dim=64), rngs=nnx.Rngs(0))
      >>> logits = d(x_prev, x_t, t, text_features, mask=mask)   # (B,)
    """

    def __init__(self, config: MotionDiscriminatorConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MotionDiscriminatorConfig):
            raise TypeError(
                f"config must be a MotionDiscriminatorConfig, got {type(config).__name__}"
            )
        self.config = cfg = config
        td = cfg.time_dim
        self.time_0 = dense(td, td, rngs=rngs)
        self.time_1 = dense(td, td, rngs=rngs)
        if cfg.kind == "mlp":
            self.reduce = (
                nnx.Conv(2 * cfg.feature_dim, cfg.reduce_channels, (cfg.reduce_kernel,),
                         padding="SAME", param_dtype=jnp.float32, kernel_init=default_init,
                         bias_init=zeros_init, rngs=rngs)
                if cfg.reduce_channels is not None else None
            )
            widths = (cfg.mlp_in_dim, *cfg.hidden)
            self.mlp = nnx.List([dense(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:],
                                                                         strict=True)])
            self.norms = nnx.List([_VectorGroupNorm(h, g, rngs=rngs) if g else None
                                   for h, g in zip(cfg.hidden, cfg.norm_groups, strict=True)])
            self.head = dense(cfg.hidden[-1], 1, rngs=rngs)
        else:
            d = cfg.d_model
            self.time_token = dense(td, d, rngs=rngs)
            self.cond_token = dense(cfg.cond_width, d, rngs=rngs) if cfg.cond_width else None
            self.frame_proj = dense(2 * cfg.feature_dim, d, rngs=rngs)
            self.layers = nnx.List([
                _PostLNLayer(d, cfg.num_heads, cfg.ff_dim, 0.0, cfg.activation,
                             dtype=jnp.float32, rngs=rngs)
                for _ in range(cfg.num_layers)
            ])
            self.head = dense(d, 1, rngs=rngs)

    def _cond_input(self, cond: jax.Array | None) -> jax.Array | None:
        """Raw condition: text features, or the one-hot action (NaN for an out-of-range id,
        possible only under jit)."""
        cfg = self.config
        if cfg.cond == "action":
            onehot = jax.nn.one_hot(cond, cfg.num_actions, dtype=jnp.float32)
            return jnp.where(_action_valid(cond, cfg.num_actions)[:, None], onehot, jnp.nan)
        return cond

    def __call__(
        self,
        x_prev: jax.Array,
        x_t: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Discriminator logits.

        Args:
          x_prev: (B, F, D) float, the real or generated ``x_{t-1}``; ``F <= max_frames``.
          x_t: (B, F, D) float, the noisier input it is conditioned on.
          t: () or (B,) float (or int), the time input, embedded as given.
          cond: (B, cond_dim) float text features (cond="text"), (B,) int action ids in
            ``[0, num_actions)``, one-hot encoded (cond="action"; concrete ids are range-checked,
            under ``jit`` an out-of-range id gives a NaN logit), None (cond="none").
          mask: (B, F) bool, True = real frame; None = no masking (the paper). Padded frames are
            zeroed in both inputs first (and are no attention keys for kind="transformer"), so
            their content changes nothing.

        Returns:
          (B,) float32 logits.
        """
        cfg = self.config
        x_prev = _check_frames("x_prev", x_prev, cfg.feature_dim, cfg.max_frames)
        b, f, _ = x_prev.shape
        x_t = _check_frames("x_t", x_t, cfg.feature_dim, cfg.max_frames, batch=b, frames=f)
        t = _check_t(t, b)
        cond = _check_cond(cfg, cond, b)
        mask = _check_mask(mask, b, f)

        pair = jnp.concatenate([x_prev, x_t], axis=-1).astype(jnp.float32)  # (B, F, 2D)
        pair = jnp.where(mask[..., None], pair, 0.0)
        act = _activation(cfg.activation)
        temb = self.time_1(act(self.time_0(sinusoidal_embedding(t, cfg.time_dim))))
        c = self._cond_input(cond)

        if cfg.kind == "mlp":
            pair = jnp.pad(pair, ((0, 0), (0, cfg.max_frames - f), (0, 0)))
            if self.reduce is not None:
                pair = self.reduce(pair)  # (B, max_frames, c)
            if cfg.reduce_channels is None:  # the paper's flatten: all of x_prev, then x_t
                flat = jnp.concatenate([pair[..., :cfg.feature_dim].reshape(b, -1),
                                        pair[..., cfg.feature_dim:].reshape(b, -1)], axis=-1)
            else:
                flat = pair.reshape(b, -1)
            h = jnp.concatenate([flat, temb] + ([c] if c is not None else []), axis=-1)
            for layer, norm in zip(self.mlp, self.norms, strict=True):
                h = layer(h)
                h = act(norm(h) if norm is not None else h)
            return self.head(h)[:, 0]

        prefix = [self.time_token(temb)] + ([self.cond_token(c)] if c is not None else [])
        p = len(prefix)
        h = jnp.concatenate([jnp.stack(prefix, axis=1), self.frame_proj(pair)], axis=1)
        h = h + _sinusoid(jnp.arange(p + f), cfg.d_model)
        key_mask = jnp.concatenate([jnp.ones((b, p), jnp.bool_), mask], axis=1)
        for layer in self.layers:
            h = layer(h, key_mask, None)
        w = key_mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(h * w, axis=1) / jnp.sum(w, axis=1)
        return self.head(pooled)[:, 0]


def ddgan_mlp_paper(feature_dim: int = 263, max_frames: int = 196, cond_dim: int = 512,
                    cond: str = "text", num_actions: int = 0, **overrides
                    ) -> MotionDiscriminatorConfig:
    """EMDM's ``DiscriminatorMDM_MLP`` (spec §3.6): the flatten of both inputs (2 x 196 x 263),
    a 128-d time embedding and the 512-d CLIP feature (or a one-hot action) into 1024 SELU 1024
    GN(32) SELU 512 SELU 512 GN(16) SELU 256 SELU 64 SELU 1 (about 106M parameters in the
    first layer)."""
    base = dict(feature_dim=feature_dim, max_frames=max_frames, time_dim=128, kind="mlp",
                hidden=(1024, 1024, 512, 512, 256, 64), norm_groups=(0, 32, 0, 16, 0, 0),
                reduce_channels=None, activation="selu",
                **_with_cond(cond, cond_dim, num_actions))
    return MotionDiscriminatorConfig(**{**base, **overrides})


def motion_disc_small(feature_dim: int = 191, max_frames: int = 120, cond: str = "text",
                      cond_dim: int = 64, num_actions: int = 0, **overrides
                      ) -> MotionDiscriminatorConfig:
    """The CPU-sized MLP discriminator (spec §7.3): per-frame reduction to 8 channels (kernel
    3), a 64-d time embedding, hidden 256 256 GN(32) 128 128 GN(16) 64 32, SELU."""
    base = dict(feature_dim=feature_dim, max_frames=max_frames, time_dim=64, kind="mlp",
                hidden=(256, 256, 128, 128, 64, 32), norm_groups=(0, 32, 0, 16, 0, 0),
                reduce_channels=8, reduce_kernel=3, activation="selu",
                **_with_cond(cond, cond_dim, num_actions))
    return MotionDiscriminatorConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------- evaluator


@dataclasses.dataclass(frozen=True)
class MotionEncoderConfig:
    """Static description of a :class:`MotionEncoder` (hashable).

    Attributes:
      feature_dim: per-frame features D.
      max_frames: longest sequence F accepted.
      width: token width; even and divisible by ``num_heads``.
      depth: pre-LN transformer blocks.
      num_heads: attention heads.
      embed_dim: width E of the embedding.
      mlp_ratio: hidden width of the blocks' MLP is ``mlp_ratio * width``.
    """

    feature_dim: int
    max_frames: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    embed_dim: int = 64
    mlp_ratio: int = 4

    def __post_init__(self):
        _check_ints(self, ("feature_dim", "max_frames", "width", "depth", "num_heads",
                           "embed_dim", "mlp_ratio"))
        _check_width("width", self.width, "num_heads", self.num_heads)


class MotionEncoder(nnx.Module):
    """The evaluator's motion encoder: ``(B, F, D) -> (B, E)`` unit-norm embeddings.

    ``Linear(D -> width)`` per frame plus the sinusoidal positional encoding, pre-LN transformer
    blocks that attend only to real frames, a final LayerNorm, the mean over real frames, and
    ``Linear(width -> E)``: the features (FID space); the embedding is their L2 normalisation.

    Args:
      config: a :class:`MotionEncoderConfig`.

    Example:
      >>> enc = MotionEncoder(MotionEncoderConfig(191, 120), rngs=nnx.Rngs(0))
      >>> e = enc(motion, mask=mask)             # (B, 64), unit norm
      >>> feats = enc.features(motion, mask=mask)  # (B, 64), for FID
    """

    def __init__(self, config: MotionEncoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MotionEncoderConfig):
            raise TypeError(f"config must be a MotionEncoderConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.frame_proj = dense(cfg.feature_dim, cfg.width, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.norm = layer_norm(cfg.width, rngs)
        self.out_proj = dense(cfg.width, cfg.embed_dim, rngs=rngs)

    def features(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Un-normalised pooled features (the FID space).

        Args:
          x: (B, F, D) float, ``F <= max_frames``.
          mask: (B, F) bool, True = real frame (None = all real); every row needs a real frame
            (checked when concrete). Padded frames change no output.

        Returns:
          (B, E) float32.
        """
        cfg = self.config
        x = _check_frames("x", x, cfg.feature_dim, cfg.max_frames)
        b, f, _ = x.shape
        mask = _check_mask(mask, b, f, need_frame=True)
        h = self.frame_proj(jnp.where(mask[..., None], x, 0).astype(jnp.float32))
        h = h + _sinusoid(jnp.arange(f), cfg.width)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return self.out_proj(pooled)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """L2-normalised ``features(x, mask)``: (B, F, D) -> (B, E) unit norm."""
        return l2_normalize(self.features(x, mask))


# ------------------------------------------------------------------------------- text-motion model


@dataclasses.dataclass(frozen=True)
class MotionTextConfig:
    """Static description of a :class:`MotionTextModel` (hashable).

    Attributes:
      text: the text tower's :class:`nets.TextEncoderConfig`.
      motion: the motion tower's :class:`MotionEncoderConfig`; its ``embed_dim`` is the joint
        space's width.
      init_logit_scale: initial ``log`` of the logit scale (CLIP: ``log(1 / 0.07)``).
      max_logit_scale: the logit scale is clipped at this value (CLIP: 100).
    """

    text: TextEncoderConfig
    motion: MotionEncoderConfig
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if not isinstance(self.text, TextEncoderConfig):
            raise TypeError(f"text must be a TextEncoderConfig, got {type(self.text).__name__}")
        if not isinstance(self.motion, MotionEncoderConfig):
            raise TypeError(f"motion must be a MotionEncoderConfig, got "
                            f"{type(self.motion).__name__}")
        if not (math.isfinite(self.max_logit_scale) and self.max_logit_scale > 0
                and math.isfinite(self.init_logit_scale)
                and math.exp(self.init_logit_scale) <= self.max_logit_scale):
            raise ValueError(f"need 0 < exp(init_logit_scale) <= max_logit_scale; got "
                             f"{self.init_logit_scale}, {self.max_logit_scale}")

    @property
    def embed_dim(self) -> int:
        return self.motion.embed_dim


class MotionTextModel(nnx.Module):
    """A contrastive text-motion pair (CLIP's recipe; the Guo et al. evaluator's role): token
    rows and motions into one unit sphere.

    The text tower is :class:`nets.TextEncoder` (its eos feature, projected), the motion tower
    :class:`MotionEncoder`. Trained with ``dpm.losses.contrastive_logits_loss`` on
    ``scale * motion_emb @ text_emb.T``; used frozen as a condition encoder (its text
    embedding) or as an evaluator (R-precision, FID in :meth:`motion_features`).

    Args:
      config: a :class:`MotionTextConfig`.

    Example:
      >>> model = MotionTextModel(cfg, rngs=nnx.Rngs(0))
      >>> m, t, scale = model(motion, mask, tokens)  # (B, E), (B, E), ()
    """

    def __init__(self, config: MotionTextConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MotionTextConfig):
            raise TypeError(f"config must be a MotionTextConfig, got {type(config).__name__}")
        self.config = config
        self.text = TextEncoder(config.text, rngs=rngs)
        self.text_proj = dense(config.text.width, config.embed_dim, rngs=rngs)
        self.motion = MotionEncoder(config.motion, rngs=rngs)
        self.log_logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32))

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """Token rows (B, L) int -> (B, E) unit-norm text embeddings."""
        return l2_normalize(self.text_proj(self.text(tokens)[2]))

    def embed_motion(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Motions (B, F, D) (and their (B, F) mask) -> (B, E) unit-norm embeddings."""
        return self.motion(x, mask)

    def motion_features(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The motion tower's un-normalised features (B, E) (the FID space)."""
        return self.motion.features(x, mask)

    def logit_scale(self) -> jax.Array:
        """``min(exp(log_scale), max_logit_scale)``, ()."""
        return jnp.minimum(jnp.exp(self.log_logit_scale[...]), self.config.max_logit_scale)

    def __call__(self, x: jax.Array, mask: jax.Array | None, tokens: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(motion_emb (B, E), text_emb (B, E), logit_scale ())``."""
        return self.embed_motion(x, mask), self.embed_text(tokens), self.logit_scale()
