"""Teachers: the teacher stage runs once and is skipped when complete; workdir teachers; the cache."""

import json
import os

import jax
import numpy as np
import pytest

from ltd_jax import data
from ltd_jax import runs
from ltd_jax import teacher as teacher_lib
from ltd_jax import train
from ltd_jax.errors import ConfigError, CheckpointError

TEACHER_CONFIG = '''
from ltd_jax import config_lib

def get_config():
  c = config_lib.default_config()
  c.method, c.eps = 'natural', 0.2
  c.data.name = 'digits'
  c.model.name, c.model.width = 'small_cnn', 6
  c.num_epochs, c.batch_size = 2, 64
  c.optim.lr, c.optim.lr_boundaries_epochs = 0.05, ()
  c.eval.selection, c.eval.during_training, c.eval.final = 'last', ('clean',), ('clean',)
  c.progress_bar = False
  return c
'''


@pytest.fixture
def ltd_config(tiny_config, tmp_path):
  path = tmp_path / 'teacher_config.py'
  path.write_text(TEACHER_CONFIG)
  tiny_config.method = 'ltd'
  tiny_config.teacher.source, tiny_config.teacher.config = 'train', str(path)
  tiny_config.num_epochs = 1
  return tiny_config


def test_teacher_stage_runs_first_and_is_skipped_when_complete(ltd_config, tmp_path):
  workdir = tmp_path / 'run'
  ltd_config.report.plots = True
  train.train_and_evaluate(ltd_config, str(workdir))
  teacher_cfg = json.load(open(workdir / 'teacher' / 'config.json'))
  assert teacher_cfg['method'] == 'natural' and teacher_cfg['model']['width'] == 6
  assert json.load(open(workdir / 'results.json'))['title'].startswith('ltd')
  assert runs.comparison_runs(ltd_config, str(workdir))['teacher']['title'].startswith('natural')
  assert os.path.exists(workdir / 'per_class_accuracy.png')
  stamp = os.path.getmtime(workdir / 'teacher' / 'results.json')
  ltd_config.num_epochs = 2  # the student goes on; the finished teacher stage is not rerun
  train.train_and_evaluate(ltd_config, str(workdir))
  assert os.path.getmtime(workdir / 'teacher' / 'results.json') == stamp
  assert json.load(open(workdir / 'results.json'))['trained_steps'] == 10


def test_teacher_stage_killed_mid_run_resumes_and_the_student_ends_undisturbed(
    ltd_config, tmp_path, monkeypatch):
  """Killed at step 30 of the teacher's 44 (mid epoch 2, after its epoch-1 checkpoint): the
  rerun resumes the teacher from its checkpoint, finishes it, and trains a student bit-identical
  to that of a run never interrupted."""
  undisturbed = train.train_and_evaluate(ltd_config, str(tmp_path / 'undisturbed'))
  run_stage = train.train_and_evaluate

  class Killed(Exception):
    pass

  def kill_at_30(step):
    if step == 30:
      raise Killed()

  def teacher_killed(config, workdir, step_hook=None):
    return run_stage(config, workdir, step_hook=kill_at_30 if workdir.endswith('teacher') else step_hook)
  monkeypatch.setattr(train, 'train_and_evaluate', teacher_killed)
  with pytest.raises(Killed):
    run_stage(ltd_config, str(tmp_path / 'run'))
  monkeypatch.undo()
  assert not os.path.exists(tmp_path / 'run' / 'teacher' / 'results.json')
  assert not os.path.exists(tmp_path / 'run' / 'results.json')
  resumed = train.train_and_evaluate(ltd_config, str(tmp_path / 'run'))
  teacher_records = [json.loads(l) for l in open(tmp_path / 'run' / 'teacher' / 'metrics.jsonl')]
  # Resumed, not restarted: epoch 1 (steps 1-22) was trained and evaluated once.
  assert [r['step'] for r in teacher_records if r['kind'] == 'eval'] == [22, 44]
  train_steps = [r['step'] for r in teacher_records if r['kind'] == 'train']
  assert len(train_steps) == len(set(train_steps)) and train_steps[0] <= 22
  # Exact by construction: both runs execute the same compiled step program (same HLO, so the
  # same executable; the compilation cache hands the resumed run the very same one) on
  # the same state and batches, and checkpoints restore every bit.
  for a, b in zip(jax.tree_util.tree_leaves((undisturbed.params, undisturbed.batch_stats)),
                  jax.tree_util.tree_leaves((resumed.params, resumed.batch_stats))):
    np.testing.assert_array_equal(a, b)
  for name in ('undisturbed', 'run'):
    assert teacher_lib.load_teacher(str(tmp_path / name / 'teacher'), 10, (8, 8, 1)).step == 44


def test_teacher_from_a_workdir_is_frozen_in_eval_mode(ltd_config, tmp_path):
  train.train_and_evaluate(ltd_config, str(tmp_path / 'run'))
  ds = data.load_digits()
  t = teacher_lib.load_teacher(str(tmp_path / 'run' / 'teacher'), 10, ds.image_shape)
  assert t.step == 44 and t.config.model.width == 6
  x = ds.train_images[:32]
  a = t.apply_fn(t.variables, data.to_float(x), train=False)
  logits = teacher_lib.precompute_logits(t, ds.train_images, batch_size=100)
  np.testing.assert_allclose(logits[:32], a, rtol=1e-5, atol=1e-5)


