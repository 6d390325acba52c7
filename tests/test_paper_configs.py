"""Every paper-scale distillation config starts and runs a step on the real CIFAR subsets, with its
real student architecture and a small stand-in teacher (the teacher configs run in test_configs)."""

import json
import os

import pytest

from ltd_jax import config_lib
from ltd_jax import train
from tests.conftest import ROOT, shared_path


def _data_dir(name):
  folder = {'cifar10': ('cifar-10-subset', 'cifar-10-batches-py'),
            'cifar100': ('cifar-100-subset', 'cifar-100-python')}[name]
  return os.path.dirname(shared_path('data', *folder))


@pytest.fixture(scope='module')
def stand_in_teachers(tmp_path_factory):
  teachers = {}
  for name in ('cifar10', 'cifar100'):
    c = config_lib.default_config()
    c.method, c.data.name, c.data.dir = 'natural', name, _data_dir(name)
    c.model.name, c.model.width = 'small_cnn', 4
    c.batch_size, c.max_steps = 16, 2
    c.eval.selection, c.eval.final, c.eval.final_subset_size = 'last', ('clean',), 20
    c.progress_bar = False
    workdir = str(tmp_path_factory.mktemp(f'teacher_{name}'))
    train.train_and_evaluate(c, workdir)
    teachers[name] = workdir
  return teachers


@pytest.mark.parametrize('name,method,model,epochs', [
    ('absld_cifar10', 'absld', 'resnet18', 300),
    ('absld_cifar10_mobilenetv2', 'absld', 'mobilenetv2', 300),
    ('absld_cifar100', 'absld', 'resnet18', 300),
    ('rslad_cifar10', 'rslad', 'resnet18', 300),
    # ltd_awp_cifar10 derives from ltd_trades_cifar10 and runs the same WRN-34-10 LTD step plus
    # AWP: the TRADES-based one is slow, for the suite's time on 2 cores.
    pytest.param('ltd_trades_cifar10', 'ltd', 'wrn-34-10', 120, marks=pytest.mark.slow),
    ('ltd_awp_cifar10', 'ltd', 'wrn-34-10', 120),
    pytest.param('ltd_awp_cifar10_wrn34_20', 'ltd', 'wrn-34-20', 120, marks=pytest.mark.slow),
    pytest.param('ltd_awp_cifar100', 'ltd', 'wrn-34-10', 120, marks=pytest.mark.slow),
])
def test_paper_distillation_config_runs_a_step(name, method, model, epochs, stand_in_teachers,
                                                tmp_path):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert (config.method, config.model.name, config.num_epochs) == (method, model, epochs)
  assert config.teacher.source == 'train' and os.path.exists(os.path.join(ROOT, config.teacher.config))
  config.data.dir = _data_dir(config.data.name)
  config.teacher.source, config.teacher.path = 'workdir', stand_in_teachers[config.data.name]
  config.batch_size, config.max_steps, config.attack.steps = 2, 1, 1
  config.awp.warmup_epochs = 0  # exercise the weight perturbation in the one step
  config.eval.final, config.eval.final_subset_size, config.eval.batch_size = ('clean',), 4, 4
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  record = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"train"' in l][0]
  assert record['loss'] == record['loss'] and record['loss'] > 0
