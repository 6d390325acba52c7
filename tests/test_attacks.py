"""Attacks: eps-ball and box invariants, hand-computed gradients, and real damage to a trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltd_jax import attacks
from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import methods
from ltd_jax import state as state_lib
from ltd_jax import train


def linear_logits_fn(w):
  return lambda x: x.reshape(x.shape[0], -1) @ w


@pytest.fixture
def linear():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  x = jnp.asarray(rng.uniform(size=(8, 2, 2, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=8))
  return w, x, y


@pytest.mark.parametrize('init', ['uniform', 'normal', 'none'])
@pytest.mark.parametrize('objective', ['ce', 'cw', 'kl'])
def test_pgd_stays_in_eps_ball_and_box(linear, init, objective):
  w, x, y = linear
  f = linear_logits_fn(w)
  obj = {'ce': attacks.ce_objective(f, y), 'cw': attacks.cw_objective(f, y),
         'kl': attacks.kl_objective(f, jax.nn.softmax(f(x)))}[objective]
  eps = 0.1
  x_adv = attacks.pgd_attack(obj, x, jax.random.PRNGKey(1), eps=eps, alpha=0.04, steps=7, init=init)
  assert x_adv.shape == x.shape
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  assert float(jnp.max(jnp.abs(x_adv - x))) > 0.05  # it moved


def test_attack_objectives_are_sums_over_the_batch(linear):
  """The released attacks' losses are summed (CrossEntropyLoss(reduction='sum'),
  KLDivLoss(size_average=False), the CW margin summed): each is checked against numpy per
  example, so a mean (1/B of it) would fail."""
  w, x, y = linear
  logits = np.asarray(x).reshape(8, -1).astype(np.float64) @ np.asarray(w, np.float64)
  log_q = logits - logits.max(1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
  yy = np.asarray(y)
  f = linear_logits_fn(w)
  assert float(attacks.ce_objective(f, y)(x)) == pytest.approx(-log_q[np.arange(8), yy].sum(),
                                                                rel=1e-5)
  p = np.full((8, 3), 0.2)
  p[np.arange(8), yy] = 0.6
  kl = (p * (np.log(p) - log_q)).sum()
  assert float(attacks.kl_objective(f, jnp.asarray(p, jnp.float32))(x)) == pytest.approx(kl,
                                                                                     rel=1e-5)
  other = np.where(np.eye(3, dtype=bool)[yy], -np.inf, logits).max(1)
  cw = -np.maximum(logits[np.arange(8), yy] - other + 50.0, 0.0).sum()
  assert float(attacks.cw_objective(f, y)(x)) == pytest.approx(cw, rel=1e-5)


def test_fgsm_matches_hand_computed_gradient_sign(linear):
  w, x, y = linear
  xf = np.asarray(x).reshape(8, -1).astype(np.float64)
  z = xf @ np.asarray(w, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(3)[np.asarray(y)]) @ np.asarray(w, np.float64).T  # d CE / d x
  expected = np.clip(xf + 0.05 * np.sign(grad), 0, 1).reshape(x.shape)
  got = attacks.fgsm_attack(attacks.ce_objective(linear_logits_fn(w), y), x, eps=0.05)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_one_step_pgd_without_init_is_fgsm(linear):
  w, x, y = linear
  obj = attacks.ce_objective(linear_logits_fn(w), y)
  pgd = attacks.pgd_attack(obj, x, jax.random.PRNGKey(0), eps=0.03, alpha=0.03, steps=1, init='none')
  np.testing.assert_allclose(pgd, attacks.fgsm_attack(obj, x, eps=0.03), atol=1e-7)


def test_zero_eps_returns_clean_images(linear):
  w, x, y = linear
  obj = attacks.ce_objective(linear_logits_fn(w), y)
  for init in attacks.INITS:
    x_adv = attacks.pgd_attack(obj, x, jax.random.PRNGKey(0), eps=0.0, alpha=0.01, steps=3,
                               init=init)
    np.testing.assert_allclose(x_adv, x, atol=1e-7)


def test_inits():
  x = jnp.full((1000, 4), 0.5)
  u = attacks.init_uniform(jax.random.PRNGKey(0), x, 0.1)
  assert float(jnp.abs(u - x).max()) <= 0.1 and float(jnp.abs(u - x).mean()) > 0.04
  n = attacks.init_normal(jax.random.PRNGKey(0), x, 0.1)
  assert 0.0008 < float(jnp.std(n - x)) < 0.0012
  with pytest.raises(ValueError, match='init'):
    attacks.pgd_attack(lambda a: jnp.sum(a), x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1,
                       steps=1, init='gaussian')


def test_unclipped_uniform_init_is_the_drawn_uniform_noise_in_the_inputs_dtype():
  """ARD / IAD start: x + U(-eps, eps), not clipped: at black pixels half the starts are
  negative; the noise is the draw of jax.random.uniform with the input's key and dtype."""
  x = jnp.zeros((2000, 4))
  rng = jax.random.PRNGKey(7)
  got = np.asarray(attacks.init_uniform_unclipped(rng, x, 0.1))
  np.testing.assert_array_equal(got, np.asarray(jax.random.uniform(rng, x.shape, x.dtype, -0.1,
                                                                   0.1)))
  assert -0.1 <= got.min() < -0.099 and 0.099 < got.max() <= 0.1
  assert 0.45 < (got < 0).mean() < 0.55
  half = attacks.init_uniform_unclipped(rng, jnp.full((8, 4), 0.5, jnp.bfloat16), 0.1)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(half, np.float32),
      np.asarray(0.5 + jax.random.uniform(rng, (8, 4), jnp.bfloat16, -0.1, 0.1), np.float32))


