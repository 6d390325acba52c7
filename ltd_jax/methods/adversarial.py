"""Adversarial training: natural, PGD-AT (Madry et al.), TRADES (Zhang et al. 2019) and
TRADES-AWP (Wu et al. 2020)."""

from __future__ import annotations

import jax

from ltd_jax import attacks
from ltd_jax import losses
from ltd_jax.methods.base import (Method, MethodInputs, TrainForward, loss_aux, no_adversary,
                                  passes, pgd, register)


def natural_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x), y)."""
  del x_adv, config
  logits = forward(inputs.x)
  return losses.cross_entropy(logits, inputs.y), loss_aux(inputs.y, logits_clean=logits)


def pgd_at_adversary(student, inputs: MethodInputs, config):
  """PGD on CE with the true label (Madry et al.)."""
  return pgd(student, lambda f: attacks.ce_objective(f, inputs.y), inputs, config)


def pgd_at_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x_adv), y)."""
  del config
  logits_adv = forward(x_adv)
  return losses.cross_entropy(logits_adv, inputs.y), loss_aux(inputs.y, logits_adv=logits_adv)


def trades_adversary(student, inputs: MethodInputs, config):
  """PGD on sum KL(softmax(f(x)) || softmax(f(x_adv))), f as the attack sees it (Zhang et al.)."""
  clean_probs = jax.nn.softmax(student(inputs.x), axis=-1)
  return pgd(student, lambda f: attacks.kl_objective(f, clean_probs), inputs, config)


def clean_and_adv_logits(forward: TrainForward, inputs: MethodInputs, x_adv, adv_first: bool):
  """Train-mode logits on x and x_adv, in the order of the reference code: the TRADES code runs
  the clean forward first, the TRADES-AWP code the adversarial one (BatchNorm's running
  statistics depend on the order; the gradient does not)."""
  if adv_first:
    logits_adv = forward(x_adv)
    return forward(inputs.x), logits_adv
  logits_clean = forward(inputs.x)
  return logits_clean, forward(x_adv)


def trades_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config, adv_first=False):
  """CE(f(x), y) + beta * KL_batchmean(f(x) || f(x_adv)); the clean side is not stop-gradient'ed.
  ``trades.label_smoothing`` s > 0 smooths the natural term's labels (Wang et al. 2023's recipe)."""
  logits_clean, logits_adv = clean_and_adv_logits(forward, inputs, x_adv, adv_first)
  smoothing = config.trades.get('label_smoothing', 0.0)
  natural = (losses.smoothed_cross_entropy(logits_clean, inputs.y, smoothing) if smoothing
             else losses.cross_entropy(logits_clean, inputs.y))
  robust = losses.kl_from_logits(logits_clean, logits_adv, 'batchmean')
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + config.trades.beta * robust, aux


def awp_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """The TRADES loss with the TRADES-AWP code's forward order (adversarial first)."""
  return trades_loss(forward, inputs, x_adv, config, adv_first=True)


# Pass counts: natural forward + backward (3); PGD-AT K attack steps (2K) + 3; TRADES the clean
# eval forward of the attack's target (1), 2K, two train forwards with backward (6); AWP adds its
# proxy's two forwards and backward (6).
TRADES_PASSES = lambda k: 2 * k + 7

register('natural', Method(no_adversary, natural_loss, minimal_passes=passes(lambda k: 3)))
register('pgd_at', Method(pgd_at_adversary, pgd_at_loss,
                          minimal_passes=passes(lambda k: 2 * k + 3)))
register('trades', Method(trades_adversary, trades_loss, reference_bn_passes=('x',),
                          minimal_passes=passes(TRADES_PASSES, replays=1)))
register('awp', Method(trades_adversary, awp_loss, uses_awp=lambda config: True,
                       reference_bn_passes=('x',),
                       minimal_passes=passes(lambda k: 2 * k + 13, replays=1)))
