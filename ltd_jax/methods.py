"""Training methods as (adversary, loss) pairs over the one shared train step (METHODS.md section 2).

A method never owns a training loop. The train step calls ``method.adversary`` with the model in
eval mode (the inner maximisation, whose result is a constant), then differentiates
``method.loss`` with respect to the parameters, running the model in train mode through a
``TrainForward`` that threads BatchNorm statistics through every forward pass in order, as the
PyTorch reference code does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ltd_jax import attacks
from ltd_jax import losses


@dataclasses.dataclass
class MethodInputs:
  """What a method sees of one batch: augmented images in [0, 1], labels, an rng and the
  ABSLD per-class temperatures (unused by the other methods)."""
  x: jax.Array
  y: jax.Array
  rng: jax.Array
  tau_adv: jax.Array
  tau_clean: jax.Array
  teacher_logits: jax.Array | None = None


class TrainForward:
  """Train-mode forward passes that chain BatchNorm running statistics from call to call."""

  def __init__(self, apply_fn: Callable[..., Any], params, batch_stats):
    self.apply_fn, self.params, self.batch_stats = apply_fn, params, batch_stats

  def __call__(self, x: jax.Array) -> jax.Array:
    logits, updates = self.apply_fn({'params': self.params, 'batch_stats': self.batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
    self.batch_stats = updates['batch_stats']
    return logits


# Aux outputs a loss may return: the logits it trained on (for train accuracy) and the
# per-sample cross-entropies that ABSLD accumulates per class as its risks.
Aux = dict


class Method(NamedTuple):
  """``adversary(eval_logits_fn, inputs, config) -> x_adv | None`` and
  ``loss(forward, inputs, x_adv, config) -> (scalar, aux)``."""
  adversary: Callable[..., jax.Array | None]
  loss: Callable[..., tuple[jax.Array, Aux]]
  needs_teacher: bool = False


def _pgd(objective, inputs: MethodInputs, config, init: str | None = None):
  a = config.attack
  return attacks.pgd_attack(objective, inputs.x, inputs.rng, eps=config.eps, alpha=a.alpha,
                            steps=a.steps, init=init or a.init)


def _aux(y, logits_clean=None, logits_adv=None) -> Aux:
  aux = {}
  if logits_clean is not None:
    aux['logits_clean'] = logits_clean
    aux['ce_clean'] = losses.cross_entropy(logits_clean, y, 'none')
  if logits_adv is not None:
    aux['logits_adv'] = logits_adv
    aux['ce_adv'] = losses.cross_entropy(logits_adv, y, 'none')
  return aux


def no_adversary(eval_logits_fn, inputs, config):
  del eval_logits_fn, inputs, config
  return None


def natural_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x), y)."""
  del x_adv, config
  logits = forward(inputs.x)
  return losses.cross_entropy(logits, inputs.y), _aux(inputs.y, logits_clean=logits)


def pgd_at_adversary(eval_logits_fn, inputs: MethodInputs, config):
  """PGD on CE with the true label (Madry et al.)."""
  return _pgd(attacks.ce_objective(eval_logits_fn, inputs.y), inputs, config)


def pgd_at_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x_adv), y)."""
  del config
  logits_adv = forward(x_adv)
  return losses.cross_entropy(logits_adv, inputs.y), _aux(inputs.y, logits_adv=logits_adv)


def trades_adversary(eval_logits_fn, inputs: MethodInputs, config):
  """PGD on sum KL(softmax(f(x)) || softmax(f(x_adv))), f in eval mode (Zhang et al. 2019)."""
  clean_probs = jax.nn.softmax(eval_logits_fn(inputs.x), axis=-1)
  return _pgd(attacks.kl_objective(eval_logits_fn, clean_probs), inputs, config)


def trades_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x), y) + beta * KL_batchmean(f(x) || f(x_adv)); the clean side is not stop-gradient'ed."""
  logits_clean = forward(inputs.x)
  logits_adv = forward(x_adv)
  natural = losses.cross_entropy(logits_clean, inputs.y)
  robust = losses.kl_from_logits(logits_clean, logits_adv, 'batchmean')
  aux = _aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + config.trades.beta * robust, aux


METHODS: dict[str, Method] = {
    'natural': Method(no_adversary, natural_loss),
    'pgd_at': Method(pgd_at_adversary, pgd_at_loss),
    'trades': Method(trades_adversary, trades_loss),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}: choose one of {", ".join(sorted(METHODS))}')
  return METHODS[name]


def per_class_sums(values: jax.Array, labels: jax.Array, num_classes: int):
  """(sum of values per class, count per class) over a batch."""
  sums = jnp.zeros((num_classes,), jnp.float32).at[labels].add(values.astype(jnp.float32))
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(1.0)
  return sums, counts