def test_uniform_init_is_the_drawn_noise_added_then_clipped_to_the_image_box():
  """Madry / evaluation PGD start: clip(x + U(-eps, eps), 0, 1) with the input's key and dtype:
  at black and white pixels the half of the draws that leaves [0, 1] is cut to the bound, at
  grey pixels the draw is added (not subtracted) as it is."""
  rng = jax.random.PRNGKey(11)
  x = jnp.tile(jnp.array([0.0, 0.5, 1.0]), (2000, 1))
  noise = np.asarray(jax.random.uniform(rng, x.shape, x.dtype, -0.1, 0.1))
  got = np.asarray(attacks.init_uniform(rng, x, 0.1))
  np.testing.assert_array_equal(got, np.clip(np.asarray(x) + noise, 0.0, 1.0))
  assert got.min() == 0.0 and got.max() == 1.0
  assert 0.45 < (got[:, 0] == 0.0).mean() < 0.55 and 0.45 < (got[:, 2] == 1.0).mean() < 0.55
  np.testing.assert_array_equal(got[:, 1], np.float32(0.5) + noise[:, 1])
  half = attacks.init_uniform(rng, jnp.full((8, 4), 0.5, jnp.bfloat16), 0.1)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(half, np.float32),
      np.asarray(0.5 + jax.random.uniform(rng, (8, 4), jnp.bfloat16, -0.1, 0.1), np.float32))


def test_normal_init_is_a_thousandth_of_the_drawn_normal_noise_in_the_inputs_dtype():
  """TRADES / AWP / RSLAD start: x + 0.001 N(0, 1), drawn with the input's key and dtype (a
  bfloat16 batch stays bfloat16), whatever the radius."""
  rng = jax.random.PRNGKey(3)
  x = jnp.full((500, 4), 0.5)
  got = np.asarray(attacks.init_normal(rng, x, 0.3))
  np.testing.assert_array_equal(
      got, np.float32(0.5) + np.float32(0.001) * np.asarray(jax.random.normal(rng, x.shape)))
  assert 0.0008 < np.std(got - 0.5) < 0.0012
  half = attacks.init_normal(rng, x.astype(jnp.bfloat16), 0.3)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(half, np.float32),
      np.asarray(0.5 + 0.001 * jax.random.normal(rng, x.shape, jnp.bfloat16), np.float32))


def test_clipped_normal_init_stays_in_the_image_box_and_is_the_normal_init_inside_it():
  """BAT's init: clip(x + 0.001 N(0, 1), 0, 1): at black and white pixels the noise that would
  leave [0, 1] is cut off; elsewhere it is init_normal's draw."""
  x = jnp.concatenate([jnp.zeros((500, 4)), jnp.ones((500, 4)), jnp.full((500, 4), 0.5)])
  rng = jax.random.PRNGKey(4)
  got = np.asarray(attacks.init_normal_clipped(rng, x, 0.1))
  free = np.asarray(attacks.init_normal(rng, x, 0.1))
  np.testing.assert_array_equal(got, np.clip(free, 0.0, 1.0))
  assert free[:500].min() < 0 and free[500:1000].max() > 1  # the draw does leave the box
  assert got.min() == 0.0 and got.max() == 1.0


def test_projection():
  x = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(attacks.project_linf(jnp.array([-1.0, 0.9, 0.95]), x, 0.1),
                             [0.0, 0.6, 0.95])


