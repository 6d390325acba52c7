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
                                  loss_aux, passes, per_class_sums, pgd, register, validation_pgd)
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
  w[y_i] CE(f(x_i), y_i), KL_mean the code's per-sample KLDivLoss() (sum over classes / C: the
  elementwise mean of ``ard.reduction``, whose other choices reduce the weighted KL alike)."""
  logits_adv = forward(adv['x_adv'])
  logits_clean = forward(inputs.x)
  c, w = config.ard, class_values(inputs.method_state['class_weight'], inputs.y)
  t = c.temperature
  kl = losses.kl_divergence(losses.softmax_t(inputs.teacher_logits, t), logits_adv / t, 'none')
  robust = c.alpha * t * t * losses.reduce_per_sample(w * kl, c.reduction, logits_adv.shape[-1])
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


# ----------------------------------------------------------------------------- FRL
def frl_init_state(config, num_classes: int) -> dict:
  """FRL's multipliers (frlrmrw.py ``lmbda``: 3 x C zeros): natural, boundary, margin."""
  del config
  zeros = jnp.zeros((num_classes,), jnp.float32)
  return {'lambda_nat': zeros, 'lambda_bndy': zeros, 'lambda_margin': zeros}


def frl_normalize(lmb, limit: float):
  """utils_frl2 ``normalize_lambda``: clamp at 0, then rescale to sum ``limit`` if above it."""
  lmb = jnp.maximum(lmb, 0.0)
  total = jnp.sum(lmb)
  return jnp.where(total > limit, limit * lmb / jnp.where(total > 0, total, 1.0), lmb)


def frl_costs(method_state: dict, config):
  """utils_frl2 ``cost_sensitive``: natural and boundary class weights 1/C + lambda_c -
  sum(lambda) / C (the code's 0.1 for 10 classes) and the margin factors
  clip(exp(``frl.margin_exponent`` lambda_margin), ``frl.margin_min``, ``frl.margin_max``)."""
  f = config.frl
  weight = lambda lmb: 1.0 / lmb.shape[0] + lmb - jnp.sum(lmb) / lmb.shape[0]
  margin = jnp.clip(jnp.exp(f.margin_exponent * method_state['lambda_margin']), f.margin_min,
                    f.margin_max)
  return weight(method_state['lambda_nat']), weight(method_state['lambda_bndy']), margin


def frl_validation(config) -> dict:
  return validation_pgd(config, config.frl.validation_pgd_steps)


