"""Averages of the weights, kept beside them in the TrainState's ``method_state['average']``.

Two rules share the one slot:

* ``fawa``: a method's own average (``Method.weight_average``; CFA's fairness-aware average,
  updated by its epoch end). It replaces the trained weights everywhere they are used.
* ``ema``: the exponential moving average of Gowal et al. 2020 as Wang et al. 2023's
  ``train-wa.py`` keeps it (``ema.decay`` > 0, any method). After every optimiser update ``t``
  (1-indexed), with ``w = ema.warmup_fraction`` of the run's steps,

      decay_t = 0                                   if t < w
      decay_t = min(ema.decay, (1 + t - w) / (10 + t - w))   otherwise (``ema.dynamic_decay``)
      ema_t   = decay_t * ema_{t-1} + (1 - decay_t) * params_t

  in float32. BatchNorm statistics are not averaged: at the end of every epoch the average takes
  the trained model's running statistics (the code's ``update_bn``). The EMA is evaluated beside
  the trained weights, has its own best checkpoint (``best_ema/``) and its own rows in the final
  table; ``--checkpoint=WHICH:ema`` exports, attacks or distils from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SLOT = 'average'
EMA = 'ema'


def rule(method, config) -> str | None:
  """The weight average a run keeps: 'fawa' (the method's own), 'ema' or None."""
  if method.weight_average is not None:
    return 'fawa'
  if config.get('ema') is not None and config.ema.decay > 0:
    return EMA
  return None


def initial_average(variables):
  """The average at step 0: a float32 copy of the initial weights (own buffers: the step donates
  the state's)."""
  return jax.tree_util.tree_map(lambda v: jnp.array(v, dtype=jnp.float32, copy=True), variables)


def ema_warmup_steps(config, total_steps: int) -> float:
  """The code's ``warmup_steps = 0.025 * num_adv_epochs * update_steps``."""
  return config.ema.warmup_fraction * total_steps


def ema_decay(step, config, total_steps: int):
  """decay_t of the module docstring after update ``step`` (1-indexed)."""
  t = jnp.asarray(step, jnp.float32)
  warmup = jnp.float32(ema_warmup_steps(config, total_steps))
  tau = jnp.float32(config.ema.decay)
  if config.ema.dynamic_decay:
    delta = t - warmup
    decay = jnp.where(delta == -10.0, tau, jnp.minimum(tau, (1.0 + delta) / (10.0 + delta)))
  else:
    decay = tau
  return jnp.where(t >= warmup, decay, 0.0)


def ema_update(average: dict, params, step, config, total_steps: int) -> dict:
  """The average after update ``step``: its parameters move; its statistics stay."""
  decay = ema_decay(step, config, total_steps)
  new_params = jax.tree_util.tree_map(
      lambda a, p: decay * a + (1.0 - decay) * p.astype(jnp.float32), average['params'], params)
  return {**average, 'params': new_params}


def ema_epoch_end(average: dict, batch_stats) -> dict:
  """The code's ``update_bn``: the average takes the model's running statistics."""
  stats = jax.tree_util.tree_map(lambda s: jnp.array(s, dtype=jnp.float32, copy=True), batch_stats)
  return {**average, 'batch_stats': stats}


def variables_of(state, average: dict):
  """The average as variables of the state's model, in the dtypes of its own weights."""
  return jax.tree_util.tree_map(lambda a, v: a.astype(v.dtype), average, state.variables)


def weight_sets(method, config, state) -> list[tuple[str, dict]]:
  """``[(name, variables)]`` evaluated at every evaluation: the trained weights ('') or, for a
  method's own average, that average in their place; and the EMA ('ema') beside them."""
  kind = rule(method, config)
  if kind == 'fawa':
    return [('', method.weight_average(state.method_state, state.variables))]
  if kind == EMA:
    return [('', state.variables), (EMA, variables_of(state, state.method_state[SLOT]))]
  return [('', state.variables)]


def with_weights(state, variables):
  """``state`` whose params and statistics are ``variables``."""
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def deployed_variables(method, config, state, weights: str):
  """The variables a checkpoint is evaluated, exported or distilled from with: a method's own
  average in place of the trained weights; with ``weights='ema'`` the EMA (refused with one line
  where the run keeps none)."""
  kind = rule(method, config)
  if weights == EMA:
    if kind != EMA:  # an EMA run always holds its average
      from ltd_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(f'checkpoint weights {weights!r}: this run keeps no EMA of its weights '
                        f'(ema.decay = 0): drop the :ema suffix, or train with --config.ema.decay')
    return variables_of(state, state.method_state[SLOT])
  if kind == 'fawa':
    return method.weight_average(state.method_state, state.variables)
  return state.variables