@pytest.fixture(scope='module')
def natural_digits_model(tmp_path_factory):
  from tests.conftest import config_lib
  c = config_lib.default_config()
  c.method, c.eps, c.data.name = 'natural', 0.2, 'digits'
  c.model.name, c.model.width = 'small_cnn', 8
  c.num_epochs, c.batch_size, c.optim.lr = 4, 64, 0.05
  c.optim.lr_boundaries_epochs = ()
  c.eval.selection, c.eval.final, c.eval.during_training = 'last', ('clean',), ('clean',)
  c.progress_bar = False
  workdir = str(tmp_path_factory.mktemp('natural'))
  state = train.train_and_evaluate(c, workdir)
  return c, state, datasets.load(c.data)


def test_attacks_lower_a_trained_models_accuracy(natural_digits_model):
  config, state, ds = natural_digits_model
  config.eval.pgd_steps, config.eval.cw_steps, config.eval.alpha = 10, 10, 0.05
  step = evaluate.make_eval_step(state.apply_fn, ('clean', 'fgsm', 'pgd20', 'cw'), eps=0.2,
                                 eval_config=config.eval)
  res = evaluate.evaluate(step, state.variables, ds.test_images, ds.test_labels, 10, 128,
                          jax.random.PRNGKey(0))
  assert res['clean']['avg'] > 0.85
  assert res['fgsm']['avg'] < res['clean']['avg'] - 0.3
  assert res['pgd20']['avg'] <= res['fgsm']['avg'] + 0.02
  assert res['pgd20']['avg'] < 0.3 and res['cw']['avg'] < 0.3
  # A tiny eps barely changes accuracy: the damage comes from the perturbation budget.
  small = evaluate.make_eval_step(state.apply_fn, ('pgd20',), eps=1e-3, eval_config=config.eval)
  res_small = evaluate.evaluate(small, state.variables, ds.test_images, ds.test_labels, 10, 128,
                                jax.random.PRNGKey(0))
  assert res_small['pgd20']['avg'] > res['clean']['avg'] - 0.05


def test_custom_projection_and_step_compose(linear):
  w, x, y = linear
  obj = attacks.ce_objective(linear_logits_fn(w), y)
  box_only = lambda xa, x0, eps: jnp.clip(xa, 0.0, 1.0)
  x_adv = attacks.pgd_attack(obj, x, jax.random.PRNGKey(0), eps=0.05, alpha=0.05, steps=4,
                             init='none', project=box_only)
  assert float(jnp.max(jnp.abs(x_adv - x))) > 0.05 + 1e-6  # left the eps-ball: no eps projection
  grad_step = lambda xa, g, alpha: xa + alpha * g / (jnp.abs(g).max() + 1e-12)
  x_l = attacks.pgd_attack(obj, x, jax.random.PRNGKey(0), eps=0.05, alpha=0.01, steps=2,
                           init='none', step_fn=grad_step)
  assert float(jnp.max(jnp.abs(x_l - x))) <= 0.02 + 1e-6


def digits_student_with_moved_statistics(tiny_config):
  """A tiny student whose running BatchNorm statistics are off its batch's (+0.5), and 32 digits."""
  ds = data.load_digits()
  model = state_lib.build_model(tiny_config, 10)
  state = state_lib.create_train_state(tiny_config, model, ds.image_shape, 10, 5)
  state = state.replace(batch_stats=jax.tree_util.tree_map(lambda a: a + 0.5, state.batch_stats))
  x, y = data.to_float(ds.train_images[:32]), ds.train_labels[:32]
  return state, x, y, methods.MethodInputs(x, y, jax.random.PRNGKey(3))


def test_training_attack_batchnorm_modes(tiny_config):
  """eval: the running statistics, unchanged; train: the batch's statistics, and every attack
  forward moves the running ones, as K chained train-mode forwards on the iterates would."""
  state, x, y, inputs = digits_student_with_moved_statistics(tiny_config)
  evaluator = methods.AttackStudent.of(state, 'eval')
  np.testing.assert_allclose(evaluator(x), state.apply_fn(state.variables, x, train=False))
  mover = methods.AttackStudent.of(state, 'train')
  assert not np.allclose(evaluator(x), mover(x))
  once = methods.TrainForward(state.apply_fn, state.params, state.batch_stats)
  once(x)
  chex_equal = lambda a, b: jax.tree_util.tree_map(np.testing.assert_allclose, a, b)
  chex_equal(mover.batch_stats, once.batch_stats)  # one forward outside the attack moved them

  record = (jnp.zeros((tiny_config.attack.steps,) + x.shape), lambda t, k, xk, logits: t.at[k].set(xk))
  for student in (methods.AttackStudent.of(state, 'eval'), methods.AttackStudent.of(state, 'train')):
    x_adv, iterates = methods.pgd(student, lambda f: attacks.ce_objective(f, y), inputs,
                                  tiny_config, track=record)
    replay = methods.TrainForward(state.apply_fn, state.params, state.batch_stats)
    for k in range(tiny_config.attack.steps):
      replay(iterates[k])
    moved = jax.tree_util.tree_leaves(student.batch_stats)
    if student.moves_statistics:
      chex_equal(student.batch_stats, replay.batch_stats)
    else:
      chex_equal(student.batch_stats, state.batch_stats)
    assert not np.allclose(moved[0], jax.tree_util.tree_leaves(replay.batch_stats)[0]) or \
        student.moves_statistics
    # The same attack as the plain loop (eval) from the same start.
    if not student.moves_statistics:
      plain = methods.pgd(methods.AttackStudent.of(state), lambda f: attacks.ce_objective(f, y),
                          inputs, tiny_config)
      np.testing.assert_array_equal(plain, x_adv)


