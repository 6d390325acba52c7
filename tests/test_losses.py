"""Losses against a direct NumPy transcription of the formulas in METHODS.md."""

import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import losses
from ltd_jax import methods


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(6, 5)) * 3).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)


def test_cross_entropy_matches_numpy(logits):
  z, _ = logits
  y = np.array([0, 1, 2, 3, 4, 0])
  per = -np_log_softmax(z.astype(np.float64))[np.arange(6), y]
  np.testing.assert_allclose(losses.cross_entropy(z, y, 'none'), per, rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(z, y, 'sum'), per.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(z, y, 'batchmean'), per.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(z, y, 'elementwise_mean'), per.mean() / 5,
                             rtol=1e-5)


def test_kl_matches_numpy_and_both_forms_agree(logits):
  t, z = logits
  p = np.exp(np_log_softmax(t.astype(np.float64)))
  per = (p * (np.log(p) - np_log_softmax(z.astype(np.float64)))).sum(-1)
  np.testing.assert_allclose(losses.kl_from_logits(t, z, 'none'), per, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses.kl_divergence(p.astype(np.float32), z, 'batchmean'),
                             per.mean(), rtol=1e-4)
  assert float(losses.kl_from_logits(t, t, 'sum')) == pytest.approx(0.0, abs=1e-5)
  # Without a reduction: the mean over the batch (KLDivLoss(reduction='batchmean')).
  np.testing.assert_allclose(losses.kl_from_logits(t, z), per.mean(), rtol=1e-4)
  np.testing.assert_allclose(losses.kl_divergence(p.astype(np.float32), z), per.mean(), rtol=1e-4)
  # elementwise_mean divides by batch x classes (6 x 5 here; not 6 x 6).
  np.testing.assert_allclose(losses.kl_from_logits(t, z, 'elementwise_mean'), per.mean() / 5,
                             rtol=1e-4)


def test_kl_handles_zero_probabilities():
  p = np.array([[1.0, 0.0, 0.0]], np.float32)
  z = np.array([[2.0, 1.0, 0.0]], np.float32)
  expected = -np_log_softmax(z.astype(np.float64))[0, 0]
  np.testing.assert_allclose(losses.kl_divergence(p, z, 'sum'), expected, rtol=1e-5)



def test_kl_gradient_in_a_target_with_zeros_is_finite_and_exact():
  """d/dp_c sum_c p_c (log p_c - log_softmax(z)_c) = log p_c + 1 - log_softmax(z)_c where p_c > 0,
  and -log_softmax(z)_c at p_c = 0 (0 log 0 = 0 with a zero derivative): finite, as the
  attacks that differentiate through a teacher's softmax target (AdaAD) need when it underflows."""
  import jax  # pylint: disable=g-import-not-at-top
  p = np.array([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0]], np.float32)
  z = np.array([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]], np.float32)
  grad = jax.grad(lambda q: losses.kl_divergence(q, z, 'sum'))(jnp.asarray(p))
  ls = np_log_softmax(z.astype(np.float64))
  want = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) + 1.0 - ls, -ls)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)

