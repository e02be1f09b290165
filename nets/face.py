"""Face networks of REFace in miniature: a conv face encoder and the conditioning-token fuser.

:class:`FaceEncoder` is one conv tower with optional heads. It serves every in-project face
network of REFace (spec §7.2): the two ArcFace-style identity encoders ``E_id^train`` and
``E_id^eval`` (unit embedding + class-weight matrix for the additive-angular-margin softmax,
``dpm.losses.arcface_loss``), the attribute regressors ``R_pose`` and ``R_expr`` (a linear head),
and the generic image encoder that stands in for CLIP ViT-L/14. Its stages follow
:class:`nets.Classifier`: two conv3x3 + GroupNorm + SiLU layers per stage, width doubling and 2x2
average pooling between stages, global average pooling, a dense layer to the features.

:class:`FaceConditioner` builds REFace's cross-attention context (spec §2.3)::

    e_src = P_s(M(CLIP(src)))      e_tgt = P_t(M(CLIP(tgt)))      (shared mapper M)
    e_id  = Lin(ArcFace(src))      e_lm  = Lin(landmarks(tgt))
    c     = (w_clip (e_src + e_tgt) + w_id e_id + w_lm e_lm) / (w_clip + w_id + w_lm)

with ``M`` a small pre-LN transformer over the feature token followed by a LayerNorm, and a
learnable null token, the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import (
    ConvNormAct,
    Downsample,
    TransformerBlock,
    default_init,
    dense,
    l2_normalize,
    layer_norm,
)

__all__ = [
    "FaceConditioner",
    "FaceConditionerConfig",
    "FaceEncoder",
    "FaceEncoderConfig",
    "TOKEN_MODES",
    "face_encoder_small",
    "reface_conditioner_paper",
    "reface_conditioner_small",
]

TOKEN_MODES = ("fused", "separate")

_null_init = nnx.initializers.normal(0.02)


def _check_positive_ints(config, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# FaceEncoder


@dataclasses.dataclass(frozen=True)
class FaceEncoderConfig:
    """Static description of a :class:`FaceEncoder` (hashable).

    Attributes:
      image_size: H = W of the inputs; divisible by ``2**(num_stages - 1)``.
      in_channels: image channels C.
      width: channels of the first stage; stage s has ``width * 2**s``.
      num_stages: conv stages (2x2 average pooling between consecutive stages).
      embed_dim: width E of the features / identity embedding.
      num_classes: identities of the ArcFace head (an ``(E, num_classes)`` class-weight
        matrix); 0 = no head.
      num_outputs: outputs of the linear regression head on the features; 0 = no head.
    """

    image_size: int = 32
    in_channels: int = 3
    width: int = 32
    num_stages: int = 3
    embed_dim: int = 64
    num_classes: int = 0
    num_outputs: int = 0

    def __post_init__(self):
        _check_positive_ints(self, ("image_size", "in_channels", "width", "num_stages",
                                    "embed_dim"))
        _check_positive_ints(self, ("num_classes", "num_outputs"), minimum=0)
        factor = 2 ** (self.num_stages - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size must be divisible by 2**(num_stages - 1) = {factor} "
                f"(num_stages={self.num_stages}), got {self.image_size}"
            )


class FaceEncoder(nnx.Module):
    """Conv face encoder ``(B, S, S, C) -> (B, E)`` with optional ArcFace and regression heads.

    Args:
      config: a :class:`FaceEncoderConfig`.

    Example:
      >>> enc = FaceEncoder(face_encoder_small(num_classes=100), rngs=nnx.Rngs(0))
      >>> e = enc.embed(x)             # (B, 64), unit norm
      >>> cos = enc.cosine_logits(x)   # (B, 100) in [-1, 1], for dpm.losses.arcface_loss
    """

    def __init__(self, config: FaceEncoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, FaceEncoderConfig):
            raise TypeError(f"config must be a FaceEncoderConfig, got {type(config).__name__}")
        self.config = config
        stages, c_in = [], config.in_channels
        for s in range(config.num_stages):
            c = config.width * 2**s
            stages.append(nnx.List([ConvNormAct(c_in, c, rngs=rngs), ConvNormAct(c, c, rngs=rngs)]))
            c_in = c
        self.stages = nnx.List(stages)
        self.pool = Downsample(c_in, False, padding="SAME", dtype=jnp.float32, rngs=rngs)
        self.fc = dense(c_in, config.embed_dim, rngs=rngs)
        self.class_weights = (
            nnx.Param(default_init(rngs.params(), (config.embed_dim, config.num_classes)))
            if config.num_classes
            else None
        )
        self.head = (
            dense(config.embed_dim, config.num_outputs, rngs=rngs) if config.num_outputs else None
        )

    def _check(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != expected:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, expected))}), got {jnp.shape(x)}"
            )
        return jnp.asarray(x, jnp.float32)

    def feature_maps(self, x: jax.Array) -> list[jax.Array]:
        """The output of every stage (a feature-matching perceptual proxy).

        x: (B, S, S, C) -> ``[(B, S / 2**s, S / 2**s, width * 2**s) for s in stages]`` float32
        (before the pooling that follows the stage).
        """
        h = self._check(x)
        maps = []
        for s, stage in enumerate(self.stages):
            if s > 0:
                h = self.pool(h)
            for layer in stage:
                h = layer(h)
            maps.append(h)
        return maps

    def features(self, x: jax.Array) -> jax.Array:
        """Raw features: dense(global average pool(last stage)). x: (B, S, S, C) -> (B, E)."""
        return self.fc(jnp.mean(self.feature_maps(x)[-1], axis=(1, 2)))

    def embed(self, x: jax.Array) -> jax.Array:
        """Identity embedding (ArcFace-style): the L2-normalised features, (B, E) unit norm."""
        return l2_normalize(self.features(x))

    def cosine_logits(self, x: jax.Array) -> jax.Array:
        """``cos(theta_j)`` between ``embed(x)`` and each normalised class-weight column.

        x: (B, S, S, C) -> (B, num_classes) in [-1, 1]: the input of
        ``dpm.losses.arcface_loss``. Needs ``num_classes > 0``.
        """
        if self.class_weights is None:
            raise ValueError("cosine_logits needs an ArcFace head: num_classes must be > 0, got 0")
        w = l2_normalize(self.class_weights[...].T).T  # unit columns (E, num_classes)
        return self.embed(x) @ w

    def regress(self, x: jax.Array) -> jax.Array:
        """Linear regression head on the features. x: (B, S, S, C) -> (B, num_outputs).

        Needs ``num_outputs > 0``.
        """
        if self.head is None:
            raise ValueError("regress needs a regression head: num_outputs must be > 0, got 0")
        return self.head(self.features(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``embed(x)``: (B, S, S, C) -> (B, E) unit norm."""
        return self.embed(x)