def test_square_schedule_halves_p_at_the_papers_boundaries():
  # Andriushchenko et al.: p_init up to query 10 of 10,000, then /2 up to 50, /4 up to 200, ...
  got = [float(attacks.square_fraction(0.8, q, 10000)) for q in (0, 10, 11, 50, 51, 9999)]
  np.testing.assert_allclose(got, [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512])
  # Budgets other than 10,000 are rescaled: query 11 of 1,000 counts as 110, in (50, 200].
  assert float(attacks.square_fraction(0.8, 11, 1000)) == pytest.approx(0.8 / 4)


def test_square_attack_needs_no_gradient_and_stays_in_the_ball():
  """A model with zero gradients everywhere (rounded logits) still falls to Square; the images
  stay within eps of x and in [0, 1]; misclassified ones are left as they are."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4 * 4 * 1, 3)), jnp.float32)
  logits_fn = lambda x: jnp.round(100 * x.reshape(len(x), -1) @ w)  # d/dx = 0
  x = jnp.asarray(rng.uniform(size=(64, 4, 4, 1)), jnp.float32)
  labels = jnp.argmax(logits_fn(x), -1)
  labels = labels.at[:8].set((labels[:8] + 1) % 3)  # 8 misclassified from the start
  assert float(jnp.abs(jax.grad(lambda z: logits_fn(z).sum())(x)).max()) == 0
  eps = 0.3
  x_adv = attacks.square_attack(logits_fn, x, labels, jax.random.PRNGKey(1), eps=eps, queries=200)
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  np.testing.assert_array_equal(x_adv[:8], x[:8])
  fooled = jnp.argmax(logits_fn(x_adv[8:]), -1) != labels[8:]
  pgd = attacks.pgd_attack(attacks.ce_objective(logits_fn, labels), x, jax.random.PRNGKey(2),
                           eps=eps, alpha=eps / 4, steps=10, init='none')
  assert float(fooled.mean()) > 0.5  # black box succeeds ...
  np.testing.assert_array_equal(pgd, x)  # ... where a gradient attack cannot move


def test_margin_square_init_and_proposal_by_hand():
  logits = jnp.array([[2.0, 5.0, 1.0], [0.5, -1.0, 3.0]])
  np.testing.assert_allclose(attacks.margin(logits, jnp.array([1, 0])), [3.0, -2.5])
  # Stripes: every pixel of a column and channel moves by the same +-eps, then is clipped.
  x = jnp.full((2, 5, 6, 3), 0.5).at[0, 0, 0, 0].set(0.95)
  init = np.asarray(attacks.square_init(jax.random.PRNGKey(0), x, 0.1))
  delta = init - np.asarray(x)
  np.testing.assert_allclose(np.abs(delta[:, 1:]), 0.1, atol=1e-6)
  np.testing.assert_allclose(delta[:, 1:], np.broadcast_to(delta[:, 1:2], delta[:, 1:].shape))
  assert init[0, 0, 0, 0] in (1.0, np.float32(0.85))
  assert (delta[:, 1] > 0).any() and (delta[:, 1] < 0).any()
  # A proposal replaces one side x side window per example with x +- eps (one sign per channel).
  x_best = jnp.zeros((3, 6, 6, 2))
  x = jnp.full((3, 6, 6, 2), 0.5)
  out = np.asarray(attacks.square_proposal(jax.random.PRNGKey(3), x_best, x, 0.25, 2))
  for b in range(3):
    changed = np.argwhere(np.any(out[b] != 0.0, axis=-1))
    assert len(changed) == 4  # a 2 x 2 window
    (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
    assert (r1 - r0, c1 - c0) == (1, 1)
    window = out[b, r0:r1 + 1, c0:c1 + 1]
    np.testing.assert_allclose(np.abs(window - 0.5), 0.25)
    np.testing.assert_allclose(window, np.broadcast_to(window[:1, :1], window.shape))
  places = {tuple(np.argwhere(np.any(out[b] != 0, -1)).min(0)) for b in range(3)}
  assert len(places) > 1  # a different place per example
  # The window is x + eps * s for the signs s drawn from the proposal's third key (the sign is
  # a fair coin, so only the draw itself tells x + eps * s from x - eps * s).
  signs = jax.random.choice(jax.random.split(jax.random.PRNGKey(3), 3)[2], jnp.array([-1.0, 1.0]),
                            (3, 1, 1, 2))
  for b in range(3):
    r0, c0 = np.argwhere(np.any(out[b] != 0.0, axis=-1)).min(0)
    np.testing.assert_allclose(out[b, r0, c0], 0.5 + 0.25 * np.asarray(signs[b, 0, 0]))


def test_square_attack_keeps_only_improvements():
  """Each query is kept only where it lowers a positive margin: the final margin is never above
  the stripes' (the initial point), and an example already misclassified is never touched."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  logits_fn = lambda x: 10 * x.reshape(len(x), -1) @ w
  x = jnp.asarray(rng.uniform(size=(32, 4, 4, 1)), jnp.float32)
  labels = jnp.argmax(logits_fn(x), -1)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(4))
  start = attacks.margin(logits_fn(attacks.square_init(init_rng, x, 0.05)), labels)
  for queries in (1, 30):
    x_adv = attacks.square_attack(logits_fn, x, labels, jax.random.PRNGKey(4), eps=0.05,
                                  queries=queries)
    end = attacks.margin(logits_fn(x_adv), labels)
    if queries == 1:  # no query yet: the stripes themselves
      np.testing.assert_allclose(end, start, rtol=1e-6)
    else:
      assert np.all(np.asarray(end) <= np.asarray(start) + 1e-6)
      assert np.any(np.asarray(end) < np.asarray(start) - 1e-3)


