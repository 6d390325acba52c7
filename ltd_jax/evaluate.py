"""Per-class evaluation under clean, FGSM, PGD-20 and CW-inf (METHODS.md section 3).

Summaries: ``avg`` (overall accuracy), ``class_mean``, ``worst`` (lowest class), ``worst10``
(mean of the lowest ceil(10%) classes) and ``nsd`` = std(class accuracies) / mean(class
accuracies), with the population std (ddof=0).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ltd_jax import attacks
from ltd_jax import data
from ltd_jax import parallel


ATTACKS = ('clean', 'fgsm', 'pgd20', 'cw')  # the names attack_images knows


def attack_images(name: str, logits_fn, x, y, rng, *, eps: float, eval_config,
                  platform: str | None = None):
  """Adversarial (or clean) images for evaluation attack ``name``; the PGD loops follow
  ``eval.unroll`` or the default of ``platform`` (``attacks.resolve_unroll``)."""
  if name == 'clean':
    return x
  if name == 'fgsm':
    return attacks.fgsm_attack(attacks.ce_objective(logits_fn, y), x, eps=eps)
  unroll = attacks.resolve_unroll(eval_config.unroll, 'eval', platform)
  if name == 'pgd20':
    return attacks.pgd_attack(attacks.ce_objective(logits_fn, y), x, rng, eps=eps,
                              alpha=eval_config.alpha, steps=eval_config.pgd_steps, init='uniform',
                              unroll=unroll)
  if name == 'cw':
    return attacks.pgd_attack(attacks.cw_objective(logits_fn, y, eval_config.cw_kappa), x, rng,
                              eps=eps, alpha=eval_config.alpha, steps=eval_config.cw_steps,
                              init='uniform', unroll=unroll)
  raise ValueError(f'unknown evaluation attack {name!r}')


def make_attack_eval_step(apply_fn, attack_fns: dict[str, Callable]):
  """jit-compiled ``(variables, images_uint8, labels, rng) -> {attack: correct[B]}`` for
  ``attack_fns[name](logits_fn, x, labels, rng) -> x_adv`` (each with its own rng)."""
  attack_names = tuple(attack_fns)

  @jax.jit
  def eval_step(variables, images, labels, rng):
    logits_fn = lambda x: apply_fn(variables, x, train=False)
    x = data.to_float(images)
    out = {}
    for i, name in enumerate(attack_names):
      x_adv = attack_fns[name](logits_fn, x, labels, jax.random.fold_in(rng, i))
      out[name] = jnp.argmax(logits_fn(x_adv), axis=-1) == labels
    return out

  eval_step.attack_names = attack_names
  return eval_step


def make_eval_step(apply_fn, attack_names: Sequence[str], *, eps: float, eval_config,
                   platform: str | None = None):
  """``make_attack_eval_step`` for the named evaluation attacks (``attack_images``), built for
  the devices of ``platform`` (``parallel.platform(mesh)``; default: JAX's default backend)."""
  return make_attack_eval_step(apply_fn, {
      name: functools.partial(attack_images, name, eps=eps, eval_config=eval_config,
                              platform=platform)
      for name in attack_names})


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  counts = np.bincount(labels, minlength=num_classes)
  hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def summarize(class_acc: np.ndarray, correct_total: float | None = None) -> dict:
  """avg, class_mean, worst, worst10, nsd of per-class accuracies (NaN classes are absent)."""
  acc = class_acc[~np.isnan(class_acc)]
  k = max(1, math.ceil(0.1 * len(acc)))
  mean = float(np.mean(acc))
  return {
      'avg': float(correct_total) if correct_total is not None else mean,
      'class_mean': mean,
      'worst': float(np.min(acc)),
      'worst10': float(np.mean(np.sort(acc)[:k])),
      'nsd': float(np.std(acc) / mean) if mean > 0 else float('nan'),
  }


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, num_classes: int,
             batch_size: int, rng: jax.Array, mesh=None) -> dict:
  """Runs ``eval_step`` over all images (last batch padded and masked); with a ``mesh`` each
  batch (rounded up to a multiple of its devices) is split over the devices.

  Returns ``{attack: {'per_class': [...], 'avg', 'class_mean', 'worst', 'worst10', 'nsd'}}``.
  """
  if mesh is not None:
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
  n = len(labels)
  correct: dict[str, list[np.ndarray]] = {}
  for b, start in enumerate(range(0, n, batch_size)):
    x = np.asarray(images[start:start + batch_size])  # decodes a streamed split's batch
    y = labels[start:start + batch_size]
    valid = len(y)
    if valid < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - valid,), y.dtype)])
    if mesh is not None:
      x, y = parallel.shard_global_batch((x, y), mesh)
    out = eval_step(variables, x, y, jax.random.fold_in(rng, b))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    for name, c in out.items():
      correct.setdefault(name, []).append(np.asarray(c)[:valid])
  results = {}
  for name in sorted(correct, key=list(eval_step.attack_names).index):
    c = np.concatenate(correct[name])
    class_acc = per_class_accuracy(c, labels, num_classes)
    results[name] = {'per_class': [float(a) for a in class_acc], **summarize(class_acc, c.mean())}
  return results


def is_evaluation_epoch(epoch: int, eval_config) -> bool:
  """Whether the periodic evaluation runs after (1-indexed) ``epoch``: every
  ``eval.every_epochs``, and from ``eval.late_from_epoch`` on every ``eval.late_every_epochs``
  (the released ABSLD script: ``epoch % 10 == 0 and epoch < 215 or epoch >= 215``)."""
  late = eval_config.late_from_epoch and epoch >= eval_config.late_from_epoch
  return epoch % (eval_config.late_every_epochs if late else eval_config.every_epochs) == 0


def selection_score(results: dict, selection: str) -> float:
  """``robust``: avg PGD-20; ``fair``: avg + worst PGD-20 (ABSLD, CFA), with the worst 10% of
  classes in place of the worst class for 100 classes or more (the ABSLD paper, CIFAR-100)."""
  if selection == 'robust':
    return results['pgd20']['avg']
  if selection == 'fair':
    worst = 'worst10' if len(results['pgd20'].get('per_class', ())) >= 100 else 'worst'
    return results['pgd20']['avg'] + results['pgd20'][worst]
  raise ValueError(f'unknown selection {selection!r}')


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Sorted indices of a fixed, class-balanced subset of ``size`` examples (all if size <= 0)."""
  if size <= 0 or size >= len(labels):
    return np.arange(len(labels))
  order = np.random.default_rng(seed).permutation(len(labels))
  rank = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    members = order[labels[order] == c]
    rank[members] = np.arange(len(members))
  return np.sort(np.lexsort((labels, rank))[:size])
