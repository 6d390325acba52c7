"""A model trained here is exported, loads strictly into PyTorch, gives the same logits and
results when imported back, serves as a teacher, and gets an AutoAttack row in its results."""

import json
import os

import jax
import numpy as np
import pytest

from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import export
from ltd_jax import interchange
from ltd_jax import runs
from ltd_jax import teacher as teacher_lib
from ltd_jax.errors import ConfigError
from tests.test_cli import run_cli

torch = pytest.importorskip('torch')
pytest.importorskip('pyautoattack')
torch_models = pytest.importorskip('ltd_jax.torch_models')

OVERRIDES = {'num_epochs': 2, 'batch_size': 128, 'model.width': 4, 'attack.steps': 2,
             'eval.final_subset_size': 100, 'eval.pgd_steps': 5, 'eval.cw_steps': 5,
             'progress_bar': False, 'report.plots': False}
CLI_TINY = ['--config=configs/trades_digits.py',
            *(f'--config.{k}={v}' for k, v in OVERRIDES.items())]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A TRADES digits run trained and exported from the command line."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  proc = run_cli(*CLI_TINY, f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr
  proc = run_cli(*CLI_TINY, f'--workdir={workdir}', '--mode=export')
  assert proc.returncode == 0, proc.stderr
  assert 'exported best checkpoint' in proc.stdout
  return workdir