def test_soft_cross_entropy_is_kl_plus_entropy(logits):
  t, z = logits
  p = np.exp(np_log_softmax(t.astype(np.float64) / 5.0))
  soft_ce = -(p * np_log_softmax(z.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(losses.soft_cross_entropy(z, p.astype(np.float32), 'none'), soft_ce,
                             rtol=1e-5)
  for reduction, want in (('sum', soft_ce.sum()), ('batchmean', soft_ce.mean()),
                          ('elementwise_mean', soft_ce.mean() / 5)):
    np.testing.assert_allclose(losses.soft_cross_entropy(z, p.astype(np.float32), reduction), want,
                               rtol=1e-5)
  np.testing.assert_allclose(losses.softmax_t(t, 5.0), p, rtol=1e-5)
  np.testing.assert_allclose(losses.softmax_t(t), np.exp(np_log_softmax(t.astype(np.float64))),
                             rtol=1e-5)  # T = 1 by default


def test_cw_margin_matches_numpy(logits):
  z, _ = logits
  y = np.array([0, 1, 2, 3, 4, 0])
  other = np.where(np.eye(5)[y] > 0, -np.inf, z).max(-1)
  per = -np.maximum(z[np.arange(6), y] - other + 50.0, 0.0)
  np.testing.assert_allclose(losses.cw_margin(z, y, 50.0, 'none'), per, rtol=1e-5)
  np.testing.assert_allclose(losses.cw_margin(z, y, 0.0, 'sum'),
                             -np.maximum(z[np.arange(6), y] - other, 0).sum(), rtol=1e-5)
  # Defaults: kappa 50 (the CW-inf of the papers) and a sum over the batch, as the attack uses.
  np.testing.assert_allclose(losses.cw_margin(z, y), per.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.cw_margin(z, y, 50.0, 'elementwise_mean'), per.mean() / 5,
                             rtol=1e-5)
  from ltd_jax import attacks  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(attacks.cw_objective(lambda x: x, y)(z), per.sum(), rtol=1e-5)


def test_unknown_reduction_raises(logits):
  with pytest.raises(ValueError, match='reduction'):
    losses.cross_entropy(logits[0], np.zeros(6, int), 'mean')


def test_trades_loss_matches_numpy():
  """Through a student whose logits depend on its input (x @ W) and distinct x, x_adv: feeding
  the clean image to the adversarial forward (or the reverse) gives another loss."""
  import ml_collections
  rng = np.random.default_rng(7)
  w = rng.normal(size=(3, 5)).astype(np.float32)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  x_adv = x + rng.normal(size=(6, 3)).astype(np.float32)
  clean, adv = x @ w, x_adv @ w
  y = np.array([0, 1, 2, 3, 4, 0])
  cfg = ml_collections.ConfigDict({'trades': {'beta': 6.0}})
  inputs = methods.MethodInputs(x, y, None, None, None)
  forward = lambda images: jnp.asarray(images) @ w
  loss, aux = methods.trades_loss(forward, inputs, x_adv, cfg)
  assert methods.awp_loss(forward, inputs, x_adv, cfg)[0] == pytest.approx(float(loss), rel=1e-6)
  ls_c, ls_a = np_log_softmax(clean.astype(np.float64)), np_log_softmax(adv.astype(np.float64))
  ce = -ls_c[np.arange(6), y].mean()
  kl = (np.exp(ls_c) * (ls_c - ls_a)).sum(-1).mean()
  np.testing.assert_allclose(loss, ce + 6.0 * kl, rtol=1e-5)
  np.testing.assert_allclose(aux['ce_adv'], -ls_a[np.arange(6), y], rtol=1e-5)
  np.testing.assert_allclose(aux['ce_clean'], -ls_c[np.arange(6), y], rtol=1e-5)
  # The logged terms (train.LOSS_TERMS) and the logits of train accuracy.
  np.testing.assert_allclose(aux['loss_natural'], ce, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_robust'], kl, rtol=1e-5)
  np.testing.assert_allclose(aux['logits_clean'], clean, rtol=1e-6)
  np.testing.assert_allclose(aux['logits_adv'], adv, rtol=1e-6)


def test_per_class_sums():
  s, c = methods.per_class_sums(np.array([1., 2., 3., 4.]), np.array([0, 2, 0, 2]), 3)
  np.testing.assert_allclose(s, [4., 0., 6.])
  np.testing.assert_allclose(c, [2., 0., 2.])


def test_natural_and_pgd_at_losses_return_the_logits_they_trained_on():
  """The train accuracies come from the aux logits: natural's on x, PGD-AT's on x_adv."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  x, x_adv = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0])
  inputs = methods.MethodInputs(x, y, None)
  forward = lambda z: jnp.asarray(z) @ w
  loss, aux = methods.natural_loss(forward, inputs, x_adv, None)
  np.testing.assert_allclose(aux['logits_clean'], x @ w, rtol=1e-5)
  np.testing.assert_allclose(aux['ce_clean'], -np_log_softmax(x @ w)[np.arange(5), y], rtol=1e-5)
  assert 'logits_adv' not in aux and float(loss) == pytest.approx(float(aux['ce_clean'].mean()))
  loss, aux = methods.pgd_at_loss(forward, inputs, x_adv, None)
  np.testing.assert_allclose(aux['logits_adv'], x_adv @ w, rtol=1e-5)
  assert 'logits_clean' not in aux and float(loss) == pytest.approx(float(aux['ce_adv'].mean()))
