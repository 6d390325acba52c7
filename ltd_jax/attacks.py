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


def init_uniform_unclipped(rng, x, eps):
  """x + U(-eps, eps), not clipped to [0, 1] before the first step (the ARD / IAD code)."""
  return x + jax.random.uniform(rng, x.shape, x.dtype, -eps, eps)


def init_normal(rng, x, eps):
  """x + 0.001 N(0, 1) (TRADES / AWP / RSLAD / ABSLD training attacks)."""
  del eps
  return x + 0.001 * jax.random.normal(rng, x.shape, x.dtype)


def init_normal_clipped(rng, x, eps):
  """clip(x + 0.001 N(0, 1), 0, 1) (BAT's early-stopped attacks)."""
  return jnp.clip(init_normal(rng, x, eps), 0.0, 1.0)


def init_none(rng, x, eps):
  del rng, eps
  return x


INITS = {'uniform': init_uniform, 'uniform_unclipped': init_uniform_unclipped,
         'normal': init_normal, 'normal_clipped': init_normal_clipped, 'none': init_none}

# Whether an attack's K steps are written out in the program (True) or run as a lax.fori_loop,
# per platform of the devices the step is compiled for (``parallel.platform(mesh)``: 'cpu',
# 'gpu', 'tpu'; a deviceless GPU topology is 'gpu'), for ``attack.unroll`` / ``eval.unroll``
# left at None. XLA:CPU ran the training
# attack's loop body 2.2x slower than the unrolled steps, while evaluation on small models is
# compile-bound (benchmarks/README.md); on GPUs the choice is set from the loop-vs-unrolled rows
# of scripts/gpu_check.sh (until measured: loops, which compile once per step).
UNROLL_DEFAULTS = {'train': {'cpu': True}, 'eval': {'cpu': False}}


def resolve_unroll(value: bool | None, use: str, platform: str | None = None) -> bool:
  """``value`` when set, else the default of ``use`` ('train' or 'eval') on ``platform``
  (default: JAX's default backend, for steps not built over a mesh)."""
  if value is not None:
    return bool(value)
  return UNROLL_DEFAULTS[use].get(platform or jax.default_backend(), False)


