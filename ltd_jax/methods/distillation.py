"""Distillation from a teacher: LTD (Chen et al.), RSLAD (Zi et al. 2021), ABSLD (Zhao et al.)
with adaptive or fixed ("Manual", Table 6) class temperatures, and the soft-label substitutes
of LTD's temperature search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ltd_jax import attacks
from ltd_jax import losses
from ltd_jax import temperatures
from ltd_jax.methods.adversarial import TRADES_PASSES, clean_and_adv_logits, trades_adversary
from ltd_jax.methods.adversarial import trades_loss
from ltd_jax.methods.base import (Aux, Method, MethodInputs, PlotSpec, TrainForward, loss_aux,
                                  no_adversary, passes, per_class_sums, pgd, register)


def ltd_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """TRADES with the teacher's soft labels in the natural term (LTD, Chen et al.):
  -sum_c softmax(t(x) / T_t)_c log softmax(f(x) / T_s)_c + beta * KL_batchmean(f(x) || f(x_adv)).
  T_s is a training constant only; evaluation never divides the student's logits. On AWP
  (``ltd.base``) the forwards follow the TRADES-AWP code's order (adversarial first)."""
  logits_clean, logits_adv = clean_and_adv_logits(forward, inputs, x_adv,
                                                  adv_first=config.ltd.base == 'awp')
  soft_labels = losses.softmax_t(inputs.teacher_logits, config.ltd.teacher_temperature)
  natural = losses.soft_cross_entropy(logits_clean / config.ltd.student_temperature, soft_labels)
  robust = losses.kl_from_logits(logits_clean, logits_adv, 'batchmean')
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  # H(p_T), constant in the student: natural - H is the KL form of the natural term.
  entropy = jnp.mean(-jnp.sum(soft_labels * jnp.log(jnp.maximum(soft_labels, 1e-30)), axis=-1))
  aux.update(loss_natural=natural, loss_robust=robust, teacher_entropy=entropy)
  return natural + config.trades.beta * robust, aux


def ltd_awp_proxy_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """AWP's proxy loss for LTD: the TRADES loss with hard labels, as the AWP code's calc_awp
  computes it (``awp.proxy_loss='trades'``), or LTD's own loss (``'method'``)."""
  if config.awp.proxy_loss == 'method':
    return ltd_loss(forward, inputs, x_adv, config)
  return trades_loss(forward, inputs, x_adv, config)


def soft_label_natural_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """-sum_c softmax(t(x) / T_t)_c log softmax(f(x))_c on clean data only: the substitute
  models of LTD's temperature search (paper section 4.2, step 1)."""
  del x_adv
  logits = forward(inputs.x)
  soft_labels = losses.softmax_t(inputs.teacher_logits, config.ltd.teacher_temperature)
  return losses.soft_cross_entropy(logits, soft_labels), loss_aux(inputs.y, logits_clean=logits)


def distillation_targets(inputs: MethodInputs, config, per_class: bool):
  """(adversarial target, clean target) probabilities: RSLAD's softmax(t(x)) for both, or
  ABSLD's softmax(t(x) / tau_adv[y]) and softmax(t(x) / tau_clean[y])."""
  if not per_class:
    probs = jax.nn.softmax(inputs.teacher_logits, axis=-1)
    return probs, probs
  tau = inputs.method_state
  t_adv, t_clean = temperatures.class_temperatures(inputs.y, tau['tau_adv'], tau['tau_clean'],
                                                   config.absld.released_code_aliasing)
  return (losses.softmax_t(inputs.teacher_logits, t_adv),
          losses.softmax_t(inputs.teacher_logits, t_clean))


def distillation_adversary(student, inputs: MethodInputs, config, *, per_class: bool):
  """PGD on sum KL(teacher target || softmax(f(x_adv))) (RSLAD / ABSLD inner maximisation)."""
  adv_target, _ = distillation_targets(inputs, config, per_class)
  return pgd(student, lambda f: attacks.kl_objective(f, adv_target), inputs, config)