def face_encoder_small(**overrides) -> FaceEncoderConfig:
    """The CPU-sized face encoder: 32x32x3 inputs, stages 32/64/128, 64-d embedding."""
    return FaceEncoderConfig(**overrides)


# ----------------------------------------------------------------------------------------------
# FaceConditioner


@dataclasses.dataclass(frozen=True)
class FaceConditionerConfig:
    """Static description of a :class:`FaceConditioner` (hashable).

    Attributes:
      feature_dim: width D_f of the generic image ("CLIP") features of source and target.
      id_dim: width of the identity (ArcFace) embedding.
      landmark_dim: width of the flattened target landmarks (68 x 2 = 136 in the paper);
        0 = no landmark branch.
      width: token width (the paper's 768 = the U-Net's ``context_dim``).
      mapper_layers: pre-LN transformer blocks of the mapper M (paper: 5).
      heads: attention heads of the mapper; must divide ``width``.
      mapper_mlp_ratio: MLP hidden width of the mapper is ``mapper_mlp_ratio * width``.
      w_clip, w_id, w_lm: fusion weights of the CLIP terms ``e_src + e_tgt``, of ``e_id`` and
        of ``e_lm`` (paper: 1, 10, 0.05); finite and >= 0, the present ones with a sum > 0.
      use_target: whether the disentangled target branch ``e_tgt`` is present.
      tokens: ``"fused"`` = one token, the weighted mean; ``"separate"`` = one unweighted token
        per present branch, in the order ``[e_src, e_id, (e_tgt), (e_lm)]``.
    """

    feature_dim: int
    id_dim: int
    landmark_dim: int = 0
    width: int = 64
    mapper_layers: int = 2
    heads: int = 4
    mapper_mlp_ratio: int = 4
    w_clip: float = 1.0
    w_id: float = 10.0
    w_lm: float = 0.05
    use_target: bool = True
    tokens: str = "fused"

    def __post_init__(self):
        _check_positive_ints(self, ("feature_dim", "id_dim", "width", "mapper_layers", "heads",
                                    "mapper_mlp_ratio"))
        _check_positive_ints(self, ("landmark_dim",), minimum=0)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        for name in ("w_clip", "w_id", "w_lm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.use_target, bool):
            raise ValueError(f"use_target must be a bool, got {self.use_target!r}")
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {self.tokens!r}")
        if self.tokens == "fused" and self.normalizer <= 0:
            raise ValueError(
                f"the fusion weights of the present branches must sum to > 0, got w_clip="
                f"{self.w_clip}, w_id={self.w_id}"
                + (f", w_lm={self.w_lm}" if self.landmark_dim else " (no landmark branch)")
            )

    @property
    def normalizer(self) -> float:
        """The fused token's denominator: ``w_clip + w_id (+ w_lm if landmarks)``."""
        return self.w_clip + self.w_id + (self.w_lm if self.landmark_dim else 0.0)

    @property
    def num_tokens(self) -> int:
        """Context length L: 1 when fused, else the number of present branches."""
        if self.tokens == "fused":
            return 1
        return 2 + int(self.use_target) + int(self.landmark_dim > 0)


class _Mapper(nnx.Module):
    """REFace's mapper M: input projection D_f -> width, pre-LN transformer blocks, LayerNorm.

    The blocks are :class:`nets.TextEncoder`'s (x + Attn(LN x), then x + MLP(LN x)), attending
    over every token (no padding). Over a single token the softmax is 1 and self-attention
    reduces to the value / output projections, but a sequence works the same way.
    """

    def __init__(self, cfg: FaceConditionerConfig, *, rngs: nnx.Rngs):
        self.proj_in = dense(cfg.feature_dim, cfg.width, rngs=rngs)
        self.blocks = nnx.List([
            TransformerBlock(cfg.width, cfg.heads, cfg.mapper_mlp_ratio, rngs=rngs)
            for _ in range(cfg.mapper_layers)
        ])
        self.norm = layer_norm(cfg.width, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, D_f) -> (B, L, width) float32."""
        h = self.proj_in(jnp.asarray(x, jnp.float32))
        mask = jnp.ones(h.shape[:2], jnp.bool_)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h).astype(jnp.float32)


class FaceConditioner(nnx.Module):
    """REFace's conditioning token(s) from image features, identity and landmarks (spec §2.3).

    Sub-modules: ``mapper`` (M, shared by source and target), ``proj_src`` (P_s), ``proj_tgt``
    (P_t, the "CLIP feature disentanglement"; None without the target branch), ``proj_id``,
    ``proj_lm`` (None without landmarks) and ``null_token`` (L, width).

    Args:
      config: a :class:`FaceConditionerConfig`.

    Example:
      >>> cond = FaceConditioner(reface_conditioner_small(64, 64), rngs=nnx.Rngs(0))
      >>> c = cond(src_feat, id_emb, tgt_feat)   # (B, 1, 64)
      >>> c0 = cond.null_context(B)              # (B, 1, 64), the CFG unconditional input
    """

    def __init__(self, config: FaceConditionerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, FaceConditionerConfig):
            raise TypeError(
                f"config must be a FaceConditionerConfig, got {type(config).__name__}"
            )
        self.config = config
        d = config.width
        self.mapper = _Mapper(config, rngs=rngs)
        self.proj_src = dense(d, d, rngs=rngs)
        self.proj_tgt = dense(d, d, rngs=rngs) if config.use_target else None
        self.proj_id = dense(config.id_dim, d, rngs=rngs)
        self.proj_lm = dense(config.landmark_dim, d, rngs=rngs) if config.landmark_dim else None
        self.null_token = nnx.Param(_null_init(rngs.params(), (config.num_tokens, d)))

    @property
    def num_tokens(self) -> int:
        """Context length L of ``__call__`` and ``null_context``."""
        return self.config.num_tokens

    def _check(self, name: str, x, dim: int, batch: int | None) -> jax.Array:
        shape = jnp.shape(x)
        if len(shape) != 2 or shape[1] != dim or (batch is not None and shape[0] != batch):
            b = "B" if batch is None else str(batch)
            raise ValueError(f"{name} must have shape ({b}, {dim}), got {shape}")
        return jnp.asarray(x, jnp.float32)

    def __call__(
        self,
        src_feat: jax.Array,
        id_emb: jax.Array,
        tgt_feat: jax.Array | None = None,
        landmarks: jax.Array | None = None,
    ) -> jax.Array:
        """The cross-attention context.

        Args:
          src_feat: (B, D_f) image features of the source face crop.
          id_emb: (B, id_dim) identity embedding of the source.
          tgt_feat: (B, D_f) image features of the whole target; required iff ``use_target``.
          landmarks: (B, landmark_dim) flattened target landmarks; required iff
            ``landmark_dim > 0``.

        Returns:
          (B, L, width) float32. ``"fused"``: L = 1, ``(w_clip (e_src + e_tgt) + w_id e_id +
          w_lm e_lm) / (w_clip + w_id + w_lm)`` where an absent branch leaves the sum and its
          weight leaves the denominator (without the target branch only ``e_tgt`` leaves the
          sum: ``w_clip`` still weighs ``e_src``). ``"separate"``: the unweighted tokens
          ``[e_src, e_id, (e_tgt), (e_lm)]`` of the present branches.
        """
        cfg = self.config
        src_feat = self._check("src_feat", src_feat, cfg.feature_dim, None)
        b = src_feat.shape[0]
        id_emb = self._check("id_emb", id_emb, cfg.id_dim, b)
        if cfg.use_target and tgt_feat is None:
            raise ValueError("tgt_feat is required when use_target=True, got None")
        if not cfg.use_target and tgt_feat is not None:
            raise ValueError(
                f"tgt_feat must be None when use_target=False, got shape {jnp.shape(tgt_feat)}"
            )
        if cfg.landmark_dim and landmarks is None:
            raise ValueError(
                f"landmarks are required when landmark_dim={cfg.landmark_dim} > 0, got None"
            )
        if not cfg.landmark_dim and landmarks is not None:
            raise ValueError(
                f"landmarks must be None when landmark_dim=0, got shape {jnp.shape(landmarks)}"
            )

        if cfg.use_target:
            tgt_feat = self._check("tgt_feat", tgt_feat, cfg.feature_dim, b)
        if cfg.landmark_dim:
            landmarks = self._check("landmarks", landmarks, cfg.landmark_dim, b)

        e_src = self.proj_src(self.mapper(src_feat[:, None])[:, 0])
        e_id = self.proj_id(id_emb)
        e_tgt = self.proj_tgt(self.mapper(tgt_feat[:, None])[:, 0]) if cfg.use_target else None
        e_lm = self.proj_lm(landmarks) if cfg.landmark_dim else None

        if cfg.tokens == "separate":
            present = [e for e in (e_src, e_id, e_tgt, e_lm) if e is not None]
            return jnp.stack(present, axis=1)
        clip_terms = e_src if e_tgt is None else e_src + e_tgt
        c = cfg.w_clip * clip_terms + cfg.w_id * e_id
        if e_lm is not None:
            c = c + cfg.w_lm * e_lm
        return (c / cfg.normalizer)[:, None, :]

    def null_context(self, batch_size: int) -> jax.Array:
        """The learnable null context (classifier-free guidance): (batch_size, L, width)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        token = self.null_token[...]
        return jnp.broadcast_to(token[None], (batch_size, *token.shape))


def reface_conditioner_paper(
    feature_dim: int = 768, id_dim: int = 512, landmark_dim: int = 136, **overrides
) -> FaceConditionerConfig:
    """REFace's conditioner (spec §2.3): width 768, a 5-block mapper, weights 1 / 10 / 0.05.

    ``heads=12`` (head width 64, as in CLIP ViT-L/14). Over the single mapper token the head
    count changes nothing (softmax over one key is 1); Paint-by-Example's mapper, which REFace
    inherits, uses one head.
    """
    base = dict(feature_dim=feature_dim, id_dim=id_dim, landmark_dim=landmark_dim, width=768,
                mapper_layers=5, heads=12, mapper_mlp_ratio=4, w_clip=1.0, w_id=10.0, w_lm=0.05,
                use_target=True, tokens="fused")
    return FaceConditionerConfig(**{**base, **overrides})


def reface_conditioner_small(feature_dim: int, id_dim: int, **overrides) -> FaceConditionerConfig:
    """The CPU-sized conditioner: width 64, 2 mapper blocks, 4 heads, target branch, no
    landmarks, the paper's fusion weights."""
    base = dict(feature_dim=feature_dim, id_dim=id_dim, landmark_dim=0, width=64,
                mapper_layers=2, heads=4, mapper_mlp_ratio=4)
    return FaceConditionerConfig(**{**base, **overrides})
