"""The "Extending ltd_jax" examples, taken from docs/extending.md as written: a new method
(ALP) in one config file and a new dataset, each trained end to end from the command line."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from ltd_jax import config_lib
from ltd_jax import datasets
from ltd_jax import methods
from tests.conftest import ROOT, run_in_process

TINY = ['--config.num_epochs=1', '--config.model.width=4', '--config.attack.steps=2',
        '--config.eval.final_subset_size=60', '--config.eval.pgd_steps=2', '--config.eval.cw_steps=2',
        '--config.progress_bar=False']


def readme_examples() -> dict[str, str]:
  """{file name: code} of every ``<!-- example: NAME -->`` block of docs/extending.md."""
  text = open(os.path.join(ROOT, 'docs', 'extending.md')).read()
  return dict(re.findall(r'<!-- example: (\S+) -->\n```python\n(.*?)```', text, re.S))


@pytest.fixture
def example(tmp_path):
  """Writes an example of docs/extending.md to tmp_path and removes what it registers afterwards."""
  saved = dict(methods.METHODS), dict(datasets.REGISTRY)

  def write(name):
    path = tmp_path / os.path.basename(name)
    path.write_text(readme_examples()[name])
    return str(path)
  yield write
  for registry, old in zip((methods.METHODS, datasets.REGISTRY), saved):
    registry.clear()
    registry.update(old)


def test_the_extending_page_has_both_examples():
  assert set(readme_examples()) == {'configs/alp_digits.py', 'configs/trades_digits_inverted.py'}


def test_new_method_example_computes_alp_and_trains(example, tmp_path):
  path = example('configs/alp_digits.py')
  spec = importlib.util.spec_from_file_location('alp_example', path)
  module = importlib.util.module_from_spec(spec)
  os.chdir(ROOT)
  spec.loader.exec_module(module)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  x, x_adv = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 1])
  config = module.get_config()
  loss, aux = module.alp_loss(lambda z: z @ w, methods.MethodInputs(x, y, None), x_adv, config)
  za, zc = x_adv @ w, x @ w
  ce = -np.log(np.exp(za)[np.arange(5), y] / np.exp(za).sum(-1)).mean()
  np.testing.assert_allclose(loss, ce + 0.5 * ((zc - za) ** 2).sum(-1).mean(), rtol=1e-5)
  assert {'logits_clean', 'logits_adv'} <= set(aux)
  workdir = tmp_path / 'alp'
  assert run_in_process(f'--config={path}', f'--workdir={workdir}', *TINY) == 0
  results = json.load(open(workdir / 'results.json'))
  assert results['title'].startswith('alp / small_cnn / digits')
  assert json.load(open(workdir / 'config.json'))['alp'] == {'weight': 0.5}


def test_new_dataset_example_registers_and_trains(example, tmp_path):
  path = example('configs/trades_digits_inverted.py')
  workdir = tmp_path / 'inverted'
  assert run_in_process(f'--config={path}', f'--workdir={workdir}', '--config.data.val_size=100',
                        '--config.eval.selection_split=val', *TINY) == 0
  results = json.load(open(workdir / 'results.json'))
  assert results['title'].endswith('/ digits_inverted') and results['selection_split'] == 'val'
  data_config = config_lib.load_config_file(path).data
  data_config.val_size = 100
  ds = datasets.load(data_config)
  from ltd_jax import data  # pylint: disable=g-import-not-at-top
  plain = data.load_digits()
  np.testing.assert_array_equal(ds.test_images, 255 - plain.test_images)
  assert ds.num_classes == 10 and len(ds.split('val')[1]) == 100