def distillation_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config, *,
                      per_class: bool):
  """scale * (alpha KL(p_adv || f(x_adv)) + (1 - alpha) KL(p_clean || f(x))), reduced by
  ``rslad.reduction`` (the RSLAD/ABSLD code's elementwise mean by default)."""
  adv_target, clean_target = distillation_targets(inputs, config, per_class)
  logits_adv = forward(x_adv)
  logits_clean = forward(inputs.x)
  r = config.rslad
  robust = losses.kl_divergence(adv_target, logits_adv, r.reduction, r.target_log_eps)
  natural = losses.kl_divergence(clean_target, logits_clean, r.reduction, r.target_log_eps)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return r.loss_scale * (r.alpha * robust + (1.0 - r.alpha) * natural), aux


def rslad_adversary(student, inputs, config):
  return distillation_adversary(student, inputs, config, per_class=False)


def rslad_loss(forward, inputs, x_adv, config):
  return distillation_loss(forward, inputs, x_adv, config, per_class=False)


def absld_adversary(student, inputs, config):
  return distillation_adversary(student, inputs, config, per_class=True)


def absld_loss(forward, inputs, x_adv, config):
  return distillation_loss(forward, inputs, x_adv, config, per_class=True)


RISKS = ('risk_adv_sum', 'risk_adv_count', 'risk_clean_sum', 'risk_clean_count')


def absld_init_state(config, num_classes: int) -> dict:
  """tau_adv = tau_clean = ``absld.tau_init`` per class, and zero per-class risk sums / counts."""
  tau = jnp.full((num_classes,), config.absld.tau_init, jnp.float32)
  zeros = jnp.zeros((num_classes,), jnp.float32)
  return {'tau_adv': tau, 'tau_clean': tau, **{k: zeros for k in RISKS}}


def absld_accumulate(method_state: dict, aux: Aux, labels, num_classes: int) -> dict:
  """Adds the step's per-class sums and counts of the student's cross-entropy (clean and adv)."""
  out = dict(method_state)
  for kind in ('adv', 'clean'):
    sums, counts = per_class_sums(aux[f'ce_{kind}'], labels, num_classes)
    out[f'risk_{kind}_sum'] = method_state[f'risk_{kind}_sum'] + sums
    out[f'risk_{kind}_count'] = method_state[f'risk_{kind}_count'] + counts
  return out


def absld_epoch_end(method_state: dict, epochs_completed, config) -> dict:
  """Eq. 10 on the epoch's per-class risks, for tau_adv and tau_clean separately; the risk
  accumulators start the next epoch at zero."""
  a = config.absld
  beta_t = temperatures.absld_beta(epochs_completed, a.beta, config.optim.lr_boundaries_epochs,
                                   config.optim.lr_decay)
  m = method_state
  update = lambda tau, s, c: temperatures.absld_update_temperatures(
      tau, s, c, beta_t, a.tau_min, a.tau_max, a.gap_rtol, a.risk)
  return {'tau_adv': update(m['tau_adv'], m['risk_adv_sum'], m['risk_adv_count']),
          'tau_clean': update(m['tau_clean'], m['risk_clean_sum'], m['risk_clean_count']),
          **{k: jnp.zeros_like(m[k]) for k in RISKS}}


def absld_epoch_record(before: dict, after: dict) -> tuple[str, dict]:
  """The epoch's per-class mean risks (NaN for classes not seen) and the updated temperatures."""
  mean = lambda s, c: np.where(c > 0, s / np.maximum(c, 1), np.nan).tolist()
  return 'temperatures', {
      'risk_adv': mean(before['risk_adv_sum'], before['risk_adv_count']),
      'risk_clean': mean(before['risk_clean_sum'], before['risk_clean_count']),
      'tau_adv': np.asarray(after['tau_adv']).tolist(),
      'tau_clean': np.asarray(after['tau_clean']).tolist()}


ABSLD_PLOTS = (PlotSpec('temperatures.png', 'ABSLD class temperatures', 'temperatures',
                        (('tau_adv', 'teacher temperature, adversarial targets'),
                         ('tau_clean', 'teacher temperature, clean targets')), 'temperature'),)


