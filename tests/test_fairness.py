"""The robust-fairness methods' pieces against hand computation and NumPy transcriptions of
their released code: BAT's stop iterates, Fair-ARD's kappa and class weights, ABSLD's Manual
temperatures (the full steps are in test_reference_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import attacks
from ltd_jax import config_lib
from ltd_jax import methods
from ltd_jax.methods import distillation
from ltd_jax.methods import fairness
from ltd_jax.errors import ConfigError

# m_i(k): whether sample i is misclassified at iterate k (k = 0 .. K-1), K = 4.
WRONG = np.array([[0, 0, 0, 0],   # never: x_lc = x_fa = x_K
                  [1, 0, 1, 0],   # wrong at the start: x_lc = x_0; 2nd wrong at k = 2: x_fa = x_2
                  [0, 0, 1, 1],   # first wrong at 2: x_lc = x_1; 2nd wrong at 3: x_fa = x_3
                  [0, 1, 0, 0]],  # first wrong at 1: x_lc = x_0; wrong once only: x_fa = x_K
                 bool)
K = WRONG.shape[1]


def run_tracker(tracker, labels):
  """Feeds iterates x_k (every pixel of sample i: 10 k + i) and logits that are wrong where
  WRONG says through ``tracker``, as ``pgd`` would; returns the tracked state and x_K."""
  tracked, update = tracker
  for k in range(K):
    x_k = jnp.asarray(10.0 * k + np.arange(4), jnp.float32).reshape(4, 1, 1, 1) * jnp.ones((4, 2, 2, 1))
    right = np.eye(3)[labels]
    logits = jnp.asarray(np.where(WRONG[:, k, None], 1.0 - right, right), jnp.float32)
    tracked = update(tracked, k, x_k, logits)
  x_final = jnp.asarray(10.0 * K + np.arange(4), jnp.float32).reshape(4, 1, 1, 1) * jnp.ones((4, 2, 2, 1))
  return tracked, x_final


def picked(images) -> list[int]:
  """Which iterate k each sample's image is (pixel = 10 k + i)."""
  return [int(round((float(images[i, 0, 0, 0]) - i) / 10)) for i in range(len(images))]


def test_bat_last_clean_and_misclassified_stop_iterates_by_hand():
  labels = np.array([0, 1, 2, 0])
  x = jnp.zeros((4, 2, 2, 1))
  lc, x_final = run_tracker(fairness.last_clean_tracker(x, labels), labels)
  assert picked(fairness.finish(lc, x_final)) == [K, 0, 1, 0]
  fa, x_final = run_tracker(fairness.misclassified_count_tracker(x, labels, tau=1), labels)
  assert picked(fairness.finish(fa, x_final)) == [K, 2, 3, K]
  first, x_final = run_tracker(fairness.misclassified_count_tracker(x, labels, tau=0), labels)
  assert picked(fairness.finish(first, x_final)) == [K, 0, 2, 1]  # tau = 0: the first wrong one


def test_fair_ard_kappa_counts_the_correct_iterates():
  labels = np.array([0, 1, 2, 0])
  kappa, _ = run_tracker(fairness.correct_count_tracker(jnp.asarray(labels)), labels)
  np.testing.assert_array_equal(kappa, (~WRONG).sum(1))


def weight_assign(kappa, beta, guard, num_classes):
  """Fair-ARD.py's weight_assign, in NumPy (float32 as the code's tensors)."""
  reweight = (1 / (kappa + guard)) ** beta
  reweight = reweight * (num_classes / np.sum(reweight))
  return np.clip(reweight, 5 / 6, 5 / 2).astype(np.float32)