def project_linf(x_adv, x, eps):
  """Projection onto the eps-ball around x, then onto the image box [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def sign_ascent_step(x_adv, grad, alpha):
  """x_adv + alpha * sign(grad)."""
  return x_adv + alpha * jnp.sign(grad)


def per_sample(value):
  """A per-sample [B] eps or step size as [B, 1, 1, 1], to broadcast over NHWC images
  (scalars as they are): FRL's and CFA's class-wise margins, eps[y_i] per image."""
  if isinstance(value, (int, float)) or jnp.ndim(value) == 0:
    return value
  return jnp.reshape(value, (-1, 1, 1, 1))


def pgd_attack(objective: Objective, x: jax.Array, rng: jax.Array, *, eps, alpha,
               steps: int, init: str = 'uniform', step_fn=sign_ascent_step,
               project=project_linf, unroll: bool = False, state=None, track=None):
  """K steps of ``x_adv <- project(step_fn(x_adv, grad objective, alpha), x, eps)`` from
  ``init(x)``; the defaults are L-inf PGD (signed ascent, eps-ball then [0, 1] box). ``eps``
  and ``alpha`` may be scalars or per-sample [B, 1, 1, 1]. ``unroll`` writes the K steps out in
  the program (XLA's cost analysis counts a loop body once; the FLOP count of the benchmark
  needs them unrolled).

  With ``state`` (what the objective's forwards change: a train-mode attack's BatchNorm
  statistics), ``objective(x_adv, state) -> (value, state)`` and the state is threaded from
  step to step. ``track = (tracked, update)`` follows the iterates: before each step k (0..K-1)
  ``tracked = update(tracked, k, x_k, state_k)``, with ``state_k`` what the objective left on
  x_k (``state`` must then hold what ``update`` reads, such as x_k's logits). Returns x_K, then
  ``tracked`` with ``track``, then the final state with ``state``."""
  if init not in INITS:
    raise ValueError(f'unknown attack init {init!r}: use one of {sorted(INITS)}')
  x_adv = INITS[init](rng, x, eps)
  stateful = state is not None
  grad_fn = jax.grad(objective, has_aux=stateful)
  tracked, update = track if track is not None else (None, None)

  def body(k, carry):
    xa, s, t = carry
    if stateful:
      g, s = grad_fn(xa, s)
    else:
      g = grad_fn(xa)
    if update is not None:
      t = update(t, k, xa, s)
    return project(step_fn(xa, g, alpha), x, eps), s, t

  x_adv, state, tracked = lax.fori_loop(0, steps, body, (x_adv, state, tracked),
                                        unroll=True if unroll else 1)
  out = (lax.stop_gradient(x_adv),)
  if track is not None:
    out += (lax.stop_gradient(tracked),)
  if stateful:
    out += (lax.stop_gradient(state),)
  return out[0] if len(out) == 1 else out


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


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{c != y} z_c per example: negative once the example is misclassified."""
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return z_y - jnp.max(others, axis=-1)


def square_init(rng, x, eps):
  """Vertical stripes: x + eps * (+-1) per column and channel, clipped to [0, 1]."""
  b, _, w, c = x.shape
  signs = jax.random.choice(rng, jnp.array([-1.0, 1.0], x.dtype), (b, 1, w, c))
  return jnp.clip(x + eps * signs, 0.0, 1.0)


def square_fraction(p_init: float, query: jax.Array, queries: int) -> jax.Array:
  """The Square attack's schedule of the window's area fraction p: p_init halved at 10, 50,
  200, 500, 1000, 2000, 4000, 6000 and 8000 of a budget rescaled to 10,000 queries."""
  it = (query * 10000) // queries
  halvings = jnp.sum(it > jnp.array([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]))
  return p_init / 2.0 ** halvings


def square_side(p, h: int, w: int) -> jax.Array:
  """The window's side for area fraction p of an h x w image: round(sqrt(p h w)), at least 1
  and at most min(h, w) - 1 (int32)."""
  return jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w) - 1).astype(jnp.int32)


def square_proposal(rng, x_best, x, eps, side):
  """x_best with one random side x side window (a different place per example) set to
  x + eps * (+-1 per channel), clipped to [0, 1]."""
  b, h, w, c = x.shape
  r_rng, c_rng, s_rng = jax.random.split(rng, 3)
  top = jax.random.randint(r_rng, (b, 1, 1, 1), 0, h - side + 1)
  left = jax.random.randint(c_rng, (b, 1, 1, 1), 0, w - side + 1)
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
  signs = jax.random.choice(s_rng, jnp.array([-1.0, 1.0], x.dtype), (b, 1, 1, c))
  return jnp.where(window, jnp.clip(x + eps * signs, 0.0, 1.0), x_best)


def square_attack(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, rng: jax.Array, *,
                  eps: float, queries: int, p_init: float = 0.8) -> jax.Array:
  """Score-based L-inf Square attack (Andriushchenko et al. 2020, Algorithm 1): it sees only
  the logits, never a gradient. From vertical stripes, each query proposes a random square
  window of +-eps values and keeps it where it lowers the margin ``z_y - max_{c!=y} z_c``, for
  the examples still classified correctly."""
  h, w = x.shape[1:3]
  init_rng, loop_rng = jax.random.split(rng)
  misclassified = (margin(logits_fn(x), labels) <= 0)[:, None, None, None]
  x_best = jnp.where(misclassified, x, square_init(init_rng, x, eps))  # attack only the correct
  best = margin(logits_fn(x_best), labels)

  def body(i, carry):
    x_best, best = carry
    p = square_fraction(p_init, i, queries)
    side = square_side(p, h, w)
    x_new = square_proposal(jax.random.fold_in(loop_rng, i), x_best, x, eps, side)
    new = margin(logits_fn(x_new), labels)
    better = (new < best) & (best > 0)
    return (jnp.where(better[:, None, None, None], x_new, x_best), jnp.where(better, new, best))

  x_best, _ = lax.fori_loop(1, queries, body, (x_best, best))
  return lax.stop_gradient(x_best)
