"""LTD, RSLAD, ABSLD and AWP against NumPy transcriptions of METHODS.md section 2 and ABSLD Eq. 10."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ltd_jax import awp
from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import methods
from ltd_jax import state as state_lib
from ltd_jax import temperatures
from ltd_jax import train
from ltd_jax.methods import distillation
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_softmax(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_eq10(tau, risk, beta, lo, hi):
  gap = risk - risk.mean()
  return np.clip(tau - beta * gap / np.abs(gap).max(), lo, hi)


def test_temperature_update_equals_eq10():
  rng = np.random.default_rng(0)
  tau = rng.uniform(0.8, 1.5, 10)
  risk = rng.uniform(0.5, 3.0, 10)
  counts = rng.integers(5, 50, 10).astype(float)  # unbalanced classes: per-class means
  got = temperatures.absld_update_temperatures(jnp.asarray(tau, jnp.float32),
                                               jnp.asarray(risk * counts, jnp.float32),
                                               jnp.asarray(counts, jnp.float32), 0.1, 0.5, 5.0)
  np.testing.assert_allclose(got, np_eq10(tau, risk, 0.1, 0.5, 5.0), rtol=1e-5)
  hardest, easiest = np.argmax(risk), np.argmin(risk)
  assert got[hardest] < tau[hardest] and got[easiest] > tau[easiest]  # sharper for hard classes
  extreme = np.argmax(np.abs(risk - risk.mean()))
  assert abs(got[extreme] - tau[extreme]) == pytest.approx(0.1, abs=1e-5)  # moves by beta


def test_temperature_update_on_risk_sums_is_the_released_scripts():
  """absld.risk='sum': the gap of the per-class sums, as resnet18_absld_cifar10.py computes it;
  on unbalanced classes it differs from the update on means."""
  rng = np.random.default_rng(1)
  tau = rng.uniform(0.8, 1.5, 10)
  sums = rng.uniform(5.0, 90.0, 10)
  counts = rng.integers(5, 50, 10).astype(float)
  args = (jnp.asarray(tau, jnp.float32), jnp.asarray(sums, jnp.float32),
          jnp.asarray(counts, jnp.float32), 0.1, 0.5, 5.0)
  on_sums = temperatures.absld_update_temperatures(*args, risk='sum')
  np.testing.assert_allclose(on_sums, np_eq10(tau, sums, 0.1, 0.5, 5.0), rtol=1e-5)
  assert not np.allclose(on_sums, temperatures.absld_update_temperatures(*args), rtol=1e-3)


def test_temperature_bounds_and_unseen_classes():
  tau = jnp.array([0.55, 4.95, 1.0, 1.0])
  sums = jnp.array([9.0, 0.0, 1.0, 0.0])
  counts = jnp.array([1.0, 1.0, 1.0, 0.0])  # class 3 not seen this epoch
  got = np.asarray(temperatures.absld_update_temperatures(tau, sums, counts, 1.0, 0.5, 5.0))
  assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(5.0)
  assert got[3] == pytest.approx(1.0)


@pytest.mark.parametrize('mode', ['mean', 'sum'])
def test_temperature_update_on_unbalanced_counts_with_unseen_and_single_samples(mode):
  """Counts 0, 1, 2, 5, 7, 1: the unseen class keeps its temperature and is left out of the mean
  risk; 'mean' divides each class's sum by its count (one sample: by 1), 'sum' uses the sums."""
  tau = np.array([1.2, 0.8, 2.0, 1.5, 3.0, 1.0])
  sums = np.array([0.0, 2.5, 3.0, 4.0, 14.0, 0.3])
  counts = np.array([0.0, 1.0, 2.0, 5.0, 7.0, 1.0])
  seen = counts > 0
  risk = sums / np.where(seen, counts, 1.0) if mode == 'mean' else sums.copy()
  want = tau.copy()
  want[seen] = np_eq10(tau[seen], risk[seen], 0.4, 0.5, 5.0)
  kw = {} if mode == 'mean' else {'risk': 'sum'}  # 'mean' is the default
  got = temperatures.absld_update_temperatures(jnp.asarray(tau), jnp.asarray(sums),
                                               jnp.asarray(counts), 0.4, 0.5, 5.0, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  risks, mask = temperatures.per_class_risk(jnp.asarray(sums), jnp.asarray(counts))
  np.testing.assert_allclose(risks, np.where(seen, sums / np.maximum(counts, 1), 0.0), rtol=1e-6)
  np.testing.assert_array_equal(mask, seen)
  # One class seen: its gap is 0, so nothing moves.
  one = temperatures.absld_update_temperatures(jnp.asarray(tau), jnp.asarray(sums),
                                               jnp.asarray([0.0, 0.0, 3.0, 0.0, 0.0, 0.0]),
                                               0.4, 0.5, 5.0, **kw)
  np.testing.assert_allclose(one, tau, rtol=1e-6)


@pytest.mark.parametrize('level, gap, moves', [
    (1e-3, 2e-8, True),    # tiny risks, relative gap 1e-5 above rtol: a real gap, the update runs
    (1e3, 2e-4, False),    # large risks, relative gap 1e-7 below rtol: rounding, nothing moves
    (1e3, 0.4, True)])     # large risks, relative gap 4e-4: the update runs
def test_temperature_update_threshold_is_relative_to_the_largest_risk(level, gap, moves):
  """The skip test is max|gap| > rtol * max|risk| (rtol 1e-6), so it scales with the risks: an
  absolute threshold, or one divided by the risks, gives the other answer in one of these rows."""
  tau = jnp.array([1.0, 1.0, 1.0], jnp.float32)
  sums = jnp.array([level, level, level + gap], jnp.float32)
  got = np.asarray(temperatures.absld_update_temperatures(tau, sums, jnp.ones(3), 0.1, 0.5, 5.0))
  if moves:
    np.testing.assert_allclose(got, np_eq10(np.ones(3), np.asarray(sums, np.float64), 0.1, 0.5, 5.0),
                               rtol=1e-4)
    assert got[2] == pytest.approx(0.9, abs=1e-5)
  else:
    np.testing.assert_array_equal(got, np.ones(3, np.float32))


def test_class_temperatures_default_to_the_papers_separate_sets():
  labels = jnp.array([0, 2])
  t_adv, t_clean = temperatures.class_temperatures(labels, jnp.array([1.0, 2.0, 3.0]),
                                                   jnp.array([4.0, 5.0, 6.0]))
  np.testing.assert_allclose(t_adv[:, 0], [1.0, 3.0])
  np.testing.assert_allclose(t_clean[:, 0], [4.0, 6.0])


@pytest.mark.parametrize('risk', [np.full(10, 0.7), np.full(10, 1e-3) + 1e-19 * np.arange(10)])
def test_equal_risks_skip_the_update_instead_of_nan(risk):
  tau = jnp.linspace(0.8, 1.2, 10)
  got = temperatures.absld_update_temperatures(tau, jnp.asarray(risk * 3, jnp.float32),
                                               jnp.full(10, 3.0), 0.1, 0.5, 5.0)
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, tau)