def test_fair_class_weights_against_the_code_on_unbalanced_classes_with_one_absent():
  config = config_lib.default_config()
  rng = np.random.default_rng(0)
  counts = np.array([30, 5, 12, 0, 40, 8, 20, 1, 17, 9], np.float32)  # 3 absent, 7 seen once
  kappa = rng.uniform(0, 10, size=10).astype(np.float32) * (counts > 0)
  sums = kappa * counts
  got = fairness.fair_class_weights(jnp.asarray(sums), jnp.asarray(counts), config)
  np.testing.assert_allclose(got, weight_assign(kappa, 2.0, 1e-5, 10), rtol=1e-5)
  assert float(got[3]) == pytest.approx(5 / 2)  # an absent class reads kappa 0: the largest weight
  state = fairness.fair_init_state(config, 10)
  state = {**state, 'kappa_sum': jnp.asarray(sums), 'kappa_count': jnp.asarray(counts)}
  ended = fairness.fair_epoch_end(state, 1, config)
  np.testing.assert_allclose(ended['class_weight'], got)
  assert float(jnp.sum(ended['kappa_sum'])) == 0 and float(jnp.sum(ended['kappa_count'])) == 0
  # beta 1: the guard's sign shows at the absent class (kappa 0), which beta 2 squares away.
  config.fair.beta = 1.0
  np.testing.assert_allclose(
      fairness.fair_class_weights(jnp.asarray(sums), jnp.asarray(counts), config),
      weight_assign(kappa, 1.0, 1e-5, 10), rtol=1e-5)
  config.fair.beta = 2.0
  # The weights are per class: a wrong class index shows.
  config.fair.kappa_guard = 0.0
  np.testing.assert_allclose(
      fairness.fair_class_weights(jnp.asarray(sums[:3]), jnp.asarray(counts[:3]), config),
      weight_assign(kappa[:3], 2.0, 0.0, 3), rtol=1e-5)
  # Kappas of the guard's size, every class seen (one of them once), weights inside the clip: the
  # guard's sign and the division by a count of 1 both show.
  config.fair.kappa_guard = 1e-5
  kappa = np.array([2e-5, 3e-5, 2.5e-5, 4e-5], np.float32)
  counts = np.array([3, 1, 2, 5], np.float32)
  got = fairness.fair_class_weights(jnp.asarray(kappa * counts), jnp.asarray(counts), config)
  want = weight_assign(kappa, 2.0, 1e-5, 4)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert 5 / 6 < want[1] < 5 / 2 and want[0] > want[2] > want[1]


def test_fair_and_cfa_epoch_records_are_the_per_class_means_and_the_new_values():
  """Fair-ARD / Fair-RSLAD log each class's mean kappa of the epoch (NaN for a class not seen)
  and next epoch's weights; CFA the train robust accuracy per class (NaN unseen), the new class
  eps and TRADES weights, and whether FAWA has started."""
  before = {'kappa_sum': np.array([0.0, 3.0, 12.0, 5.0]),
            'kappa_count': np.array([0.0, 1.0, 4.0, 2.0])}
  after = {'class_weight': jnp.asarray([2.5, 1.0, 0.9, 1.25])}
  kind, values = fairness.fair_epoch_record(before, after)
  assert kind == 'class_weights' and sorted(values) == ['class_weight', 'kappa']
  np.testing.assert_array_equal(values['kappa'], [np.nan, 3.0, 3.0, 2.5])
  assert values['class_weight'] == [2.5, 1.0, 0.8999999761581421, 1.25]  # float32, as a list
  before = {'robust_sum': np.array([0.0, 1.0, 3.0]), 'robust_count': np.array([0.0, 1.0, 4.0])}
  after = {'class_eps': jnp.asarray([0.5, 0.25, 0.125]), 'class_beta': jnp.asarray([0.5, 0.75, 1.0]),
           'average_started': jnp.asarray(True)}
  kind, values = fairness.cfa_epoch_record(before, after)
  assert kind == 'cfa'
  assert sorted(values) == ['class_beta', 'class_eps', 'fawa_started', 'train_robust']
  np.testing.assert_array_equal(values['train_robust'], [np.nan, 1.0, 0.75])
  assert values['class_eps'] == [0.5, 0.25, 0.125] and values['class_beta'] == [0.5, 0.75, 1.0]
  assert values['fawa_started'] is True
  after['average_started'] = jnp.asarray(False)
  assert fairness.cfa_epoch_record(before, after)[1]['fawa_started'] is False


def test_cfa_accumulate_counts_each_class_train_robust_hits():
  """CFA's per-class train robust accuracy sums: argmax f(x') == y, per sample, by class."""
  state = fairness.cfa_init_state(config_lib.default_config(), 3)
  logits_adv = jnp.asarray([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.5, 0.4], [0.2, 0.1, 0.9],
                            [1.0, 0.0, 5.0]])
  labels = jnp.asarray([1, 0, 2, 2, 0])  # hits: 1, 1, 0, 1, 0
  out = fairness.cfa_accumulate(state, {'logits_adv': logits_adv}, labels, 3)
  np.testing.assert_array_equal(out['robust_sum'], [1, 1, 1])
  np.testing.assert_array_equal(out['robust_count'], [2, 1, 2])
  again = fairness.cfa_accumulate(out, {'logits_adv': logits_adv}, labels, 3)
  np.testing.assert_array_equal(again['robust_sum'], [2, 2, 2])
  assert again['robust_sum'].dtype == jnp.float32


