"""Teachers: the teacher stage runs once and is skipped when complete; workdir teachers; the cache."""

import json
import os

import jax
import numpy as np
import pytest

from ltd_jax import data
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
  c.num_epochs, c.batch_size = 2, 256
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
  train.train_and_evaluate(ltd_config, str(workdir))
  teacher_cfg = json.load(open(workdir / 'teacher' / 'config.json'))
  assert teacher_cfg['method'] == 'natural' and teacher_cfg['model']['width'] == 6
  assert json.load(open(workdir / 'results.json'))['title'].startswith('ltd')
  stamp = os.path.getmtime(workdir / 'teacher' / 'results.json')
  ltd_config.num_epochs = 2  # the student goes on; the finished teacher stage is not rerun
  train.train_and_evaluate(ltd_config, str(workdir))
  assert os.path.getmtime(workdir / 'teacher' / 'results.json') == stamp
  assert json.load(open(workdir / 'results.json'))['trained_steps'] == 10


def test_teacher_from_a_workdir_is_frozen_in_eval_mode(ltd_config, tmp_path):
  train.train_and_evaluate(ltd_config, str(tmp_path / 'run'))
  ds = data.load_digits()
  t = teacher_lib.load_teacher(str(tmp_path / 'run' / 'teacher'), 10, ds.image_shape)
  assert t.step == 10 and t.config.model.width == 6
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