def test_beta_decays_as_in_the_released_script():
  """The released resnet18_absld_cifar10.py, transcribed: at the end of epoch e (1-indexed), if
  e is a milestone, lr and class_labels_temp_rate are multiplied by 0.1; then the temperature
  update of epoch e uses class_labels_temp_rate."""
  rate, released = 0.1, {}
  for epoch in range(1, 301):
    if epoch in (215, 260, 285):
      rate *= 0.1
    released[epoch] = rate
  ours = {e: float(temperatures.absld_beta(e, 0.1, (215, 260, 285), 0.1)) for e in released}
  assert ours == pytest.approx(released, rel=1e-6)
  assert ours[214] == pytest.approx(0.1) and ours[215] == pytest.approx(0.01)


def test_absld_epoch_end_updates_each_set_by_eq10_within_the_bounds_and_zeroes_the_risks():
  """The method's epoch end: Eq. 10 with beta_t of the epoch, tau_adv from the adversarial
  risks and tau_clean from the clean ones, clipped to [tau_min, tau_max] (a step of 2 pushes
  the extreme classes past both bounds); the four risk accumulators start again at zero."""
  config = config_lib.default_config()
  config.absld.beta, config.absld.tau_min, config.absld.tau_max = 2.0, 0.8, 2.5
  config.optim.lr_boundaries_epochs, config.optim.lr_decay = (5,), 0.5
  tau_adv, tau_clean = np.array([1.0, 1.5, 2.0, 1.2]), np.array([2.0, 1.0, 1.4, 0.9])
  risk_adv, risk_clean = np.array([3.0, 0.5, 1.0, 2.0]), np.array([0.2, 0.4, 1.6, 0.1])
  counts = np.array([4.0, 2.0, 5.0, 3.0])
  state = {'tau_adv': tau_adv, 'tau_clean': tau_clean,
           'risk_adv_sum': risk_adv * counts, 'risk_adv_count': counts,
           'risk_clean_sum': risk_clean * counts, 'risk_clean_count': counts}
  state = {k: jnp.asarray(v, jnp.float32) for k, v in state.items()}
  for epochs_completed, beta_t in ((2, 2.0), (5, 1.0)):  # epoch 5 reaches the milestone
    got = distillation.absld_epoch_end(state, epochs_completed, config)
    want_adv = np_eq10(tau_adv, risk_adv, beta_t, 0.8, 2.5)
    want_clean = np_eq10(tau_clean, risk_clean, beta_t, 0.8, 2.5)
    np.testing.assert_allclose(got['tau_adv'], want_adv, rtol=1e-5)
    np.testing.assert_allclose(got['tau_clean'], want_clean, rtol=1e-5)
    for k in ('risk_adv_sum', 'risk_adv_count', 'risk_clean_sum', 'risk_clean_count'):
      np.testing.assert_array_equal(got[k], np.zeros(4))
  unclipped = np_eq10(tau_adv, risk_adv, 2.0, -np.inf, np.inf)
  assert unclipped.min() < 0.8 and unclipped.max() > 2.5  # both bounds were needed


def _absld_config(aliasing=False):
  c = config_lib.default_config()
  c.absld.released_code_aliasing = aliasing
  return c


W_LINEAR = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)


def linear_forward(x):
  """A student whose logits depend on its input (x @ W): a loss that feeds it the wrong images
  gets other logits."""
  return jnp.asarray(x) @ W_LINEAR


@pytest.fixture
def batch():
  """Teacher logits, distinct clean and adversarial inputs with the student's logits on each,
  labels and distinct per-class temperatures."""
  rng = np.random.default_rng(1)
  teacher = (rng.normal(size=(6, 4)) * 2).astype(np.float32)
  x_clean = rng.normal(size=(6, 3)).astype(np.float32)
  x_adv = x_clean + rng.normal(size=(6, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0, 2])
  tau_adv = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
  tau_clean = np.array([3.0, 0.7, 1.0, 1.5], np.float32)
  return (teacher, (x_adv, x_adv @ W_LINEAR), (x_clean, x_clean @ W_LINEAR), y, tau_adv,
          tau_clean)


