"""Gradient accumulation (optim.accumulation_steps): k micro-batches of b make the update of one
batch of k*b for a model without BatchNorm, and the stated BatchNorm behaviour with it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import config_lib
from ltd_jax import datasets
from ltd_jax import methods
from ltd_jax import state as state_lib
from ltd_jax import train
from ltd_jax.errors import ConfigError


class NoBatchNormNet(nn.Module):
  """conv - tanh - dense: no statistic couples the samples of a batch (its one batch_stats
  entry is a constant the train-mode forwards carry along)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    self.variable('batch_stats', 'unused', jnp.zeros, (1,))
    x = jnp.tanh(nn.Conv(6, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _state(config, model, image_shape, seed=0):
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape)), train=False)
  tx = state_lib.make_optimizer(config.optim, 5)
  method = methods.get_method(config.method)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                              batch_stats=variables['batch_stats'],
                              opt_state=tx.init(variables['params']), rng=jax.random.PRNGKey(1),
                              method_state=method.init_state(config, 10), apply_fn=model.apply,
                              tx=tx)


def _step(config, state, images, labels, teacher_logits=None):
  method = methods.get_method(config.method)
  return jax.jit(lambda s, x, y, t: train.train_step(
      s, x, y, teacher_logits=t, method=method, config=config, augment_kind='none',
      num_classes=10, steps_per_epoch=5))(state, images, labels, teacher_logits)


@pytest.mark.parametrize('method', ['trades', 'absld'])
def test_micro_batches_give_the_update_of_the_whole_batch(tiny_config, method):
  c = tiny_config
  c.method, c.attack.init, c.optim.lr, c.optim.momentum = method, 'none', 0.5, 0.9
  ds = datasets.load(c.data)
  images, labels = ds.train_images[:64], ds.train_labels[:64]
  # A teacher's logits that depend on the image (ABSLD's soft labels and its per-class risks).
  teacher_logits = (jnp.asarray(images.reshape(64, -1)[:, :10], jnp.float32) / 8.0
                    if method == 'absld' else None)
  model = NoBatchNormNet()
  state = _state(c, model, ds.image_shape)
  whole, whole_metrics = _step(c, state, images, labels, teacher_logits)
  c.optim.accumulation_steps = 4
  accumulated, acc_metrics = _step(c, state, images, labels, teacher_logits)
  for a, b in zip(jax.tree_util.tree_leaves(whole.params),
                  jax.tree_util.tree_leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(state.params)))
  assert moved > 1e-3  # the update is not trivially zero
  np.testing.assert_allclose(acc_metrics['loss'], whole_metrics['loss'], rtol=1e-5)
  for key in ('correct_clean', 'correct_adv', 'loss_natural', 'loss_robust'):
    if key in whole_metrics:
      np.testing.assert_allclose(acc_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
  # ABSLD's per-class risks count every micro-batch: the sums and counts of the whole batch.
  for a, b in zip(jax.tree_util.tree_leaves(whole.method_state),
                  jax.tree_util.tree_leaves(accumulated.method_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if method == 'absld':
    assert float(jnp.sum(accumulated.method_state['risk_adv_count'])) == 64


def test_batchnorm_statistics_move_once_per_micro_batch(tiny_config):
  """With BatchNorm, each micro-batch is normalised by its own statistics and moves the running
  ones: one step of k = 2 leaves the statistics of two steps on micro-batch 0 (rows 0, 2, 4, ...)
  then micro-batch 1 (rows 1, 3, 5, ...) with the same weights."""
  c = tiny_config
  c.method, c.optim.lr, c.optim.weight_decay, c.optim.momentum = 'natural', 1e-30, 0.0, 0.0
  ds = datasets.load(c.data)
  images, labels = ds.train_images[:64], ds.train_labels[:64]
  model = state_lib.build_model(c, 10)
  state = state_lib.create_train_state(c, model, ds.image_shape, 10, 5)
  sequential = state
  losses = []
  for rows in (slice(0, None, 2), slice(1, None, 2)):
    sequential, m = _step(c, sequential, images[rows], labels[rows])
    losses.append(float(m['loss']))
  c.optim.accumulation_steps = 2
  accumulated, metrics = _step(c, state, images, labels)
  for a, b in zip(jax.tree_util.tree_leaves(sequential.batch_stats),
                  jax.tree_util.tree_leaves(accumulated.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
  c.optim.accumulation_steps = 1
  whole, _ = _step(c, state, images, labels)  # one batch of 64 moves them once, differently
  assert any(float(jnp.max(jnp.abs(a - b))) > 1e-4 for a, b in zip(
      jax.tree_util.tree_leaves(whole.batch_stats),
      jax.tree_util.tree_leaves(accumulated.batch_stats)))


def test_accumulation_that_cannot_work_is_refused(tiny_config):
  tiny_config.optim.accumulation_steps = 3  # 256 is not a multiple of 3
  with pytest.raises(ConfigError, match='positive divisor of batch_size=256'):
    config_lib.validate(tiny_config)
  tiny_config.optim.accumulation_steps, tiny_config.method = 2, 'awp'
  with pytest.raises(ConfigError, match='AWP with optim.accumulation_steps > 1'):
    config_lib.validate(tiny_config)