def test_square_schedule_boundaries_one_by_one():
  """p halves once per boundary passed: query b + 1 of 10,000 is past boundary b, query b not;
  budgets are rescaled with integer division (query 2501 of 12,499 counts as 2000)."""
  import inspect  # pylint: disable=g-import-not-at-top
  bounds = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
  for k, b in enumerate(bounds):
    assert float(attacks.square_fraction(0.8, b, 10000)) == pytest.approx(0.8 / 2 ** k), b
    assert float(attacks.square_fraction(0.8, b + 1, 10000)) == pytest.approx(0.8 / 2 ** (k + 1)), b
  assert float(attacks.square_fraction(0.8, 2501, 12499)) == pytest.approx(0.8 / 2 ** 5)
  assert float(attacks.square_fraction(0.8, 1, 999)) == pytest.approx(0.8)  # 10.01 counts as 10
  assert inspect.signature(attacks.square_attack).parameters['p_init'].default == 0.8  # the paper's


def test_square_proposal_windows_cover_every_place_with_independent_signs():
  """Over many examples: every window is side x side inside the image, its top-left corner
  takes every row and column from 0 to h - side, and signs differ across examples and channels."""
  b, h, w, c, side = 256, 6, 5, 3, 2
  x = jnp.full((b, h, w, c), 0.5)
  out = np.asarray(attacks.square_proposal(jax.random.PRNGKey(7), jnp.zeros_like(x), x, 0.25, side))
  tops, lefts, signs = set(), set(), []
  for i in range(b):
    rows, cols = np.nonzero(np.any(out[i] != 0.0, axis=-1))
    assert len(rows) == side * side
    tops.add(rows.min())
    lefts.add(cols.min())
    signs.append(np.sign(out[i, rows[0], cols[0]] - 0.5))
  assert tops == set(range(h - side + 1)) and lefts == set(range(w - side + 1))
  signs = np.array(signs)
  assert len({tuple(s) for s in signs}) > 4 and (signs[:, 0] != signs[:, 1]).any()


def test_square_attack_leaves_ties_and_keeps_only_strict_improvements():
  """An image whose margin is 0 (a tie: misclassified) is not attacked; a model whose logits
  ignore the input accepts no proposal (no strict improvement): x_adv is the stripes start; an
  example with a small positive margin (0.5) is attacked."""
  zeros = jnp.zeros((2, 4, 4, 1))
  tie = attacks.square_attack(lambda x: x.reshape(2, -1)[:, :2] * 0.0, zeros, jnp.array([0, 1]),
                              jax.random.PRNGKey(0), eps=0.3, queries=20)
  np.testing.assert_array_equal(tie, zeros)
  x = jnp.full((2, 4, 4, 1), 0.5)
  constant = lambda z: jnp.tile(jnp.array([[2.0, 0.0]]), (len(z), 1))
  init_rng, _ = jax.random.split(jax.random.PRNGKey(3))
  x_adv = attacks.square_attack(constant, x, jnp.array([0, 0]), jax.random.PRNGKey(3), eps=0.2,
                                queries=20)
  np.testing.assert_array_equal(x_adv, attacks.square_init(init_rng, x, 0.2))
  small = lambda z: jnp.stack([0.5 - z.reshape(len(z), -1).sum(-1) + 8.0,
                               jnp.zeros(len(z))], -1)  # margin 0.5 at x = 0.5, lowered by brighter pixels
  x_adv = attacks.square_attack(small, x, jnp.array([0, 0]), jax.random.PRNGKey(5), eps=0.2,
                                queries=30)
  start = attacks.square_init(jax.random.split(jax.random.PRNGKey(5))[0], x, 0.2)
  assert float(jnp.max(jnp.abs(x_adv - start))) > 0  # proposals were accepted


