"""One full train step of every method against the released PyTorch code, transcribed here.

The transcriptions follow the reference scripts line by line in what they compute (forward
order and train / eval modes, losses and reductions, the AWP proxy, the SGD update, ABSLD's
per-class risks and temperature rule): TRADES ``trades.py`` (yaodongyu/TRADES), TRADES-AWP
``train_trades_cifar.py`` and its ``TradesAWP`` (csdongxian/AWP), RSLAD
``resnet18_rslad_cifar10.py`` (zibojia/RSLAD), ABSLD ``resnet18_absld_cifar10.py`` and
``absld_loss.py`` (zhaoshiji123/ABSLD); LTD from its paper (TRADES / TRADES-AWP with the
teacher's soft labels at T = 5 in the natural term); natural and PGD-AT in the same style.

Both sides start from the same weights (the JAX model exported through the interchange) and the
same batch. The compiled train step reports the adversarial images its own attack made; the
PyTorch attack, run from the same start, is checked against them (pixels may differ only where
float32 rounding can flip a sign), and both updates are then computed on them, so nothing here
relies on two XLA compilations rounding alike. Asserted: the loss within 1e-4
relative; every parameter's update within 3x float32 PyTorch's own error against float64
PyTorch; BatchNorm running statistics (PyTorch keeps the unbiased batch variance, n/(n-1));
ABSLD's per-class risk sums and updated temperatures.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from ltd_jax import attacks  # pylint: disable=g-import-not-at-top,wrong-import-position
from ltd_jax import config_lib  # pylint: disable=wrong-import-position
from ltd_jax import interchange  # pylint: disable=wrong-import-position
from ltd_jax import methods  # pylint: disable=wrong-import-position
from ltd_jax import models  # pylint: disable=wrong-import-position
from ltd_jax import state as state_lib  # pylint: disable=wrong-import-position
from ltd_jax import torch_models  # pylint: disable=wrong-import-position
from ltd_jax import train  # pylint: disable=wrong-import-position

B, HW, C, WIDTH, K = 20, 8, 10, 4, 3  # two images per class; 3-step attacks
TAU_ADV = np.linspace(0.6, 2.0, C).astype(np.float32)  # distinct per class, and adv != clean
TAU_CLEAN = np.linspace(1.7, 0.8, C).astype(np.float32)
CLASS_WEIGHT = np.linspace(2.4, 0.9, C).astype(np.float32)  # Fair-ARD / Fair-RSLAD, distinct
# FRL's multipliers (natural, boundary, margin) and CFA's class eps factors and TRADES weights.
FRL_LAMBDA = (np.linspace(0.0, 0.08, C).astype(np.float32),
              np.linspace(0.06, 0.0, C).astype(np.float32),
              np.linspace(-0.1, 0.5, C).astype(np.float32))
CFA_EPS_FACTOR = np.linspace(0.6, 1.4, C).astype(np.float32)
CFA_BETA = np.linspace(0.5, 0.9, C).astype(np.float32)


# ----------------------------------------------------------------------------- the references
def kl_loss(a, b):
  """RSLAD / ABSLD code: elementwise -a b + log(b + 1e-5) b."""
  return -a * b + torch.log(b + 1e-5) * b


def pgd(model, x, x_start, objective, eps, alpha, steps, rounding=None, predictions=None,
        iterates=None):
  """The reference attacks' loop (model already in eval mode), from ``x_start``.

  With ``rounding = (model32, objective32)`` it also returns the pixels whose sign(grad) is
  within float32 rounding of flipping at some step: where |grad| (this model's, float64) is at
  most 8x the largest |float32 grad - float64 grad| measured at the same iterate (8: another
  implementation sums in another order). Only those pixels can come out differently from a
  correct float32 attack; every other sign is the same in any float32 implementation."""
  x_adv = x_start.clone()
  fragile = torch.zeros_like(x, dtype=torch.bool)
  for _ in range(steps):
    x_adv.requires_grad_()
    with torch.enable_grad():
      logits = model(x_adv)
      loss = objective(logits, x_adv)
    if predictions is not None:  # Fair-ARD: ``predict = student_out_pgd.max(1)`` of this forward
      predictions.append(logits.detach().argmax(1))
    if iterates is not None:
      iterates.append(x_adv.detach().clone())
    grad = torch.autograd.grad(loss, [x_adv])[0]
    if rounding is not None:
      model32, objective32 = rounding
      x32 = x_adv.detach().float().requires_grad_()
      with torch.enable_grad():
        grad32 = torch.autograd.grad(objective32(model32(x32), x32), [x32])[0].to(grad.dtype)
      fragile |= grad.abs() <= 8 * (grad32 - grad).abs().max()
    x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
  return (x_adv, fragile) if rounding is not None else x_adv


def trades_kl_objective(model, x):
  """trades.py / perturb_input: KL(softmax(f(x)) || f(x_adv)), reduction sum (eval mode)."""
  with torch.no_grad():
    clean = F.softmax(model(x), dim=1)
  return lambda logits, x_adv: F.kl_div(F.log_softmax(logits, dim=1), clean, reduction='sum')


class Reference:
  """One method's reference step on a PyTorch model (float32 or float64)."""

  def __init__(self, method, config, state_dict, teacher_sd, dtype):
    self.method, self.c, self.dtype = method, config, dtype
    self.model = self._load(state_dict)
    self.teacher = self._load(teacher_sd).eval() if teacher_sd is not None else None
    o = config.optim
    self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay, nesterov=o.nesterov)
    self.tau_adv = torch.tensor(TAU_ADV, dtype=dtype)
    self.tau_nat = torch.tensor(TAU_CLEAN, dtype=dtype)
    self.reweight = torch.tensor(CLASS_WEIGHT, dtype=dtype)
    self.predictions = []

  def _load(self, sd):
    model = torch_models.build_torch_model('small_cnn', C, 3, width=WIDTH)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model.to(self.dtype)

  def objective(self, x, y):
    """The attack's objective on ``x`` (puts the model in eval mode)."""
    m, model = self.method, self.model
    if m in TRAIN_MODE_ATTACKS:  # ARD's AttackPGD inside net.train(): the statistics move
      model.train()
      return lambda logits, x_adv: F.cross_entropy(logits, y, size_average=False)
    model.eval()
    if m == 'pgd_at':
      return lambda logits, x_adv: F.cross_entropy(logits, y, reduction='sum')
    if m == 'adaad':  # adaad_inner_loss: KLDivLoss(none) summed; the teacher's graph kept
      return lambda logits, x_adv: torch.sum(F.kl_div(
          F.log_softmax(logits, dim=1), F.softmax(self.teacher(x_adv), dim=1), reduction='none'))
    if m in ('trades', 'awp', 'ltd', 'frl', 'cfa'):
      return trades_kl_objective(model, x)
    # rslad / absld: KL(teacher target || f(x_adv)), sum
    target = F.softmax(self._teacher_targets(x, y)[0], dim=1)
    return lambda logits, x_adv: torch.sum(F.kl_div(F.log_softmax(logits, dim=1), target,
                                                    reduction='none'))

  def attack(self, x, y, x_start, ref32=None):
    """The adversarial images the reference attack finds from ``x_start`` (eval mode); with
    the float32 reference ``ref32``, also the pixels within rounding of a sign flip."""
    c = self.c
    rounding = None
    if ref32 is not None:
      rounding = (ref32.model, ref32.objective(x.float(), y))
    eps, alpha = self.attack_eps(y)
    out = pgd(self.model, x, x_start, self.objective(x, y), eps, alpha,
              c.attack.steps, rounding, self.predictions)
    self.model.train()
    if ref32 is not None:
      ref32.model.train()
    return out

  def frl_costs(self):
    """utils_frl2 cost_sensitive: the class weights built as the code builds them (float32 loop)."""
    lam0, lam1, lam2 = (torch.tensor(l) for l in FRL_LAMBDA)
    diff0 = torch.ones(C) * 1 / C
    diff1 = torch.ones(C) * 1 / C
    for j in range(C):
      diff0 = diff0 + lam0[j] * (torch.eye(C)[j] - 1 / C)  # 1/C + lam0_j - sum(lam0) / C
      diff1 = diff1 + lam1[j] * (torch.eye(C)[j] - 1 / C)
    diff2 = torch.clamp(torch.exp(2 * lam2), min=0.98, max=3)
    return diff0.to(self.dtype), diff1.to(self.dtype), diff2.to(self.dtype)

  def attack_eps(self, y):
    """The training attack's eps (per sample for FRL's remargin and CFA's class eps) and step."""
    c = self.c
    if self.method == 'frl':  # utils_frl2: new_eps = eps * diff2[y]; step = max(new_eps) / 4
      eps = (c.eps * self.frl_costs()[2][y]).view(-1, 1, 1, 1)
      return eps, torch.max(eps) / 4
    if self.method == 'cfa':  # cw_trades_loss: per-sample box, step 2/255 as configured
      return (c.eps * torch.tensor(CFA_EPS_FACTOR, dtype=self.dtype)[y]).view(-1, 1, 1, 1), \
          c.attack.alpha
    return c.eps, c.attack.alpha

  def bat_attacks(self, x, y, starts, ref32):
    """BAT's stop_to_lastclean and stop_to_firstadv (train_mode/), each from its own start, as a
    masked full batch: in eval mode the samples are independent, so dropping stopped ones (the
    code's shrinking batch, regrouped by stop iterate) changes no remaining one. Returns x_lc,
    x_fa and the pixels within rounding of a sign flip on either trajectory."""
    c, model = self.c, self.model
    model.eval()
    ref32.model.eval()
    with torch.no_grad():
      clean = F.softmax(model(x), dim=1)
      clean32 = F.softmax(ref32.model(x.float()), dim=1)
    objective = lambda p: lambda logits, x_adv: F.kl_div(F.log_softmax(logits, dim=1), p,
                                                        reduction='sum')
    out, fragile = [], torch.zeros_like(x, dtype=torch.bool)
    for start, kind in zip(starts, ('lc', 'fa')):
      predictions, iterates = [], []
      x_final, frag = pgd(model, x, start, objective(clean), c.eps, c.attack.alpha,
                          c.attack.steps, (ref32.model, objective(clean32)), predictions, iterates)
      fragile |= frag
      iterates.append(x_final)
      wrong = torch.stack([p != y for p in predictions])  # [K, B]: m_i(k)
      chosen, stops = [], []
      for i in range(len(y)):
        ks = torch.nonzero(wrong[:, i]).flatten().tolist()
        if kind == 'lc':
          k = c.attack.steps if not ks else max(ks[0] - 1, 0)
        else:
          k = c.attack.steps if len(ks) <= c.bat.tau else ks[c.bat.tau]
        chosen.append(iterates[k][i])
        stops.append(k)
      # The batch tells the rules apart: samples stop at different iterates, some never.
      assert len(set(stops)) >= 3 and c.attack.steps in stops, (kind, stops)
      out.append(torch.stack(chosen))
    model.train()
    ref32.model.train()
    return out[0], out[1], fragile

  def _teacher_targets(self, x, y):
    """ABSLD's per-sample scaled teacher logits (adv, nat) as resnet18_absld_cifar10.py builds
    them; with released aliasing both names are one tensor, divided in place twice."""
    with torch.no_grad():
      t = self.teacher(x).detach()
    if self.method in ('rslad', 'fair_rslad'):
      return t, t
    if self.c.absld.released_code_aliasing:
      t_adv = t.detach()
      t_nat = t_adv  # .detach() of the same tensor shares storage
      for i in range(y.shape[0]):
        t_adv[i] = t_adv[i] / self.tau_adv[y[i]]
        t_nat[i] = t_nat[i] / self.tau_nat[y[i]]
      return t_adv, t_nat
    return t / self.tau_adv[y][:, None], t / self.tau_nat[y][:, None]

  def _ltd_natural(self, logits, x):
    with torch.no_grad():
      soft = F.softmax(self.teacher(x) / self.c.ltd.teacher_temperature, dim=1)
    return -(soft * F.log_softmax(logits / self.c.ltd.student_temperature, dim=1)).sum(1).mean()

  def _awp_diff(self, x_adv, x, y):
    """TradesAWP.calc_awp: one proxy step on -(CE + beta KL_batchmean), then
    ||w|| / (||diff|| + 1e-20) diff for every weight of ndim > 1."""
    proxy = copy.deepcopy(self.model)
    proxy.load_state_dict(self.model.state_dict())
    proxy.train()
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=self.c.awp.proxy_lr)
    loss_natural = F.cross_entropy(proxy(x), y)
    loss_robust = F.kl_div(F.log_softmax(proxy(x_adv), dim=1), F.softmax(proxy(x), dim=1),
                           reduction='batchmean')
    loss = -1.0 * (loss_natural + self.c.trades.beta * loss_robust)
    proxy_opt.zero_grad()
    loss.backward()
    proxy_opt.step()
    diff = {}
    model_sd, proxy_sd = self.model.state_dict(), proxy.state_dict()
    for (old_k, old_w), (_, new_w) in zip(model_sd.items(), proxy_sd.items()):
      if len(old_w.size()) <= 1:
        continue
      if 'weight' in old_k:
        d = new_w - old_w
        diff[old_k] = old_w.norm() / (d.norm() + 1e-20) * d
    return diff

  def _add(self, diff, coeff):
    with torch.no_grad():
      for name, param in self.model.named_parameters():
        if name in diff:
          param.add_(coeff * diff[name])

  def step(self, x, y, x_adv):
    """The update on (x, y) with the attack's result ``x_adv``; returns the loss and, for
    ABSLD, the per-class risk sums (adv, nat)."""
    m, c, model = self.method, self.c, self.model
    model.train()
    risks, diff = None, None
    awp_base = m == 'awp' or (m == 'ltd' and c.ltd.base == 'awp')
    if awp_base:  # train_trades_cifar.py
      diff = self._awp_diff(x_adv, x, y)
      self._add(diff, c.awp.gamma)
      self.opt.zero_grad()
      logits_adv = model(x_adv)
      loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x), dim=1),
                             reduction='batchmean')
      logits = model(x)
      natural = (F.cross_entropy(logits, y) if m == 'awp' else self._ltd_natural(logits, x))
      loss = natural + c.trades.beta * loss_robust
    elif m in ('trades', 'ltd'):  # trades.py
      self.opt.zero_grad()
      logits = model(x)
      natural = F.cross_entropy(logits, y) if m == 'trades' else self._ltd_natural(logits, x)
      loss_robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1),
                             reduction='sum') / x.shape[0]
      loss = natural + c.trades.beta * loss_robust
    elif m in ('rslad', 'absld'):  # resnet18_rslad_cifar10.py / resnet18_absld_cifar10.py
      t_adv, t_nat = self._teacher_targets(x, y)
      self.opt.zero_grad()
      adv_logits = model(x_adv)  # the last line of rslad_inner_loss / absld_inner_loss
      nat_logits = model(x)
      with torch.no_grad():
        ce = torch.nn.CrossEntropyLoss(reduction='none')
        risk_adv = torch.zeros(C, dtype=self.dtype).index_add_(0, y, ce(adv_logits, y))
        risk_nat = torch.zeros(C, dtype=self.dtype).index_add_(0, y, ce(nat_logits, y))
        risks = (risk_adv, risk_nat)
      log = (torch.log if m == 'absld' else lambda p: p)  # absld: log(softmax); rslad: log_softmax
      sm = (F.softmax if m == 'absld' else F.log_softmax)
      loss1 = kl_loss(log(sm(adv_logits, dim=1)), F.softmax(t_adv, dim=1)).mean()
      loss2 = kl_loss(log(sm(nat_logits, dim=1)), F.softmax(t_nat, dim=1)).mean()
      loss = 5.0 / 6.0 * loss1 + 1.0 / 6.0 * loss2
    elif m == 'adaad':  # main.py: net(inputs), net(adv_inputs), then the teacher under no_grad
      self.opt.zero_grad()
      ori_outputs, adv_outputs = model(x), model(x_adv)
      with torch.no_grad():
        t_ori, t_adv = self.teacher(x), self.teacher(x_adv)
      if c.adaad.reduction == 'elementwise_mean':  # CIFAR-10: nn.KLDivLoss() (mean)
        kl = lambda s, t: torch.nn.KLDivLoss()(F.log_softmax(s, dim=1), F.softmax(t, dim=1))
      else:  # CIFAR-100: (1 / B) * sum KLDivLoss(reduce=False)
        kl = lambda s, t: (1.0 / len(s)) * torch.sum(torch.nn.KLDivLoss(reduction='none')(
            F.log_softmax(s, dim=1), F.softmax(t, dim=1)))
      loss = c.adaad.alpha * kl(adv_outputs, t_adv) + (1 - c.adaad.alpha) * kl(ori_outputs, t_ori)
    elif m == 'ard':  # main.py: outputs (the attack's last forward, on x'), teacher, clean
      self.opt.zero_grad()
      t = c.ard.temperature
      outputs = model(x_adv)
      teacher_outputs = self.teacher(x)
      basic_outputs = model(x)
      loss = (c.ard.alpha * t * t * torch.nn.KLDivLoss()(F.log_softmax(outputs / t, dim=1),
                                                         F.softmax(teacher_outputs / t, dim=1))
              + (1.0 - c.ard.alpha) * F.cross_entropy(basic_outputs, y))
    elif m == 'iad':  # IAD-I.py
      self.opt.zero_grad()
      t, a = c.ard.temperature, c.ard.alpha
      kl = torch.nn.KLDivLoss(reduction='none')
      with torch.no_grad():
        teacher_outputs = self.teacher(x)
      outputs = model(x_adv)
      model(x_adv).detach()  # basicop
      guide = self.teacher(x_adv)
      alpha_w = torch.ones(len(x), dtype=self.dtype)
      for pp in range(len(x)):
        alpha_w[pp] = (F.softmax(guide, dim=1)[pp][y[pp].item()]).pow(c.iad.beta).item()
      first = a * t * t * (1 / len(outputs)) * torch.sum(
          kl(F.log_softmax(outputs / t, dim=1), F.softmax(teacher_outputs / t, dim=1)).sum(dim=1))
      if 0 >= c.iad.begin_epoch:  # the step is in epoch 0
        loss = (first + a * (1 / len(outputs)) * torch.sum(
            kl(F.log_softmax(outputs, dim=1), F.softmax(model(x), dim=1)).sum(dim=1).mul(1 - alpha_w))
                + (1.0 - a) * F.cross_entropy(model(x), y))
      else:
        loss = first + (1.0 - a) * F.cross_entropy(model(x), y)
    elif m == 'fair_ard':  # Fair-ARD.py train(): per-sample KLDivLoss() over dim 0, x reweight[y]
      self.opt.zero_grad()
      t = c.ard.temperature
      outputs = model(x_adv)
      teacher_outputs = self.teacher(x)
      basic_outputs = model(x)
      kl_class, ce_class = [], []
      for i in range(len(outputs)):
        kl_class.append(torch.nn.KLDivLoss()(F.log_softmax(outputs[i] / t, dim=0),
                                             F.softmax(teacher_outputs[i] / t, dim=0)))
        ce_class.append(torch.nn.CrossEntropyLoss()(basic_outputs[i].unsqueeze(0), y[i].unsqueeze(0)))
        kl_class[i] = kl_class[i] * self.reweight[y[i]]
        ce_class[i] = ce_class[i] * self.reweight[y[i]]
      kl1 = (1 / len(outputs)) * torch.sum(torch.stack(kl_class))
      ce = (1 / len(outputs)) * torch.sum(torch.stack(ce_class))
      loss = c.ard.alpha * t * t * kl1 + (1.0 - c.ard.alpha) * ce
    elif m == 'fair_rslad':  # Fair-RSLAD.py: kl_loss per sample (dim 0) x reweight[y], / B, mean
      t_adv, _ = self._teacher_targets(x, y)
      self.opt.zero_grad()
      adv_logits, nat_logits = model(x_adv), model(x)
      soft = F.softmax(t_adv, dim=1)
      terms = []
      for logits in (adv_logits, nat_logits):
        per = [kl_loss(F.log_softmax(logits[i], dim=0), soft[i]) * self.reweight[y[i]]
               for i in range(len(logits))]
        terms.append(((1.0 / len(logits)) * sum(per)).mean())
      loss = 5.0 / 6.0 * terms[0] + 1.0 / 6.0 * terms[1]
    elif m == 'bat':  # train.py BAT_loss: forwards x_lc, x_fa, x
      self.opt.zero_grad()
      x_lc, x_fa = x_adv
      lastclean_logits, firstadv_logits, clean_logits = model(x_lc), model(x_fa), model(x)
      kl = torch.nn.KLDivLoss(size_average=False)
      b = len(y)
      uniform_logits = torch.ones_like(firstadv_logits) * 0.1
      loss_natural = torch.nn.CrossEntropyLoss(reduction='mean')(lastclean_logits, y)
      u1 = (1.0 / b) * kl(F.log_softmax(uniform_logits, dim=1), F.softmax(lastclean_logits, dim=1))
      u2 = (1.0 / b) * kl(F.log_softmax(uniform_logits, dim=1), F.softmax(firstadv_logits, dim=1))
      robust = (1.0 / b) * kl(F.log_softmax(firstadv_logits, dim=1), F.softmax(clean_logits, dim=1))
      loss = c.trades.beta * robust + loss_natural + (u1 + u2)
    elif m == 'frl':  # utils_frl2 train_model: model(data), model(x_adv), model(data)
      self.opt.zero_grad()
      w0_c, w1_c, _ = self.frl_costs()
      w0, w1 = w0_c[y], w1_c[y]
      loss_natural = F.cross_entropy(model(x), y, reduction='none')
      loss_bndy = torch.sum(torch.nn.KLDivLoss(reduction='none')(
          F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1)), 1)
      loss = (torch.sum(loss_natural * w0) / torch.sum(w0)
              + c.frl.beta * torch.sum(loss_bndy * w1) / torch.sum(w1))
    elif m == 'cfa':  # CFA utils cw_trades_loss (train mode: x, x_adv, x again), then a clean log
      self.opt.zero_grad()
      b = torch.tensor(CFA_BETA, dtype=self.dtype)[y]
      batch_size = len(x)
      logits, logits_adv = model(x), model(x_adv)
      loss_natural = F.cross_entropy(logits, y, reduction='none')
      loss_robust = torch.nn.KLDivLoss(reduction='none')(F.log_softmax(logits_adv, dim=1),
                                                        F.softmax(model(x), dim=1))
      loss = ((1 - b) * loss_natural / batch_size
              + b * (1.0 / batch_size) * torch.sum(loss_robust, 1)).sum()
    elif m == 'pgd_at':
      self.opt.zero_grad()
      loss = F.cross_entropy(model(x_adv), y)
    else:  # natural
      self.opt.zero_grad()
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    self.opt.step()
    if m == 'cfa':  # train_epoch: output = model(data) after optimizer.step(), for the clean log
      with torch.no_grad():
        model(x)
    if diff is not None:
      self._add(diff, -c.awp.gamma)
    return float(loss), risks

  def update_temperatures(self, risks, beta):
    """The released script's epoch end: gap over the risk sums, max-abs normalised, clipped."""
    out = []
    for tau, total in zip((self.tau_adv, self.tau_nat), risks):
      gap = total - torch.mean(total)
      out.append(torch.clamp(tau - beta * gap / torch.max(torch.abs(gap)), self.c.absld.tau_min,
                             self.c.absld.tau_max))
    return out