def frl_epoch_end(method_state: dict, epochs_completed, config, validation, variables) -> dict:
  """frlrmrw.py ``frl_train`` before epoch t = epochs_completed + 1, from the validation split's
  per-class clean and PGD accuracies: R_nat,c = 1 - acc_c, R_bndy,c = acc_c - adv_c (and over the
  split); gamma0 = R_nat,c - R_nat - tau_nat, gamma1 = R_bndy,c - R_bndy - tau_bndy;
  lambda_nat = P(+ r1 gamma0), lambda_bndy = P(+ 2 r1 gamma1), lambda_margin += r2 gamma1, with
  r1 = rate1 / 2^(t // halve_every) and P ``frl_normalize``."""
  del variables
  f = config.frl
  acc, adv = validation['clean'], validation['pgd']
  nat_c, bndy_c = 1.0 - acc['per_class'], acc['per_class'] - adv['per_class']
  nat, bndy = 1.0 - acc['avg'], acc['avg'] - adv['avg']
  gamma0 = jnp.nan_to_num(nat_c - nat - f.tau_nat)  # a class absent from the split: no update
  gamma1 = jnp.nan_to_num(bndy_c - bndy - f.tau_bndy)
  t = epochs_completed + 1
  rate1 = f.rate1 / 2.0 ** (t // f.rate1_halve_every)
  m = method_state
  return {'lambda_nat': frl_normalize(m['lambda_nat'] + rate1 * gamma0, f.limit),
          'lambda_bndy': frl_normalize(m['lambda_bndy'] + 2.0 * rate1 * gamma1, f.limit),
          'lambda_margin': m['lambda_margin'] + f.rate2 * gamma1}


def frl_adversary(student, inputs: MethodInputs, config):
  """TRADES' attack with the remargined per-sample eps_i = eps m[y_i] and, as the code,
  one step size for the batch, max_i eps_i / 4 (``frl.step_size='max_eps_quarter'``; 'config':
  ``attack.alpha``, the 2021 code)."""
  _, _, margin = frl_costs(inputs.method_state, config)
  eps = config.eps * class_values(margin, inputs.y)
  alpha = jnp.max(eps) / 4.0 if config.frl.step_size == 'max_eps_quarter' else config.attack.alpha
  clean_probs = jax.nn.softmax(student(inputs.x), axis=-1)
  return pgd(student, lambda f: attacks.kl_objective(f, clean_probs), inputs, config, eps=eps,
             alpha=alpha)


def frl_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """sum_i w0[y_i] CE_i / sum_i w0[y_i] + beta sum_i w1[y_i] KL_i / sum_i w1[y_i], KL_i =
  KL(f(x_i) || f(x'_i)) (target not stopped); forwards x, x' (and x again: ``reference_bn_passes``)."""
  logits_clean = forward(inputs.x)
  logits_adv = forward(x_adv)
  w_nat, w_bndy, _ = frl_costs(inputs.method_state, config)
  w0, w1 = class_values(w_nat, inputs.y), class_values(w_bndy, inputs.y)
  natural = jnp.sum(losses.cross_entropy(logits_clean, inputs.y, 'none') * w0) / jnp.sum(w0)
  robust = jnp.sum(losses.kl_from_logits(logits_clean, logits_adv, 'none') * w1) / jnp.sum(w1)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + config.frl.beta * robust, aux


def frl_epoch_record(before: dict, after: dict) -> tuple[str, dict]:
  del before
  lists = {k: np.asarray(v).tolist() for k, v in after.items()}
  return 'frl', lists


FRL_PLOTS = (PlotSpec('frl_multipliers.png', 'FRL multipliers', 'frl',
                      (('lambda_nat', 'natural-error multiplier'),
                       ('lambda_bndy', 'boundary-error multiplier'),
                       ('lambda_margin', 'margin multiplier')), 'lambda'),)


# ----------------------------------------------------------------------------- CFA
def cfa_init_state(config, num_classes: int) -> dict:
  """Class eps = eps and beta weight = beta / (1 + beta) until ``cfa.begin_epoch``; per-class
  sums of the epoch's train robust accuracy; FAWA not started (the loop adds ``average``)."""
  b = config.trades.beta
  zeros = jnp.zeros((num_classes,), jnp.float32)
  return {'class_eps': jnp.full((num_classes,), config.eps, jnp.float32),
          'class_beta': jnp.full((num_classes,), b / (1.0 + b), jnp.float32),
          'robust_sum': zeros, 'robust_count': zeros, 'average_started': jnp.zeros((), bool)}


def cfa_accumulate(method_state: dict, aux, labels, num_classes: int) -> dict:
  """The epoch's per-class train robust accuracy: argmax f(x') == y of the loss's train forward."""
  hits = (jnp.argmax(aux['logits_adv'], axis=-1) == labels).astype(jnp.float32)
  sums, counts = per_class_sums(hits, labels, num_classes)
  return {**method_state, 'robust_sum': method_state['robust_sum'] + sums,
          'robust_count': method_state['robust_count'] + counts}


def cfa_class_margins(robust_acc, config):
  """CCM and CCR (train.py): eps_c = (lambda_1 + A_c) eps and the TRADES weight
  b_c = (lambda_2 + A_c) beta / (1 + (lambda_2 + A_c) beta), A_c the class's train robust accuracy."""
  c, beta = config.cfa, config.trades.beta
  eps = (c.lambda_1 + robust_acc) * config.eps
  s = (c.lambda_2 + robust_acc) * beta
  return eps, s / (1.0 + s)


def cfa_validation(config) -> dict:
  return validation_pgd(config, config.cfa.fawa_pgd_steps)


def cfa_epoch_end(method_state: dict, epochs_completed, config, validation, variables) -> dict:
  """From epoch ``cfa.begin_epoch`` (0-indexed) on, the next epoch's class eps and beta from this
  epoch's train robust accuracy; FAWA: when the validation split's worst-class (or worst-10%,
  ``cfa.fawa_worst``) PGD accuracy is at least ``cfa.fawa_threshold``, the average becomes the
  weights the first time and decay * average + (1 - decay) * weights after, BatchNorm statistics
  included (the code averages every state_dict entry)."""
  c, m = config.cfa, method_state
  robust_acc = m['robust_sum'] / jnp.maximum(m['robust_count'], 1.0)
  eps, beta = cfa_class_margins(robust_acc, config)
  on = epochs_completed >= c.begin_epoch
  per_class = validation['pgd']['per_class']
  present = jnp.sort(jnp.where(jnp.isnan(per_class), jnp.inf, per_class))
  k = max(1, int(np.ceil(0.1 * per_class.shape[0]))) if c.fawa_worst == 'worst10' else 1
  worst = jnp.mean(present[:k])
  update = worst >= jnp.float32(c.fawa_threshold)
  started = m['average_started']
  decay = jnp.where(started, c.fawa_decay, 0.0)
  average = jax.tree_util.tree_map(
      lambda a, v: jnp.where(update, decay * a + (1.0 - decay) * v, a), m['average'], variables)
  return {'class_eps': jnp.where(on, eps, m['class_eps']),
          'class_beta': jnp.where(on, beta, m['class_beta']),
          'robust_sum': jnp.zeros_like(m['robust_sum']),
          'robust_count': jnp.zeros_like(m['robust_count']),
          'average_started': started | update, 'average': average}


def cfa_weight_average(method_state: dict, variables):
  """FAWA's weights once it has started, the trained weights before."""
  started = method_state['average_started']
  return jax.tree_util.tree_map(lambda a, v: jnp.where(started, a, v), method_state['average'],
                                variables)


def cfa_adversary(student, inputs: MethodInputs, config):
  """TRADES' attack (eval mode) with eps_i = class_eps[y_i]; the step size stays ``attack.alpha``."""
  clean_probs = jax.nn.softmax(student(inputs.x), axis=-1)
  eps = class_values(inputs.method_state['class_eps'], inputs.y)
  return pgd(student, lambda f: attacks.kl_objective(f, clean_probs), inputs, config, eps=eps)


def cfa_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """cw_trades_loss: mean_i [(1 - b[y_i]) CE(f(x_i), y_i) + b[y_i] KL(f(x_i) || f(x'_i))], the
  target not stopped; forwards x, x' (and x again: ``reference_bn_passes``)."""
  logits_clean = forward(inputs.x)
  logits_adv = forward(x_adv)
  b = class_values(inputs.method_state['class_beta'], inputs.y)
  natural = jnp.mean((1.0 - b) * losses.cross_entropy(logits_clean, inputs.y, 'none'))
  robust = jnp.mean(b * losses.kl_from_logits(logits_clean, logits_adv, 'none'))
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + robust, aux


def cfa_epoch_record(before: dict, after: dict) -> tuple[str, dict]:
  acc = np.where(before['robust_count'] > 0,
                 before['robust_sum'] / np.maximum(before['robust_count'], 1), np.nan)
  return 'cfa', {'train_robust': acc.tolist(), 'class_eps': np.asarray(after['class_eps']).tolist(),
                 'class_beta': np.asarray(after['class_beta']).tolist(),
                 'fawa_started': bool(after['average_started'])}


CFA_PLOTS = (PlotSpec('cfa_margins.png', 'CFA class-wise margins', 'cfa',
                      (('class_eps', 'attack eps'), ('class_beta', 'TRADES weight b'),
                       ('train_robust', 'train robust accuracy')), 'value'),)


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
# FRL and CFA: TRADES' passes (2K + 7), one replayed clean forward (CFA: one more after the update).
register('frl', Method(frl_adversary, frl_loss, init_state=frl_init_state, epoch_end=frl_epoch_end,
                       epoch_record=frl_epoch_record, plots=FRL_PLOTS, validation=frl_validation,
                       validate_before_training=True, reference_bn_passes=('x',),
                       minimal_passes=passes(lambda k: 2 * k + 7, replays=1)))
register('cfa', Method(cfa_adversary, cfa_loss, init_state=cfa_init_state,
                       accumulate=cfa_accumulate, epoch_end=cfa_epoch_end,
                       epoch_record=cfa_epoch_record, plots=CFA_PLOTS, validation=cfa_validation,
                       weight_average=cfa_weight_average, reference_bn_passes=('x',),
                       post_update_bn_passes=('x',),
                       minimal_passes=passes(lambda k: 2 * k + 7, replays=2)))
