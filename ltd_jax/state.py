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


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int):
  """Piecewise-constant lr: ``lr`` times ``lr_decay`` after each epoch in ``lr_boundaries_epochs``;
  with ``warmup_epochs`` W > 0, scaled by min(1, (step + 1) / (W * steps_per_epoch)) (Goyal et
  al.'s linear warm-up for large batches; the papers' recipes use none)."""
  scales: dict[int, float] = {}
  for epoch in optim.lr_boundaries_epochs:
    boundary = int(epoch) * steps_per_epoch
    scales[boundary] = scales.get(boundary, 1.0) * optim.lr_decay
  piecewise = optax.piecewise_constant_schedule(optim.lr, scales)
  warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
  if warmup_steps <= 0:
    return piecewise
  return lambda step: piecewise(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int):
  """PyTorch SGD: coupled weight decay on every parameter, heavy-ball or Nesterov momentum."""
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(learning_rate_schedule(optim, steps_per_epoch),
                momentum=optim.momentum or None, nesterov=optim.nesterov))


def build_model(config, num_classes: int):
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  try:
    return models.create_model(config.model.name, num_classes, dtype,
                               base_width=config.model.base_width, width=config.model.width)
  except ValueError as e:
    raise ConfigError(f'{e} (--config.model.name)') from e


def create_train_state(config, model, image_shape, num_classes: int,
                       steps_per_epoch: int) -> TrainState:
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  params, batch_stats = models.init_variables(model, init_rng, image_shape)
  tx = make_optimizer(config.optim, steps_per_epoch)
  method = methods.get_method(config.method)
  method_state = method.init_state(config, num_classes)
  if weight_average.rule(method, config) is not None:
    method_state = {**method_state, weight_average.SLOT: weight_average.initial_average(
        {'params': params, 'batch_stats': batch_stats})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=state_rng, method_state=method_state,
                    apply_fn=model.apply, tx=tx)
