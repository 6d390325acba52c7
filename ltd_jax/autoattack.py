"""``--mode=autoattack``: the official AutoAttack on the exported PyTorch model.

The selected checkpoint is exported (``WORKDIR/export``), loaded strictly into the PyTorch
definition, checked against the JAX logits, and attacked by ``pyautoattack`` (Croce & Hein,
2020; ``version='standard'``: APGD-CE, APGD-T, FAB-T, Square) at ``eval.eps`` (else ``eps``), L-inf.
Per-class AA accuracy, average, worst-class, worst-10% and NSD join the JAX attacks in
``results.json`` / ``results.md`` as the row ``autoattack``.

Needs the optional extra: ``pip install -r requirements-torch.txt``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import evaluate
from ltd_jax import export
from ltd_jax import interchange
from ltd_jax import reports
from ltd_jax import runs
from ltd_jax.errors import CheckpointError, ConfigError

PARITY_RTOL = 1e-3  # float32 logits of the two frameworks agree to ~1e-6; 1e-3 flags a wrong model


def _import_torch():
  try:
    import pyautoattack  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError('--mode=autoattack needs PyTorch and AutoAttack: pip install -r '
                      'requirements-torch.txt') from e
  return torch, pyautoattack


def resolve_device(torch, device: str) -> str:
  if device == 'auto':
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  if device.startswith('cuda') and not torch.cuda.is_available():
    raise ConfigError(f'autoattack.device={device} but PyTorch sees no CUDA device: use '
                      f'--config.autoattack.device=cpu or install a CUDA build of torch')
  return device


def load_torch_model(state, config: ml_collections.ConfigDict, num_classes: int, image_shape,
                     device: str = 'cpu'):
  """The PyTorch twin of ``state``'s model with its weights, loaded with ``strict=True``."""
  torch, _ = _import_torch()
  from ltd_jax import torch_models  # pylint: disable=g-import-not-at-top
  model = torch_models.build_torch_model(config.model.name, num_classes, int(image_shape[-1]),
                                         config.model.base_width, config.model.width)
  state_dict = interchange.to_torch_state_dict(state.params, state.batch_stats)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return model.to(device).eval()


def logits_parity(torch_model, apply_fn, variables, images_uint8: np.ndarray) -> float:
  """max |torch - jax| / max |jax| of the eval-mode logits on ``images_uint8`` (NHWC).

  Both sides compute in full float32: GPUs otherwise run float32 convolutions and matrix
  products in TF32 (JAX's default precision, PyTorch's cuDNN default), whose ~1e-3 rounding
  would hide or fake an export error."""
  import torch  # pylint: disable=g-import-not-at-top
  x = data.to_float(images_uint8)
  with jax.default_matmul_precision('float32'):
    jax_logits = np.asarray(jax.jit(lambda v, x: apply_fn(v, x, train=False))(variables, x))
  device = next(torch_model.parameters()).device
  tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with torch.no_grad():
      torch_logits = torch_model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)).to(device))
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
  torch_logits = torch_logits.cpu().numpy()
  return float(np.abs(torch_logits - jax_logits).max() / max(np.abs(jax_logits).max(), 1e-12))


def run_autoattack(torch_model, images_uint8: np.ndarray, labels: np.ndarray, *, eps: float,
                   version: str = 'standard', batch_size: int = 500, device: str = 'cpu',
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
  """Runs AutoAttack; returns (correct under attack per image, adversarial images NHWC, info)."""
  torch, pyautoattack = _import_torch()
  x = torch.from_numpy(np.asarray(data.to_float(images_uint8)).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype(np.int64))
  adversary = pyautoattack.AutoAttack(torch_model, norm='Linf', eps=eps, version=version,
                                      device=device, seed=seed)
  logger = logging.getLogger('auto-attack')
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('autoattack: %(message)s'))
  logger.addHandler(handler)
  level, propagate = logger.level, logger.propagate
  logger.setLevel(logging.DEBUG)
  logger.propagate = False  # absl's root handler would print every line twice
  start = time.time()
  try:
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
  correct = (y_adv.cpu() == y).numpy()
  x_adv = x_adv.cpu().numpy()
  info = {'version': version, 'attacks': list(adversary.attacks_to_run), 'eps': float(eps),
          'device': device, 'seed': seed, 'batch_size': batch_size,
          'num_examples': int(len(labels)), 'seconds': time.time() - start,
          'max_perturbation': float(np.abs(x_adv - x.numpy()).max()),
          'pyautoattack': importlib.metadata.version('pyautoattack'),
          'torch': torch.__version__}
  return correct, x_adv.transpose(0, 2, 3, 1), info


