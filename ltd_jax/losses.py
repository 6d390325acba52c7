"""Loss terms from logits (METHODS.md sections 0-2), with explicit batch reductions.

Reductions: ``sum`` over the batch (attacks), ``batchmean`` = sum / batch (TRADES, AWP),
``elementwise_mean`` = batchmean / num_classes (RSLAD / ABSLD code), ``none`` per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

REDUCTIONS = ('none', 'sum', 'batchmean', 'elementwise_mean')


def reduce_per_sample(values: jax.Array, reduction: str, num_classes: int | None = None):
  """Reduces per-sample values of shape [B]."""
  if reduction == 'none':
    return values
  if reduction == 'sum':
    return jnp.sum(values)
  if reduction == 'batchmean':
    return jnp.mean(values)
  if reduction == 'elementwise_mean':
    return jnp.mean(values) / num_classes
  raise ValueError(f'unknown reduction {reduction!r}: use one of {REDUCTIONS}')


def softmax_t(logits: jax.Array, temperature=1.0) -> jax.Array:
  """softmax(z / T); ``temperature`` may be a scalar or a per-sample [B, 1] array."""
  return jax.nn.softmax(logits / temperature, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, reduction: str = 'batchmean'):
  """CE(z, y) = -log softmax(z)_y for integer labels [B]."""
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float,
                           reduction: str = 'batchmean'):
  """(1 - s) CE(z, y) + s mean_c(-log softmax(z)_c): label smoothing, as the
  DM-Improves-AT code's SmoothCrossEntropyLoss; s = 0 is ``cross_entropy``."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  per_sample = (1.0 - smoothing) * nll + smoothing * -jnp.mean(log_probs, axis=-1)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, reduction: str = 'batchmean'):
  """-sum_c p_c log softmax(z)_c for a target distribution p [B, C] (LTD's natural term)."""
  per_sample = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])


def kl_divergence(target_probs: jax.Array, logits: jax.Array, reduction: str = 'batchmean',
                  log_eps: float = 0.0):
  """KL(p || softmax(z)) = sum_c p_c (log p_c - log_softmax(z)_c), with 0 log 0 = 0.

  ``log_eps`` > 0 takes log(p_c + log_eps) for log p_c, as the RSLAD / ABSLD code's
  ``kl_loss`` (1e-5): a term constant in z, so only the loss's value changes, not its gradient."""
  if log_eps:
    log_p = jnp.log(target_probs + log_eps)
  else:
    log_p = jnp.where(target_probs > 0, jnp.log(jnp.where(target_probs > 0, target_probs, 1.0)), 0.)
  per_sample = jnp.sum(target_probs * (log_p - jax.nn.log_softmax(logits, axis=-1)), axis=-1)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])


def kl_from_logits(target_logits: jax.Array, logits: jax.Array, reduction: str = 'batchmean'):
  """KL(softmax(t) || softmax(z)), both sides from logits through log_softmax."""
  log_p = jax.nn.log_softmax(target_logits, axis=-1)
  per_sample = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits, axis=-1)), axis=-1)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])


def cw_margin(logits: jax.Array, labels: jax.Array, kappa: float = 50.0,
              reduction: str = 'sum'):
  """Carlini-Wagner L-inf margin, maximised by the attack: -clamp(z_y - max_{c!=y} z_c + kappa, 0)."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  correct = jnp.sum(onehot * logits, axis=-1)
  other = jnp.max(jnp.where(onehot > 0, -jnp.inf, logits), axis=-1)
  per_sample = -jnp.maximum(correct - other + kappa, 0.0)
  return reduce_per_sample(per_sample, reduction, logits.shape[-1])
