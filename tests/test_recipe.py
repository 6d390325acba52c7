"""The pieces of Wang et al. 2023's recipe (wzekai99/DM-Improves-AT): the cosine schedule
(PyTorch's OneCycleLR, momentum cycled), weight decay without BatchNorm, label smoothing, the
attack's batch-statistics mode; and the bundled leaderboard configs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ltd_jax import config_lib
from ltd_jax import losses
from ltd_jax import methods
from ltd_jax import models
from ltd_jax import state as state_lib

torch = pytest.importorskip('torch')


def _optim(**kw):
  o = config_lib.default_config().optim
  o.update(kw)
  return o


@pytest.mark.parametrize('per, cycle', [('epoch', (0.85, 0.95)), ('step', ())])
def test_cosine_schedule_is_pytorch_one_cycle(per, cycle):
  epochs, spe = 80, 3
  o = _optim(schedule='cosine', lr=0.2, cosine_warmup_fraction=0.05, cosine_per=per,
             cycle_momentum=cycle, momentum=0.9, nesterov=True)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=0.2, momentum=0.9, nesterov=True)
  total = epochs if per == 'epoch' else epochs * spe
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=0.05, total_steps=total,
                                              cycle_momentum=bool(cycle),
                                              **({'base_momentum': cycle[0],
                                                  'max_momentum': cycle[1]} if cycle else {}))
  for step in range(epochs * spe):
    lr, momentum = state_lib.one_cycle(o, spe, epochs, step)
    group = opt.param_groups[0]
    np.testing.assert_allclose(float(lr), group['lr'], rtol=2e-5, atol=1e-8, err_msg=f'step {step}')
    np.testing.assert_allclose(float(momentum), group['momentum'], rtol=2e-6)
    np.testing.assert_allclose(float(state_lib.learning_rate_schedule(o, spe, epochs)(step)),
                               group['lr'], rtol=2e-5, atol=1e-8)
    if per == 'step' or (step + 1) % spe == 0:  # the DM-Improves-AT code steps it per epoch
      opt.step()
      sched.step()


def test_sgd_with_cycled_momentum_follows_pytorch():
  """The optimizer of the cosine schedule with cycled momentum against torch SGD + OneCycleLR
  (per step), on a quadratic with a gradient that changes every step."""
  o = _optim(schedule='cosine', lr=0.1, cosine_warmup_fraction=0.3, cosine_per='step',
             cycle_momentum=(0.8, 0.95), nesterov=True, weight_decay=1e-2)
  tx = state_lib.make_optimizer(o, steps_per_epoch=2, num_epochs=5)
  w0 = np.array([1.0, -2.0, 0.5], np.float32)
  params, opt_state = {'w': jnp.asarray(w0)}, None
  opt_state = tx.init(params)
  tw = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  topt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
  tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=0.1, pct_start=0.3, total_steps=10,
                                               base_momentum=0.8, max_momentum=0.95)
  target = np.array([0.3, 0.1, -0.4])
  for step in range(10):
    g = (np.asarray(params['w'], np.float64) - target) * (1 + step)
    updates, opt_state = tx.update({'w': jnp.asarray(g, jnp.float32)}, opt_state, params)
    params = {'w': params['w'] + updates['w']}
    topt.zero_grad()
    tw.grad = torch.tensor((tw.detach().numpy() - target) * (1 + step))
    topt.step()
    tsched.step()
    np.testing.assert_allclose(params['w'], tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_spares_batchnorm_as_group_weight_does():
  """group_weight: no decay for parameters whose name holds 'batchnorm' (every BatchNorm of the
  DM WideResNet); with zero gradients one step is -lr * wd * p elsewhere and nothing there."""
  model = models.create_model('dm-wrn-10-1', 10)
  params, _ = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
  params = jax.tree_util.tree_map(lambda p: p + 1.0, params)  # no zero weight (biases start at 0)
  o = _optim(lr=0.5, momentum=0.0, weight_decay=0.1, weight_decay_batchnorm=False)
  tx = state_lib.make_optimizer(o, 1, 1)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  flat = jax.tree_util.tree_leaves_with_path(updates)
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  spared = [n for n, (_, u) in zip(names, flat) if not np.any(np.asarray(u))]
  assert spared and all('batchnorm' in n for n in spared)
  assert sorted(spared) == sorted(n for n in names if 'batchnorm' in n)
  for (path, u), p in zip(flat, jax.tree_util.tree_leaves(params)):
    if 'batchnorm' not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(u, -0.5 * 0.1 * np.asarray(p), rtol=1e-6)


def test_label_smoothing_is_smooth_cross_entropy_loss():
  """core/utils/utils.py SmoothCrossEntropyLoss, transcribed."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  labels = rng.integers(0, 10, 6)
  x = torch.tensor(logits, dtype=torch.float64)
  logprobs = torch.nn.functional.log_softmax(x, dim=-1)
  nll = -logprobs.gather(dim=-1, index=torch.tensor(labels).unsqueeze(1)).squeeze(1)
  want = (0.9 * nll + 0.1 * -logprobs.mean(dim=-1)).mean().item()
  got = losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(float(losses.smoothed_cross_entropy(logits, labels, 0.0)),
                             float(losses.cross_entropy(logits, labels)), rtol=1e-6)


def test_batch_mode_attack_uses_batch_statistics_and_moves_nothing():
  model = models.create_model('dm-wrn-10-1', 10)
  params, stats = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
  stats = jax.tree_util.tree_map(lambda s: s + 0.3, stats)  # running statistics unlike a batch's
  x = jax.random.uniform(jax.random.PRNGKey(1), (12, 8, 8, 3))
  student = methods.AttackStudent(model.apply, params, stats, 'batch')
  train_logits = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                             mutable=['batch_stats'])[0]
  eval_logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
  np.testing.assert_allclose(student(x), train_logits, rtol=1e-6)
  assert np.max(np.abs(np.asarray(eval_logits) - np.asarray(train_logits))) > 1e-3
  assert student.batch_stats is stats and not student.moves_statistics
