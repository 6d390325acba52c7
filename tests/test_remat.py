"""Rematerialisation (model.remat): the same loss, gradients and statistics. Its memory is
tested where it shows, in XLA:GPU's analysis of a compile for an H200 (tests/test_compile_plan.py:
XLA:CPU's memory analysis reports the same temporaries with and without it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import models


def _loss_and_grads(model, x, y):
  """``(params, batch_stats) -> ((loss, new batch_stats), grads)``, compiled."""
  def loss_fn(params, batch_stats):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                  train=True, mutable=['batch_stats'])
    loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    return loss, updates['batch_stats']
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.mark.parametrize('name, policies', [
    ('dm-wrn-10-1', ('convs', 'nothing')),  # both policies on one family, one on each other
    ('wrn-10-1', ('nothing',)), ('preactresnet18', ('convs',))])
def test_remat_gives_the_same_loss_gradients_and_statistics(name, policies):
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  plain = models.create_model(name, 10, base_width=2)
  init = lambda model: jax.jit(lambda k: model.init(k, x[:1], train=False))  # not op by op
  variables = init(plain)(jax.random.PRNGKey(1))
  (loss, stats), grads = _loss_and_grads(plain, x, y)(variables['params'], variables['batch_stats'])
  for policy in policies:
    remat = models.create_model(name, 10, base_width=2, remat=policy)
    # The same parameter tree: a checkpoint of one restores into the other.
    assert (jax.tree_util.tree_structure(jax.eval_shape(init(remat), jax.random.PRNGKey(1)))
            == jax.tree_util.tree_structure(variables))
    (loss_r, stats_r), grads_r = _loss_and_grads(remat, x, y)(variables['params'],
                                                              variables['batch_stats'])
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((grads, stats)),
                    jax.tree_util.tree_leaves((grads_r, stats_r))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_of_a_model_without_residual_blocks_is_refused():
  with pytest.raises(ValueError, match='no residual blocks'):
    models.create_model('small_cnn', 10, remat='convs')
  with pytest.raises(ValueError, match='unknown remat policy'):
    models.create_model('wrn-10-2', 10, remat='everything')
  with pytest.raises(ValueError, match='bn_momentum'):
    models.create_model('resnet18', 10, bn_momentum=0.01)
