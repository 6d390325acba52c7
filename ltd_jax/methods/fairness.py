"""Robust-fairness baselines of the ABSLD tables: Fair-ARD and Fair-RSLAD (Yue et al. 2023,
NISP-official/Fair-ARD), BAT (Sun et al. 2023), FRL (Xu et al. 2021, hannxu123/fair_robust)
and CFA (Wei et al. 2023, PKU-ML/CFA)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ltd_jax import attacks
from ltd_jax import losses
from ltd_jax.methods.base import (Method, MethodInputs, PlotSpec, TrainForward, class_values,
                                  loss_aux, passes, per_class_sums, pgd, register)
from ltd_jax.methods.distillation import ard_adversary


# ----------------------------------------------------------------------------- iterate trackers
def correct_count_tracker(labels):
  """``pgd``'s ``track``: per sample, how many iterates x_0 .. x_{K-1} the student classifies
  correctly (Fair-ARD's kappa: counted on each step's own forward, the start included, x_K not)."""
  def update(count, k, x_k, logits_k):
    del k, x_k
    return count + (jnp.argmax(logits_k, axis=-1) == labels).astype(jnp.float32)
  return jnp.zeros(labels.shape, jnp.float32), update


def _expand(mask, x):
  return jnp.reshape(mask, (-1,) + (1,) * (x.ndim - 1))


def last_clean_tracker(x, labels):
  """BAT's ``stop_to_lastclean``: a sample stops at its first misclassified iterate k* and keeps
  x_{k*-1} (x_0 when the start is already misclassified); ``finish`` gives x_K to samples that
  never stopped. Tracked: (stopped, kept iterate, previous iterate)."""
  def update(t, k, x_k, logits_k):
    stopped, kept, previous = t
    wrong = jnp.argmax(logits_k, axis=-1) != labels
    candidate = jnp.where(k == 0, x_k, previous)
    kept = jnp.where(_expand(wrong & ~stopped, x), candidate, kept)
    return stopped | wrong, kept, x_k
  init = (jnp.zeros(labels.shape, bool), x, x)
  return init, update


def misclassified_count_tracker(x, labels, tau: int):
  """BAT's ``stop_to_firstadv`` with its ``tau``: a sample stops at the iterate that is its
  (tau + 1)-th misclassified one (not necessarily consecutive) and keeps it; ``finish`` gives x_K
  to samples that never got there (with the code's tau = 1: the second misclassified iterate).
  Tracked: (stopped, kept iterate, misclassified count)."""
  def update(t, k, x_k, logits_k):
    del k
    stopped, kept, count = t
    wrong = jnp.argmax(logits_k, axis=-1) != labels
    count = count + (wrong & ~stopped)
    now = ~stopped & (count > tau)
    return stopped | now, jnp.where(_expand(now, x), x_k, kept), count
  init = (jnp.zeros(labels.shape, bool), x, jnp.zeros(labels.shape, jnp.int32))
  return init, update


def finish(tracked, x_final):
  """The kept iterate of the samples that stopped, x_K for the others."""
  stopped, kept = tracked[0], tracked[1]
  return jnp.where(_expand(stopped, x_final), kept, x_final)


# ----------------------------------------------------------------------------- Fair-ARD / Fair-RSLAD
def fair_init_state(config, num_classes: int) -> dict:
  """Class weights 1 for the first epoch, and the per-class sums of kappa and counts."""
  del config
  return {'class_weight': jnp.ones((num_classes,), jnp.float32),
          'kappa_sum': jnp.zeros((num_classes,), jnp.float32),
          'kappa_count': jnp.zeros((num_classes,), jnp.float32)}


def fair_accumulate(method_state: dict, aux, labels, num_classes: int) -> dict:
  sums, counts = per_class_sums(aux['kappa'], labels, num_classes)
  return {**method_state, 'kappa_sum': method_state['kappa_sum'] + sums,
          'kappa_count': method_state['kappa_count'] + counts}


def fair_class_weights(kappa_sum, kappa_count, config) -> jax.Array:
  """Fair-ARD's ``weight_assign``: K_c = mean kappa of class c (the code divides by 5,000, the
  class size of CIFAR-10's training set, here by the class's count), w = (1 / (K + guard))^beta,
  scaled to sum to C, then clipped to [clip_min, clip_max] (no renormalisation after the clip)."""
  f = config.fair
  kappa = kappa_sum / jnp.maximum(kappa_count, 1.0)
  w = (1.0 / (kappa + f.kappa_guard)) ** f.beta
  w = w * (w.shape[0] / jnp.sum(w))
  return jnp.clip(w, f.clip_min, f.clip_max)


def fair_epoch_end(method_state: dict, epochs_completed, config) -> dict:
  """Next epoch's class weights from this epoch's kappa; the sums start again at zero."""
  del epochs_completed
  m = method_state
  return {'class_weight': fair_class_weights(m['kappa_sum'], m['kappa_count'], config),
          'kappa_sum': jnp.zeros_like(m['kappa_sum']),
          'kappa_count': jnp.zeros_like(m['kappa_count'])}


def fair_epoch_record(before: dict, after: dict) -> tuple[str, dict]:
  mean = np.where(before['kappa_count'] > 0,
                  before['kappa_sum'] / np.maximum(before['kappa_count'], 1), np.nan)
  return 'class_weights', {'kappa': mean.tolist(),
                           'class_weight': np.asarray(after['class_weight']).tolist()}


FAIR_PLOTS = (PlotSpec('class_weights.png', 'Fair-ARD class weights', 'class_weights',
                       (('class_weight', 'class weight'),
                        ('kappa', 'iterates still classified correctly (kappa)')), 'value'),)


def fair_ard_adversary(student, inputs: MethodInputs, config):
  """ARD's attack (train mode in the code) with kappa, the count of iterates still correct."""
  x_adv, kappa = pgd(student, lambda f: attacks.ce_objective(f, inputs.y), inputs, config,
                     track=correct_count_tracker(inputs.y))
  return {'x_adv': x_adv, 'kappa': kappa}