def test_fair_accumulate_sums_kappa_per_class():
  state = fairness.fair_init_state(None, 4)
  # The first epoch is ARD's / RSLAD's: every class weight 1, nothing counted yet.
  assert sorted(state) == ['class_weight', 'kappa_count', 'kappa_sum']
  np.testing.assert_array_equal(state['class_weight'], np.ones(4, np.float32))
  np.testing.assert_array_equal(state['kappa_sum'], np.zeros(4, np.float32))
  labels = jnp.asarray([0, 2, 2, 3, 0])
  out = fairness.fair_accumulate(state, {'kappa': jnp.asarray([1., 2., 3., 4., 5.])}, labels, 4)
  np.testing.assert_array_equal(out['kappa_sum'], [6, 0, 5, 4])
  np.testing.assert_array_equal(out['kappa_count'], [2, 0, 2, 1])


def test_manual_temperatures_name_the_hard_classes():
  config = config_lib.default_config()
  tau = distillation.manual_temperatures(config, 10)
  np.testing.assert_array_equal(tau, [5, 5, 0.5, 0.5, 0.5, 0.5, 5, 5, 5, 5])  # bird, cat, deer, dog
  state = distillation.absld_manual_init_state(config, 10)
  np.testing.assert_array_equal(state['tau_adv'], tau)
  np.testing.assert_array_equal(state['tau_clean'], tau)
  config.absld.manual_hard_classes = (1, 12)
  with pytest.raises(ConfigError, match='manual_hard_classes'):
    config_lib.validate(config)


def normalize_lambda(lmb, lim):
  """utils_frl2.normalize_lambda in NumPy."""
  lmb = np.maximum(lmb, 0)
  return lim * lmb / np.sum(lmb) if np.sum(lmb) > lim else lmb


def test_frl_multipliers_and_margins_against_the_code():
  config = config_lib.default_config()
  config.eps = 8 / 255
  rng = np.random.default_rng(1)
  acc_c = rng.uniform(0.5, 1.0, 10)
  adv_c = acc_c * rng.uniform(0.2, 0.8, 10)
  acc_c[4] = adv_c[4] = np.nan  # a class absent from the split: its multipliers stay
  counts = np.array([30, 10, 50, 20, 0, 40, 25, 35, 15, 45])  # unbalanced
  acc, adv = np.nansum(acc_c * counts) / counts.sum(), np.nansum(adv_c * counts) / counts.sum()
  lam = [rng.uniform(0, 0.05, 10), rng.uniform(0, 0.05, 10), rng.normal(0, 0.2, 10)]
  state = dict(zip(('lambda_nat', 'lambda_bndy', 'lambda_margin'), map(jnp.asarray, lam)))
  validation = {'clean': {'per_class': jnp.asarray(acc_c, jnp.float32), 'avg': jnp.float32(acc)},
                'pgd': {'per_class': jnp.asarray(adv_c, jnp.float32), 'avg': jnp.float32(adv)}}
  for epochs_completed, rate1 in ((3, 0.05), (38, 0.05), (39, 0.025)):  # t = 40: rate1 halved
    got = fairness.frl_epoch_end(state, epochs_completed, config, validation, None)
    tau = config.frl.tau_nat
    gamma0 = np.nan_to_num((1 - acc_c) - (1 - acc) - tau)
    gamma1 = np.nan_to_num((acc_c - adv_c) - (acc - adv) - tau)
    want = (normalize_lambda(lam[0] + rate1 * np.maximum(gamma0, -1000), 0.5),
            normalize_lambda(lam[1] + rate1 * 2 * np.maximum(gamma1, -1000), 0.5),
            lam[2] + 0.2 * gamma1)
    for key, w in zip(('lambda_nat', 'lambda_bndy', 'lambda_margin'), want):
      np.testing.assert_allclose(got[key], w, rtol=1e-5, atol=1e-7)
    assert float(got['lambda_margin'][4]) == pytest.approx(lam[2][4], rel=1e-6)
  w0, w1, m = fairness.frl_costs(got, config)
  np.testing.assert_allclose(w0, 0.1 + want[0] - 0.1 * want[0].sum(), rtol=1e-5)
  np.testing.assert_allclose(w1, 0.1 + want[1] - 0.1 * want[1].sum(), rtol=1e-5)
  np.testing.assert_allclose(m, np.clip(np.exp(2 * want[2]), 0.98, 3), rtol=1e-5)
  # Clean and PGD accuracies swapped (a miswiring) give other multipliers.
  swapped = fairness.frl_epoch_end(state, 3, config, {'clean': validation['pgd'],
                                                      'pgd': validation['clean']}, None)
  assert not np.allclose(swapped['lambda_margin'], got['lambda_margin'])



