"""Plain PyTorch eager train steps of every method, after the published training code.

The recipes of the TRADES, AWP, RSLAD, ABSLD and LTD repositories (SGD with momentum and
weight decay, a 10-step attack with the model in eval mode, the loss with the model in train
mode), written with the same pass count as ltd_jax: the clean probabilities of the TRADES
attack are computed once per batch. (The official TRADES code recomputes ``model(x_natural)``
in each attack iteration, 37 passes instead of 27, so it is slower than this reference.)
``compile=True`` runs every network through ``torch.compile``. Only the benchmarks import this
module.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ltd_jax import torch_models


def _kl_sum(target_probs, logits):
  return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction='sum')


def _pgd(model, x, objective, eps, alpha, steps, init):
  """L-inf PGD with the model in eval mode; ``objective(logits) -> scalar`` is maximised."""
  model.eval()
  if init == 'uniform':
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
  else:
    x_adv = x + 0.001 * torch.randn_like(x)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    grad, = torch.autograd.grad(objective(model(x_adv)), [x_adv])
    x_adv = x_adv.detach() + alpha * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
  model.train()
  return x_adv.detach()


class TorchStep:
  """One method's train step on (x, y): ``step(x, y)``; ``teacher`` for distillation."""

  def __init__(self, method: str, model_name: str, num_classes: int, *, lr=0.1, momentum=0.9,
               weight_decay=2e-4, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0,
               awp_gamma=0.005, awp_proxy_lr=0.01, teacher_model: str | None = None,
               device='cpu', channels_last=False, compile=False):
    self.method, self.num_classes = method, num_classes
    self.eps, self.alpha, self.steps, self.beta = eps, alpha, steps, beta
    self.awp_gamma, self.awp_proxy_lr = awp_gamma, awp_proxy_lr
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # compile: torch.compile of every network (student, AWP proxy, teacher), so that each
    # forward and backward of the step (attack, loss, proxy) runs as an Inductor graph; the
    # step's Python (the attack loop, autograd.grad, the optimizer) stays as in eager mode.
    wrap = torch.compile if compile else (lambda module: module)
    raw = torch_models.build_torch_model(model_name, num_classes).to(device, memory_format=fmt)
    raw.train()
    self.opt = torch.optim.SGD(raw.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    self.teacher = None
    if method in ('rslad', 'absld', 'ltd'):
      teacher = torch_models.build_torch_model(teacher_model or model_name, num_classes)
      self.teacher = wrap(teacher.to(device, memory_format=fmt).eval())
    if method == 'awp':
      proxy = copy.deepcopy(raw)
      self.proxy_opt = torch.optim.SGD(proxy.parameters(), lr=awp_proxy_lr)
      self.proxy = wrap(proxy)
    self.model = wrap(raw)
    self.tau_adv = torch.ones(num_classes, device=device)
    self.tau_clean = torch.ones(num_classes, device=device)

  def _trades_adversary(self, x):
    with torch.no_grad():
      self.model.eval()
      clean_probs = F.softmax(self.model(x), dim=1)
    return _pgd(self.model, x, lambda z: _kl_sum(clean_probs, z), self.eps, self.alpha,
                self.steps, 'normal')

  def _trades_loss(self, model, x, x_adv, y, soft_labels=None):
    logits_clean, logits_adv = model(x), model(x_adv)
    if soft_labels is None:
      natural = F.cross_entropy(logits_clean, y)
    else:
      natural = -(soft_labels * F.log_softmax(logits_clean, dim=1)).sum(1).mean()
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1),
                      reduction='batchmean')
    return natural + self.beta * robust

  def _awp_perturbation(self, x, x_adv, y):
    """AWP's calc_awp: one proxy ascent step, layer-wise relative diff of the kernels."""
    self.proxy.load_state_dict(self.model.state_dict())
    self.proxy.train()
    loss = -self._trades_loss(self.proxy, x, x_adv, y)
    self.proxy_opt.zero_grad()
    loss.backward()
    self.proxy_opt.step()
    diff = {}
    for (name, w), (_, p) in zip(self.model.named_parameters(), self.proxy.named_parameters()):
      if w.dim() > 1:
        d = p.detach() - w.detach()
        diff[name] = self.awp_gamma * w.detach().norm() / (d.norm() + 1e-20) * d
    return diff

  def _perturb(self, diff, sign):
    with torch.no_grad():
      for name, w in self.model.named_parameters():
        if name in diff:
          w.add_(sign * diff[name])

  def __call__(self, x, y):
    m, model = self.method, self.model
    diff = None
    if m == 'natural':
      model.train()
      loss = F.cross_entropy(model(x), y)
    elif m == 'pgd_at':
      x_adv = _pgd(model, x, lambda z: F.cross_entropy(z, y, reduction='sum'), self.eps,
                   self.alpha, self.steps, 'uniform')
      loss = F.cross_entropy(model(x_adv), y)
    elif m in ('trades', 'awp'):
      x_adv = self._trades_adversary(x)
      if m == 'awp':
        diff = self._awp_perturbation(x, x_adv, y)
        self._perturb(diff, 1.0)
      loss = self._trades_loss(model, x, x_adv, y)
    elif m == 'ltd':
      with torch.no_grad():
        soft = F.softmax(self.teacher(x) / 5.0, dim=1)
      x_adv = self._trades_adversary(x)
      loss = self._trades_loss(model, x, x_adv, y, soft)
    elif m in ('rslad', 'absld'):
      with torch.no_grad():
        t = self.teacher(x)
        if m == 'absld':
          adv_target = F.softmax(t / self.tau_adv[y][:, None], dim=1)
          clean_target = F.softmax(t / self.tau_clean[y][:, None], dim=1)
        else:
          adv_target = clean_target = F.softmax(t, dim=1)
      x_adv = _pgd(model, x, lambda z: _kl_sum(adv_target, z), self.eps, self.alpha, self.steps,
                   'normal')
      logits_adv, logits_clean = model(x_adv), model(x)
      kl = lambda p, z: F.kl_div(F.log_softmax(z, dim=1), p, reduction='none').sum(1).mean()
      loss = 5 / 6 * kl(adv_target, logits_adv) + 1 / 6 * kl(clean_target, logits_clean)
    else:
      raise ValueError(f'no PyTorch reference for method {m!r}')
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    if diff is not None:
      self._perturb(diff, -1.0)
    return loss.detach()
