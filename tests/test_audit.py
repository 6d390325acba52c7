"""The gradient-masking audit tells a masked model (logits scaled by 10^4, as defensive
distillation at a high temperature does) from a robust one (TRADES), through the command line.
The Square attack it relies on is tested in test_attacks.py."""

import json
import os

import jax
import pytest

from ltd_jax import audit
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import train
from tests.conftest import make_tiny_config, run_in_process


def _audited_config(method, epochs):
  c = make_tiny_config()
  c.method, c.num_epochs, c.batch_size = method, epochs, 128
  c.model.width = 8
  c.optim.lr_boundaries_epochs = (epochs - 1,)
  c.eval.final, c.eval.pgd_steps, c.eval.alpha = ('clean', 'pgd20'), 10, 0.05
  c.audit.n_examples, c.audit.pgd_steps, c.audit.restarts = 200, 50, 3
  c.audit.square_queries = 300
  return c


@pytest.fixture(scope='module')
def natural(tmp_path_factory):
  config = _audited_config('natural', 3)
  return config, train.train_and_evaluate(config, str(tmp_path_factory.mktemp('natural')))


def _audit(config, state, logit_scale):
  ds = datasets.load(config.data)
  images, labels = ds.split('test')
  subset = evaluate.stratified_subset(labels, config.audit.n_examples, config.seed)
  apply_fn = lambda v, x, train=False: logit_scale * state.apply_fn(v, x, train=train)
  return audit.audit_model(apply_fn, state.variables, images[subset], labels[subset], 10, config,
                           jax.random.PRNGKey(3))


def test_masked_model_is_flagged_and_the_same_model_unscaled_is_not(natural):
  config, state = natural
  plain = _audit(config, state, 1.0)
  assert plain['passed'], plain['checks']  # not robust, but its gradients work
  masked = _audit(config, state, 1e4)
  verdicts = {c['check']: c['passed'] for c in masked['checks']}
  assert not masked['passed'] and masked['verdict'].startswith('gradient masking suspected')
  assert not verdicts['black box (Square) does not beat white box (PGD)']
  assert not verdicts['about 0 at a large eps (0.5)']
  assert 'overstate its robustness' in audit.audit_markdown(masked)
  assert 'overstate' not in audit.audit_markdown(plain)
  acc = {n: r['avg'] for n, r in masked['attacks'].items()}
  # The scale changes no prediction: clean and black-box accuracy are the plain model's.
  assert acc['clean'] == plain['attacks']['clean']['avg']
  assert acc['pgd10@1eps'] > acc['square'] + 0.3


def test_trades_model_passes_the_audit_from_the_command_line(tmp_path):
  config = _audited_config('trades', 6)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  overrides = {'method': 'trades', 'num_epochs': 6, 'batch_size': 128, 'model.width': 8,
               'eps': 0.2, 'data.name': 'digits', 'model.name': 'small_cnn',
               'eval.pgd_steps': 10, 'eval.alpha': 0.05, 'audit.n_examples': 200,
               'audit.pgd_steps': 50, 'audit.restarts': 3, 'audit.square_queries': 300,
               'optim.lr_boundaries_epochs': '(5,)', 'eval.final': '("clean","pgd20")'}
  code = run_in_process('--config=configs/trades_digits.py', '--mode=audit',
                        f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()])
  record = json.load(open(os.path.join(workdir, 'audit.json')))
  assert code == 0, record['checks']
  assert record['passed'] and all(c['passed'] for c in record['checks'])
  assert record['checkpoint'] == 'best' and len(record['checks']) == 6
  acc = {n: r['avg'] for n, r in record['attacks'].items()}
  assert acc['clean'] > acc['pgd10@1eps'] > 0.05  # robust to a degree, and attacked for real
  report = open(os.path.join(workdir, 'report.md')).read()
  assert 'Status: finished' in report and 'passed: no sign of gradient masking' in report
  for needle in ('| pgd20 |', '## Gradient-masking audit', '## Environment', 'git commit',
                 '"method": "trades"'):
    assert needle in report, needle
  assert '![' not in report  # the test config draws no plots, and the report links none


def test_each_masking_check_fails_on_made_up_accuracies_that_show_its_sign():
  """The verdict logic alone: a healthy set of accuracies passes all six checks, and each
  check, and only it, fails when the accuracies show its sign of masking (tolerance 2 points)."""
  from ltd_jax import audit as audit_lib  # pylint: disable=g-import-not-at-top
  from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  config.eps = 0.1
  specs = audit_lib.audit_attacks(config)
  healthy = {'clean': 0.90, 'pgd20@0.25eps': 0.80, 'pgd20@0.5eps': 0.70, 'pgd20@1eps': 0.50,
             'pgd20@2eps': 0.20, 'pgd20@4eps': 0.05, 'fgsm': 0.60, 'pgd_strong': 0.49,
             'square': 0.55, 'pgd_large_eps': 0.0}
  assert set(healthy) == set(specs)
  names = [c['check'] for c in audit_lib.gradient_masking_checks(healthy, specs, config)]
  assert all(c['passed'] for c in audit_lib.gradient_masking_checks(healthy, specs, config))
  signs = {  # check index -> accuracies that show it (each just past the 2-point tolerance)
      0: {'pgd20@2eps': 0.53},                      # accuracy rises with eps
      1: {'pgd_large_eps': 0.06},                   # not about 0 at a large eps
      2: {'pgd_strong': 0.521},                     # restarts raise accuracy
      3: {'fgsm': 0.479},                           # FGSM beats PGD
      4: {'square': 0.469},                         # the black box beats the white box
      5: {'fgsm': 0.91},                            # an attack above clean
  }
  for index, change in signs.items():
    checks = audit_lib.gradient_masking_checks({**healthy, **change}, specs, config)
    failed = [c['check'] for c in checks if not c['passed']]
    assert failed == [names[index]], (change, failed)
  # Within the tolerance it is sampling noise, not masking (except the last check).
  for change in ({'pgd20@2eps': 0.51}, {'pgd_strong': 0.519}, {'fgsm': 0.481},
                 {'square': 0.471}):
    assert all(c['passed'] for c in audit_lib.gradient_masking_checks({**healthy, **change},
                                                                      specs, config)), change