@pytest.mark.parametrize('lmb,limit', [([0.3, -0.1, 0.5], 0.5),  # sum 0.8 > limit, below 1
                                       ([2.0, 1.0, 0.0], 0.5),  # sum above 1
                                       ([0.1, 0.2, -0.4], 0.5),  # under the limit: kept
                                       ([-0.1, -0.2, 0.0], 0.5)])  # all clamped: zeros
def test_frl_normalize_against_the_code(lmb, limit):
  got = fairness.frl_normalize(jnp.asarray(lmb, jnp.float32), limit)
  np.testing.assert_allclose(got, normalize_lambda(np.array(lmb), limit), rtol=1e-6, atol=1e-7)


def test_frl_margins_are_clipped_to_both_bounds_and_the_record_lists_the_multipliers():
  """clip(exp(2 lambda_margin), 0.98, 3): a large multiplier stops at 3, a negative one at 0.98;
  the epoch record is the new multipliers as lists (kind 'frl')."""
  config = config_lib.default_config()
  margin = np.array([-1.0, 0.0, 0.3, 2.0])
  state = {'lambda_nat': jnp.asarray([0.1, 0.0, 0.2, 0.0]),
           'lambda_bndy': jnp.asarray([0.0, 0.3, 0.0, 0.1]),
           'lambda_margin': jnp.asarray(margin, jnp.float32)}
  _, _, m = fairness.frl_costs(state, config)
  np.testing.assert_allclose(m, [0.98, 1.0, np.exp(0.6), 3.0], rtol=1e-6)
  kind, record = fairness.frl_epoch_record(None, state)
  assert kind == 'frl' and sorted(record) == ['lambda_bndy', 'lambda_margin', 'lambda_nat']
  for key, value in state.items():
    assert record[key] == pytest.approx(np.asarray(value).tolist())


@pytest.mark.parametrize('step_size', ['max_eps_quarter', 'config'])
def test_frl_attack_eps_is_remargined_per_class_with_the_configured_step(step_size):
  """eps_i = eps m[y_i]; the step max_i eps_i / 4 for the batch (the code) or attack.alpha: the
  attack equals PGD run with exactly those, and not with the other step."""
  from ltd_jax.methods import base  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  config.eps, config.attack.alpha, config.attack.steps = 0.1, 0.01, 2
  config.frl.step_size = step_size
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  student = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(4, 2, 2, 3)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 1])
  state = {'lambda_nat': jnp.zeros(3), 'lambda_bndy': jnp.zeros(3),
           'lambda_margin': jnp.asarray([0.0, 0.3, -0.5], jnp.float32)}
  inputs = methods.MethodInputs(x, y, jax.random.PRNGKey(3), state)
  got = fairness.frl_adversary(student, inputs, config)
  eps = 0.1 * np.clip(np.exp(2 * np.array([0.0, 0.3, -0.5])), 0.98, 3.0)[np.array(y)]
  steps = {'max_eps_quarter': eps.max() / 4, 'config': 0.01}
  clean_probs = jax.nn.softmax(student(x), axis=-1)
  objective = lambda f: attacks.kl_objective(f, clean_probs)
  for name, alpha in steps.items():
    want = base.pgd(student, objective, inputs, config, eps=jnp.asarray(eps, jnp.float32),
                    alpha=alpha)
    assert np.allclose(got, want, atol=1e-6) == (name == step_size), name

