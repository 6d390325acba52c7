"""Training methods as (adversary, loss) pairs over the one shared train step (METHODS.md section 2).

A method never owns a training loop. The train step calls ``method.adversary`` with the model in
eval mode (the inner maximisation, whose result is a constant), then differentiates
``method.loss`` with respect to the parameters, running the model in train mode through a
``TrainForward`` that threads BatchNorm statistics through every forward pass in order, as the
PyTorch reference code does.

A method with state of its own (ABSLD's per-class temperatures and risks) declares it: its
initial value (the TrainState's ``method_state``), what each step adds to it, its epoch-end
update, the record it logs each epoch and the plots drawn from those records. The loop and the
reports call these hooks and never name a method.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ltd_jax import attacks
from ltd_jax import losses
from ltd_jax import temperatures


@dataclasses.dataclass
class MethodInputs:
  """What a method sees of one batch: augmented images in [0, 1], labels, an rng and the
  method's own state (``Method.init_state``; ABSLD's temperatures)."""
  x: jax.Array
  y: jax.Array
  rng: jax.Array
  method_state: Any = None
  teacher_logits: jax.Array | None = None  # the frozen teacher on x, in eval mode


class TrainForward:
  """Train-mode forward passes that chain BatchNorm running statistics from call to call."""

  def __init__(self, apply_fn: Callable[..., Any], params, batch_stats):
    self.apply_fn, self.params, self.batch_stats = apply_fn, params, batch_stats

  def __call__(self, x: jax.Array) -> jax.Array:
    logits, updates = self.apply_fn({'params': self.params, 'batch_stats': self.batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
    self.batch_stats = updates['batch_stats']
    return logits


# Aux outputs a loss may return: the logits it trained on (for train accuracy), the per-sample
# cross-entropies ``ce_clean`` / ``ce_adv`` (ABSLD accumulates them per class as its risks) and
# the loss terms of train.LOSS_TERMS.
Aux = dict


def _never(config) -> bool:
  del config
  return False


def _no_state(config, num_classes: int):
  del config, num_classes
  return {}


class PlotSpec(NamedTuple):
  """A plot drawn from a method's epoch records: one curve per class of each list-valued
  ``series`` field of the records of ``kind``, into WORKDIR/``file``."""
  file: str
  title: str
  kind: str
  series: tuple[tuple[str, str], ...]  # (record field, panel title)
  ylabel: str


class Method(NamedTuple):
  """``adversary(eval_logits_fn, inputs, config) -> x_adv | None``,
  ``loss(forward, inputs, x_adv, config) -> (scalar, aux)``; ``needs_teacher`` asks the train
  step for the teacher's logits and ``uses_awp(config)`` wraps the update in AWP's weight
  perturbation. A method's own state: ``init_state(config, num_classes)`` (a pytree, checkpointed
  as the TrainState's ``method_state``), ``accumulate(method_state, aux, labels, num_classes)``
  after each step, ``epoch_end(method_state, epochs_completed, config)`` once per epoch (all
  three run compiled), ``epoch_record(before, after) -> (kind, values)`` written to
  metrics.jsonl after the epoch end, and ``plots`` drawn from those records;
  ``awp_proxy_loss`` and ``reference_bn_passes`` as commented."""
  adversary: Callable[..., jax.Array | None]
  loss: Callable[..., tuple[jax.Array, Aux]]
  needs_teacher: bool = False
  uses_awp: Callable[[Any], bool] = _never
  init_state: Callable[[Any, int], Any] = _no_state
  accumulate: Callable[..., Any] | None = None
  epoch_end: Callable[..., Any] | None = None
  epoch_record: Callable[[Any, Any], tuple[str, dict]] | None = None
  plots: tuple[PlotSpec, ...] = ()
  # The loss of AWP's proxy ascent step, ``(forward, inputs, x_adv, config) -> (loss, aux)``
  # (None: ``loss``).
  awp_proxy_loss: Callable[..., tuple[jax.Array, Aux]] | None = None
  # Statistics-only train-mode forwards ('x' or 'x_adv') that, appended to the loss's own, give
  # the running BatchNorm statistics the reference code's forwards give (config
  # ``reference_bn_passes``): TRADES clean, adv, clean; TRADES-AWP adv, clean, clean.
  reference_bn_passes: tuple[str, ...] = ()
  # ``minimal_passes(config)``: the student passes of one step that the method cannot do without,
  # in forward-pass units (forward 1, backward to the input 1, backward to the weights 2), the
  # teacher's forward not included: what ``--mode=compile`` and benchmarks/train_step.py divide
  # the step's FLOPs by (None: not stated).
  minimal_passes: Callable[[Any], float] | None = None


def _passes(base: Callable[[int], float]):
  """``minimal_passes`` of a method with ``base(K)`` passes for a K-step training attack, plus
  one forward per statistics-only replay when ``reference_bn_passes`` is on."""
  def count(config, replays: int = 0) -> float:
    return base(config.attack.steps) + (replays if config.reference_bn_passes else 0)
  return count


def _pgd(objective, inputs: MethodInputs, config, init: str | None = None):
  a = config.attack
  return attacks.pgd_attack(objective, inputs.x, inputs.rng, eps=config.eps, alpha=a.alpha,
                            steps=a.steps, init=init or a.init,
                            unroll=attacks.resolve_unroll(a.unroll, 'train'))


def loss_aux(y, logits_clean=None, logits_adv=None) -> Aux:
  """The aux a loss returns for the logits it trained on: them (train accuracy) and their
  per-sample cross-entropies (``ce_clean`` / ``ce_adv``)."""
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
  return losses.cross_entropy(logits, inputs.y), loss_aux(inputs.y, logits_clean=logits)


def pgd_at_adversary(eval_logits_fn, inputs: MethodInputs, config):
  """PGD on CE with the true label (Madry et al.)."""
  return _pgd(attacks.ce_objective(eval_logits_fn, inputs.y), inputs, config)


def pgd_at_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """CE(f(x_adv), y)."""
  del config
  logits_adv = forward(x_adv)
  return losses.cross_entropy(logits_adv, inputs.y), loss_aux(inputs.y, logits_adv=logits_adv)


def trades_adversary(eval_logits_fn, inputs: MethodInputs, config):
  """PGD on sum KL(softmax(f(x)) || softmax(f(x_adv))), f in eval mode (Zhang et al. 2019)."""
  clean_probs = jax.nn.softmax(eval_logits_fn(inputs.x), axis=-1)
  return _pgd(attacks.kl_objective(eval_logits_fn, clean_probs), inputs, config)


def _clean_and_adv_logits(forward: TrainForward, inputs: MethodInputs, x_adv, adv_first: bool):
  """Train-mode logits on x and x_adv, in the order of the reference code: the TRADES code runs
  the clean forward first, the TRADES-AWP code the adversarial one (BatchNorm's running
  statistics depend on the order; the gradient does not)."""
  if adv_first:
    logits_adv = forward(x_adv)
    return forward(inputs.x), logits_adv
  logits_clean = forward(inputs.x)
  return logits_clean, forward(x_adv)


def trades_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config, adv_first=False):
  """CE(f(x), y) + beta * KL_batchmean(f(x) || f(x_adv)); the clean side is not stop-gradient'ed."""
  logits_clean, logits_adv = _clean_and_adv_logits(forward, inputs, x_adv, adv_first)
  natural = losses.cross_entropy(logits_clean, inputs.y)
  robust = losses.kl_from_logits(logits_clean, logits_adv, 'batchmean')
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  aux.update(loss_natural=natural, loss_robust=robust)
  return natural + config.trades.beta * robust, aux


