"""config.dtype='bfloat16': bf16 compute, float32 parameters, BN statistics, images and losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import methods
from ltd_jax import models
from ltd_jax import runs
from ltd_jax import state as state_lib
from ltd_jax import train


def _bf16(config):
  config.dtype = 'bfloat16'
  return config


def test_bf16_model_computes_in_bf16_with_float32_params_and_logits(tiny_config):
  model = state_lib.build_model(_bf16(tiny_config), 10)
  st = state_lib.create_train_state(tiny_config, model, (8, 8, 1), 10, 5)
  leaves = jax.tree_util.tree_leaves((st.params, st.batch_stats))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
  x = jnp.ones((2, 8, 8, 1), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(st.variables))
  convs = [line for line in jaxpr.splitlines() if 'conv_general_dilated' in line]
  assert convs and all('bf16[' in line for line in convs)
  assert model.apply(st.variables, x, train=False).dtype == jnp.float32


def test_bf16_train_step_keeps_images_losses_and_statistics_in_float32(tiny_config):
  config = _bf16(tiny_config)
  ds = datasets.load(config.data)
  model = state_lib.build_model(config, 10)
  st = state_lib.create_train_state(config, model, ds.image_shape, 10, 5)
  method = methods.get_method('trades')
  inputs = methods.MethodInputs(data.to_float(ds.train_images[:16]), ds.train_labels[:16],
                                jax.random.PRNGKey(0), st.method_state)
  x_adv = method.adversary(methods.AttackStudent.of(st), inputs, config)
  assert x_adv.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(x_adv - inputs.x))) <= config.eps + 1e-6
  step = jax.jit(lambda s, x, y: train.train_step(
      s, x, y, method=method, config=config, augment_kind='none', num_classes=10,
      steps_per_epoch=5))
  new, metrics = step(st, ds.train_images[:64], ds.train_labels[:64])
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(float(metrics['loss']))
  for tree in (new.params, new.batch_stats, new.opt_state):
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 st.batch_stats, new.batch_stats)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the statistics were updated


def test_bf16_trains_as_well_as_float32(tiny_config, tmp_path):
  """Natural training of the small CNN on digits: bf16 learns, and lands near float32."""
  accuracy = {}
  for dtype in ('float32', 'bfloat16'):
    c = tiny_config.copy_and_resolve_references()
    c.method, c.dtype, c.model.width = 'natural', dtype, 8
    c.num_epochs, c.batch_size, c.optim.lr = 4, 128, 0.1
    c.optim.lr_boundaries_epochs = (3,)
    c.eval.final, c.eval.during_training = ('clean',), ('clean',)
    c.eval.final_subset_size = 0
    c.eval.selection = 'last'
    train.train_and_evaluate(c, str(tmp_path / dtype))
    with open(tmp_path / dtype / 'results.json') as f:
      results = json.load(f)
    accuracy[dtype] = results['attacks']['clean']['avg']
  assert accuracy['float32'] > 0.8
  assert accuracy['bfloat16'] > 0.8
  assert abs(accuracy['bfloat16'] - accuracy['float32']) < 0.08  # two training trajectories
  # The same float32 weights computed in bfloat16: close logits, the same clean and PGD accuracy
  # within 2 points (bf16 neither weakens the attack nor changes the model's answers).
  c = tiny_config.copy_and_resolve_references()
  c.method, c.model.width = 'natural', 8
  ds, state, store = runs.restore_for_evaluation(c, str(tmp_path / 'float32'), 'latest')
  store.close()
  images, labels = ds.split('test')
  bf16 = models.create_model('small_cnn', 10, dtype=jnp.bfloat16, width=8)
  x = data.to_float(images)
  f32_logits = np.asarray(state.apply_fn(state.variables, x, train=False))
  bf16_logits = np.asarray(bf16.apply(state.variables, x, train=False))
  assert np.abs(bf16_logits - f32_logits).max() < 0.05 * np.abs(f32_logits).max()
  assert np.mean(bf16_logits.argmax(1) == f32_logits.argmax(1)) > 0.97
  results = {}
  for name, apply_fn in (('float32', state.apply_fn), ('bfloat16', bf16.apply)):
    step = evaluate.make_eval_step(apply_fn, ('clean', 'pgd20'), eps=c.eps, eval_config=c.eval)
    results[name] = evaluate.evaluate(step, state.variables, images, labels, 10, 360,
                                      jax.random.PRNGKey(0))
  for attack in ('clean', 'pgd20'):
    assert abs(results['bfloat16'][attack]['avg'] - results['float32'][attack]['avg']) < 0.02
  assert results['float32']['pgd20']['avg'] < results['float32']['clean']['avg'] - 0.2