def test_square_attack_stops_an_example_whose_margin_reaches_exactly_zero():
  """As in the Square attack's code (only margin > 0 is attacked further), an example whose
  stripes start already has margin exactly 0 is fooled and stays at the start, though a later
  proposal would push its margin below 0; examples starting above 0 are attacked on.
  Model: z = (10 (x[0, 0] - x[1, 0]), 0), clean x[0, 0] = 0.95, x[1, 0] = 0.92 (margin 0.3):
  a +eps stripe on column 0 clips both to 1, margin 0."""
  x = jnp.full((32, 4, 4, 1), 0.5).at[:, 0, 0, 0].set(0.95).at[:, 1, 0, 0].set(0.92)
  y = jnp.zeros(32, jnp.int32)
  logits_fn = lambda z: jnp.stack([10 * (z[:, 0, 0, 0] - z[:, 1, 0, 0]), jnp.zeros(len(z))], -1)
  rng = jax.random.PRNGKey(6)
  start = attacks.square_attack(logits_fn, x, y, rng, eps=0.1, queries=1)
  at_zero = np.asarray(attacks.margin(logits_fn(start), y)) == 0.0
  assert 0 < at_zero.sum() < 32  # both kinds of start are present
  x_adv = attacks.square_attack(logits_fn, x, y, rng, eps=0.1, queries=200)
  np.testing.assert_array_equal(np.asarray(x_adv)[at_zero], np.asarray(start)[at_zero])
  final = np.asarray(attacks.margin(logits_fn(x_adv), y))
  assert (final[~at_zero] < 0).any()  # the others were pushed across the boundary


def test_square_side_and_defaults_by_hand():
  for p, h, w, side in ((0.8, 4, 4, 3), (0.8, 8, 8, 7), (0.05, 32, 32, 7), (0.001, 4, 4, 1),
                        (0.2, 6, 10, 3), (0.5, 32, 16, 15), (0.3, 8, 8, 4)):
    got = attacks.square_side(p, h, w)
    assert int(got) == side and got.dtype == jnp.int32, (p, h, w)
  rng = np.random.default_rng(2)
  w8 = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
  logits_fn = lambda z: 10 * z.reshape(len(z), -1) @ w8
  x = jnp.asarray(rng.uniform(size=(16, 8, 8, 1)), jnp.float32)
  y = jnp.argmax(logits_fn(x), -1)
  # 1,000 queries: the first ones use p = p_init itself (windows of 7 pixels, 4 at p = 0.3).
  run = lambda **kw: attacks.square_attack(logits_fn, x, y, jax.random.PRNGKey(1), eps=0.1,
                                           queries=1000, **kw)
  np.testing.assert_array_equal(run(), run(p_init=0.8))  # the default is the paper's 0.8
  assert not np.array_equal(run(), run(p_init=0.3))


def test_square_attack_starts_correct_examples_from_stripes_and_uses_every_query():
  """A margin of 0.5 (correct, close to the boundary): with no query the result is the stripes
  start; one query (queries=2) already moves some of 64 such examples; proposals are kept while
  the margin is positive, however small."""
  x = jnp.full((64, 4, 4, 1), 0.5)
  y = jnp.zeros(64, jnp.int32)
  logits_fn = lambda z: jnp.stack([0.5 + 0.01 * (z.reshape(len(z), -1).sum(-1) - 8.0),
                                   jnp.zeros(len(z))], -1)  # margin 0.5 +- 0.03 over the ball
  start = attacks.square_init(jax.random.split(jax.random.PRNGKey(2))[0], x, 0.1)
  none = attacks.square_attack(logits_fn, x, y, jax.random.PRNGKey(2), eps=0.1, queries=1)
  np.testing.assert_array_equal(none, start)
  one = attacks.square_attack(logits_fn, x, y, jax.random.PRNGKey(2), eps=0.1, queries=2)
  moved = np.any(np.asarray(one) != np.asarray(start), axis=(1, 2, 3))
  assert 0 < moved.sum() < 64