def manual_temperatures(config, num_classes: int) -> np.ndarray:
  """ABSLD Table 6's "Manual" rule: ``absld.manual_hard_temperature`` (0.5, tau_min) for the
  classes in ``absld.manual_hard_classes``, ``absld.manual_easy_temperature`` (5, tau_max) for
  the others; one set for the clean and the adversarial targets (the paper's tau_k^t)."""
  a = config.absld
  hard = np.zeros(num_classes, bool)
  hard[list(a.manual_hard_classes)] = True
  return np.where(hard, a.manual_hard_temperature, a.manual_easy_temperature).astype(np.float32)


def absld_manual_init_state(config, num_classes: int) -> dict:
  """Fixed per-class temperatures (``manual_temperatures``), never updated."""
  tau = jnp.asarray(manual_temperatures(config, num_classes))
  return {'tau_adv': tau, 'tau_clean': tau}


def ard_adversary(student, inputs: MethodInputs, config):
  """ARD's attack (Goldblum et al. 2020, main.py ``AttackPGD``): PGD on sum CE(f(x'), y), the
  student alone; the code runs it in train mode (``attack.bn_mode='train'``: the running
  statistics move with each of the K forwards) from x + U(-eps, eps), unclipped
  (``attack.init='uniform_unclipped'``)."""
  return pgd(student, lambda f: attacks.ce_objective(f, inputs.y), inputs, config)


def ard_teacher_term(logits_adv, teacher_logits, config, reduction=None):
  """alpha T^2 KL(softmax(t(x) / T) || softmax(f(x') / T)), reduced by ``ard.reduction`` (ARD's
  KLDivLoss(): the elementwise mean; IAD's sum / B: 'batchmean')."""
  c = config.ard
  t = c.temperature
  kl = losses.kl_divergence(losses.softmax_t(teacher_logits, t), logits_adv / t,
                            reduction or c.reduction)
  return c.alpha * t * t * kl


def ard_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """alpha T^2 KL(t(x)/T || f(x')/T) + (1 - alpha) CE(f(x), y): the adversarial forward first
  (the attack's last forward, on x'), then the clean one, which the code runs also at alpha = 1."""
  logits_adv = forward(x_adv)
  logits_clean = forward(inputs.x)
  robust = ard_teacher_term(logits_adv, inputs.teacher_logits, config)
  natural = losses.cross_entropy(logits_clean, inputs.y)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return robust + (1.0 - config.ard.alpha) * natural, aux


def iad_reliability(inputs: MethodInputs, x_adv, config) -> jax.Array:
  """IAD's per-sample teacher reliability (Zhu et al. 2022, IAD-I.py): softmax(t(x'))[y]^beta,
  a constant of the step."""
  probs = jax.nn.softmax(inputs.teacher_fn(x_adv), axis=-1)
  p_y = jnp.take_along_axis(probs, inputs.y[:, None], axis=-1)[:, 0]
  return jax.lax.stop_gradient(p_y ** config.iad.beta)


def iad_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """IAD-I: ARD's teacher term (``ard.reduction`` 'batchmean', T = 1 by default) + from epoch
  ``iad.begin_epoch`` (0-indexed) the student's own introspection alpha (1/B) sum_i (1 - w_i)
  KL(softmax(f(x_i)) || softmax(f(x'_i))), with w_i = ``iad_reliability`` and the target not
  stopped, + (1 - alpha) CE(f(x), y). The code's forwards: x' (the attack's last), x' again
  (statistics only), x for the introspection target (from ``begin_epoch``), x for the CE."""
  c = config.ard
  logits_adv = forward(x_adv)
  forward(jax.lax.stop_gradient(x_adv))  # basic_net(pert_inputs).detach(): statistics only
  logits_self = forward(inputs.x)
  after_self = forward.batch_stats
  logits_clean = forward(inputs.x)
  active = inputs.epoch >= config.iad.begin_epoch
  # Before begin_epoch the code runs one clean forward, not two: the statistics it leaves are
  # after_self (both clean forwards see the same batch).
  forward.batch_stats = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b),
                                               forward.batch_stats, after_self)
  weight = iad_reliability(inputs, x_adv, config)
  robust = ard_teacher_term(logits_adv, inputs.teacher_logits, config)
  introspection = jnp.mean((1.0 - weight) * losses.kl_from_logits(logits_self, logits_adv, 'none'))
  natural = losses.cross_entropy(logits_clean, inputs.y)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return (robust + jnp.where(active, c.alpha * introspection, 0.0)
          + (1.0 - c.alpha) * natural), aux


