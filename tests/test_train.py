"""The shared train step, the optimizer, checkpoints and resume, and the work directory."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import methods
from ltd_jax import parallel
from ltd_jax import runs
from ltd_jax import state as state_lib
from ltd_jax import train
from ltd_jax.errors import CheckpointError, TrainingError


def test_sgd_matches_pytorch_sgd():
  """torch.optim.SGD (momentum, coupled weight decay, Nesterov) with the lr / 10 after one
  epoch of two steps, against the optax chain, step by step."""
  torch = pytest.importorskip('torch')
  for nesterov in (False, True):
    optim = ml_collections.ConfigDict({'lr': 0.1, 'momentum': 0.9, 'nesterov': nesterov,
                                       'weight_decay': 5e-4, 'lr_boundaries_epochs': (1,),
                                       'lr_decay': 0.1, 'warmup_epochs': 0})
    tx = state_lib.make_optimizer(optim, steps_per_epoch=2)
    w = jnp.array([1.0, -2.0])
    opt_state = tx.init(w)
    w_t = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([w_t], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for step in range(4):
      grad = jnp.array([0.3, 0.7]) * (step + 1)
      updates, opt_state = tx.update(grad, opt_state, w)
      w = w + updates
      sgd.param_groups[0]['lr'] = 0.1 if step < 2 else 0.01
      w_t.grad = torch.tensor(np.asarray(grad, np.float64))
      sgd.step()
      np.testing.assert_allclose(w, w_t.detach().numpy(), rtol=1e-6)


def test_learning_rate_schedule_boundaries():
  optim = ml_collections.ConfigDict({'lr': 0.1, 'lr_boundaries_epochs': (2, 3), 'lr_decay': 0.1,
                                     'warmup_epochs': 0})
  sched = state_lib.learning_rate_schedule(optim, steps_per_epoch=10)
  assert [float(sched(s)) for s in (0, 19, 20, 29, 30)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001])


def test_learning_rate_warmup_is_linear_then_piecewise():
  optim = ml_collections.ConfigDict({'lr': 0.4, 'lr_boundaries_epochs': (3,), 'lr_decay': 0.1,
                                     'warmup_epochs': 1.5})
  sched = state_lib.learning_rate_schedule(optim, steps_per_epoch=4)  # warm-up: 6 steps
  assert [float(sched(s)) for s in (0, 1, 5, 6, 11, 12)] == pytest.approx(
      [0.4 / 6, 0.8 / 6, 0.4, 0.4, 0.4, 0.04])
  assert float(jax.jit(sched)(jnp.int32(2))) == pytest.approx(0.2)  # traced step, as in optax


def _state_and_batch(config):
  ds = datasets.load(config.data)
  model = state_lib.build_model(config, ds.num_classes)
  state = state_lib.create_train_state(config, model, ds.image_shape, ds.num_classes, 5)
  return state, ds.train_images[:64], ds.train_labels[:64]


@pytest.mark.parametrize('method', ['natural', 'pgd_at', 'trades'])
def test_train_step_for_each_method(tiny_config, method):
  tiny_config.method = method
  state, images, labels = _state_and_batch(tiny_config)
  step = jax.jit(lambda s, x, y: train.train_step(
      s, x, y, method=methods.get_method(method), config=tiny_config, augment_kind='none',
      num_classes=10, steps_per_epoch=5))
  new, metrics = step(state, images, labels)
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params,
                                 state.params)
  assert all(v > 0 for v in jax.tree_util.tree_leaves(moved))
  assert not np.allclose(new.batch_stats['bn1']['mean'], state.batch_stats['bn1']['mean'])
  # These methods keep no state of their own; the train accuracy is of the logits they trained on.
  assert new.method_state == {} and state.method_state == {}
  assert train.end_of_epoch(new, 1, method=methods.get_method(method), config=tiny_config) is new
  kinds = {'natural': ['clean'], 'pgd_at': ['adv'], 'trades': ['clean', 'adv']}[method]
  assert sorted(k for k in metrics if k.startswith('correct_')) == sorted(f'correct_{k}' for k in kinds)
  if 'clean' in kinds:
    logits = state.apply_fn(state.variables, data.to_float(images), train=True,
                            mutable=['batch_stats'])[0]
    want = np.sum(np.argmax(np.asarray(logits), -1) == labels)
    assert float(metrics['correct_clean']) == want


def test_repeated_training_improves_the_loss(tiny_config):
  tiny_config.method, tiny_config.optim.lr = 'natural', 0.1
  state, images, labels = _state_and_batch(tiny_config)
  step = jax.jit(lambda s: train.train_step(s, images, labels, method=methods.get_method('natural'),
                                            config=tiny_config, augment_kind='none',
                                            num_classes=10, steps_per_epoch=5))
  first = float(step(state)[1]['loss'])
  for _ in range(80):
    state, metrics = step(state)
  assert float(metrics['loss']) < 0.5 * first


class Interrupt(Exception):
  pass


def _interrupt_at(step_to_stop):
  def hook(step):
    if step == step_to_stop:
      raise Interrupt()
  return hook


def _leaves(state):
  return jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state, state.step,
                                    state.method_state))


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_config, tmp_path):
  tiny_config.batch_size = 128  # 11 steps per epoch, 22 in all
  tiny_config.data.augment = 'crop_flip'  # exercise on-device augmentation rng too
  tiny_config.checkpoint.every_steps = 4
  tiny_config.ema.decay = 0.9  # the EMA (method_state['average']) is restored bit for bit too
  full = train.train_and_evaluate(tiny_config, str(tmp_path / 'full'))
  workdir = str(tmp_path / 'interrupted')
  for stop in (6, 13):  # killed mid-epoch, after the checkpoints at 4 and at 12 (epoch end 11)
    with pytest.raises(Interrupt):
      train.train_and_evaluate(tiny_config, workdir, step_hook=_interrupt_at(stop))
  resumed = train.train_and_evaluate(tiny_config, workdir)
  assert int(resumed.step) == int(full.step) == 22
  # Exact by construction: both runs execute the same compiled step program (same HLO, so the
  # same executable; the compilation cache hands the resumed run the very same one) on
  # the same state and batches, and checkpoints restore every bit.
  for a, b in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  with open(tmp_path / 'full' / 'results.json') as f:
    r_full = json.load(f)
  with open(os.path.join(workdir, 'results.json')) as f:
    r_resumed = json.load(f)
  assert json.dumps(r_full['attacks']) == json.dumps(r_resumed['attacks'])
  assert json.dumps(r_full['ema']) == json.dumps(r_resumed['ema'])
  assert 'average' in full.method_state


def test_work_directory_contents_and_best_checkpoint(tiny_config, tmp_path):
  tiny_config.checkpoint.keep = 1
  tiny_config.num_epochs = 3
  tiny_config.optim.warmup_epochs = 1.0
  tiny_config.report.plots = True
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config, workdir)
  for name in ('config.json', 'environment.json', 'metrics.jsonl', 'results.json', 'results.md',
               'report.md', 'per_class_accuracy.png', 'training_curves.png'):
    assert os.path.exists(os.path.join(workdir, name)), name
  env = json.load(open(os.path.join(workdir, 'environment.json')))
  assert env['devices'] and env['libraries']['jax'] and 'git_commit' in env
  assert json.load(open(os.path.join(workdir, 'config.json')))['method'] == 'trades'
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if r['kind'] == 'eval']
  assert len(evals) == 3 and {r['kind'] for r in records} == {'train', 'eval'}
  assert 'images_per_sec' in records[0] and 'acc_adv' in records[0]
  # 5 steps per epoch: the lr of each record's last step, warm-up over epoch 1, / 10 after it.
  for r in (r for r in records if r['kind'] == 'train'):
    s = r['step']
    assert r['lr'] == pytest.approx(0.05 * min(1, s / 5) if s <= 5 else 0.005), r
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['15']  # keep=1: only the latest
  best = [r for r in evals if r['is_best']][-1]
  assert os.listdir(os.path.join(workdir, 'best')) == [str(best['step'])]
  assert best['pgd20/avg'] == max(r['pgd20/avg'] for r in evals)
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['checkpoint'] == 'best' and results['step'] == best['step']
  assert results['selection'] == 'robust' and results['selection_split'] == 'test'
  assert list(results['attacks']) == ['clean', 'fgsm', 'pgd20', 'cw']
  for r in results['attacks'].values():
    assert len(r['per_class']) == 10 and 0 <= r['worst'] <= r['avg'] <= 1
  md = open(os.path.join(workdir, 'results.md')).read()
  assert '| pgd20 |' in md and 'NSD' in md
  report = open(os.path.join(workdir, 'report.md')).read()
  assert report.startswith('# Run report: trades / small_cnn / digits')
  assert 'Status: finished' in report and md.split('\n', 2)[2].strip() in report  # all attacks
  for png in ('training_curves.png', 'per_class_accuracy.png'):
    assert f']({png})' in report
  assert env['git_commit'] in report and json.dumps(json.load(open(
      os.path.join(workdir, 'config.json'))), indent=2) in report
  assert 'Gradient-masking audit' in report and 'Not run' in report

  # --mode=evaluate on the same work directory gives the same numbers for the same checkpoint.
  again = runs.evaluate_checkpoint(tiny_config, workdir, 'best')
  assert json.dumps(again['attacks']) == json.dumps(results['attacks'])  # NaN-safe
  latest = runs.evaluate_checkpoint(tiny_config, workdir, 'latest')
  assert latest['step'] == 15 and latest['checkpoint'] == 'latest'


def test_fair_selection_uses_avg_plus_worst(tiny_config, tmp_path):
  tiny_config.eval.selection = 'fair'
  tiny_config.num_epochs = 3
  train.train_and_evaluate(tiny_config, str(tmp_path))
  evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"eval"' in l]
  for r in evals:
    assert r['selection_score'] == pytest.approx(r['pgd20/avg'] + r['pgd20/worst'])
  best = max(evals, key=lambda r: r['selection_score'])
  assert json.load(open(tmp_path / 'results.json'))['step'] == best['step']


def test_checkpoint_of_another_architecture_is_refused(tiny_config, tmp_path):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.model.width = 8
  with pytest.raises(CheckpointError, match='does not fit the configured model'):
    runs.evaluate_checkpoint(tiny_config, str(tmp_path))
  with pytest.raises(CheckpointError, match='no checkpoint'):
    runs.evaluate_checkpoint(tiny_config, str(tmp_path / 'empty'))


def test_non_finite_parameters_stop_with_the_step_and_keep_the_last_good_checkpoint(
    tiny_config, tmp_path):
  tiny_config.method = 'natural'
  tiny_config.num_epochs = 3
  tiny_config.log_every_steps = 4  # the bad step is found inside a lagged block of metrics
  good = train.train_and_evaluate(tiny_config, str(tmp_path))  # 15 steps, checkpoint at 15
  tiny_config.num_epochs = 6
  tiny_config.optim.lr = 1e30  # the loss stays finite while the updates overflow the weights
  tiny_config.optim.lr_boundaries_epochs = ()
  last = os.path.join(tmp_path, 'checkpoints', '15')
  with pytest.raises(TrainingError, match=rf'non-finite parameters after step 1[67]: .*{last}'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '15', '5']
  assert 'Status: failed: non-finite parameters after step 1' in open(tmp_path / 'report.md').read()
  ds, latest, store = runs.restore_for_evaluation(tiny_config, str(tmp_path), 'latest')
  store.close()
  assert int(latest.step) == 15
  # Exact by construction: a restored checkpoint is the saved arrays, bit for bit.
  for a, b in zip(_leaves(good), _leaves(latest)):
    np.testing.assert_array_equal(a, b)



def test_evaluating_a_directory_without_checkpoints_fails_before_reading_data(tiny_config, tmp_path,
                                                                              monkeypatch):
  """--mode=evaluate on the wrong --workdir says so at once, not after loading (or downloading)
  the dataset and building the model."""
  def no_data(*args, **kwargs):
    raise AssertionError('the data was read')
  monkeypatch.setattr(datasets, 'load', no_data)
  with pytest.raises(CheckpointError, match=f'no checkpoint in {tmp_path}'):
    runs.restore_for_evaluation(tiny_config, str(tmp_path), 'auto')
  with pytest.raises(AssertionError, match='the data was read'):  # a PyTorch file reads the data
    runs.restore_for_evaluation(tiny_config, str(tmp_path / 'other'), str(tmp_path / 'model.pt'))

def test_non_finite_loss_stops_before_any_checkpoint(tiny_config, tmp_path, monkeypatch):
  natural = methods.METHODS['natural']
  def nan_loss(forward, inputs, x_adv, config):
    loss, aux = natural.loss(forward, inputs, x_adv, config)
    return loss * jnp.nan, aux
  monkeypatch.setitem(methods.METHODS, 'natural', natural._replace(loss=nan_loss))
  tiny_config.method = 'natural'
  with pytest.raises(TrainingError, match=r'non-finite loss at step 1: .*last good: none'):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not os.listdir(tmp_path / 'checkpoints')


def test_evaluation_uses_eval_eps_not_the_training_eps(tiny_config, tmp_path):
  """Trained at eps 0.2 and evaluated at eval.eps = 0: every attack leaves the clean images, so
  FGSM / PGD-20 / CW accuracy equals clean accuracy; both eps are recorded."""
  tiny_config.max_steps, tiny_config.eval.eps = 2, 0.0
  train.train_and_evaluate(tiny_config, str(tmp_path))
  results = json.load(open(tmp_path / 'results.json'))
  assert results['eps'] == 0.0 and results['train_eps'] == pytest.approx(0.2)
  for attack in ('fgsm', 'pgd20', 'cw'):
    assert results['attacks'][attack]['per_class'] == results['attacks']['clean']['per_class']
  assert 'trained at 0.20000' in open(tmp_path / 'results.md').read()


def test_host_data_trains_as_the_device_resident_data(tiny_config, tmp_path):
  """data.on_device=False (each batch sent from the host) trains as data.on_device=True (the
  training set on the device, indices sent). The batches are equal exactly (uint8 rows and
  labels, gathered by the same indices); the two step programs differ (one gathers inside), so
  XLA may round them differently, and the parameters agree to float32 rounding (natural
  training: no sign(grad) to turn a rounding into a step)."""
  tiny_config.max_steps, tiny_config.method = 3, 'natural'
  ds = data.load_digits()
  mesh = parallel.make_mesh()
  host = {'images': ds.train_images, 'labels': ds.train_labels}
  on_device = parallel.replicate(host, mesh)
  sent = train.train_batches(ds, tiny_config, mesh, 0, 3, host, None)
  indexed = train.train_batches(ds, tiny_config, mesh, 0, 3, host, on_device)
  for batch, index in zip(sent, indexed):
    for key in host:
      np.testing.assert_array_equal(batch[key], np.asarray(on_device[key])[index['index']])
  states = {}
  for on_device in (True, False):
    tiny_config.data.on_device = on_device
    states[on_device] = train.train_and_evaluate(tiny_config, str(tmp_path / str(on_device)))
  for a, b in zip(jax.tree_util.tree_leaves(states[True].params),
                  jax.tree_util.tree_leaves(states[False].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(states[True].step) == 3


def test_selection_on_the_validation_split(tiny_config, tmp_path):
  """README: data.val_size=N holds out a stratified validation split from train, and
  eval.selection_split=val selects on it: every eval record is the checkpoint's accuracy on
  those images (recomputed here from the best checkpoint), not on the test set."""
  c = tiny_config
  c.data.val_size, c.eval.selection_split, c.eval.subset_size = 180, 'val', 0
  full, ds = data.load_digits(), datasets.load(c.data)
  val_images, val_labels = ds.split('val')
  assert len(val_labels) == 180 and ds.num_train == full.num_train - 180
  share = np.bincount(full.train_labels, minlength=10) / full.num_train
  assert np.all(np.abs(np.bincount(val_labels, minlength=10) - 180 * share) <= 1)  # stratified
  as_rows = lambda images: sorted(x.tobytes() for x in images)
  assert as_rows(np.concatenate([ds.train_images, val_images])) == as_rows(full.train_images)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  evals = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in evals if r['kind'] == 'eval']
  assert evals and all(r['split'] == 'val' for r in evals)
  best = [r for r in evals if r['is_best']][-1]
  _, state, store = runs.restore_for_evaluation(c, workdir, 'best')
  state, _ = runs.select_checkpoint(c, state, store, 'best')
  store.close()
  assert int(state.step) == best['step']

  def accuracy(images, labels):
    logits = state.apply_fn(state.variables, data.to_float(images), train=False)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert best['clean/avg'] == pytest.approx(accuracy(val_images, val_labels), abs=1e-9)
  assert best['clean/avg'] != pytest.approx(accuracy(*ds.split('test')), abs=1e-9)
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['selection_split'] == 'val' and results['split'] == 'test'
  # report.plots=False (the tiny config's): the tables and records, no PNG, none in report.md.
  assert not [f for f in os.listdir(workdir) if f.endswith('.png')]
  assert '.png)' not in open(os.path.join(workdir, 'report.md')).read()


@pytest.mark.parametrize('method', ['absld', 'trades'])
def test_checkpoints_of_layout_1_restore(tiny_config, tmp_path, method):
  """Checkpoints written before methods owned their state (layout 1: ABSLD's six arrays as
  top-level TrainState fields, for every method) restore: into ABSLD's method_state, and
  dropped for a method that keeps none. (Checked once against checkpoints the old code wrote.)"""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from ltd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  tiny_config.method = method
  state, _, _ = _state_and_batch(tiny_config)
  tree = serialization.to_state_dict(state.replace(step=jnp.int32(7)))
  del tree['method_state']
  rng = np.random.default_rng(0)
  old = {k: rng.uniform(0.5, 2.0, 10).astype(np.float32) for k in checkpoints.LAYOUT_1_FIELDS}
  store = checkpoints.CheckpointStore(str(tmp_path), 2)
  store.latest.save(7, args=store._save_args({**tree, **old}), force=True)
  store.wait()
  restored = store.restore(state)
  store.close()
  assert int(restored.step) == 7
  for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  if method == 'absld':
    assert sorted(restored.method_state) == sorted(old)
    for k, v in old.items():
      np.testing.assert_array_equal(restored.method_state[k], v)
  else:
    assert restored.method_state == {}