def fair_ard_loss(forward: TrainForward, inputs: MethodInputs, adv, config):
  """alpha T^2 (1/B) sum_i w[y_i] KL_mean(t(x_i)/T || f(x'_i)/T) + (1 - alpha) (1/B) sum_i
  w[y_i] CE(f(x_i), y_i), KL_mean the code's per-sample KLDivLoss() (sum over classes / C)."""
  logits_adv = forward(adv['x_adv'])
  logits_clean = forward(inputs.x)
  c, w = config.ard, class_values(inputs.method_state['class_weight'], inputs.y)
  t = c.temperature
  kl = losses.kl_divergence(losses.softmax_t(inputs.teacher_logits, t), logits_adv / t, 'none')
  robust = c.alpha * t * t * jnp.mean(w * kl) / logits_adv.shape[-1]
  natural = jnp.mean(w * losses.cross_entropy(logits_clean, inputs.y, 'none'))
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust, kappa=adv['kappa'])
  return robust + (1.0 - c.alpha) * natural, aux


def fair_rslad_adversary(student, inputs: MethodInputs, config):
  """RSLAD's attack on KL(softmax(t(x)) || f(x')) (eval mode) with kappa counted on its forwards."""
  target = jax.nn.softmax(inputs.teacher_logits, axis=-1)
  x_adv, kappa = pgd(student, lambda f: attacks.kl_objective(f, target), inputs, config,
                     track=correct_count_tracker(inputs.y))
  return {'x_adv': x_adv, 'kappa': kappa}