def _np_kl(p, logits):
  return (p * (np.log(p) - np.log(np_softmax(logits)))).sum(-1)


def _aux_matches(aux, y, clean, adv, natural, robust):
  """The aux every loss returns: its two terms, the logits each forward gave and their
  per-sample cross-entropies."""
  np.testing.assert_allclose(aux['loss_natural'], natural, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_robust'], robust, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_clean'], clean, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_adv'], adv, rtol=1e-5)
  rows = np.arange(len(y))
  np.testing.assert_allclose(aux['ce_clean'], -np.log(np_softmax(clean))[rows, y], rtol=1e-5)
  np.testing.assert_allclose(aux['ce_adv'], -np.log(np_softmax(adv))[rows, y], rtol=1e-5)


@pytest.mark.parametrize('aliasing', [False, True])
def test_absld_targets_use_each_samples_class_temperature(batch, aliasing):
  teacher, _, _, y, tau_adv, tau_clean = batch
  inputs = methods.MethodInputs(None, y, None, {'tau_adv': tau_adv, 'tau_clean': tau_clean}, teacher)
  p_adv, p_clean = methods.distillation_targets(inputs, _absld_config(aliasing), per_class=True)
  for i in range(6):
    t_a, t_c = tau_adv[y[i]], tau_clean[y[i]]
    if aliasing:
      t_a = t_c = tau_adv[y[i]] * tau_clean[y[i]]
    np.testing.assert_allclose(p_adv[i], np_softmax(teacher[i], t_a), rtol=1e-5)
    np.testing.assert_allclose(p_clean[i], np_softmax(teacher[i], t_c), rtol=1e-5)


@pytest.mark.parametrize('name', ['rslad', 'absld'])
def test_distillation_loss_matches_numpy(batch, name):
  teacher, (x_adv, adv), (x, clean), y, tau_adv, tau_clean = batch
  config = _absld_config()
  inputs = methods.MethodInputs(x, y, None, {'tau_adv': tau_adv, 'tau_clean': tau_clean}, teacher)
  loss, aux = methods.get_method(name).loss(linear_forward, inputs, x_adv, config)
  if name == 'rslad':
    p_adv = p_clean = np_softmax(teacher)
  else:
    p_adv = np_softmax(teacher / tau_adv[y][:, None])
    p_clean = np_softmax(teacher / tau_clean[y][:, None])
  robust = _np_kl(p_adv, adv).mean() / 4  # elementwise mean = batchmean / classes
  natural = _np_kl(p_clean, clean).mean() / 4
  np.testing.assert_allclose(loss, 5 / 6 * robust + 1 / 6 * natural, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)


def test_distillation_adversary_step_is_the_sign_of_the_kl_gradient(batch):
  """One step from x (no random start): x + alpha sign(d/dx sum KL(p_adv || softmax(x W)))
  with p_adv = softmax(t / tau_adv[y]), whose gradient is (softmax(x W) - p_adv) W^T; clipped to
  the eps-ball and [0, 1]. The clean temperature would give another target and another step."""
  teacher, _, _, y, tau_adv, tau_clean = batch
  config = _absld_config()
  config.eps, config.attack.steps, config.attack.alpha, config.attack.init = 0.05, 1, 0.03, 'none'
  x = np.random.default_rng(3).uniform(0.1, 0.9, size=(6, 3)).astype(np.float32)
  inputs = methods.MethodInputs(jnp.asarray(x), y, jax.random.PRNGKey(0),
                                {'tau_adv': tau_adv, 'tau_clean': tau_clean},
                                teacher)
  x_adv = np.asarray(methods.get_method('absld').adversary(linear_forward, inputs, config))
  expected = {}
  for name, tau in (('adv', tau_adv), ('clean', tau_clean)):
    grad = (np_softmax(x @ W_LINEAR) - np_softmax(teacher / tau[y][:, None])) @ W_LINEAR.T
    expected[name] = np.clip(x + 0.03 * np.sign(grad), 0.0, 1.0)
  np.testing.assert_allclose(x_adv, expected['adv'], atol=1e-6)
  assert not np.allclose(expected['adv'], expected['clean'])


def test_ltd_loss_matches_numpy(batch):
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.ltd.teacher_temperature, config.ltd.student_temperature = 5.0, 2.0
  inputs = methods.MethodInputs(x, y, None, None, teacher)
  loss, aux = methods.ltd_loss(linear_forward, inputs, x_adv, config)
  soft = np_softmax(teacher, 5.0)
  natural = -(soft * np.log(np_softmax(clean, 2.0))).sum(-1).mean()
  robust = _np_kl(np_softmax(clean), adv).mean()
  np.testing.assert_allclose(loss, natural + 6.0 * robust, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_natural'], natural, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_robust'], robust, rtol=1e-5)
  entropy = -(soft * np.log(soft)).sum(-1).mean()  # H(p_T): natural - H is the KL form
  np.testing.assert_allclose(aux['teacher_entropy'], entropy, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_clean'], clean, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_adv'], adv, rtol=1e-5)


