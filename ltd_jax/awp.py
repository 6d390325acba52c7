"""Adversarial Weight Perturbation (Wu et al. 2020), as in the reference TRADES-AWP code.

A proxy copy of the weights takes one ascent step of size ``proxy_lr`` on the training loss;
for every kernel (ndim > 1; not BatchNorm parameters, not biases)

    d = ||w|| / (||w_proxy - w|| + 1e-20) * (w_proxy - w)

and the update's gradient is taken at ``w + gamma * d``. The optimizer update is then applied
to ``w`` itself, which equals PyTorch's ``perturb -> step -> restore`` (w + gamma d + u - gamma d)
without the rounding of adding and subtracting gamma d.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

EPS = 1e-20


def relative_perturbation(params, proxy_params):
  """Layer-wise ||w|| / ||w_proxy - w|| * (w_proxy - w) for kernels, zeros elsewhere."""
  def per_leaf(w, p):
    if w.ndim <= 1:
      return jnp.zeros_like(w)
    diff = p - w
    return jnp.linalg.norm(w) / (jnp.linalg.norm(diff) + EPS) * diff
  return jax.tree_util.tree_map(per_leaf, params, proxy_params)


def weight_perturbation(loss_of_params: Callable, params, *, proxy_lr: float, gamma: float):
  """gamma * d from one proxy ascent step ``w_proxy = w + proxy_lr * grad loss(w)``.

  ``loss_of_params`` runs the model in train mode; whatever BatchNorm statistics it computes
  are discarded, so the proxy never touches the real running statistics.
  """
  grads = jax.grad(loss_of_params)(params)
  proxy = jax.tree_util.tree_map(lambda w, g: w + proxy_lr * g, params, grads)
  return jax.tree_util.tree_map(lambda d: gamma * d, relative_perturbation(params, proxy))


def is_active(step, warmup_epochs: int, steps_per_epoch: int):
  """Whether AWP perturbs the weights at (0-indexed) ``step``: from the 1-indexed epoch
  ``warmup_epochs`` on, as the AWP code's ``if epoch >= args.awp_warmup`` with epochs counted
  from 1 (0 and 1: from the first step)."""
  return step >= max(warmup_epochs - 1, 0) * steps_per_epoch


def add(params, delta):
  return jax.tree_util.tree_map(jnp.add, params, delta)