# ----------------------------------------------------------------------------- the comparison
VARIANTS = {
    'natural': {},
    'pgd_at': {'attack.init': 'uniform'},
    'trades': {'reference_bn_passes': True},
    'awp': {'reference_bn_passes': True},
    'ltd_trades': {'method': 'ltd', 'reference_bn_passes': True, 'optim.nesterov': True},
    'ltd_awp': {'method': 'ltd', 'ltd.base': 'awp', 'reference_bn_passes': True,
                'optim.nesterov': True},
    'rslad': {},
    'absld': {},
    'absld_released': {'method': 'absld', 'absld.released_code_aliasing': True},
    # alpha < 1 so that the clean term counts (the code's default 1 leaves it to BatchNorm only)
    'adaad': {'adaad.alpha': 0.7},
    'adaad_cifar100': {'method': 'adaad', 'adaad.alpha': 0.7, 'adaad.reduction': 'batchmean'},
    # ARD's attack: train mode, unclipped uniform start; alpha < 1 and T != 1 so every term counts
    'ard': {'attack.bn_mode': 'train', 'attack.init': 'uniform_unclipped', 'ard.alpha': 0.8,
            'ard.temperature': 4.0},
    'iad': {'attack.bn_mode': 'train', 'attack.init': 'uniform_unclipped', 'ard.alpha': 0.8,
            'ard.temperature': 2.0, 'ard.reduction': 'batchmean', 'iad.begin_epoch': 0,
            'iad.beta': 0.5},
    'iad_before_begin': {'method': 'iad', 'attack.bn_mode': 'train',
                         'attack.init': 'uniform_unclipped', 'ard.alpha': 0.8,
                         'ard.temperature': 2.0, 'ard.reduction': 'batchmean',
                         'iad.begin_epoch': 1},
    'fair_ard': {'attack.bn_mode': 'train', 'attack.init': 'uniform_unclipped', 'ard.alpha': 0.8,
                 'ard.temperature': 4.0},
    'fair_rslad': {},
    'bat': {'attack.init': 'normal_clipped', 'eps': 0.1, 'attack.alpha': 0.03, 'attack.steps': 5},
    'frl': {'reference_bn_passes': True, 'frl.beta': 1.5},
    'cfa': {'reference_bn_passes': True},
}
TRAIN_MODE_ATTACKS = ('ard', 'iad', 'fair_ard')