def autoattack_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                          which: str = 'auto') -> dict:
  """Exports checkpoint ``which``, runs AutoAttack on it and adds it to the results table.

  The JAX attacks of ``eval.final`` are run first when ``results.json`` does not already hold
  them for this checkpoint. The AA images are the final evaluation's
  (``autoattack.n_examples=0``) or a stratified subset of the test split of that size.
  """
  torch, _ = _import_torch()
  device = resolve_device(torch, config.autoattack.device)
  ds, state, store = runs.restore_for_evaluation(config, workdir, which)
  try:
    state, label = runs.select_checkpoint(config, state, store, which)
    imported = runs.is_torch_file(which)
    step = None if imported else int(state.step)
    results = _results_for(workdir, label, step)
    if results is None:
      if imported:
        reports.write_run_info(workdir, config)
      results = runs.final_evaluation(config, workdir, state, ds, store, which,
                                       trained_steps=step)
  finally:
    store.close()
  entry = _entry_for(results, label, step)  # the table's rows of this checkpoint (EMA: its own)
  weights = runs.parse_checkpoint(which)[1]
  export.write_export(os.path.join(workdir, 'export' + (f'_{weights}' if weights else '')), state,
                      config, ds.num_classes, ds.image_shape, label, step)

  torch_model = load_torch_model(state, config, ds.num_classes, ds.image_shape, device)
  images, labels = ds.split('test')
  size = config.autoattack.n_examples or config.eval.final_subset_size
  subset = evaluate.stratified_subset(labels, size, config.seed)
  images, labels = images[subset], labels[subset]
  parity = logits_parity(torch_model, state.apply_fn, state.variables, images[:16])
  if not parity <= PARITY_RTOL:
    raise CheckpointError(f'the exported PyTorch model disagrees with the JAX model (relative '
                          f'logit error {parity:.2e} > {PARITY_RTOL:g}): the export of '
                          f'{config.model.name} is wrong; AutoAttack was not run')
  eps = config_lib.eval_eps(config)
  correct, x_adv, info = run_autoattack(
      torch_model, images, labels, eps=eps, version=config.autoattack.version,
      batch_size=config.autoattack.batch_size, device=device, seed=config.seed)
  if info['max_perturbation'] > eps + 1e-6:
    raise CheckpointError(f'AutoAttack returned a perturbation of {info["max_perturbation"]:.6f} '
                          f'> eps = {eps:.6f}; its result is not valid')
  jax_logits = jax.jit(lambda v, x: state.apply_fn(v, x, train=False))
  jax_pred = np.concatenate([np.argmax(np.asarray(jax_logits(state.variables, x_adv[i:i + 256])), -1)
                             for i in range(0, len(labels), 256)])
  info['jax_agreement'] = float(np.mean((jax_pred == labels) == correct))
  info['parity_rel_error'] = parity
  class_acc = evaluate.per_class_accuracy(correct, labels, ds.num_classes)
  entry['attacks']['autoattack'] = {
      'per_class': [float(a) for a in class_acc],
      **evaluate.summarize(class_acc, correct.mean()), 'num_examples': int(len(labels))}
  entry['autoattack'] = info
  md = reports.write_results(workdir, results, ds.class_names)
  if config.report.get('plots', True):
    reports.plot_per_class(workdir, results, ds.class_names, runs.comparison_runs(config, workdir))
  reports.write_report(workdir)
  print(md)
  return results


def _entry_for(results: dict, label: str, step: int | None) -> dict | None:
  """The part of ``results`` that evaluates the checkpoint (label, step): the results
  themselves, or their EMA entry (``results['ema']``)."""
  for entry in (results, results.get('ema') or {}):
    if entry.get('checkpoint') == label and entry.get('step') == step:
      return entry
  return None


def _results_for(workdir: str, label: str, step: int | None) -> dict | None:
  """``results.json`` of ``workdir`` when it evaluates the checkpoint (label, step)."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if _entry_for(results, label, step) is not None else None
