"""L-inf attacks composed from small init / step / project functions (METHODS.md section 1).

An attack maximises an ``objective(x_adv) -> scalar`` (a sum over the batch, so each example's
gradient is its own). Objectives are built from a ``logits_fn(x)`` that runs the model in eval
mode (running BatchNorm statistics, not updated).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ltd_jax import losses

Objective = Callable[[jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]


def init_uniform(rng, x, eps):
  """x + U(-eps, eps), clipped to [0, 1] (Madry PGD, evaluation PGD)."""
  return jnp.clip(x + jax.random.uniform(rng, x.shape, x.dtype, -eps, eps), 0.0, 1.0)


def init_normal(rng, x, eps):
  """x + 0.001 N(0, 1) (TRADES / AWP / RSLAD / ABSLD training attacks)."""
  del eps
  return x + 0.001 * jax.random.normal(rng, x.shape, x.dtype)


def init_none(rng, x, eps):
  del rng, eps
  return x


INITS = {'uniform': init_uniform, 'normal': init_normal, 'none': init_none}


def project_linf(x_adv, x, eps):
  """Projection onto the eps-ball around x, then onto the image box [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def sign_ascent_step(x_adv, grad, alpha):
  """x_adv + alpha * sign(grad)."""
  return x_adv + alpha * jnp.sign(grad)


def pgd_attack(objective: Objective, x: jax.Array, rng: jax.Array, *, eps: float, alpha: float,
               steps: int, init: str = 'uniform', step_fn=sign_ascent_step,
               project=project_linf, unroll: bool = False) -> jax.Array:
  """K steps of ``x_adv <- project(step_fn(x_adv, grad objective, alpha), x, eps)`` from
  ``init(x)``; the defaults are L-inf PGD (signed ascent, eps-ball then [0, 1] box).
  ``unroll`` writes the K steps out in the program (XLA's cost analysis counts a loop body
  once; the FLOP count of the benchmark needs them unrolled)."""
  if init not in INITS:
    raise ValueError(f'unknown attack init {init!r}: use one of {sorted(INITS)}')
  grad_fn = jax.grad(objective)
  x_adv = INITS[init](rng, x, eps)
  body = lambda _, xa: project(step_fn(xa, grad_fn(xa), alpha), x, eps)
  return lax.stop_gradient(lax.fori_loop(0, steps, body, x_adv, unroll=True if unroll else 1))


def fgsm_attack(objective: Objective, x: jax.Array, *, eps: float) -> jax.Array:
  """One signed-gradient step of size eps from x (Goodfellow et al.)."""
  x_adv = project_linf(sign_ascent_step(x, jax.grad(objective)(x), eps), x, eps)
  return lax.stop_gradient(x_adv)


def ce_objective(logits_fn: LogitsFn, labels: jax.Array) -> Objective:
  """sum_i CE(f(x_adv_i), y_i)."""
  return lambda x_adv: losses.cross_entropy(logits_fn(x_adv), labels, 'sum')


def kl_objective(logits_fn: LogitsFn, target_probs: jax.Array) -> Objective:
  """sum_i KL(p_i || softmax(f(x_adv_i))): ``kl_to_clean`` (p = softmax(f(x))) or
  ``kl_to_teacher`` (p = the teacher's soft label)."""
  target_probs = lax.stop_gradient(target_probs)
  return lambda x_adv: losses.kl_divergence(target_probs, logits_fn(x_adv), 'sum')


def cw_objective(logits_fn: LogitsFn, labels: jax.Array, kappa: float = 50.0) -> Objective:
  """sum_i -clamp(z_y - max_{c!=y} z_c + kappa, 0)."""
  return lambda x_adv: losses.cw_margin(logits_fn(x_adv), labels, kappa, 'sum')
