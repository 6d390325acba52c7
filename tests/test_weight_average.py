"""The EMA of the weights (ltd_jax/weight_average.py) against the reference recurrence, and the
EMA through a whole run: its evaluations, best checkpoint, table rows, export and teacher use."""

import json
import os

import jax
import numpy as np
import pytest

from ltd_jax import datasets
from ltd_jax import export
from ltd_jax import methods
from ltd_jax import runs
from ltd_jax import state as state_lib
from ltd_jax import teacher as teacher_lib
from ltd_jax import train
from ltd_jax import weight_average
from ltd_jax.errors import ConfigError


def reference_ema_update(wa, model, global_step, decay_rate, warmup_steps, dynamic_decay=True):
  """wzekai99/DM-Improves-AT gowal21uncovering/utils/watrain.py ``ema_update``, on NumPy arrays
  (transcribed: python floats, ``int(global_step >= warmup_steps)``)."""
  factor = int(global_step >= warmup_steps)
  if dynamic_decay:
    delta = global_step - warmup_steps
    decay = min(decay_rate, (1. + delta) / (10. + delta)) if 10. + delta != 0 else decay_rate
  else:
    decay = decay_rate
  decay *= factor
  return {k: wa[k] * decay + model[k] * (1 - decay) for k in wa}


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('dynamic', [True, False])
def test_ema_equals_the_reference_recurrence_over_the_recorded_weights(tiny_config, dynamic):
  c = tiny_config
  c.method, c.model.name, c.model.base_width = 'natural', 'resnet18', 4  # BatchNorm statistics
  c.optim.lr, c.num_epochs = 0.2, 4
  c.ema.decay, c.ema.warmup_fraction, c.ema.dynamic_decay = 0.8, 0.15, dynamic
  steps_per_epoch, total = 5, 4 * 5  # warm-up: updates 1 and 2 copy the weights (t < 3)
  ds = datasets.load(c.data)
  method = methods.get_method('natural')
  state = state_lib.create_train_state(c, state_lib.build_model(c, 10), ds.image_shape, 10,
                                       steps_per_epoch)
  initial_stats = _flat(state.batch_stats)
  step = jax.jit(lambda s, x, y: train.train_step(
      s, x, y, method=method, config=c, augment_kind='none', num_classes=10,
      steps_per_epoch=steps_per_epoch))
  wa = _flat(state.params)
  for t in range(1, 8):
    rows = slice(32 * t, 32 * t + 32)
    state, _ = step(state, ds.train_images[rows], ds.train_labels[rows])
    wa = reference_ema_update(wa, _flat(state.params), t, 0.8, 0.15 * total, dynamic)
    average = state.method_state['average']
    for k, v in _flat(average['params']).items():
      np.testing.assert_allclose(v, wa[k], rtol=2e-6, atol=1e-7, err_msg=f'update {t} {k}')
    # Steps never touch the average's statistics; the epoch end copies the model's.
    for k, v in _flat(average['batch_stats']).items():
      np.testing.assert_array_equal(v, initial_stats[k])
  assert jax.tree_util.tree_leaves(state.method_state['average'])[0].dtype == np.float32
  ended = train.end_of_epoch(state, 1, method=method, config=c)
  for k, v in _flat(ended.method_state['average']['batch_stats']).items():
    np.testing.assert_array_equal(v, _flat(state.batch_stats)[k])
  assert any(np.any(v != initial_stats[k]) for k, v in _flat(state.batch_stats).items())
  # The warm-up copied; after it, the average lags the weights.
  assert any(np.max(np.abs(wa[k] - v)) > 1e-4 for k, v in _flat(state.params).items())


def test_ema_run_evaluates_selects_tabulates_exports_and_teaches(tiny_config, tmp_path):
  c = tiny_config
  c.method, c.num_epochs, c.batch_size = 'natural', 3, 128  # 11 steps per epoch
  c.optim.lr, c.ema.decay, c.ema.warmup_fraction = 0.1, 0.9, 0.0
  c.eval.final = ('clean', 'pgd20')
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(c, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if r['kind'] == 'eval']
  assert len(evals) == 3
  for r in evals:  # both weight sets evaluated and selected at every evaluation
    assert {'pgd20/avg', 'ema_pgd20/avg', 'is_best', 'ema_is_best'} <= set(r)
  assert os.path.isdir(os.path.join(workdir, 'best_ema'))
  best_ema_epoch = max((r for r in evals), key=lambda r: r['ema_selection_score'])['epoch']
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['checkpoint'] == 'best' and results['ema']['checkpoint'] == 'best:ema'
  assert results['ema']['step'] == best_ema_epoch * 11
  assert set(results['ema']['attacks']) == {'clean', 'pgd20'}
  table = open(os.path.join(workdir, 'results.md')).read()
  assert '| pgd20 (EMA) |' in table and '| pgd20 |' in table

  # The EMA's export loads strictly into the PyTorch twin and gives the EMA's logits, not the
  # trained weights'.
  info = export.export_checkpoint(c, workdir, 'latest:ema')
  assert info['checkpoint'] == 'latest:ema'
  from ltd_jax import autoattack  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  ds = datasets.load(c.data)
  ema_variables = weight_average.variables_of(state, state.method_state['average'])
  model = autoattack.load_torch_model(weight_average.with_weights(state, ema_variables), c, 10,
                                      ds.image_shape)
  from ltd_jax import interchange  # pylint: disable=g-import-not-at-top
  sd = interchange.load_torch_file(os.path.join(workdir, 'export_ema', 'model.safetensors'))
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x = ds.test_images[:32]
  with torch.no_grad():
    torch_logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255)).numpy()
  ema_logits = np.asarray(state.apply_fn(ema_variables, x.astype(np.float32) / 255, train=False))
  raw_logits = np.asarray(state.apply_fn(state.variables, x.astype(np.float32) / 255, train=False))
  np.testing.assert_allclose(torch_logits, ema_logits, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(raw_logits - ema_logits)) > 1e-3

  # A distillation teacher (or a warm start) from the EMA's best checkpoint.
  teacher = teacher_lib.load_teacher(workdir, 10, ds.image_shape, 'auto:ema')
  assert teacher.step == results['ema']['step']
  np.testing.assert_array_equal(
      jax.tree_util.tree_leaves(teacher.variables)[0],
      jax.tree_util.tree_leaves(runs.select_checkpoint(
          c, state, _store(workdir), 'best:ema')[0].variables)[0])