def test_cfa_margins_beta_and_fawa_against_the_code():
  config = config_lib.default_config()
  config.eps, config.trades.beta = 8 / 255, 6.0
  state = fairness.cfa_init_state(config, 10)
  np.testing.assert_allclose(state['class_beta'], 6 / 7)
  counts = np.array([30, 1, 50, 20, 0, 40, 25, 35, 15, 45], np.float32)  # 4 absent, 1 seen once
  robust = np.round(counts * np.linspace(0.1, 0.7, 10))
  robust[1] = 1.0
  variables = {'params': {'w': jnp.full((3,), 2.0)}, 'batch_stats': {'m': jnp.full((2,), 4.0)}}
  average = {'params': {'w': jnp.zeros((3,))}, 'batch_stats': {'m': jnp.zeros((2,))}}
  state = {**state, 'robust_sum': jnp.asarray(robust), 'robust_count': jnp.asarray(counts),
           'average': average}
  pgd_c = np.linspace(0.25, 0.6, 10).astype(np.float32)  # classes 1..9: at least 0.289
  val = lambda worst: {'clean': {'per_class': jnp.ones(10), 'avg': jnp.float32(1)},
                       'pgd': {'per_class': jnp.asarray(np.r_[worst, pgd_c[1:]], jnp.float32),
                               'avg': jnp.float32(0.3)}}
  before = fairness.cfa_epoch_end(state, 9, config, val(0.3), variables)  # epoch 9 -> 10 not on
  np.testing.assert_allclose(before['class_eps'], 8 / 255)
  ended = fairness.cfa_epoch_end(state, 10, config, val(0.3), variables)
  a = robust / np.maximum(counts, 1)
  np.testing.assert_allclose(ended['class_eps'], (0.5 + a) * 8 / 255, rtol=1e-6)
  np.testing.assert_allclose(ended['class_beta'], (0.5 + a) * 6 / (1 + (0.5 + a) * 6), rtol=1e-6)
  # FAWA: worst class 0.23 >= 0.24? no -> unchanged; 0.3 -> first a copy, then the 0.88 average.
  low = fairness.cfa_epoch_end(state, 10, config, val(0.23), variables)
  assert not bool(low['average_started'])
  np.testing.assert_array_equal(low['average']['params']['w'], 0.0)
  assert bool(ended['average_started'])
  np.testing.assert_array_equal(ended['average']['params']['w'], 2.0)
  again = fairness.cfa_epoch_end(ended, 11, config, val(0.3),
                                 {'params': {'w': jnp.full((3,), 1.0)},
                                  'batch_stats': {'m': jnp.full((2,), 1.0)}})
  np.testing.assert_allclose(again['average']['params']['w'], 0.88 * 2 + 0.12 * 1, rtol=1e-6)
  np.testing.assert_allclose(again['average']['batch_stats']['m'], 0.88 * 4 + 0.12, rtol=1e-6)
  np.testing.assert_allclose(fairness.cfa_weight_average(again, variables)['params']['w'],
                             again['average']['params']['w'])
  np.testing.assert_array_equal(fairness.cfa_weight_average(low, variables)['params']['w'], 2.0)
  # The worst 10% of 10 classes is the worst class; NaN (absent) classes never count as worst.
  config.cfa.fawa_worst = 'worst10'
  absent = fairness.cfa_epoch_end(state, 10, config, val(np.nan), variables)
  assert bool(absent['average_started'])  # the worst present class: 0.289 >= 0.24
  config.cfa.fawa_threshold = 0.29
  assert not bool(fairness.cfa_epoch_end(state, 10, config, val(np.nan),
                                         variables)['average_started'])
  # 30 classes: the worst 10% are the 3 worst, (0.1 + 0.3 + 0.35) / 3 = 0.25 >= 0.24, while the
  # worst class alone, 0.1, is not.
  config.cfa.fawa_threshold = 0.24
  state30 = {**fairness.cfa_init_state(config, 30), 'robust_sum': jnp.zeros(30),
             'robust_count': jnp.ones(30), 'average': average}
  per_class = np.r_[0.35, np.full(26, 0.9), 0.1, 0.3, 0.5].astype(np.float32)
  val30 = {'clean': {'per_class': jnp.ones(30), 'avg': jnp.float32(1)},
           'pgd': {'per_class': jnp.asarray(per_class), 'avg': jnp.float32(0.8)}}
  for worst, starts in (('worst10', True), ('worst', False)):
    config.cfa.fawa_worst = worst
    assert bool(fairness.cfa_epoch_end(state30, 10, config, val30, variables)['average_started']) \
        == starts, worst