def _config_from_cli():
  """The config that CLI_TINY describes."""
  c = config_lib.load_config_file('configs/trades_digits.py')
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_export_writes_strictly_loadable_state_dicts(trained):
  export_dir = os.path.join(trained, 'export')
  with open(os.path.join(export_dir, 'model.json')) as f:
    info = json.load(f)
  assert info['model']['name'] == 'small_cnn' and info['image_shape'] == [8, 8, 1]
  assert info['checkpoint'] == 'best' and info['step'] > 0
  assert set(info['files']) == {'safetensors', 'pt'}
  import hashlib  # pylint: disable=g-import-not-at-top
  for entry in info['files'].values():  # the README's promise: SHA-256 of both files
    with open(os.path.join(export_dir, entry['path']), 'rb') as f:
      assert entry['sha256'] == hashlib.sha256(f.read()).hexdigest()
  config = _config_from_cli()
  ds, state, store = runs.restore_for_evaluation(config, trained, 'auto')
  best, _ = runs.select_checkpoint(config, state, store, 'best')
  store.close()
  images = data.to_float(ds.test_images[:32])
  jax_logits = np.asarray(best.apply_fn(best.variables, images, train=False))
  for kind in ('pt', 'safetensors'):
    sd = interchange.load_torch_file(os.path.join(export_dir, info['files'][kind]['path']))
    tm = torch_models.build_torch_model('small_cnn', 10, in_channels=1, width=4)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
      out = tm(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(out - jax_logits).max() <= 1e-4 * np.abs(jax_logits).max()


def test_num_batches_tracked_is_a_0d_count_that_survives_reexport(trained, tmp_path):
  """PyTorch's BatchNorm2d keeps num_batches_tracked as a 0-d int64 tensor; the exports hold the
  trained step there, and re-exporting an imported file keeps its count."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  export_dir = os.path.join(trained, 'export')
  step = json.load(open(os.path.join(export_dir, 'model.json')))['step']
  want = torch.nn.BatchNorm2d(2).state_dict()['num_batches_tracked']
  for sd in (load_file(os.path.join(export_dir, 'model.safetensors')),
             torch.load(os.path.join(export_dir, 'model.pt'), weights_only=True)):
    tracked = sd['bn1.num_batches_tracked']
    assert tracked.shape == want.shape == () and tracked.dtype == want.dtype == torch.int64
    assert int(tracked) == step
  sd = torch.load(os.path.join(export_dir, 'model.pt'), weights_only=True)
  sd = {k: torch.tensor(123) if k.endswith('num_batches_tracked') else v for k, v in sd.items()}
  torch.save(sd, tmp_path / 'counted.pt')
  info = export.export_checkpoint(_config_from_cli(), str(tmp_path / 'again'),
                                  str(tmp_path / 'counted.pt'))
  again = load_file(os.path.join(tmp_path, 'again', 'export', 'model.safetensors'))
  assert info['step'] is None and int(again['bn2.num_batches_tracked']) == 123


def test_imported_checkpoint_reproduces_the_results(trained, tmp_path):
  other = str(tmp_path / 'imported')
  config = _config_from_cli()
  results = runs.evaluate_checkpoint(config, other, os.path.join(trained, 'export', 'model.pt'))
  with open(os.path.join(trained, 'results.json')) as f:
    original = json.load(f)
  assert results['step'] is None and results['checkpoint'].endswith('model.pt')
  assert results['attacks'] == original['attacks']
  with pytest.raises(ConfigError, match='holds a trained run'):
    runs.evaluate_checkpoint(config, trained, os.path.join(trained, 'export', 'model.pt'))


def test_exported_model_is_a_torch_teacher(trained):
  config = _config_from_cli()
  ds = datasets.load(config.data)
  want = teacher_lib.load_teacher(trained, ds.num_classes, ds.image_shape, 'best')
  config.teacher.source = 'torch'
  config.teacher.path = os.path.join(trained, 'export', 'model.safetensors')  # model.json beside
  got = teacher_lib.prepare_teacher(config, trained, ds, run_stage=None)
  # Exact by construction: export and import copy arrays, and the logits come from one program.
  for a, b in zip(jax.tree_util.tree_leaves(want.variables), jax.tree_util.tree_leaves(got.variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(teacher_lib.precompute_logits(got, ds.test_images[:50]),
                                teacher_lib.precompute_logits(want, ds.test_images[:50]))


def test_torch_teacher_needs_its_architecture(tmp_path, tiny_config):
  path = tmp_path / 'teacher.pt'
  path.write_bytes(b'')
  tiny_config.method, tiny_config.teacher.source = 'rslad', 'torch'
  tiny_config.teacher.path = str(path)
  ds = datasets.load(tiny_config.data)
  with pytest.raises(ConfigError, match='teacher.model.name'):
    teacher_lib.prepare_teacher(tiny_config, str(tmp_path), ds, run_stage=None)


def test_autoattack_joins_the_results_table(trained):
  proc = run_cli(*CLI_TINY, f'--workdir={trained}', '--mode=autoattack')
  assert proc.returncode == 0, proc.stderr
  assert '| autoattack | 100 |' in proc.stdout
  with open(os.path.join(trained, 'results.json')) as f:
    results = json.load(f)
  aa, attacks = results['autoattack'], results['attacks']
  assert aa['attacks'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square'] and aa['version'] == 'standard'
  assert aa['num_examples'] == results['num_examples'] == 100
  assert aa['max_perturbation'] <= 0.2 + 1e-6 and aa['parity_rel_error'] < 1e-4
  assert aa['jax_agreement'] >= 0.95  # JAX classifies AA's adversarial images alike
  row = attacks['autoattack']
  counts = np.full(10, 10)  # the stratified 100-image subset holds 10 images per class
  assert row['avg'] == pytest.approx(float(np.dot(row['per_class'], counts)) / 100)
  assert row['worst'] == min(row['per_class'])
  # AutoAttack only removes images the clean model got right, and beats 5-step PGD.
  assert all(a <= c for a, c in zip(row['per_class'], attacks['clean']['per_class']))
  assert row['avg'] <= attacks['pgd20']['avg']
  assert os.path.exists(os.path.join(trained, 'export', 'model.pt'))


@pytest.mark.parametrize('scale,stops', [(1.0 + 3e-3, True), (1.0 + 3e-5, False)])
def test_autoattack_stops_when_pytorch_and_jax_logits_differ_by_more_than_1e_3(
    trained, tmp_path, monkeypatch, scale, stops):
  """A PyTorch model whose logits are off by a relative 3e-3 (the last layer scaled) stops the
  run before AutoAttack, with one line and nothing written; 3e-5 (float rounding's order) runs."""
  import shutil  # pylint: disable=g-import-not-at-top
  from ltd_jax import autoattack  # pylint: disable=g-import-not-at-top
  from ltd_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  real_load = autoattack.load_torch_model

  def off_by_scale(*args, **kwargs):
    model = real_load(*args, **kwargs)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
      last.weight.mul_(scale)
      last.bias.mul_(scale)
    return model

  class Ran(Exception):
    pass

  def must_not_run(*args, **kwargs):
    raise Ran()
  monkeypatch.setattr(autoattack, 'load_torch_model', off_by_scale)
  monkeypatch.setattr(autoattack, 'run_autoattack', must_not_run)
  before = {p: open(os.path.join(workdir, p), 'rb').read() for p in ('results.json', 'results.md')}
  with pytest.raises(CheckpointError if stops else Ran) as e:
    autoattack.autoattack_checkpoint(_config_from_cli(), workdir)
  if stops:
    msg = str(e.value)
    assert '\n' not in msg and 'relative logit error 3.0' in msg and '> 0.001' in msg, msg
    assert 'AutoAttack was not run' in msg
  after = {p: open(os.path.join(workdir, p), 'rb').read() for p in before}
  assert after == before