def _store(workdir):
  from ltd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.CheckpointStore(workdir)


def test_ema_suffix_on_a_run_without_one_is_refused(tiny_config, tmp_path):
  tiny_config.method = 'natural'
  ds = datasets.load(tiny_config.data)
  state = state_lib.create_train_state(tiny_config, state_lib.build_model(tiny_config, 10),
                                       ds.image_shape, 10, 5)
  with pytest.raises(ConfigError, match='keeps no EMA'):
    runs.select_checkpoint(tiny_config, state, _store(str(tmp_path)), 'best:ema')
  assert runs.parse_checkpoint('best:ema') == ('best', 'ema')
  assert runs.parse_checkpoint('ema') == ('auto', 'ema')
  assert runs.parse_checkpoint('/x/model.pt') == ('/x/model.pt', '')
  assert runs.is_torch_file('/x/model.pt') and not runs.is_torch_file('latest:ema')


def test_ema_decay_by_hand_after_the_warm_up():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({'ema': {'decay': 0.99, 'warmup_fraction': 0.1,
                                         'dynamic_decay': True}})
  for t in (0, 5, 9, 10, 11, 15, 20, 30, 100, 1000):  # w = 10 of 100 steps
    want = reference_ema_update({'w': np.ones(1)}, {'w': np.zeros(1)}, t, 0.99, 10.0)['w'][0]
    np.testing.assert_allclose(float(weight_average.ema_decay(t, c, 100)), want, rtol=1e-6,
                               err_msg=f'step {t}')
  assert float(weight_average.ema_decay(20, c, 100)) == pytest.approx(11 / 20)  # delta 10


class _State:
  def __init__(self, params, batch_stats, method_state):
    self.params, self.batch_stats, self.method_state = params, batch_stats, method_state

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def replace(self, **kw):
    return _State(kw.get('params', self.params), kw.get('batch_stats', self.batch_stats),
                  kw.get('method_state', self.method_state))


def test_weight_sets_dtypes_and_substitution_by_rule(tiny_config):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bf16 = {'params': {'w': jnp.full((2,), 1.5, jnp.bfloat16)},
          'batch_stats': {'m': jnp.full((2,), 0.5, jnp.bfloat16)}}
  average = weight_average.initial_average(bf16)  # float32 copies of bfloat16 weights
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(average))
  stats = weight_average.ema_epoch_end(average, bf16['batch_stats'])['batch_stats']
  assert stats['m'].dtype == jnp.float32 and float(stats['m'][0]) == 0.5
  average = {'params': {'w': jnp.full((2,), 3.0)}, 'batch_stats': {'m': jnp.full((2,), 4.0)}}
  state = _State(bf16['params'], bf16['batch_stats'], {'average': average})
  back = weight_average.variables_of(state, average)  # in the model's own dtypes
  assert back['params']['w'].dtype == jnp.bfloat16 and float(back['params']['w'][0]) == 3.0
  swapped = weight_average.with_weights(state, back)
  assert float(swapped.params['w'][0]) == 3.0 and float(swapped.batch_stats['m'][0]) == 4.0

  tiny_config.ema.decay = 0.9
  natural = methods.get_method('natural')
  sets = weight_average.weight_sets(natural, tiny_config, state)
  assert [name for name, _ in sets] == ['', 'ema']
  assert float(sets[0][1]['params']['w'][0]) == 1.5 and float(sets[1][1]['params']['w'][0]) == 3.0
  tiny_config.ema.decay = 0.0
  assert [(n, float(v['params']['w'][0]))
          for n, v in weight_average.weight_sets(natural, tiny_config, state)] == [('', 1.5)]
  # CFA's FAWA replaces the trained weights once it has started.
  cfa = methods.get_method('cfa')
  state = state.replace(method_state={'average': average, 'average_started': jnp.asarray(True)})
  sets = weight_average.weight_sets(cfa, tiny_config, state)
  assert [(n, float(v['params']['w'][0])) for n, v in sets] == [('', 3.0)]
  assert float(weight_average.deployed_variables(cfa, tiny_config, state, '')['params']['w'][0]) == 3.0