def test_cached_soft_labels_give_the_same_training(ltd_config, tmp_path):
  ltd_config.data.augment = 'none'
  train.train_and_evaluate(ltd_config, str(tmp_path / 'a'))
  ltd_config.teacher.source, ltd_config.teacher.path = 'workdir', str(tmp_path / 'a' / 'teacher')
  ltd_config.teacher.cache_logits = True
  b = train.train_and_evaluate(ltd_config, str(tmp_path / 'b'))
  ltd_config.teacher.cache_logits = False
  c = train.train_and_evaluate(ltd_config, str(tmp_path / 'c'))
  for x, y in zip(jax.tree_util.tree_leaves(b.params), jax.tree_util.tree_leaves(c.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_teacher_errors(tiny_config, tmp_path):
  tiny_config.method = 'rslad'
  with pytest.raises(ConfigError, match='distils from a teacher'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'x'))
  tiny_config.teacher.source, tiny_config.teacher.path = 'workdir', str(tmp_path / 'missing')
  with pytest.raises(CheckpointError, match='has no config.json'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'y'))
  tiny_config.teacher.source, tiny_config.teacher.config = 'train', 'configs/nope.py'
  with pytest.raises(ConfigError, match='configs/nope.py not found'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'z'))
  tiny_config.teacher.source = 'workdir'
  tiny_config.data.augment = 'crop_flip'
  tiny_config.teacher.cache_logits = True
  with pytest.raises(ConfigError, match='augment=none'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'w'))


def test_temperature_search_two_steps(ltd_config, tmp_path):
  from ltd_jax import temperature_search
  ltd_config.ltd.search_temperatures = (1.0, 4.0, 1000.0)
  ltd_config.ltd.search_accuracy_threshold = 0.35
  ltd_config.ltd.search_epochs = 3
  ltd_config.model.width, ltd_config.batch_size, ltd_config.optim.lr = 8, 128, 0.1
  ltd_config.eval.pgd_steps, ltd_config.attack.steps = 1, 1
  table = temperature_search.ltd_temperature_search(ltd_config, str(tmp_path), train.train_and_evaluate)
  step1 = [r for r in table['rows'] if r['step'] == 1]
  step2 = [r for r in table['rows'] if r['step'] == 2]
  assert step1[0]['T'] == 1.0 and step1[0]['substitute_natural_acc'] > 0.35 and step2
  # Step 1 walks up the temperatures until a substitute falls below the threshold.
  assert all(r['substitute_natural_acc'] >= 0.35 for r in step1[:-1])
  if table['t_max'] is not None:
    assert step1[-1]['substitute_natural_acc'] < 0.35 and step1[-1]['T'] == table['t_max']
  assert [r['T'] for r in step2] == [t for t in (1.0, 4.0, 1000.0)
                                     if table['t_max'] is None or t < table['t_max']]
  assert table['best_T'] == min(step2, key=lambda r: r['ltd_loss'])['T']
  md = open(tmp_path / 'temperature_search.md').read()
  assert '| T | step |' in md and os.path.exists(tmp_path / 'search' / 'substitute_T1')


def test_temperature_search_picks_by_the_kl_form_of_the_objective(tiny_config, tmp_path,
                                                                 monkeypatch):
  """A scripted run function: substitutes whose natural accuracy falls below the threshold from
  T = 8 (T_max = 8), and LTD runs whose raw loss favours T = 1 only through the soft labels'
  entropy; the KL-form objective (loss - H) favours T = 3."""
  from ltd_jax import temperature_search  # pylint: disable=g-import-not-at-top
  from ltd_jax import reports  # pylint: disable=g-import-not-at-top
  substitute_acc = {1.0: 0.9, 3.0: 0.85, 5.0: 0.7, 8.0: 0.3, 10.0: 0.2}
  entropy = {1.0: 0.2, 3.0: 0.9, 5.0: 1.5}  # grows with T
  kl_objective = {1.0: 0.60, 3.0: 0.40, 5.0: 0.55}
  calls = []

  def run(config, workdir):
    calls.append((config.method, config.ltd.teacher_temperature))
    os.makedirs(workdir, exist_ok=True)
    t = config.ltd.teacher_temperature
    if config.method == 'soft_label_natural':
      attacks = {'clean': {'avg': substitute_acc[t], 'worst': 0.0}}
    else:
      attacks = {'clean': {'avg': 0.8, 'worst': 0.5}, 'pgd20': {'avg': 0.4, 'worst': 0.1}}
      writer = reports.MetricWriter(workdir)
      for step, epoch in ((1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)):
        late = epoch > 1  # only the last epoch counts: the first is made worse on purpose
        writer.write('train', step, epoch=epoch, teacher_entropy=entropy[t],
                     loss=kl_objective[t] + entropy[t] + (0 if late else 5))
    reports.write_json(os.path.join(workdir, 'results.json'), {'attacks': attacks})

  tiny_config.method = 'ltd'
  tiny_config.teacher.source, tiny_config.teacher.path = 'workdir', str(tmp_path / 'teacher')
  tiny_config.ltd.search_temperatures = (10.0, 1.0, 3.0, 5.0, 8.0)
  tiny_config.ltd.search_accuracy_threshold = 0.5
  teacher_stub = type('T', (), {'workdir': str(tmp_path / 'teacher')})()
  monkeypatch.setattr(temperature_search.teacher_lib, 'prepare_teacher',
                      lambda *a, **k: teacher_stub)
  table = temperature_search.ltd_temperature_search(tiny_config, str(tmp_path), run)
  assert table['t_max'] == 8.0 and table['best_T'] == 3.0
  assert calls == [('soft_label_natural', t) for t in (1.0, 3.0, 5.0, 8.0)] + [
      ('ltd', t) for t in (1.0, 3.0, 5.0)]
  objective = {r['T']: r['ltd_loss'] for r in table['rows'] if r['step'] == 2}
  assert objective == pytest.approx(kl_objective)