def ltd_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """TRADES with the teacher's soft labels in the natural term (LTD, Chen et al.):
  -sum_c softmax(t(x) / T_t)_c log softmax(f(x) / T_s)_c + beta * KL_batchmean(f(x) || f(x_adv)).
  T_s is a training constant only; evaluation never divides the student's logits. On AWP
  (``ltd.base``) the forwards follow the TRADES-AWP code's order (adversarial first)."""
  logits_clean, logits_adv = _clean_and_adv_logits(forward, inputs, x_adv,
                                                   adv_first=config.ltd.base == 'awp')
  soft_labels = losses.softmax_t(inputs.teacher_logits, config.ltd.teacher_temperature)
  natural = losses.soft_cross_entropy(logits_clean / config.ltd.student_temperature, soft_labels)
  robust = losses.kl_from_logits(logits_clean, logits_adv, 'batchmean')
  aux = loss_aux(inputs.y, logits_clean, logits_adv)
  # H(p_T), constant in the student: natural - H is the KL form of the natural term.
  entropy = jnp.mean(-jnp.sum(soft_labels * jnp.log(jnp.maximum(soft_labels, 1e-30)), axis=-1))
  aux.update(loss_natural=natural, loss_robust=robust, teacher_entropy=entropy)
  return natural + config.trades.beta * robust, aux