def adaad_adversary(student, inputs: MethodInputs, config):
  """AdaAD's inner maximisation (Huang et al. 2023, AT_helper.py ``adaad_inner_loss``): PGD on
  sum KL(softmax(t(x')) || softmax(f(x'))) with the teacher and the student on x', the gradient
  through both (both in eval mode)."""
  def make_objective(logits_fn):
    return lambda x_adv: losses.kl_divergence(jax.nn.softmax(inputs.teacher_fn(x_adv), axis=-1),
                                              logits_fn(x_adv), 'sum')
  return pgd(student, make_objective, inputs, config)


def adaad_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """alpha KL(t(x') || f(x')) + (1 - alpha) KL(t(x) || f(x)), reduced by ``adaad.reduction``
  (the code: KLDivLoss's elementwise mean on CIFAR-10, sum / B on CIFAR-100); the code's clean
  forward runs first, also at alpha = 1, where only BatchNorm's statistics see it."""
  logits_clean = forward(inputs.x)
  logits_adv = forward(x_adv)
  teacher_adv = jax.lax.stop_gradient(inputs.teacher_fn(x_adv))
  c = config.adaad
  robust = losses.kl_divergence(jax.nn.softmax(teacher_adv, axis=-1), logits_adv, c.reduction)
  natural = losses.kl_divergence(jax.nn.softmax(inputs.teacher_logits, axis=-1), logits_clean,
                                 c.reduction)
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return c.alpha * robust + (1.0 - c.alpha) * natural, aux


# Pass counts: RSLAD / ABSLD 2K + 6 (the teacher gives the target).
register('ltd', Method(trades_adversary, ltd_loss, needs_teacher=True,
                       uses_awp=lambda config: config.ltd.base == 'awp',
                       awp_proxy_loss=ltd_awp_proxy_loss, reference_bn_passes=('x',),
                       minimal_passes=lambda c: passes(TRADES_PASSES, replays=1)(c)
                       + (6 if c.ltd.base == 'awp' else 0)))
register('rslad', Method(rslad_adversary, rslad_loss, needs_teacher=True,
                         minimal_passes=passes(lambda k: 2 * k + 6)))
register('absld', Method(absld_adversary, absld_loss, needs_teacher=True,
                         init_state=absld_init_state, accumulate=absld_accumulate,
                         epoch_end=absld_epoch_end, epoch_record=absld_epoch_record,
                         plots=ABSLD_PLOTS, minimal_passes=passes(lambda k: 2 * k + 6)))
register('absld_manual', Method(absld_adversary, absld_loss, needs_teacher=True,
                                init_state=absld_manual_init_state,
                                minimal_passes=passes(lambda k: 2 * k + 6)))
# ARD: 2K + 6; IAD adds a statistics-only forward of x' and the introspection target's forward
# and backward.
register('ard', Method(ard_adversary, ard_loss, needs_teacher=True,
                       minimal_passes=passes(lambda k: 2 * k + 6)))
register('iad', Method(ard_adversary, iad_loss, needs_teacher=True, teacher_on_inputs=True,
                       minimal_passes=passes(lambda k: 2 * k + 10)))
# AdaAD: 2K attack passes (the teacher's backward to the input not counted), 6 for the loss.
register('adaad', Method(adaad_adversary, adaad_loss, needs_teacher=True, teacher_on_inputs=True,
                         minimal_passes=passes(lambda k: 2 * k + 6)))
register('soft_label_natural', Method(no_adversary, soft_label_natural_loss, needs_teacher=True,
                                      minimal_passes=passes(lambda k: 3)))
