"""The TrainState and what builds it: model by name, SGD with a piecewise-constant schedule."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from ltd_jax import methods
from ltd_jax import models
from ltd_jax import weight_average
from ltd_jax.errors import ConfigError


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; all of it is checkpointed.

  ``method_state`` is the method's own pytree (``Method.init_state``; {} for most methods,
  ABSLD's per-class temperatures and epoch risks).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  method_state: Any
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                           num_epochs: int | None = None):
  """The lr at each step (0-indexed): ``optim.schedule`` piecewise or cosine.

  piecewise: ``lr`` times ``lr_decay`` after each epoch in ``lr_boundaries_epochs``; with
  ``warmup_epochs`` W > 0, scaled by min(1, (step + 1) / (W * steps_per_epoch)) (Goyal et
  al.'s linear warm-up for large batches; the papers' recipes use none). cosine:
  ``one_cycle(...)[0]`` over ``num_epochs``."""
  if optim.get('schedule', 'piecewise') == 'cosine':
    return lambda step: one_cycle(optim, steps_per_epoch, num_epochs, step)[0]
  scales: dict[int, float] = {}
  for epoch in optim.lr_boundaries_epochs:
    boundary = int(epoch) * steps_per_epoch
    scales[boundary] = scales.get(boundary, 1.0) * optim.lr_decay
  piecewise = optax.piecewise_constant_schedule(optim.lr, scales)
  warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
  if warmup_steps <= 0:
    return piecewise
  return lambda step: piecewise(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)


def one_cycle(optim: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, step):
  """(lr, momentum) of PyTorch's ``OneCycleLR(max_lr=lr, pct_start=p, total_steps=T,
  anneal_strategy='cos', div_factor=d, final_div_factor=f)`` after ``s`` scheduler steps:
  s = step // steps_per_epoch, T = num_epochs (``cosine_per='epoch'``, the DM-Improves-AT
  code's once-per-epoch ``scheduler.step()``) or s = step, T = num_epochs * steps_per_epoch.
  With e1 = p T - 1 and e2 = T - 1, cos(a, b, t) = b + (a - b) (1 + cos(pi t)) / 2:
  lr = cos(lr / d, lr, s / e1) up to e1, then cos(lr, lr / (d f), (s - e1) / (e2 - e1));
  momentum (``cycle_momentum`` (low, high)) cos(high, low, .) then cos(low, high, .); without it,
  ``optim.momentum``."""
  per_epoch = optim.cosine_per == 'epoch'
  total = num_epochs if per_epoch else num_epochs * steps_per_epoch
  s = (jnp.asarray(step) // steps_per_epoch if per_epoch else jnp.asarray(step)).astype(jnp.float32)
  end_warmup = jnp.float32(optim.cosine_warmup_fraction * total - 1.0)
  end = jnp.float32(total - 1.0)
  top = jnp.float32(optim.lr)
  initial = top / optim.cosine_initial_div
  final = initial / optim.cosine_final_div
  warming = s <= end_warmup
  t = jnp.where(warming, s / jnp.maximum(end_warmup, 1e-12),
                (s - end_warmup) / jnp.maximum(end - end_warmup, 1e-12))
  anneal = lambda a, b: b + (a - b) / 2.0 * (jnp.cos(jnp.pi * t) + 1.0)
  lr = jnp.where(warming, anneal(initial, top), anneal(top, final))
  if len(optim.cycle_momentum) == 2:
    low, high = (jnp.float32(m) for m in optim.cycle_momentum)
    momentum = jnp.where(warming, anneal(high, low), anneal(low, high))
  else:
    momentum = jnp.float32(optim.momentum)
  return lr, momentum


def _decayed(params):
  """The weight-decay mask without BatchNorm: False for the scale and bias of every module that
  has a ``scale`` (Flax's BatchNorm), True for the rest."""
  def mask(tree):
    if not isinstance(tree, dict) and not hasattr(tree, 'items'):
      return True
    is_norm = 'scale' in tree
    return {k: (False if is_norm and k in ('scale', 'bias') else mask(v)) for k, v in tree.items()}
  return mask(params)


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                   num_epochs: int | None = None):
  """PyTorch SGD: coupled weight decay (on every parameter, or all but BatchNorm's with
  ``weight_decay_batchnorm=False``), heavy-ball or Nesterov momentum; the lr of
  ``learning_rate_schedule``, and with the cosine schedule's ``cycle_momentum`` a momentum
  that follows ``one_cycle`` too."""
  decay = (optax.add_decayed_weights(optim.weight_decay)
           if optim.get('weight_decay_batchnorm', True)
           else optax.add_decayed_weights(optim.weight_decay, mask=_decayed))
  lr = learning_rate_schedule(optim, steps_per_epoch, num_epochs)
  if optim.get('schedule', 'piecewise') == 'cosine' and len(optim.cycle_momentum) == 2:
    momentum = lambda step: one_cycle(optim, steps_per_epoch, num_epochs, step)[1]
    return optax.chain(decay, optax.inject_hyperparams(optax.sgd)(
        learning_rate=lr, momentum=momentum, nesterov=optim.nesterov))
  return optax.chain(decay, optax.sgd(lr, momentum=optim.momentum or None,
                                      nesterov=optim.nesterov))


def build_model(config, num_classes: int):
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  try:
    return models.create_model(config.model.name, num_classes, dtype,
                               base_width=config.model.base_width, width=config.model.width,
                               remat=_remat_policy(config.model),
                               bn_momentum=config.model.get('bn_momentum', 0.1))
  except ValueError as e:
    raise ConfigError(f'{e} (--config.model.name)') from e


def _remat_policy(model_config) -> str:
  """'' without ``model.remat``; else ``model.remat_policy``."""
  return model_config.get('remat_policy', 'convs') if model_config.get('remat', False) else ''


def create_train_state(config, model, image_shape, num_classes: int,
                       steps_per_epoch: int) -> TrainState:
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = models.init_variables(model, init_rng, image_shape)
  tx = make_optimizer(config.optim, steps_per_epoch, config.num_epochs)
  method = methods.get_method(config.method)
  method_state = method.init_state(config, num_classes)
  if weight_average.rule(method, config) is not None:
    method_state = {**method_state, weight_average.SLOT: weight_average.initial_average(
        {'params': params, 'batch_stats': batch_stats})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=state_rng, method_state=method_state,
                    apply_fn=model.apply, tx=tx)