def test_methods_pgd_tracks_the_iterates_of_a_plain_logits_function(linear, tiny_config):
  """``methods.pgd`` with a logits function that is no AttackStudent and a ``track``: the same
  iterates as ``attacks.pgd_attack`` from the same start, and ``update`` sees each iterate and
  the function's logits on it."""
  w, x, y = linear
  f = linear_logits_fn(w)
  inputs = methods.MethodInputs(x, y, jax.random.PRNGKey(5))
  steps = tiny_config.attack.steps
  assert steps >= 2
  zeros = (jnp.zeros((steps,) + x.shape), jnp.zeros((steps, x.shape[0], 3)))
  record = lambda t, k, xk, logits: (t[0].at[k].set(xk), t[1].at[k].set(logits))
  x_adv, (iterates, logits) = methods.pgd(f, lambda g: attacks.ce_objective(g, y), inputs,
                                          tiny_config, track=(zeros, record))
  plain = methods.pgd(f, lambda g: attacks.ce_objective(g, y), inputs, tiny_config)
  np.testing.assert_array_equal(x_adv, plain)
  by_hand, hand_iterates = attacks.pgd_attack(
      attacks.ce_objective(f, y), x, inputs.rng, eps=tiny_config.eps,
      alpha=tiny_config.attack.alpha, steps=steps, init=tiny_config.attack.init,
      track=(zeros[0], lambda t, k, xk, s: t.at[k].set(xk)))
  np.testing.assert_allclose(x_adv, by_hand, rtol=0, atol=1e-6)
  np.testing.assert_allclose(iterates, hand_iterates, rtol=0, atol=1e-6)
  assert not np.allclose(iterates[0], iterates[1])  # the iterates move
  for k in range(steps):
    np.testing.assert_allclose(logits[k], f(iterates[k]), rtol=1e-5, atol=1e-5)