def fair_rslad_loss(forward: TrainForward, inputs: MethodInputs, adv, config):
  """RSLAD's loss with each sample's KL weighted by w[y_i]: 5/6 L(x') + 1/6 L(x), L = (1/(B C))
  sum_i w[y_i] sum_c p (log(p + 1e-5) - log q) (``rslad.alpha``, ``rslad.target_log_eps``)."""
  logits_adv = forward(adv['x_adv'])
  logits_clean = forward(inputs.x)
  r, w = config.rslad, class_values(inputs.method_state['class_weight'], inputs.y)
  target = jax.nn.softmax(inputs.teacher_logits, axis=-1)
  term = lambda logits: jnp.mean(w * losses.kl_divergence(
      target, logits, 'none', r.target_log_eps)) / logits.shape[-1]
  robust, natural = term(logits_adv), term(logits_clean)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust, kappa=adv['kappa'])
  return r.loss_scale * (r.alpha * robust + (1.0 - r.alpha) * natural), aux


# ----------------------------------------------------------------------------- BAT
def bat_adversary(student, inputs: MethodInputs, config):
  """BAT's two early-stopped TRADES attacks (train_mode/, eval mode), each from its own
  clip(x + 0.001 N(0, 1)): the last still-clean iterate x_lc and the (tau + 1)-th misclassified
  one x_fa (``bat.tau``; the code's 1), x_K where a sample never stops."""
  clean_probs = jax.nn.softmax(student(inputs.x), axis=-1)
  objective = lambda f: attacks.kl_objective(f, clean_probs)
  lc_rng, fa_rng = jax.random.split(inputs.rng)
  x_final, lc = pgd(student, objective, dataclasses.replace(inputs, rng=lc_rng), config,
                    track=last_clean_tracker(inputs.x, inputs.y))
  x_lc = finish(lc, x_final)
  x_final, fa = pgd(student, objective, dataclasses.replace(inputs, rng=fa_rng), config,
                    track=misclassified_count_tracker(inputs.x, inputs.y, config.bat.tau))
  return {'x_lc': x_lc, 'x_fa': finish(fa, x_final)}


def bat_loss(forward: TrainForward, inputs: MethodInputs, adv, config):
  """CE(f(x_lc), y) + beta (1/B) sum KL(f(x) || f(x_fa)) + (1/B) sum KL(f(x_lc) || U) +
  (1/B) sum KL(f(x_fa) || U), U uniform; no target stopped; forwards x_lc, x_fa, x."""
  logits_lc = forward(adv['x_lc'])
  logits_fa = forward(adv['x_fa'])
  logits_clean = forward(inputs.x)
  uniform = jnp.zeros_like(logits_fa)
  natural = losses.cross_entropy(logits_lc, inputs.y)
  robust = losses.kl_from_logits(logits_clean, logits_fa, 'batchmean')
  spread = (losses.kl_from_logits(logits_lc, uniform, 'batchmean')
            + losses.kl_from_logits(logits_fa, uniform, 'batchmean'))
  aux = loss_aux(inputs.y, logits_clean, logits_fa)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + config.trades.beta * robust + spread, aux


# Pass counts: Fair-ARD / Fair-RSLAD as ARD / RSLAD (2K + 6); BAT: the clean eval forward, two
# K-step attacks (4K) and three train forwards with backward (9).
register('fair_ard', Method(fair_ard_adversary, fair_ard_loss, needs_teacher=True,
                            init_state=fair_init_state, accumulate=fair_accumulate,
                            epoch_end=fair_epoch_end, epoch_record=fair_epoch_record,
                            plots=FAIR_PLOTS, minimal_passes=passes(lambda k: 2 * k + 6)))
register('fair_rslad', Method(fair_rslad_adversary, fair_rslad_loss, needs_teacher=True,
                              init_state=fair_init_state, accumulate=fair_accumulate,
                              epoch_end=fair_epoch_end, epoch_record=fair_epoch_record,
                              plots=FAIR_PLOTS, minimal_passes=passes(lambda k: 2 * k + 6)))
register('bat', Method(bat_adversary, bat_loss, minimal_passes=passes(lambda k: 4 * k + 10)))
