"""What every method shares: the Method record and its registry, the inputs a method sees, the
student as the loss and the attack run it, and the attack helper (METHODS.md section 2).

A method never owns a training loop. The train step calls ``method.adversary`` with the student
as the training attack sees it (``AttackStudent``: eval mode, or PyTorch's train mode whose
running statistics move with every attack forward), then differentiates ``method.loss`` with
respect to the parameters, running the model in train mode through a ``TrainForward`` that
threads BatchNorm statistics through every forward pass in order, as the PyTorch reference code
does.

A method with state of its own (ABSLD's per-class temperatures, Fair-ARD's class weights)
declares it: its initial value (the TrainState's ``method_state``), what each step adds to it,
its epoch-end update, the record it logs each epoch and the plots drawn from those records. The
loop and the reports call these hooks and never name a method.
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
  method's own state (``Method.init_state``; ABSLD's temperatures); for distillation methods
  the frozen teacher's eval-mode logits on x and, for those that query it on images they make
  (``Method.teacher_on_inputs``: AdaAD, IAD), the teacher itself, ``teacher_fn(x) -> logits``
  in eval mode, differentiable in x."""
  x: jax.Array
  y: jax.Array
  rng: jax.Array
  method_state: Any = None
  teacher_logits: jax.Array | None = None  # the frozen teacher on x, in eval mode
  teacher_fn: Callable[[jax.Array], jax.Array] | None = None
  epoch: jax.Array | None = None  # 0-indexed epoch of this step (IAD's warm-up, BAT's schedule)


