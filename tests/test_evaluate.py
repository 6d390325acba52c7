"""Evaluation summaries against hand computation; padding and subsets."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ltd_jax import evaluate


def test_summary_matches_hand_computation():
  """Ten predictions over four unbalanced classes: the average over images (6/10) is not the
  mean of the class accuracies (3/4, 1/2, 2/3, 0)."""
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
  correct = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 0], bool)
  class_acc = evaluate.per_class_accuracy(correct, labels, 4)
  np.testing.assert_allclose(class_acc, [0.75, 0.5, 2 / 3, 0.0])
  s = evaluate.summarize(class_acc, correct.mean())
  mean = (0.75 + 0.5 + 2 / 3 + 0.0) / 4
  assert s['avg'] == pytest.approx(0.6)
  assert s['class_mean'] == pytest.approx(mean)
  assert s['worst'] == 0.0 and s['worst10'] == 0.0  # ceil(10% of 4) = 1 class
  std = np.sqrt(((0.75 - mean) ** 2 + (0.5 - mean) ** 2 + (2 / 3 - mean) ** 2 + mean ** 2) / 4)
  assert s['nsd'] == pytest.approx(std / mean)


def test_worst_ten_percent_of_a_hundred_classes():
  acc = np.linspace(0.0, 0.99, 100)
  assert evaluate.summarize(acc)['worst10'] == pytest.approx(np.mean(acc[:10]))


def test_per_class_accuracy_counts_each_class():
  labels = np.array([0, 0, 1, 1, 1, 2])
  correct = np.array([1, 0, 1, 1, 0, 1], bool)
  np.testing.assert_allclose(evaluate.per_class_accuracy(correct, labels, 4)[:3], [0.5, 2 / 3, 1.0])
  assert np.isnan(evaluate.per_class_accuracy(correct, labels, 4)[3])


def test_selection_scores():
  r = {'pgd20': {'avg': 0.5, 'worst': 0.2}}
  assert evaluate.selection_score(r, 'robust') == 0.5
  assert evaluate.selection_score(r, 'fair') == pytest.approx(0.7)
  with pytest.raises(ValueError, match="unknown selection 'best'"):
    evaluate.selection_score(r, 'best')


def test_stratified_subset_is_balanced_and_fixed():
  labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140]).astype(np.int32)
  idx = evaluate.stratified_subset(labels, 200, seed=0)
  assert len(idx) == 200 and len(np.unique(idx)) == 200
  assert set(np.bincount(labels[idx])) == {20}
  np.testing.assert_array_equal(idx, evaluate.stratified_subset(labels, 200, seed=0))
  assert len(evaluate.stratified_subset(labels, 0, seed=0)) == len(labels)
  assert len(evaluate.stratified_subset(labels, 1, seed=0)) == 1
  np.testing.assert_array_equal(evaluate.stratified_subset(labels, len(labels), seed=3),
                                np.arange(len(labels)))  # all of it, in order


def test_padded_last_batch_gives_the_same_result_as_one_batch():
  w = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  apply_fn = lambda variables, x, train=False: x.reshape(x.shape[0], -1) @ variables['w']
  cfg = ml_collections.ConfigDict({'alpha': 0.05, 'pgd_steps': 3, 'cw_steps': 3, 'cw_kappa': 50.,
                                   'unroll': False})
  step = evaluate.make_eval_step(apply_fn, ('clean', 'fgsm'), eps=0.1, eval_config=cfg)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(23, 2, 2, 3)).astype(np.uint8)
  labels = rng.integers(0, 3, size=23).astype(np.int32)
  one = evaluate.evaluate(step, {'w': w}, images, labels, 3, 23, jax.random.PRNGKey(0))
  padded = evaluate.evaluate(step, {'w': w}, images, labels, 3, 10, jax.random.PRNGKey(0))
  assert one == padded
  logits = images.reshape(23, -1).astype(np.float32) / 255 @ w
  assert one['clean']['avg'] == pytest.approx(np.mean(logits.argmax(1) == labels))


class ProcessShareStep:
  """An eval step as one of ``processes`` processes sees it: the first 1/processes of each
  batch's rows (the other process holds the rest); correct = (label + attack index) is even."""
  attack_names = ('pgd20', 'clean', 'fgsm')  # not alphabetical: results keep this order

  def __init__(self, processes):
    self.processes = processes

  def __call__(self, variables, x, y, rng):
    local = np.asarray(y)[:len(y) // self.processes]
    return {name: (local + i) % 2 == 0 for i, name in enumerate(self.attack_names)}


@pytest.mark.parametrize('processes', [1, 2])
def test_several_processes_gather_each_batch_tiled_and_one_process_does_not(processes,
                                                                            monkeypatch):
  """With more than one process every batch's per-example results are gathered
  (process_allgather(out, tiled=True): the processes' rows end to end) before the accuracies;
  one process never gathers. The summaries are checked by hand."""
  labels = np.array([0, 1, 2, 3, 0, 2, 1, 1, 2, 0, 3, 2], np.int32)
  images = np.zeros((len(labels), 1, 1, 1), np.uint8)
  calls = []

  def allgather(out, tiled=False):
    calls.append(tiled)
    assert tiled is True, "the processes' rows must be concatenated, not stacked"
    other = labels[len(calls) * 4 - 2:len(calls) * 4]  # the other process's half of this batch
    return {name: np.concatenate([c, (other + i) % 2 == 0])
            for i, (name, c) in enumerate(out.items())}

  monkeypatch.setattr(evaluate.jax, 'process_count', lambda: processes)
  monkeypatch.setattr(evaluate.multihost_utils, 'process_allgather', allgather)
  step = ProcessShareStep(processes)
  results = evaluate.evaluate(step, {}, images, labels, 4, 4, jax.random.PRNGKey(0))
  assert calls == ([True] * 3 if processes == 2 else [])
  assert list(results) == ['pgd20', 'clean', 'fgsm']
  for i, name in enumerate(step.attack_names):
    correct = (labels + i) % 2 == 0  # even classes all right (i even) or all wrong (i odd)
    assert results[name]['per_class'] == [float((c + i) % 2 == 0) for c in range(4)]
    assert results[name]['avg'] == pytest.approx(correct.mean())  # 7/12 or 5/12, not 1/2
    assert results[name]['class_mean'] == pytest.approx(0.5)
    assert results[name]['worst'] == 0.0 and results[name]['worst10'] == 0.0
    assert results[name]['nsd'] == pytest.approx(1.0)  # std 0.5 over mean 0.5


def test_unrolled_evaluation_attacks_equal_the_looped_ones():
  """eval.unroll only changes how the program is written: same rng, same adversarial images."""
  rng = np.random.default_rng(2)
  w = rng.normal(size=(12, 3)).astype(np.float32)
  apply_fn = lambda variables, x, train=False: jnp.tanh(x.reshape(x.shape[0], -1) @ variables['w'])
  images = rng.integers(0, 256, size=(64, 2, 2, 3)).astype(np.uint8)
  labels = rng.integers(0, 3, size=64).astype(np.int32)
  out, loops = {}, {}
  for unroll in (False, True):
    cfg = ml_collections.ConfigDict({'alpha': 0.02, 'pgd_steps': 5, 'cw_steps': 4,
                                     'cw_kappa': 50., 'unroll': unroll})
    step = evaluate.make_eval_step(apply_fn, ('clean', 'pgd20', 'cw'), eps=0.1, eval_config=cfg)
    out[unroll] = jax.device_get(step({'w': w}, images, labels, jax.random.PRNGKey(3)))
    program = step.lower({'w': w}, images, labels, jax.random.PRNGKey(3)).as_text()
    loops[unroll] = program.count('stablehlo.while')
  assert loops[False] == loops[True] + 2  # PGD's and CW's loops gone (the rest: threefry)
  # The two are different programs, which XLA may round differently: an example whose gradient
  # has a component within rounding of 0 at some step can end either way, so one example per
  # attack may differ; a wrong unrolling changes most of the 64.
  for name in ('clean', 'pgd20', 'cw'):
    assert np.sum(out[False][name] != out[True][name]) <= (0 if name == 'clean' else 1), name
  assert out[True]['pgd20'].sum() < out[True]['clean'].sum()  # the attacks did something


def test_evaluation_loops_follow_the_default_of_the_platform_they_are_built_for(monkeypatch):
  """With eval.unroll unset the PGD and CW loops take the default of the ``platform`` the step
  is built for (a deviceless GPU compile on a CPU host asks for 'gpu'), not of the host."""
  from ltd_jax import attacks  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(attacks.UNROLL_DEFAULTS, 'eval', {'cpu': False, 'gpu': True})
  w = np.random.default_rng(4).normal(size=(12, 3)).astype(np.float32)
  apply_fn = lambda variables, x, train=False: x.reshape(x.shape[0], -1) @ variables['w']
  images = np.zeros((4, 2, 2, 3), np.uint8)
  labels = np.zeros(4, np.int32)
  cfg = ml_collections.ConfigDict({'alpha': 0.02, 'pgd_steps': 3, 'cw_steps': 3,
                                   'cw_kappa': 50., 'unroll': None})
  loops = {}
  for platform in ('cpu', 'gpu', None):  # None: JAX's default backend, the CPU here
    step = evaluate.make_eval_step(apply_fn, ('pgd20', 'cw'), eps=0.1, eval_config=cfg,
                                   platform=platform)
    program = step.lower({'w': w}, images, labels, jax.random.PRNGKey(0)).as_text()
    loops[platform] = program.count('stablehlo.while')
  assert loops['cpu'] == loops[None] == loops['gpu'] + 2


def test_cw_evaluation_uses_the_configured_confidence():
  """eval.cw_kappa reaches the CW objective: with kappa 0 an example already misclassified has
  no gradient and stays where it is; with the default 50 the attack goes on moving it."""
  from ltd_jax import attacks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  w = rng.normal(size=(12, 3)).astype(np.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jnp.asarray(rng.uniform(size=(32, 2, 2, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 3, size=32).astype(np.int32))
  key = jax.random.PRNGKey(1)
  adv = {}
  for kappa in (0.0, 50.0):
    cfg = ml_collections.ConfigDict({'alpha': 0.02, 'pgd_steps': 3, 'cw_steps': 4,
                                     'cw_kappa': kappa, 'unroll': False})
    adv[kappa] = np.asarray(evaluate.attack_images('cw', logits_fn, x, y, key, eps=0.1,
                                                   eval_config=cfg))
    want = attacks.pgd_attack(attacks.cw_objective(logits_fn, y, kappa), x, key, eps=0.1,
                              alpha=0.02, steps=4, init='uniform')
    np.testing.assert_array_equal(adv[kappa], np.asarray(want))
  moved = np.abs(adv[0.0] - adv[50.0]).reshape(32, -1).max(axis=1) > 0
  assert 0 < moved.sum() < 32  # the examples misclassified on the way, and only those


def test_an_unknown_evaluation_attack_is_named_in_the_error():
  cfg = ml_collections.ConfigDict({'alpha': 0.02, 'pgd_steps': 3, 'cw_steps': 3,
                                   'cw_kappa': 50., 'unroll': False})
  with pytest.raises(ValueError, match="unknown evaluation attack 'pgd100'"):
    evaluate.attack_images('pgd100', lambda x: x, jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32),
                           jax.random.PRNGKey(0), eps=0.1, eval_config=cfg)


def test_evaluation_schedule_of_the_paper_configs_is_the_released_scripts():
  """resnet18_absld_cifar10.py evaluates after epoch e when (e % 10 == 0 and e < 215) or
  e >= 215; absld_cifar10.py and rslad_cifar10.py (selected the same way) do the same, on the
  whole test set, selecting 'fair'."""
  from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  released = [e for e in range(1, 301) if (e % 10 == 0 and e < 215) or e >= 215]
  for name in ('absld_cifar10', 'rslad_cifar10', 'absld_cifar100'):
    c = config_lib.load_config_file(f'{ROOT}/configs/{name}.py')
    assert [e for e in range(1, 301) if evaluate.is_evaluation_epoch(e, c.eval)] == released
    assert (c.eval.selection, c.eval.subset_size, c.eval.selection_split) == ('fair', 0, 'test')
  default = config_lib.default_config().eval
  default.every_epochs = 3
  assert [e for e in range(1, 10) if evaluate.is_evaluation_epoch(e, default)] == [3, 6, 9]


def test_fair_selection_takes_the_worst_tenth_at_100_classes():
  def results(per_class):
    class_acc = np.asarray(per_class)
    return {'pgd20': {'per_class': per_class, **evaluate.summarize(class_acc)}}
  ten = results([0.5] * 9 + [0.1])
  assert evaluate.selection_score(ten, 'fair') == pytest.approx(0.46 + 0.1)
  hundred = results([0.5] * 90 + [0.1] * 5 + [0.3] * 5)
  # worst 10% = mean of the 10 lowest = (5 x 0.1 + 5 x 0.3) / 10 = 0.2; worst class 0.1
  assert evaluate.selection_score(hundred, 'fair') == pytest.approx(0.47 + 0.2)
  assert evaluate.selection_score(hundred, 'robust') == pytest.approx(0.47)


def test_per_class_plot_draws_the_teacher_and_report_baseline_workdir(tmp_path, monkeypatch):
  """README: per_class_accuracy.png puts the run beside its teacher and beside
  --config.report.baseline_workdir=DIR: the bars drawn are each run's per-class accuracies."""
  import json  # pylint: disable=g-import-not-at-top
  import matplotlib.axes  # pylint: disable=g-import-not-at-top
  from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
  from ltd_jax import reports  # pylint: disable=g-import-not-at-top
  from ltd_jax import runs  # pylint: disable=g-import-not-at-top

  def results(offset):
    return {'attacks': {a: {'per_class': [offset + 0.1 * k + (a == 'pgd20') * 0.01 for k in range(3)]}
                        for a in ('clean', 'pgd20')}}
  for name, offset in (('teacher', 0.3), ('baseline', 0.1)):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'results.json').write_text(json.dumps(results(offset)))
  config = config_lib.default_config()
  config.teacher.source, config.teacher.path = 'workdir', str(tmp_path / 'teacher')
  config.report.baseline_workdir = str(tmp_path / 'baseline')
  others = runs.comparison_runs(config, str(tmp_path / 'run'))
  assert others == {'teacher': results(0.3), 'baseline': results(0.1)}
  config.report.baseline_workdir = str(tmp_path / 'nowhere')  # not finished: left out
  assert list(runs.comparison_runs(config, str(tmp_path / 'run'))) == ['teacher']
  drawn = []
  real_bar = matplotlib.axes.Axes.bar
  monkeypatch.setattr(matplotlib.axes.Axes, 'bar', lambda self, x, h, *a, label=None, **k: (
      drawn.append((self.get_title(), label, [round(v, 6) for v in h])),
      real_bar(self, x, h, *a, label=label, **k))[1])
  (tmp_path / 'run').mkdir()
  path = reports.plot_per_class(str(tmp_path / 'run'), results(0.5), ('a', 'b', 'c'), others)
  assert os.path.getsize(path) > 1000
  want = [(run, [round(o + 0.1 * k + d, 6) for k in range(3)])
          for d in (0.0, 0.01) for run, o in (('this run', 0.5), ('teacher', 0.3), ('baseline', 0.1))]
  assert [(label, h) for _, label, h in drawn] == want