def make_config(variant):
  c = config_lib.default_config()
  c.method = variant
  c.model.name, c.model.width = 'small_cnn', WIDTH
  c.eps, c.attack.alpha, c.attack.steps, c.attack.init = 8 / 255, 2 / 255, K, 'normal'
  c.optim.lr, c.optim.momentum, c.optim.weight_decay = 0.1, 0.9, 5e-4
  c.awp.gamma, c.awp.warmup_epochs = 0.01, 0
  c.rslad.target_log_eps = 1e-5  # the reference's kl_loss, for the loss value
  c.absld.tau_min, c.absld.tau_max = 0.5, 5.0
  for key, value in VARIANTS[variant].items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def batch():
  """Class-dependent images (a per-class colour plus noise): the batch is not noise only.
  (BatchNorm's two-pass variance is tested in test_models: uint8 images this small cannot give
  features whose |mean| / std is large enough for a one-pass variance to show here.)"""
  rng = np.random.default_rng(0)
  base = rng.integers(40, 216, size=(C, 1, 1, 3))
  labels = np.repeat(np.arange(C), B // C).astype(np.int32)
  images = np.clip(base[labels] + rng.integers(-40, 41, size=(B, HW, HW, 3)), 0, 255)
  return images.astype(np.uint8), labels


def torch_layout(params, batch_stats):
  return interchange.to_torch_state_dict(params, batch_stats)


def bn_layers(sd):
  return sorted({k.rsplit('.', 1)[0] for k in sd if k.endswith('running_mean')})


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_train_step_equals_the_reference_pytorch_step(variant):
  config = make_config(variant)
  method = methods.get_method(config.method)
  model = models.create_model('small_cnn', C, width=WIDTH)
  state = state_lib.create_train_state(config, model, (HW, HW, 3), C, steps_per_epoch=5)
  if config.method in ('fair_ard', 'fair_rslad'):
    state = state.replace(method_state={**state.method_state,
                                        'class_weight': jnp.asarray(CLASS_WEIGHT)})
  if config.method == 'frl':
    state = state.replace(method_state=dict(zip(('lambda_nat', 'lambda_bndy', 'lambda_margin'),
                                                map(jnp.asarray, FRL_LAMBDA))))
  if config.method == 'cfa':
    state = state.replace(method_state={**state.method_state,
                                        'class_eps': jnp.asarray(config.eps * CFA_EPS_FACTOR),
                                        'class_beta': jnp.asarray(CFA_BETA)})
  if config.method == 'absld':
    state = state.replace(method_state={**state.method_state, 'tau_adv': jnp.asarray(TAU_ADV),
                                        'tau_clean': jnp.asarray(TAU_CLEAN)})
  images, labels = batch()
  if config.method == 'bat':
    # Labels the untrained model gets right on clean images, so that the early-stopped attacks
    # stop at different iterates (the reference asserts it).
    labels = np.asarray(jnp.argmax(model.apply(state.variables, images / np.float32(255.0),
                                               train=False), -1)).astype(np.int32)
  teacher_vars = teacher_sd = None
  if method.needs_teacher:
    t_params, t_stats = models.init_variables(model, jax.random.PRNGKey(7), (HW, HW, 3))
    t_stats = jax.tree_util.tree_map(lambda v: v * 0.5 + 0.1, t_stats)  # not the init values
    teacher_vars = {'params': t_params, 'batch_stats': t_stats}
    teacher_sd = torch_layout(t_params, t_stats)
  sd0 = torch_layout(state.params, state.batch_stats)

  # JAX: the trainer's own step, with the images its loss was differentiated on; the reference
  # steps are fed those, so the comparison of the updates does not depend on two compilations
  # of the attack rounding alike.
  step = jax.jit(lambda s, t: train.train_step(
      s, images, labels, t, method=method, config=config, augment_kind='none', num_classes=C,
      steps_per_epoch=5, teacher_apply_fn=model.apply if teacher_vars else None,
      return_inputs=True))
  new, metrics = step(state, teacher_vars)
  x, x_adv = metrics['x'], metrics.get('x_adv')
  np.testing.assert_array_equal(x, images / np.float32(255.0))  # augment 'none'

  to_t = lambda a, dt: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).to(dt)
  y_t = torch.from_numpy(labels).long()
  refs = {dt: Reference(config.method, config, sd0, teacher_sd, dt)
          for dt in (torch.float32, torch.float64)}
  kappa = None
  if isinstance(x_adv, dict) and 'kappa' in x_adv:
    x_adv, kappa = x_adv['x_adv'], x_adv['kappa']
  _, attack_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  if config.method == 'bat':
    # Each early-stopped attack against the reference's from the same start: the iterate each
    # sample stops at and its pixels (only those within rounding of a sign flip may differ).
    starts = [to_t(attacks.INITS[config.attack.init](r, x, config.eps), torch.float64)
              for r in jax.random.split(attack_rng)]
    x_lc, x_fa, fragile = refs[torch.float64].bat_attacks(to_t(x, torch.float64), y_t, starts,
                                                           refs[torch.float32])
    for name, want in (('x_lc', x_lc), ('x_fa', x_fa)):
      differ = ~np.isclose(want.permute(0, 2, 3, 1).numpy(), np.asarray(x_adv[name]), atol=1e-5)
      assert differ.sum() <= fragile.sum(), (name, differ.sum(), fragile.sum())
    x_adv = (np.asarray(x_adv['x_lc']), np.asarray(x_adv['x_fa']))
  elif x_adv is not None:
    # The in-step attack against the reference attack from the same start (the start is a
    # pure function of the step's rng): pixels may differ only through signs that float32
    # rounding can flip, so at most as many as the reference finds within rounding of a flip.
    x_start = attacks.INITS[config.attack.init](attack_rng, x, config.eps)
    torch_adv, fragile = refs[torch.float64].attack(to_t(x, torch.float64), y_t,
                                                    to_t(x_start, torch.float64),
                                                    ref32=refs[torch.float32])
    differ = ~np.isclose(torch_adv.permute(0, 2, 3, 1).numpy(), np.asarray(x_adv), atol=1e-5)
    assert differ.sum() <= fragile.sum(), (
        f'the attacks differ in {differ.sum()} pixels; {fragile.sum()} are within rounding '
        f'of a sign flip')
  if kappa is not None:  # Fair-ARD's Kappa: iterates x_0 .. x_{K-1} still classified correctly
    want = sum((p == y_t).double() for p in refs[torch.float64].predictions)
    np.testing.assert_array_equal(np.asarray(kappa), want.numpy())
    assert 0 < want.sum() < K * B  # some iterates correct, some not: the count is not trivial
  results = {}
  for dt, ref in refs.items():
    adv = (None if x_adv is None else tuple(to_t(a, dt) for a in x_adv)
           if isinstance(x_adv, tuple) else to_t(x_adv, dt))
    loss, risks = ref.step(to_t(x, dt), y_t, adv)
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in ref.model.state_dict().items()}
    results[dt] = (loss, risks, sd, ref)

  loss64, risks64, sd64, ref64 = results[torch.float64]
  assert float(metrics['loss']) == pytest.approx(loss64, rel=1e-4)
  sd_jax = torch_layout(new.params, new.batch_stats)
  for key in sd0:
    if key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
      continue
    d64 = sd64[key] - sd0[key]
    err = lambda sd: np.linalg.norm((sd[key] - sd0[key]) - d64) / np.linalg.norm(d64)
    err32 = err(results[torch.float32][2])
    assert err(sd_jax) <= 3 * err32 + 1e-6, (key, err(sd_jax), err32)

  # BatchNorm: k train-mode forwards from running var 1; PyTorch folds in n/(n-1) x the batch var.
  k = {'natural': 1, 'pgd_at': 1, 'rslad': 2, 'absld': 2, 'adaad': 2, 'ard': K + 2,
       'fair_ard': K + 2, 'fair_rslad': 2, 'bat': 3, 'frl': 3, 'cfa': 4,
       'iad': K + (4 if config.iad.begin_epoch == 0 else 3)}.get(config.method, 3)
  for layer in bn_layers(sd0):
    np.testing.assert_allclose(sd_jax[f'{layer}.running_mean'], sd64[f'{layer}.running_mean'],
                               rtol=1e-4, atol=1e-6)
    side = {'bn1': HW, 'bn2': HW // 2, 'bn3': HW // 4}[layer]
    n = B * side * side
    decayed = 0.9 ** k
    np.testing.assert_allclose(sd64[f'{layer}.running_var'] - decayed,
                               (sd_jax[f'{layer}.running_var'] - decayed) * n / (n - 1),
                               rtol=1e-4, atol=1e-7)

  if config.method == 'absld':
    m = new.method_state
    np.testing.assert_allclose(m['risk_adv_sum'], risks64[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(m['risk_clean_sum'], risks64[1].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(m['risk_adv_count'], np.full(C, B // C))
    ended = train.end_of_epoch(new, 1, method=method, config=config)
    want_adv, want_nat = ref64.update_temperatures(risks64, beta=config.absld.beta)
    np.testing.assert_allclose(ended.method_state['tau_adv'], want_adv.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ended.method_state['tau_clean'], want_nat.numpy(), rtol=1e-5)


def test_without_the_replayed_passes_the_running_statistics_are_not_the_references():
  """The switch matters: TRADES without ``reference_bn_passes`` keeps two forwards' statistics
  (the parity test above passes only with it)."""
  config = make_config('trades')
  model = models.create_model('small_cnn', C, width=WIDTH)
  state = state_lib.create_train_state(config, model, (HW, HW, 3), C, steps_per_epoch=5)
  images, labels = batch()
  out = {}
  for replay in (False, True):
    config.reference_bn_passes = replay
    new, _ = train.train_step(state, images, labels, method=methods.get_method('trades'),
                              config=config, augment_kind='none', num_classes=C,
                              steps_per_epoch=5)
    out[replay] = new
  for a, b in zip(jax.tree_util.tree_leaves(out[False].params),
                  jax.tree_util.tree_leaves(out[True].params)):
    np.testing.assert_array_equal(a, b)  # statistics only: no change to the update
  mean = lambda s: np.asarray(s.batch_stats['bn1']['mean'])
  assert not np.allclose(mean(out[False]), mean(out[True]), rtol=1e-3)