def test_ard_loss_and_what_it_logs_match_numpy(batch):
  """ARD: alpha T^2 KL_elementwise-mean(softmax(t(x) / T) || softmax(f(x') / T)) + (1 - alpha)
  CE(f(x), y), and as aux the logits each forward gave with their per-sample cross-entropies and
  the two terms, which training logs."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.ard.alpha, config.ard.temperature = 0.75, 3.0
  inputs = methods.MethodInputs(x, y, None, None, teacher)
  loss, aux = methods.get_method('ard').loss(linear_forward, inputs, x_adv, config)
  robust = 0.75 * 9.0 * _np_kl(np_softmax(teacher, 3.0), adv / 3.0).sum() / adv.size
  natural = -np.log(np_softmax(clean))[np.arange(6), y].mean()
  np.testing.assert_allclose(loss, robust + 0.25 * natural, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)


def test_adaad_loss_and_what_it_logs_match_numpy(batch):
  """AdaAD: alpha KL(softmax(t(x')) || f(x')) + (1 - alpha) KL(softmax(t(x)) || f(x)), the
  teacher queried on x' itself (a function of its input here, so x for x' would show),
  elementwise mean; the aux as every loss's."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  w_teacher = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)
  config = config_lib.default_config()
  config.adaad.alpha = 0.75
  inputs = methods.MethodInputs(x, y, None, None, teacher,
                                teacher_fn=lambda z: jnp.asarray(z) @ w_teacher)
  loss, aux = methods.get_method('adaad').loss(linear_forward, inputs, x_adv, config)
  robust = _np_kl(np_softmax(x_adv @ w_teacher), adv).mean() / 4
  natural = _np_kl(np_softmax(teacher), clean).mean() / 4
  np.testing.assert_allclose(loss, 0.75 * robust + 0.25 * natural, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)


class _LinearTrainForward:
  """linear_forward as the train step hands it to a loss: with (no) BatchNorm statistics."""
  batch_stats = {}

  def __call__(self, x):
    return linear_forward(x)


@pytest.mark.parametrize('epoch', [0, 2])
def test_iad_loss_and_what_it_logs_match_numpy(batch, epoch):
  """IAD-I: ARD's teacher term + from iad.begin_epoch alpha (1/B) sum_i (1 - w_i)
  KL(f(x_i) || f(x'_i)) with w_i = softmax(t(x'_i))[y_i]^beta, + (1 - alpha) CE(f(x), y); the
  aux as every loss's."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  w_teacher = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)
  config = config_lib.default_config()
  config.ard.alpha, config.ard.temperature, config.ard.reduction = 0.75, 1.0, 'batchmean'
  config.iad.beta, config.iad.begin_epoch = 0.5, 1
  inputs = methods.MethodInputs(x, y, None, None, teacher,
                                teacher_fn=lambda z: jnp.asarray(z) @ w_teacher,
                                epoch=jnp.asarray(epoch))
  loss, aux = methods.get_method('iad').loss(_LinearTrainForward(), inputs, x_adv, config)
  robust = 0.75 * _np_kl(np_softmax(teacher), adv).mean()
  w = np_softmax(x_adv @ w_teacher)[np.arange(6), y] ** 0.5
  introspection = ((1 - w) * _np_kl(np_softmax(clean), adv)).mean()
  natural = -np.log(np_softmax(clean))[np.arange(6), y].mean()
  want = robust + (0.75 * introspection if epoch >= 1 else 0.0) + 0.25 * natural
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)


def test_fair_ard_loss_and_what_it_logs_match_numpy(batch):
  """Fair-ARD: ARD's terms with each sample weighted by its class's weight, alpha T^2 (1 / (B C))
  sum_i w[y_i] KL_i + (1 - alpha) (1 / B) sum_i w[y_i] CE_i, and as aux the logits each forward
  gave, their per-sample cross-entropies, the two terms and the attack's kappa."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.ard.alpha, config.ard.temperature = 0.75, 3.0
  weight = np.array([2.0, 0.5, 1.0, 1.5], np.float32)
  kappa = np.array([3.0, 0.0, 1.0, 2.0, 3.0, 1.0], np.float32)
  inputs = methods.MethodInputs(x, y, None, {'class_weight': jnp.asarray(weight)}, teacher)
  loss, aux = methods.get_method('fair_ard').loss(
      linear_forward, inputs, {'x_adv': x_adv, 'kappa': jnp.asarray(kappa)}, config)
  w = weight[y]
  robust = 0.75 * 9.0 * (w * _np_kl(np_softmax(teacher, 3.0), adv / 3.0)).sum() / adv.size
  ce_clean = -np.log(np_softmax(clean))[np.arange(6), y]
  natural = (w * ce_clean).mean()
  np.testing.assert_allclose(loss, robust + 0.25 * natural, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)
  np.testing.assert_array_equal(aux['kappa'], kappa)


