"""Every config loads and validates; the paper-scale configs start and run a few steps on real CIFAR."""

import glob
import json
import os

import pytest

from ltd_jax import config_lib
from ltd_jax import train
from tests.conftest import ROOT, shared_path

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
CONFIGS = [c for c in CONFIGS if not c.endswith('__init__.py')]


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_validates(path):
  config = config_lib.load_config_file(path)
  config_lib.validate(config)
  assert set(config_lib._flat_keys(config)) == set(config_lib._flat_keys(config_lib.default_config()))


@pytest.mark.parametrize('name,model,epochs', [
    # Slow, for the suite's time on 2 cores: the WRN-34-10 TRADES-family step runs by default in
    # test_paper_configs (ltd_awp_cifar10), and the parity suite checks the TRADES step itself.
    pytest.param('trades_cifar10', 'wrn-34-10', 76, marks=pytest.mark.slow),
    pytest.param('pgd_at_cifar10', 'wrn-34-10', 200, marks=pytest.mark.slow),
    pytest.param('natural_cifar10', 'wrn-34-10', 200, marks=pytest.mark.slow),
    pytest.param('trades_cifar100', 'wrn-34-10', 76, marks=pytest.mark.slow),
    pytest.param('natural_cifar100', 'wrn-34-10', 200, marks=pytest.mark.slow),
])
def test_paper_config_runs_a_few_steps_on_the_cifar_subset(name, model, epochs, tmp_path):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert config.model.name == model and config.num_epochs == epochs
  folder = ('cifar-10-subset', 'cifar-10-batches-py') if config.data.name == 'cifar10' else (
      'cifar-100-subset', 'cifar-100-python')
  config.data.dir = os.path.dirname(shared_path('data', *folder))
  config.batch_size = 4
  config.max_steps = 2
  config.attack.steps = 2
  config.eval.final = ('clean',)
  config.eval.final_subset_size = 10
  config.eval.batch_size = 10
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert all(r['loss'] == r['loss'] for r in records if r['kind'] == 'train')  # finite, not NaN
  assert json.load(open(tmp_path / 'results.json'))['num_examples'] == 10