def awp_loss(forward: TrainForward, inputs: MethodInputs, x_adv, config):
  """The TRADES loss with the TRADES-AWP code's forward order (adversarial first)."""
  return trades_loss(forward, inputs, x_adv, config, adv_first=True)


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


def distillation_adversary(eval_logits_fn, inputs: MethodInputs, config, *, per_class: bool):
  """PGD on sum KL(teacher target || softmax(f(x_adv))) (RSLAD / ABSLD inner maximisation)."""
  adv_target, _ = distillation_targets(inputs, config, per_class)
  return _pgd(attacks.kl_objective(eval_logits_fn, adv_target), inputs, config)


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


# Pass counts: natural forward + backward (3); PGD-AT K attack steps (2K) + 3; TRADES the clean
# eval forward of the attack's target (1), 2K, two train forwards with backward (6); AWP adds its
# proxy's two forwards and backward (6); RSLAD / ABSLD 2K + 6 (the teacher gives the target).
_TRADES_PASSES = lambda k: 2 * k + 7
METHODS: dict[str, Method] = {
    'natural': Method(no_adversary, natural_loss, minimal_passes=_passes(lambda k: 3)),
    'pgd_at': Method(pgd_at_adversary, pgd_at_loss, minimal_passes=_passes(lambda k: 2 * k + 3)),
    'trades': Method(trades_adversary, trades_loss, reference_bn_passes=('x',),
                     minimal_passes=lambda c: _passes(_TRADES_PASSES)(c, 1)),
    'awp': Method(trades_adversary, awp_loss, uses_awp=lambda config: True,
                  reference_bn_passes=('x',),
                  minimal_passes=lambda c: _passes(lambda k: 2 * k + 13)(c, 1)),
    'ltd': Method(trades_adversary, ltd_loss, needs_teacher=True,
                  uses_awp=lambda config: config.ltd.base == 'awp',
                  awp_proxy_loss=ltd_awp_proxy_loss, reference_bn_passes=('x',),
                  minimal_passes=lambda c: _passes(_TRADES_PASSES)(c, 1)
                  + (6 if c.ltd.base == 'awp' else 0)),
    'rslad': Method(functools.partial(distillation_adversary, per_class=False),
                    functools.partial(distillation_loss, per_class=False), needs_teacher=True,
                    minimal_passes=_passes(lambda k: 2 * k + 6)),
    'absld': Method(functools.partial(distillation_adversary, per_class=True),
                    functools.partial(distillation_loss, per_class=True), needs_teacher=True,
                    init_state=absld_init_state, accumulate=absld_accumulate,
                    epoch_end=absld_epoch_end, epoch_record=absld_epoch_record,
                    plots=ABSLD_PLOTS, minimal_passes=_passes(lambda k: 2 * k + 6)),
    'soft_label_natural': Method(no_adversary, soft_label_natural_loss, needs_teacher=True,
                                 minimal_passes=_passes(lambda k: 3)),
}


def register(name: str, method: Method) -> None:
  """Adds a method (README, "Extending ltd_jax"); ``--config.method=NAME`` then selects it."""
  METHODS[name] = method


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}: choose one of {", ".join(sorted(METHODS))}')
  return METHODS[name]


def per_class_sums(values: jax.Array, labels: jax.Array, num_classes: int):
  """(sum of values per class, count per class) over a batch."""
  sums = jnp.zeros((num_classes,), jnp.float32).at[labels].add(values.astype(jnp.float32))
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(1.0)
  return sums, counts