def test_fair_rslad_loss_and_what_it_logs_match_numpy(batch):
  """Fair-RSLAD: RSLAD's terms with each sample's KL weighted by its class's weight,
  scale (alpha L(x') + (1 - alpha) L(x)), L = (1 / (B C)) sum_i w[y_i] sum_c p (log(p + eps) -
  log q); the aux as every loss's, with the attack's kappa."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.rslad.loss_scale, config.rslad.target_log_eps = 2.0, 1e-5
  weight = np.array([2.0, 0.5, 1.0, 1.5], np.float32)
  kappa = np.array([1.0, 2.0, 0.0, 3.0, 1.0, 2.0], np.float32)
  inputs = methods.MethodInputs(x, y, None, {'class_weight': jnp.asarray(weight)}, teacher)
  loss, aux = methods.get_method('fair_rslad').loss(
      linear_forward, inputs, {'x_adv': x_adv, 'kappa': jnp.asarray(kappa)}, config)
  p = np_softmax(teacher)
  term = lambda z: (weight[y] * (p * (np.log(p + 1e-5) - np.log(np_softmax(z)))).sum(-1)).mean() / 4
  robust, natural = term(adv), term(clean)
  np.testing.assert_allclose(loss, 2.0 * (5 / 6 * robust + 1 / 6 * natural), rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)
  np.testing.assert_array_equal(aux['kappa'], kappa)


def test_bat_loss_and_what_it_logs_match_numpy(batch):
  """BAT: CE(f(x_lc), y) + beta KL_batchmean(f(x) || f(x_fa)) + KL(f(x_lc) || U) + KL(f(x_fa) ||
  U), U uniform, from three distinct inputs; the aux: the clean and x_fa logits, their CEs and
  the natural and robust terms."""
  _, (x_fa, fa), (x, clean), y, _, _ = batch
  x_lc = x - 0.5 * (x_fa - x)
  lc = x_lc @ W_LINEAR
  config = config_lib.default_config()
  config.trades.beta = 3.0
  inputs = methods.MethodInputs(x, y, None, None, None)
  loss, aux = methods.get_method('bat').loss(linear_forward, inputs, {'x_lc': x_lc, 'x_fa': x_fa},
                                             config)
  kl = lambda a, b: _np_kl(np_softmax(a), b).mean()
  natural = -np.log(np_softmax(lc))[np.arange(6), y].mean()
  robust = kl(clean, fa)
  spread = kl(lc, np.zeros_like(lc)) + kl(fa, np.zeros_like(fa))
  np.testing.assert_allclose(loss, natural + 3.0 * robust + spread, rtol=1e-5)
  _aux_matches(aux, y, clean, fa, natural, robust)



def test_frl_loss_and_what_it_logs_match_numpy(batch):
  """FRL (utils_frl2 cost_sensitive + train_model): sum_i w0[y_i] CE_i / sum_i w0[y_i] +
  beta sum_i w1[y_i] KL_i / sum_i w1[y_i], w = 1/C + lambda - sum(lambda)/C from distinct
  multipliers; the aux: both logits, their CEs and the two terms."""
  _, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.frl.beta = 2.5
  lam_nat, lam_bndy = np.array([0.3, 0.0, 0.1, 0.05]), np.array([0.0, 0.2, 0.05, 0.25])
  state = {'lambda_nat': jnp.asarray(lam_nat, jnp.float32),
           'lambda_bndy': jnp.asarray(lam_bndy, jnp.float32),
           'lambda_margin': jnp.zeros(4, jnp.float32)}
  inputs = methods.MethodInputs(x, y, None, state)
  loss, aux = methods.get_method('frl').loss(linear_forward, inputs, x_adv, config)
  w0 = (0.25 + lam_nat - lam_nat.sum() / 4)[y]
  w1 = (0.25 + lam_bndy - lam_bndy.sum() / 4)[y]
  ce = -np.log(np_softmax(clean))[np.arange(6), y]
  kl = _np_kl(np_softmax(clean), adv)
  natural, robust = (w0 * ce).sum() / w0.sum(), (w1 * kl).sum() / w1.sum()
  np.testing.assert_allclose(loss, natural + 2.5 * robust, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)


def test_cfa_loss_and_what_it_logs_match_numpy(batch):
  """CFA (cw_trades_loss): mean_i [(1 - b[y_i]) CE(f(x_i), y_i) + b[y_i] KL(f(x_i) || f(x'_i))]
  with distinct class weights b; the aux: both logits, their CEs and the two terms."""
  _, (x_adv, adv), (x, clean), y, _, _ = batch
  b = np.array([0.9, 0.5, 0.7, 0.2])
  state = {'class_beta': jnp.asarray(b, jnp.float32)}
  inputs = methods.MethodInputs(x, y, None, state)
  loss, aux = methods.get_method('cfa').loss(linear_forward, inputs, x_adv,
                                             config_lib.default_config())
  ce = -np.log(np_softmax(clean))[np.arange(6), y]
  natural = ((1 - b[y]) * ce).mean()
  robust = (b[y] * _np_kl(np_softmax(clean), adv)).mean()
  np.testing.assert_allclose(loss, natural + robust, rtol=1e-5)
  _aux_matches(aux, y, clean, adv, natural, robust)

def test_absld_epoch_record_is_the_mean_risk_per_class():
  """Per-class mean risks (NaN for a class not seen this epoch) and the new temperatures."""
  before = {'risk_adv_sum': np.array([0.0, 2.0, 6.0]), 'risk_adv_count': np.array([0.0, 1.0, 3.0]),
            'risk_clean_sum': np.array([1.0, 0.0, 3.0]), 'risk_clean_count': np.array([2.0, 0.0, 3.0])}
  after = {'tau_adv': np.array([1.0, 0.9, 1.1]), 'tau_clean': np.array([2.0, 1.0, 0.5])}
  kind, values = methods.absld_epoch_record(before, after)
  assert kind == 'temperatures' and sorted(values) == ['risk_adv', 'risk_clean', 'tau_adv',
                                                       'tau_clean']
  np.testing.assert_array_equal(values['risk_adv'], [np.nan, 2.0, 2.0])
  np.testing.assert_array_equal(values['risk_clean'], [0.5, np.nan, 1.0])
  assert values['tau_adv'] == [1.0, 0.9, 1.1] and values['tau_clean'] == [2.0, 1.0, 0.5]


def test_soft_label_natural_loss_matches_numpy(batch):
  """The LTD temperature search's substitute models: soft cross-entropy on clean inputs only
  (the student's logits undivided), whatever the adversarial input."""
  teacher, (x_adv, _), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.ltd.teacher_temperature, config.ltd.student_temperature = 3.0, 2.0
  inputs = methods.MethodInputs(x, y, None, None, teacher)
  loss, aux = methods.soft_label_natural_loss(linear_forward, inputs, x_adv, config)
  want = -(np_softmax(teacher, 3.0) * np.log(np_softmax(clean))).sum(-1).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_clean'], clean, rtol=1e-5)
  assert 'logits_adv' not in aux
  again, _ = methods.soft_label_natural_loss(linear_forward, inputs, x_adv + 1.0, config)
  assert float(again) == float(loss)


def test_ltd_awp_proxy_is_the_hard_label_trades_loss_or_ltds_own(batch):
  """awp.proxy_loss='trades' (the AWP code's calc_awp): CE(f(x), y) + beta KL(f(x) || f(x_adv));
  'method': LTD's own soft-label loss."""
  teacher, (x_adv, adv), (x, clean), y, _, _ = batch
  config = config_lib.default_config()
  config.ltd.teacher_temperature, config.ltd.student_temperature = 5.0, 2.0
  config.trades.beta = 6.0
  inputs = methods.MethodInputs(x, y, None, None, teacher)
  robust = _np_kl(np_softmax(clean), adv).mean()
  config.awp.proxy_loss = 'trades'
  hard, _ = methods.ltd_awp_proxy_loss(linear_forward, inputs, x_adv, config)
  ce = -np.log(np_softmax(clean)[np.arange(6), y]).mean()
  np.testing.assert_allclose(hard, ce + 6.0 * robust, rtol=1e-5)
  config.awp.proxy_loss = 'method'
  soft, _ = methods.ltd_awp_proxy_loss(linear_forward, inputs, x_adv, config)
  natural = -(np_softmax(teacher, 5.0) * np.log(np_softmax(clean, 2.0))).sum(-1).mean()
  np.testing.assert_allclose(soft, natural + 6.0 * robust, rtol=1e-5)
  assert abs(float(soft) - float(hard)) > 0.1


def test_awp_relative_perturbation_matches_numpy():
  rng = np.random.default_rng(4)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))}, 'bn': {'scale': rng.normal(size=4),
            'bias': rng.normal(size=4)}, 'fc': {'kernel': rng.normal(size=(4, 3)),
                                                'bias': rng.normal(size=3)}}
  proxy = jax.tree_util.tree_map(lambda w: w + rng.normal(size=w.shape) * 0.1, params)
  d = awp.relative_perturbation(params, proxy)
  for layer in ('conv', 'fc'):
    w, p = params[layer]['kernel'], proxy[layer]['kernel']
    want = np.linalg.norm(w) / (np.linalg.norm(p - w) + 1e-20) * (p - w)
    np.testing.assert_allclose(d[layer]['kernel'], want, rtol=1e-6)
    assert np.linalg.norm(d[layer]['kernel']) == pytest.approx(np.linalg.norm(w))
  for leaf in (d['bn']['scale'], d['bn']['bias'], d['fc']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_awp_perturbation_is_a_proxy_ascent_step():
  w = {'k': jnp.array([[1.0, 2.0], [3.0, -1.0]])}
  loss = lambda p: jnp.sum(p['k'] ** 2 * jnp.array([[1.0, 0.5], [0.1, 2.0]]))
  delta = awp.weight_perturbation(loss, w, proxy_lr=0.01, gamma=0.005)
  grad = np.array([[2.0, 2.0], [0.6, -4.0]])
  want = 0.005 * np.linalg.norm(w['k']) / np.linalg.norm(0.01 * grad) * 0.01 * grad
  np.testing.assert_allclose(delta['k'], want, rtol=1e-5)


def test_awp_starts_in_the_epoch_the_awp_code_starts_it():
  """train_trades_cifar.py: ``for epoch in range(1, epochs + 1): ... if epoch >= awp_warmup``."""
  spe = 7
  for warmup in (0, 1, 2, 10):
    released = [epoch >= warmup for epoch in range(1, 13) for _ in range(spe)]
    ours = [bool(awp.is_active(step, warmup, spe)) for step in range(12 * spe)]
    assert ours == released, warmup


def _awp_setup(tiny_config, **awp_kw):
  tiny_config.method = 'awp'
  for k, v in awp_kw.items():
    tiny_config.awp[k] = v
  ds = data.load_digits()
  model = state_lib.build_model(tiny_config, 10)
  st = state_lib.create_train_state(tiny_config, model, ds.image_shape, 10, 5)
  step = lambda m, cfg: jax.jit(lambda s: train.train_step(
      s, ds.train_images[:64], ds.train_labels[:64], method=methods.get_method(m), config=cfg,
      augment_kind='none', num_classes=10, steps_per_epoch=5))
  return st, step


def test_awp_gamma_zero_and_warmup_equal_trades(tiny_config):
  """Same parameters and optimizer state; the running statistics differ by design (AWP's code
  runs the adversarial forward first: test_reference_parity checks both orders). The two steps
  are two programs, each with its own attack, and a sign(grad) that rounds the other way in one
  of them would move a pixel by alpha: the attack takes no step here (x_adv is the start, equal
  in both to rounding), so what is compared is the update alone."""
  tiny_config.attack.steps = 0
  st, step = _awp_setup(tiny_config, gamma=0.0, warmup_epochs=0)
  trades_cfg = ml_collections.ConfigDict(tiny_config.to_dict())
  trades_cfg.method = 'trades'
  ref, _ = step('trades', trades_cfg)(st)
  got, _ = step('awp', tiny_config)(st)  # proxy runs, but gamma = 0
  for a, b in zip(jax.tree_util.tree_leaves((ref.params, ref.opt_state)),
                  jax.tree_util.tree_leaves((got.params, got.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  tiny_config.awp.gamma, tiny_config.awp.warmup_epochs = 0.5, 2  # step 0, epoch 1 < 2: warming up
  warm, _ = step('awp', tiny_config)(st)
  for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(warm.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_awp_restores_the_weights_exactly_and_changes_the_gradient(tiny_config):
  st, step = _awp_setup(tiny_config, gamma=0.5, warmup_epochs=0)
  tiny_config.optim.lr, tiny_config.optim.weight_decay = 0.0, 0.0
  st = st.replace(tx=state_lib.make_optimizer(tiny_config.optim, 5))
  st = st.replace(opt_state=st.tx.init(st.params))
  got, _ = step('awp', tiny_config)(st)
  for a, b in zip(jax.tree_util.tree_leaves(st.params), jax.tree_util.tree_leaves(got.params)):
    # Exact by construction: the update is applied to w, not to w + delta, and is 0 at lr = 0.
    np.testing.assert_array_equal(a, b)  # lr = 0: the perturbation is fully undone
  trades_cfg = ml_collections.ConfigDict(tiny_config.to_dict())
  trades_cfg.method = 'trades'
  ref, _ = step('trades', trades_cfg)(st)
  momentum_awp = jax.tree_util.tree_leaves(got.opt_state)
  momentum_trades = jax.tree_util.tree_leaves(ref.opt_state)
  assert any(not np.allclose(a, b) for a, b in zip(momentum_awp, momentum_trades))


def test_awp_update_is_the_gradient_at_w_plus_delta_applied_to_w(tiny_config):
  """The AWP code: perturb w by delta = gamma ||w|| / ||w_p - w|| (w_p - w) per kernel, with
  w_p = w + proxy_lr grad L(w); optimizer.step() at w + delta (momentum and weight decay see the
  perturbed weights); restore (subtract delta). With a parameter-independent adversary
  (attack.steps = 0) the update must equal that of a gamma = 0 step taken from w + delta,
  less delta, with delta computed here from the gradient at w."""
  tiny_config.attack.steps = 0
  tiny_config.optim.momentum, tiny_config.optim.weight_decay = 0.9, 5e-3
  proxy_lr, gamma = 0.01, 0.5
  st, step = _awp_setup(tiny_config, gamma=gamma, warmup_epochs=0, proxy_lr=proxy_lr)
  # The gradient of the proxy loss at w: one plain SGD step of lr 1 from w with gamma = 0.
  plain = ml_collections.ConfigDict(tiny_config.to_dict())
  plain.awp.gamma, plain.optim.lr, plain.optim.momentum, plain.optim.weight_decay = 0.0, 1.0, 0.0, 0.0
  plain.optim.lr_boundaries_epochs = ()
  sgd = st.replace(tx=state_lib.make_optimizer(plain.optim, 5))
  sgd = sgd.replace(opt_state=sgd.tx.init(sgd.params))
  stepped, _ = step('awp', plain)(sgd)
  grad = jax.tree_util.tree_map(lambda a, b: np.float64(a) - np.float64(b), st.params, stepped.params)

  def delta_of(w, g):
    if w.ndim <= 1:
      return np.zeros_like(np.float64(w))
    diff = proxy_lr * g
    return gamma * np.linalg.norm(np.float64(w)) / np.linalg.norm(diff) * diff
  delta = jax.tree_util.tree_map(delta_of, st.params, grad)
  assert all(np.any(d != 0) for d in jax.tree_util.tree_leaves(delta) if d.ndim > 1)

  got, _ = step('awp', tiny_config)(st)
  no_awp = ml_collections.ConfigDict(tiny_config.to_dict())
  no_awp.awp.gamma = 0.0
  at = st.replace(params=jax.tree_util.tree_map(lambda w, d: (np.float64(w) + d).astype(np.float32),
                                                st.params, delta))
  ref, _ = step('awp', no_awp)(at)
  for a, b, d in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(ref.params),
                     jax.tree_util.tree_leaves(delta)):
    np.testing.assert_allclose(a, np.float64(b) - d, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((got.opt_state, got.batch_stats)),
                  jax.tree_util.tree_leaves((ref.opt_state, ref.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # A perturbation that did not reach the gradient (or was not restored) is told apart.
  unperturbed, _ = step('awp', no_awp)(st)
  assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(
      jax.tree_util.tree_leaves(got.opt_state), jax.tree_util.tree_leaves(unperturbed.opt_state)))


def test_absld_training_updates_logs_and_checkpoints_temperatures(tiny_config, tmp_path):
  import json
  teacher_dir = tmp_path / 'teacher'
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(teacher_dir))
  tiny_config.method = 'absld'
  tiny_config.teacher.source, tiny_config.teacher.path = 'workdir', str(teacher_dir)
  tiny_config.num_epochs = 2
  tiny_config.report.plots = True  # temperatures.png
  st = train.train_and_evaluate(tiny_config, str(tmp_path / 'student'))

  class Stop(Exception):
    pass

  def stop_at_7(step):
    if step == 7:
      raise Stop()

  with pytest.raises(Stop):  # killed mid-epoch 2, after the epoch-1 checkpoint and update
    train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'), step_hook=stop_at_7)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / 'resumed'))
  # Exact by construction: both runs execute the same compiled step program (same HLO, so the
  # same executable; the compilation cache hands the resumed run the very same one) on
  # the same state and batches, and checkpoints restore every bit.
  for a, b in zip(jax.tree_util.tree_leaves((st.params, st.method_state)),
                  jax.tree_util.tree_leaves((resumed.params, resumed.method_state))):
    np.testing.assert_array_equal(a, b)
  records = [json.loads(l) for l in open(tmp_path / 'student' / 'metrics.jsonl')]
  temps = [r for r in records if r['kind'] == 'temperatures']
  assert [r['epoch'] for r in temps] == [1, 2]
  np.testing.assert_allclose(st.method_state['tau_adv'], temps[-1]['tau_adv'], rtol=1e-6)
  assert not np.allclose(st.method_state['tau_adv'], 1.0)
  assert not np.allclose(st.method_state['tau_clean'], 1.0)
  # Epoch 1's update is Eq. 10 on the logged risks, bounds [0.5, 5], beta 0.1 / 10: epoch 1 is
  # an lr milestone of the tiny config, and the released script decays beta before the update.
  np.testing.assert_allclose(temps[0]['tau_adv'],
                             np_eq10(np.ones(10), np.array(temps[0]['risk_adv']), 0.01, 0.5, 5.0),
                             rtol=1e-5)
  assert float(jnp.sum(st.method_state['risk_adv_count'])) == 0  # cleared at the epoch's end
  import os
  assert os.path.getsize(tmp_path / 'student' / 'temperatures.png') > 10_000
  assert os.path.getsize(tmp_path / 'student' / 'per_class_accuracy.png') > 10_000


def test_temperature_update_after_a_milestone_on_8_devices_with_unbalanced_classes(tmp_path):
  """Epoch 2 of ABSLD (lr milestone after epoch 1: beta decayed) sharded over 8 devices, on
  classes from 40 samples down to 2 and one absent: the per-class risks are recomputed
  unsharded from the student's logits and Eq. 10 in NumPy (tests/absld_epoch_worker.py)."""
  import json
  import subprocess
  import sys
  out = tmp_path / 'absld.json'
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'absld_epoch_worker.py'),
                         str(out)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.load(open(out))
  assert r['devices'] == 8
  for kind in ('adv', 'clean'):
    k = r[kind]
    np.testing.assert_array_equal(k['library_count'], r['counts'])
    np.testing.assert_allclose(k['library_sum'], k['expected_sum'], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k['tau_after'], k['expected'], rtol=1e-4, atol=1e-5)
    assert k['tau_after'][7] == k['tau_before'][7]  # class 7 unseen: kept
    changed = np.abs(np.subtract(k['expected'], k['tau_before'])) > 1e-3
    assert changed.sum() >= 6  # most classes move, by different amounts
    for wrong in ('undecayed', 'by_sums'):  # the test tells these apart
      assert np.abs(np.subtract(k[wrong], k['expected'])).max() > 1e-2, wrong
  assert np.abs(np.subtract(r['adv']['tau_after'], r['clean']['tau_after'])).max() > 0.1


def test_register_adds_a_method_by_name():
  method = methods.Method(methods.pgd_at_adversary, methods.natural_loss)
  try:
    methods.register('test_only_method', method)
    assert methods.get_method('test_only_method') is method
  finally:
    methods.METHODS.pop('test_only_method', None)
  with pytest.raises(ValueError) as error:
    methods.get_method('test_only_method')
  # The message lists every registered method, comma-separated, in order.
  assert str(error.value) == ("unknown method 'test_only_method': choose one of "
                              + ', '.join(sorted(methods.METHODS)))
  assert ', absld_manual, ' in str(error.value)


# The passes each method cannot do without, counted by hand in forward-pass units (forward 1,
# backward to the input 1, backward to the weights 2) for a K-step training attack, and the
# statistics-only replays ``reference_bn_passes`` adds (tests/test_compile_plan.py checks the
# counts against XLA's FLOPs of the compiled steps where the CUDA plugin is installed).
HAND_PASSES = {
    'natural': (lambda k: 3, 0), 'pgd_at': (lambda k: 2 * k + 3, 0),
    'trades': (lambda k: 2 * k + 7, 1), 'awp': (lambda k: 2 * k + 13, 1),
    'ltd': (lambda k: 2 * k + 7, 1), 'rslad': (lambda k: 2 * k + 6, 0),
    'absld': (lambda k: 2 * k + 6, 0), 'absld_manual': (lambda k: 2 * k + 6, 0),
    'ard': (lambda k: 2 * k + 6, 0), 'iad': (lambda k: 2 * k + 10, 0),
    'adaad': (lambda k: 2 * k + 6, 0), 'soft_label_natural': (lambda k: 3, 0),
    'fair_ard': (lambda k: 2 * k + 6, 0), 'fair_rslad': (lambda k: 2 * k + 6, 0),
    'bat': (lambda k: 4 * k + 10, 0), 'frl': (lambda k: 2 * k + 7, 1),
    'cfa': (lambda k: 2 * k + 7, 2)}


@pytest.mark.parametrize('replayed', [False, True])
@pytest.mark.parametrize('steps', [3, 10])
def test_minimal_passes_are_the_hand_counted_passes(steps, replayed):
  c = config_lib.default_config()
  c.attack.steps, c.reference_bn_passes = steps, replayed
  assert set(HAND_PASSES) <= set(methods.METHODS)
  for name, (base, replays) in HAND_PASSES.items():
    c.method = name
    assert methods.get_method(name).minimal_passes(c) == base(steps) + replayed * replays, name
  c.method, c.ltd.base = 'ltd', 'awp'  # LTD on TRADES-AWP adds AWP's proxy step
  assert methods.get_method('ltd').minimal_passes(c) == 2 * steps + 13 + replayed
  assert methods.passes(lambda k: 5 * k)(c) == 5 * steps  # no replays unless stated