class TrainForward:
  """Train-mode forward passes that chain BatchNorm running statistics from call to call."""

  def __init__(self, apply_fn: Callable[..., Any], params, batch_stats):
    self.apply_fn, self.params, self.batch_stats = apply_fn, params, batch_stats

  def __call__(self, x: jax.Array) -> jax.Array:
    logits, updates = self.apply_fn({'params': self.params, 'batch_stats': self.batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
    self.batch_stats = updates['batch_stats']
    return logits


class AttackStudent:
  """The student as the training attack sees it (``attack.bn_mode``): ``eval`` runs the running
  BatchNorm statistics and changes nothing; ``train`` runs PyTorch's train mode, the batch's
  statistics, and every forward moves the running statistics (``batch_stats``), as a
  ``model.train()`` attack does in the ARD, IAD and Fair-ARD code; ``batch`` runs train mode
  with the running statistics left alone (``track_running_stats=False``, the DM-Improves-AT
  TRADES attack). The train step starts the loss's forwards from the statistics the attack
  left."""

  def __init__(self, apply_fn: Callable[..., Any], params, batch_stats, bn_mode: str = 'eval'):
    self.apply_fn, self.params, self.batch_stats = apply_fn, params, batch_stats
    self.moves_statistics = bn_mode == 'train'
    self.batch_statistics = bn_mode == 'batch'

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits on x; in train mode the running statistics move (not inside a transformation:
    ``pgd`` threads them through the attack's loop); ``batch`` mode normalises by the batch's
    statistics and leaves the running ones."""
    if self.batch_statistics:
      return self.apply_fn({'params': self.params, 'batch_stats': self.batch_stats}, x,
                           train=True, mutable=['batch_stats'])[0]
    if not self.moves_statistics:
      return self.apply_fn({'params': self.params, 'batch_stats': self.batch_stats}, x,
                           train=False)
    forward = TrainForward(self.apply_fn, self.params, self.batch_stats)
    logits = forward(x)
    self.batch_stats = forward.batch_stats
    return logits

  @classmethod
  def of(cls, state, bn_mode: str = 'eval') -> 'AttackStudent':
    """The student of a TrainState."""
    return cls(state.apply_fn, state.params, state.batch_stats, bn_mode)

  def at(self, batch_stats) -> 'AttackStudent':
    """The same student at other running statistics."""
    other = AttackStudent(self.apply_fn, self.params, batch_stats)
    other.moves_statistics = self.moves_statistics
    other.batch_statistics = self.batch_statistics
    return other


def pgd(student: AttackStudent, make_objective: Callable[[Callable], attacks.Objective],
        inputs: MethodInputs, config, *, eps=None, alpha=None, init: str | None = None,
        steps: int | None = None, track=None):
  """``attacks.pgd_attack`` on ``make_objective(logits_fn)`` with the student (an
  ``AttackStudent``, or any logits function of x: a model that moves nothing) as ``logits_fn``
  (and the training attack's config unless given: ``eps`` / ``alpha`` may be per-sample [B]);
  a train-mode student's running statistics move with every step. ``track = (tracked,
  update)`` follows the iterates: ``tracked = update(tracked, k, x_k, logits_k)`` before step
  k, with the student's logits on x_k as the objective's first forward computed them (BAT's
  stop iterates, Fair-ARD's counts); the result is then ``(x_adv, tracked)``."""
  a = config.attack
  eps = config.eps if eps is None else eps
  alpha = a.alpha if alpha is None else alpha
  kwargs = dict(eps=attacks.per_sample(eps), alpha=attacks.per_sample(alpha),
                steps=a.steps if steps is None else steps, init=init or a.init,
                unroll=attacks.resolve_unroll(a.unroll, 'train'))
  if not getattr(student, 'moves_statistics', False) and track is None:
    return attacks.pgd_attack(make_objective(student), inputs.x, inputs.rng, **kwargs)

  if not isinstance(student, AttackStudent):
    student = _FixedStudent(student)

  def objective(x_adv, carry):
    moved = student.at(carry[0])
    seen = []

    def logits_fn(z):
      seen.append(moved(z))
      return seen[-1]

    value = make_objective(logits_fn)(x_adv)
    return value, (moved.batch_stats, seen[0])

  shape = jax.eval_shape(lambda z: student.at(student.batch_stats)(z), inputs.x)
  logits0 = jnp.zeros(shape.shape, shape.dtype)
  if track is not None:
    tracked, update = track
    track = (tracked, lambda t, k, x_k, carry: update(t, k, x_k, carry[1]))
  out = attacks.pgd_attack(objective, inputs.x, inputs.rng, state=(student.batch_stats, logits0),
                           track=track, **kwargs)
  student.batch_stats = out[-1][0]
  return out[0] if track is None else (out[0], out[1])


class _FixedStudent:
  """A plain logits function as a student whose forwards move nothing."""
  moves_statistics = False

  def __init__(self, logits_fn):
    self.logits_fn, self.batch_stats = logits_fn, ()

  def __call__(self, x):
    return self.logits_fn(x)

  def at(self, batch_stats):
    del batch_stats
    return self


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
  """``adversary(student, inputs, config) -> x_adv | None`` (``student``: an ``AttackStudent``,
  callable as the attack's logits function; the result may also be a dict of arrays, such as
  BAT's two iterates, which the loss unpacks), ``loss(forward, inputs, x_adv, config) -> (scalar,
  aux)``; ``needs_teacher`` asks the train step for the teacher's logits on x,
  ``teacher_on_inputs`` for the teacher itself (``MethodInputs.teacher_fn``), and
  ``uses_awp(config)`` wraps the update in AWP's weight perturbation. A method's own state:
  ``init_state(config, num_classes)`` (a pytree, checkpointed as the TrainState's
  ``method_state``), ``accumulate(method_state, aux, labels, num_classes)`` after each step,
  ``epoch_end(method_state, epochs_completed, config)`` once per epoch (all three run
  compiled), ``epoch_record(before, after) -> (kind, values)`` written to metrics.jsonl after
  the epoch end, and ``plots`` drawn from those records; ``awp_proxy_loss`` and
  ``reference_bn_passes`` as commented."""
  adversary: Callable[..., Any]
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
  # The method runs the teacher on images it makes (AdaAD's attack, IAD's x_adv): the train step
  # passes ``teacher_fn`` and ``teacher.cache_logits`` (one logit per training image) is refused.
  teacher_on_inputs: bool = False
  # ``validation(config) -> {name: attack_fn}`` (``evaluate.make_attack_eval_step``'s attacks):
  # the loop evaluates the held-out validation split (``data.val_size``) with them at every epoch
  # end, and before the first step with ``validate_before_training`` (FRL's multipliers come from
  # the model they are used on), and calls ``epoch_end(method_state, epochs_completed, config,
  # validation, variables)`` with ``{name: {'per_class': [C], 'avg': scalar}}`` and the weights.
  validation: Callable[[Any], dict] | None = None
  validate_before_training: bool = False
  # ``weight_average(method_state, variables) -> variables``: the weights that evaluation,
  # checkpoint selection, export and AutoAttack use, when the method keeps an average of them in
  # ``method_state['average']`` (started as a copy of the initial weights; CFA's FAWA).
  weight_average: Callable[[Any, Any], Any] | None = None
  # Statistics-only train-mode forwards with the updated weights, after the optimiser step
  # (``reference_bn_passes``): CFA's train_epoch logs a clean forward after optimizer.step().
  post_update_bn_passes: tuple[str, ...] = ()


def passes(base: Callable[[int], float], replays: int = 0):
  """``minimal_passes`` of a method with ``base(K)`` passes for a K-step training attack, plus
  ``replays`` forwards (statistics-only replays) when ``reference_bn_passes`` is on."""
  def count(config) -> float:
    return base(config.attack.steps) + (replays if config.reference_bn_passes else 0)
  return count


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


def no_adversary(student, inputs, config):
  del student, inputs, config
  return None


def per_class_sums(values: jax.Array, labels: jax.Array, num_classes: int):
  """(sum of values per class, count per class) over a batch."""
  sums = jnp.zeros((num_classes,), jnp.float32).at[labels].add(values.astype(jnp.float32))
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(1.0)
  return sums, counts


def class_values(values: jax.Array, labels: jax.Array) -> jax.Array:
  """values[y_i] per sample: a per-class vector read at each sample's label."""
  return jnp.take(values, labels, axis=0)


def validation_pgd(config, steps: int) -> dict:
  """The validation attacks of FRL and CFA: clean, and PGD-``steps`` on CE from a uniform start
  at the training eps and step size (both codes' validation attack)."""
  pgd_fn = lambda logits_fn, x, y, rng: attacks.pgd_attack(
      attacks.ce_objective(logits_fn, y), x, rng, eps=config.eps, alpha=config.attack.alpha,
      steps=steps, init='uniform')
  return {'clean': lambda logits_fn, x, y, rng: x, 'pgd': pgd_fn}


METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
  """Adds a method (docs/extending.md); ``--config.method=NAME`` then selects it."""
  METHODS[name] = method


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}: choose one of {", ".join(sorted(METHODS))}')
  return METHODS[name]