def test_batch_mode_attack_uses_the_batch_statistics_with_or_without_a_track(tiny_config):
  """``attack.bn_mode='batch'`` (DM-Improves-AT's TRADES attack): train-mode normalisation by
  the batch's statistics, the running ones left alone, and the same iterates when ``pgd``
  follows them (``track``, which runs the student through ``AttackStudent.at``)."""
  state, x, y, inputs = digits_student_with_moved_statistics(tiny_config)
  batch = methods.AttackStudent.of(state, 'batch')
  train_mode = state.apply_fn(state.variables, x, train=True, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(batch(x), train_mode, rtol=1e-6, atol=1e-6)
  assert not np.allclose(batch(x), state.apply_fn(state.variables, x, train=False), atol=1e-3)
  moved = batch.at(batch.batch_stats)
  assert moved.batch_statistics and not moved.moves_statistics
  np.testing.assert_allclose(moved(x), train_mode, rtol=1e-6, atol=1e-6)

  objective = lambda f: attacks.ce_objective(f, y)
  steps = tiny_config.attack.steps
  record = (jnp.zeros((steps,) + x.shape), lambda t, k, xk, logits: t.at[k].set(xk))
  plain = methods.pgd(batch, objective, inputs, tiny_config)
  tracked, _ = methods.pgd(methods.AttackStudent.of(state, 'batch'), objective, inputs,
                           tiny_config, track=record)
  np.testing.assert_allclose(tracked, plain, rtol=0, atol=1e-6)
  eval_mode = methods.pgd(methods.AttackStudent.of(state, 'eval'), objective, inputs, tiny_config)
  assert np.abs(np.asarray(eval_mode) - np.asarray(plain)).max() > 1e-3  # the mode shows
  for leaf, start in zip(jax.tree_util.tree_leaves(batch.batch_stats),
                         jax.tree_util.tree_leaves(state.batch_stats)):
    np.testing.assert_array_equal(leaf, start)  # the running statistics stay


def test_methods_pgd_takes_its_overrides_and_the_configured_loop_form(linear, tiny_config):
  """``eps``, ``alpha``, ``steps`` and ``init`` given to ``methods.pgd`` replace the training
  attack's config; ``attack.unroll`` decides the loop's form (a while loop unless unrolled)."""
  w, x, y = linear
  f = linear_logits_fn(w)
  inputs = methods.MethodInputs(x, y, jax.random.PRNGKey(6))
  objective = lambda g: attacks.ce_objective(g, y)
  assert tiny_config.attack.steps != 1 and tiny_config.attack.init != 'none'
  one = methods.pgd(f, objective, inputs, tiny_config, eps=0.05, alpha=0.02, init='none', steps=1)
  by_hand = attacks.pgd_attack(attacks.ce_objective(f, y), x, inputs.rng, eps=0.05, alpha=0.02,
                               steps=1, init='none')
  np.testing.assert_allclose(one, by_hand, rtol=0, atol=1e-7)
  step = np.abs(np.asarray(one) - np.asarray(x))
  assert step.max() <= 0.02 + 1e-6 and np.mean(np.isclose(step, 0.02, atol=1e-6)) > 0.9  # one step
  configured = methods.pgd(f, objective, inputs, tiny_config)
  assert np.abs(np.asarray(configured) - np.asarray(one)).max() > 1e-3
  loops = {}
  for unroll in (False, True):
    c = tiny_config.copy_and_resolve_references()
    c.attack.unroll = unroll
    attack = jax.jit(lambda images: methods.pgd(f, objective, methods.MethodInputs(
        images, y, jax.random.PRNGKey(6)), c))
    loops[unroll] = attack.lower(x).as_text().count('stablehlo.while')
  assert loops[False] == loops[True] + 1, loops


def test_methods_pgd_follows_the_iterates_of_a_bfloat16_student(linear, tiny_config):
  """A mixed-precision student's logits are bfloat16: the tracked path's carry holds logits of
  that dtype (a float32 placeholder would not match the loop's carry)."""
  w, x, y = linear
  f = lambda images: linear_logits_fn(w)(images).astype(jnp.bfloat16)
  inputs = methods.MethodInputs(x, y, jax.random.PRNGKey(7))
  steps = tiny_config.attack.steps
  record = (jnp.zeros((steps, x.shape[0], 3), jnp.bfloat16),
            lambda t, k, xk, logits: t.at[k].set(logits))
  x_adv, logits = methods.pgd(f, lambda g: attacks.ce_objective(g, y), inputs, tiny_config,
                              track=record)
  assert logits.dtype == jnp.bfloat16 and x_adv.dtype == x.dtype
  np.testing.assert_array_equal(logits[0], f(attack_start(x, inputs, tiny_config)))  # x_0's


def attack_start(x, inputs, config):
  """The training attack's start from x (its init drawn from the inputs' rng)."""
  return attacks.INITS[config.attack.init](inputs.rng, x, config.eps)


def test_unroll_default_is_a_bool_per_platform_and_a_set_value_wins():
  """Unrolled attack loops by default for CPU training steps only; the resolved value is a bool
  (a None would read as 'not set' and be resolved again, on another backend)."""
  assert attacks.resolve_unroll(None, 'train', 'cpu') is True
  for platform in ('gpu', 'tpu'):
    assert attacks.resolve_unroll(None, 'train', platform) is False
  assert attacks.resolve_unroll(None, 'eval', 'cpu') is False
  assert attacks.resolve_unroll(0, 'train', 'cpu') is False
  assert attacks.resolve_unroll(1, 'eval', 'gpu') is True


def test_per_sample_values_broadcast_over_images_and_scalars_stay_scalars():
  """A [B] eps becomes [B, 1, 1, 1]; a Python number and a 0-d array stay as they are, so they
  broadcast over inputs of any rank."""
  eps = attacks.per_sample(jnp.asarray([0.1, 0.2]))
  assert eps.shape == (2, 1, 1, 1)
  np.testing.assert_allclose((jnp.zeros((2, 3, 3, 1)) + eps)[:, 1, 2, 0], [0.1, 0.2])
  assert attacks.per_sample(0.25) == 0.25
  assert jnp.ndim(attacks.per_sample(jnp.float32(0.25))) == 0
  assert jnp.ndim(attacks.per_sample(jnp.max(jnp.asarray([0.1, 0.3])))) == 0


def test_pgd_defaults_are_a_uniform_start_and_a_rolled_loop():
  """Without init / unroll: the uniform start (the same x_K as init='uniform' from the same key,
  not the no-noise start's) and the K steps as one loop in the program (unroll=True writes them
  out, for XLA's cost analysis)."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).uniform(0.2, 0.8, size=(2, 2, 2, 3)), jnp.float32)
  objective = attacks.ce_objective(lambda z: z.reshape(2, -1) @ w, jnp.asarray([0, 2]))
  rng = jax.random.PRNGKey(4)
  run = lambda **kw: attacks.pgd_attack(objective, x, rng, eps=0.1, alpha=0.01, steps=3, **kw)
  np.testing.assert_array_equal(run(), run(init='uniform'))
  assert np.abs(np.asarray(run()) - np.asarray(run(init='none'))).max() > 1e-3

  def flops(**kw):  # XLA's cost analysis counts a loop's body once
    compiled = jax.jit(lambda z: attacks.pgd_attack(
        objective, z, rng, eps=0.1, alpha=0.01, steps=3, **kw)).lower(x).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']
  assert flops() == flops(unroll=False) < 0.75 * flops(unroll=True)
