"""AdamW with gradient clipping, a weight-decay mask, and the learning-rate schedules.

Schedules (all with a linear warmup from 0 over `warmup_steps`, and a floor lr·min_lr_ratio):
  constant  lr after warmup
  cosine    lr_min + (lr − lr_min)·½(1 + cos(π·p)),  p = progress after warmup in [0, 1]
  linear    lr − (lr − lr_min)·p
  wsd       warmup → stable at lr → decay over the last `decay_fraction` of steps to lr_min with shape
            linear (1 − q), cosine (½(1 + cos πq)) or sqrt (1 − √q), q = progress inside the decay
            (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
            Durations"; the cooldown branches of Catalan-Tatjer et al. 2025 start from the stable phase).

Weight decay applies to matrices (ndim >= 2) except the token embedding; norms' scales are not decayed.
`moment_dtype: bfloat16` stores Adam's first moment in bf16 (V3 §3.3 keeps optimizer moments in BF16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from efftrain.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int, decay_start: int | None = None) -> optax.Schedule:
    """The learning rate at each optimizer step (0-based count of updates already applied).

    `decay_start` (wsd only) overrides where the decay begins; used by cooldown branches.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup else peak
        span = max(total_steps - warmup, 1)
        p = jnp.clip((step - warmup) / span, 0.0, 1.0)
        if cfg.schedule == "constant":
            after = jnp.asarray(peak, jnp.float32)
        elif cfg.schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * p))
        elif cfg.schedule == "linear":
            after = peak - (peak - floor) * p
        else:  # wsd
            start = decay_start if decay_start is not None else total_steps - round(cfg.decay_fraction * total_steps)
            start = max(start, warmup)
            length = max(total_steps - start, 1)
            q = jnp.clip((step - start) / length, 0.0, 1.0)
            shape = {"linear": 1 - q, "cosine": 0.5 * (1 + jnp.cos(jnp.pi * q)), "sqrt": 1 - jnp.sqrt(q)}[
                cfg.decay_shape]
            after = floor + (peak - floor) * shape
        return jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay: matrices/expert stacks, but not the token embedding."""

    def keep(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return leaf.ndim >= 2 and "embed" not in names

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    mu_dtype = jnp.bfloat16 if cfg.moment_dtype == "bfloat16" else None
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts += [
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, mu_dtype=mu_dtype),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(cfg, total_steps)),
    ]
    return optax.chain(*parts)
