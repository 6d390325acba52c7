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
  # Every reduction of the per-sample terms (6 samples, 10 classes: the axes cannot be swapped).
  per_sample = (0.9 * nll + 0.1 * -logprobs.mean(dim=-1)).numpy()
  for reduction, value in (('none', per_sample), ('sum', per_sample.sum()),
                           ('elementwise_mean', per_sample.mean() / 10)):
    got = losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1, reduction)
    np.testing.assert_allclose(np.asarray(got), value, rtol=1e-5, err_msg=reduction)


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


# ---------------------------------------------------------------- the step against the code
def _reference_trades_step(model, x, y, x_start, c, global_step, total_steps, steps_per_epoch):
  """gowal21uncovering/utils/trades.py ``trades_loss`` (attack in train mode with the running
  statistics untracked, label smoothing), WATrainer's SGD (``group_weight``: no decay on
  'batchnorm' parameters; Nesterov) under OneCycleLR stepped per epoch, then ``ema_update``
  (transcribed: tests/test_weight_average.py ``reference_ema_update``). ``model`` is in the
  state after ``global_step`` updates with a fresh momentum buffer; returns the loss, x_adv and
  the EMA of the initial weights ``wa`` after this update."""
  from tests.test_weight_average import reference_ema_update  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional
  wa = {k: v.detach().clone() for k, v in model.named_parameters()}
  decay, no_decay = [], []
  for n, p in model.named_parameters():
    (no_decay if 'batchnorm' in n else decay).append(p)
  opt = torch.optim.SGD([dict(params=decay), dict(params=no_decay, weight_decay=0.0)],
                        lr=c.optim.lr, weight_decay=c.optim.weight_decay, momentum=0.9,
                        nesterov=True)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.optim.lr, pct_start=c.optim.cosine_warmup_fraction,
                                              total_steps=c.num_epochs)
  for _ in range(global_step // steps_per_epoch):
    sched.step()
  eps, alpha = c.eps, c.attack.alpha

  def track(on):
    for m in model.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        m.track_running_stats = on
  kl = torch.nn.KLDivLoss(reduction='batchmean')
  model.train()
  track(False)
  x_adv = x_start.clone()
  p_natural = F.softmax(model(x), dim=1).detach()
  for _ in range(c.attack.steps):
    x_adv.requires_grad_()
    with torch.enable_grad():
      loss_kl = kl(F.log_softmax(model(x_adv), dim=1), p_natural)
    grad = torch.autograd.grad(loss_kl, [x_adv])[0]
    x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
  model.train()
  track(True)
  return model, opt, sched, kl, wa, x_adv.detach()


def _reference_update(model, opt, kl, wa, x, y, x_adv, c, global_step, total_steps):
  from tests.test_weight_average import reference_ema_update  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional
  opt.zero_grad()
  logits_natural = model(x)
  logits_adv = model(x_adv)
  logprobs = F.log_softmax(logits_natural, dim=-1)
  nll = -logprobs.gather(dim=-1, index=y.unsqueeze(1)).squeeze(1)
  s = c.trades.label_smoothing
  loss_natural = ((1 - s) * nll + s * -logprobs.mean(dim=-1)).mean()
  loss_robust = kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1))
  loss = loss_natural + c.trades.beta * loss_robust
  loss.backward()
  opt.step()
  params = {k: v.detach() for k, v in model.named_parameters()}
  wa = reference_ema_update(wa, params, global_step + 1, c.ema.decay,
                            c.ema.warmup_fraction * total_steps)
  return float(loss), wa


def test_recipe_step_equals_the_dm_improves_at_step():
  from ltd_jax import attacks, interchange, torch_models, train  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file('trades_cifar10_generated')
  c.model.name = 'dm-wrn-10-1'
  c.num_epochs, c.attack.steps = 80, 3  # a 2-epoch OneCycle warm-up (2.5% of 80)
  spe, total, start_step = 4, 80 * 4, 1  # step 1: the code's BatchNorm momentum is 0.01 from there
  rng = np.random.default_rng(0)
  base = rng.integers(40, 216, size=(10, 1, 1, 3))
  labels = np.repeat(np.arange(10), 2).astype(np.int32)
  images = np.clip(base[labels] + rng.integers(-40, 41, size=(20, 8, 8, 3)), 0, 255).astype(np.uint8)
  model = state_lib.build_model(c, 10)
  state = state_lib.create_train_state(c, model, (8, 8, 3), 10, spe)
  stats = jax.tree_util.tree_map(lambda s: s * 0.7 + 0.2, state.batch_stats)  # not (0, 1)
  state = state.replace(step=jnp.asarray(start_step, jnp.int32), batch_stats=stats)
  method = methods.get_method('trades')
  step = jax.jit(lambda s: train.train_step(s, images, labels, method=method, config=c,
                                            augment_kind='none', num_classes=10,
                                            steps_per_epoch=spe, return_inputs=True))
  new, metrics = step(state)
  x = np.asarray(metrics['x'])
  _, attack_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  x_start = attacks.INITS['uniform'](attack_rng, jnp.asarray(x), c.eps)
  sd0 = interchange.to_torch_state_dict(state.params, stats)
  to_t = lambda a, dt: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).to(dt)
  y_t = torch.from_numpy(labels).long()
  results = {}
  for dt in (torch.float32, torch.float64):
    tm = torch_models.build_torch_model('dm-wrn-10-1', 10, 3)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd0.items()}, strict=True)
    tm = tm.to(dt)
    for m in tm.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = 0.01
    tm, opt, sched, kl, wa, x_adv = _reference_trades_step(
        tm, to_t(x, dt), y_t, to_t(x_start, dt), c, start_step, total, spe)
    assert opt.param_groups[0]['momentum'] == pytest.approx(0.95)  # OneCycle's cycled momentum
    if dt == torch.float64:  # the in-step attack against the code's, from the same start
      same = np.isclose(x_adv.permute(0, 2, 3, 1).numpy(), np.asarray(metrics['x_adv']), atol=1e-5)
      assert same.mean() > 0.99, same.mean()
    loss, wa = _reference_update(tm, opt, kl, wa, to_t(x, dt), y_t,
                                 to_t(metrics['x_adv'], dt), c, start_step, total)
    results[dt] = (loss, {k: v.detach().numpy().astype(np.float64)
                          for k, v in tm.state_dict().items()},
                   {k: v.numpy().astype(np.float64) for k, v in wa.items()})
  loss64, sd64, wa64 = results[torch.float64]
  assert float(metrics['loss']) == pytest.approx(loss64, rel=1e-4)
  sd_jax = interchange.to_torch_state_dict(new.params, new.batch_stats)
  avg = new.method_state['average']
  wa_jax = interchange.to_torch_state_dict(avg['params'], avg['batch_stats'])
  for key in sd0:
    if key.endswith(('running_var', 'num_batches_tracked')):
      continue
    if key.endswith('running_mean'):  # two tracked forwards at momentum 0.01
      np.testing.assert_allclose(sd_jax[key], sd64[key], rtol=1e-4, atol=1e-6, err_msg=key)
      continue
    d64 = sd64[key] - sd0[key]
    err = lambda sd: np.linalg.norm((sd[key] - sd0[key]) - d64) / np.linalg.norm(d64)
    assert err(sd_jax) <= 3 * err(results[torch.float32][1]) + 1e-6, key
    w64 = wa64[key] - sd0[key]
    werr = lambda w: np.linalg.norm((w[key] - sd0[key]) - w64) / np.linalg.norm(w64)
    assert werr(wa_jax) <= 3 * werr(results[torch.float32][2]) + 1e-6, key