def _records(workdir, kind):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def test_frl_warm_starts_validates_before_training_and_resumes(tmp_path):
  """The loop's hooks for FRL: the warm start's weights, a validation record and multiplier
  update before the first step and after every epoch, and a killed run that resumes to the same
  multipliers and weights as an uninterrupted one."""
  import jax  # pylint: disable=g-import-not-at-top
  from ltd_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from ltd_jax import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  init = make_tiny_config()
  init.num_epochs = 1
  init.data.val_size = 200
  train.train_and_evaluate(init, str(tmp_path / 'init'))
  c = make_tiny_config()
  c.method, c.data.val_size, c.num_epochs = 'frl', 200, 3
  c.frl.validation_pgd_steps = 2
  c.init.source, c.init.path = 'workdir', str(tmp_path / 'init')
  c.eval.selection = 'last'

  class Kill(Exception):
    pass

  def kill_after_epoch_1(step):
    if step == 5:  # digits: 1,237 training images / 256 = 4 steps per epoch; step 5 in epoch 2
      raise Kill()

  try:
    train.train_and_evaluate(c, str(tmp_path / 'killed'), step_hook=kill_after_epoch_1)
  except Kill:
    pass
  resumed = train.train_and_evaluate(c, str(tmp_path / 'killed'))
  whole = train.train_and_evaluate(c, str(tmp_path / 'whole'))
  for a, b in zip(jax.tree_util.tree_leaves((resumed.params, resumed.method_state)),
                  jax.tree_util.tree_leaves((whole.params, whole.method_state))):
    np.testing.assert_array_equal(a, b)
  validations = _records(tmp_path / 'whole', 'validation')
  assert [r['epoch'] for r in validations] == [0, 1, 2, 3]  # before training, then each epoch
  assert [r['epoch'] for r in _records(tmp_path / 'killed', 'validation')] == [0, 1, 2, 3]
  frl = _records(tmp_path / 'whole', 'frl')
  assert np.any(np.asarray(frl[0]['lambda_margin']) != 0)  # updated before the first step
  # The first validation evaluated the warm start itself: the init run's weights on the split.
  from ltd_jax import datasets, evaluate  # pylint: disable=g-import-not-at-top
  start = teacher_lib.load_teacher(str(tmp_path / 'init'), 10, (8, 8, 1), 'latest')
  assert start.step == 4
  val_images, val_labels = datasets.load(c.data).split('val')
  step = evaluate.make_attack_eval_step(start.apply_fn, {'clean': lambda f, x, y, r: x})
  want = evaluate.evaluate(step, start.variables, val_images, val_labels, 10, 100,
                           jax.random.PRNGKey(0))['clean']['per_class']
  np.testing.assert_allclose(validations[0]['clean/per_class'], want)


def test_cfa_final_evaluation_uses_its_weight_average(tmp_path):
  """Once FAWA has started, the final evaluation (and so export and AutoAttack, through the
  same selection) evaluates the average, not the last weights."""
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ltd_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ltd_jax import runs  # pylint: disable=g-import-not-at-top
  from ltd_jax import train  # pylint: disable=g-import-not-at-top
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  c = make_tiny_config()
  c.method, c.data.val_size, c.num_epochs = 'cfa', 200, 3
  c.cfa.fawa_pgd_steps, c.cfa.fawa_threshold, c.cfa.begin_epoch = 2, 0.0, 2
  c.eval.selection, c.eval.final = 'last', ('clean',)
  state = train.train_and_evaluate(c, str(tmp_path))
  assert bool(state.method_state['average_started'])
  average = state.method_state['average']
  assert not np.allclose(jax.tree_util.tree_leaves(average['params'])[0],
                         jax.tree_util.tree_leaves(state.params)[0])
  deployed = runs.deployed(c, state)
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(deployed.params)[0],
                                jax.tree_util.tree_leaves(average['params'])[0])
  results = json.load(open(tmp_path / 'results.json'))
  from ltd_jax import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.load(c.data)
  images, labels = ds.split('test')
  subset = evaluate.stratified_subset(labels, c.eval.final_subset_size, c.seed)
  step = evaluate.make_eval_step(state.apply_fn, ('clean',), eps=c.eps, eval_config=c.eval)
  got = evaluate.evaluate(step, deployed.variables, images[subset], labels[subset], 10, 100,
                          jax.random.PRNGKey(0))
  assert results['attacks']['clean']['avg'] == pytest.approx(got['clean']['avg'])
  cfa = _records(tmp_path, 'cfa')
  assert [r['fawa_started'] for r in cfa] == [True, True, True]
  assert cfa[0]['class_eps'] == pytest.approx([c.eps] * 10)  # before begin_epoch: the base eps
  assert cfa[1]['class_eps'] != pytest.approx([c.eps] * 10)
