"""``--mode=export``: a checkpoint as a PyTorch state_dict that RobustBench and AutoAttack load.

Writes ``WORKDIR/export/``: ``model.safetensors`` (always; no torch needed), ``model.pt`` (a raw
state_dict, when torch is installed) and ``model.json`` (architecture, how to build it in
PyTorch, the checkpoint it came from and the files' SHA-256).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re

import ml_collections

from ltd_jax import config_lib
from ltd_jax import interchange
from ltd_jax import reports
from ltd_jax import runs

_WRN = re.compile(r'^wrn-(\d+)-(\d+)$')


def torch_constructors(model: ml_collections.ConfigDict, num_classes: int,
                       in_channels: int) -> dict[str, str]:
  """Python expressions that build the PyTorch twin: ours, and RobustBench's where it has one."""
  out = {'ltd_jax': (f'ltd_jax.torch_models.build_torch_model({model.name!r}, '
                     f'num_classes={num_classes}, in_channels={in_channels}, '
                     f'base_width={model.base_width}, width={model.width})')}
  rb = 'robustbench.model_zoo.architectures'
  m = _WRN.match(model.name)
  if in_channels != 3:
    return out
  if model.name in ('resnet50', 'wrn-50-2'):
    fn = 'wide_resnet50_2' if model.name == 'wrn-50-2' else 'resnet50'
    out['torchvision'] = f'torchvision.models.{fn}(num_classes={num_classes})'
  if m:
    out['robustbench'] = (f'{rb}.wide_resnet.WideResNet(depth={m.group(1)}, '
                          f'widen_factor={m.group(2)}, num_classes={num_classes})')
  elif model.name == 'resnet18' and model.base_width == 64:
    out['robustbench'] = (f'{rb}.resnet.ResNet({rb}.resnet.BasicBlock, [2, 2, 2, 2], '
                          f'num_classes={num_classes})')
  elif model.name.startswith('preactresnet18') and model.base_width == 64:
    # PreActBlockV2: the shortcut sees relu(bn1(x)), as in AWP's and kuangliu's PreActResNet
    # (RobustBench's PreActBlock takes it from x and computes another function).
    out['robustbench'] = (f'{rb}.resnet.PreActResNet({rb}.resnet.PreActBlockV2, [2, 2, 2, 2], '
                          f'num_classes={num_classes}, '
                          f'bn_before_fc={model.name.endswith("-bn")})')
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def write_export(out_dir: str, state, config: ml_collections.ConfigDict, num_classes: int,
                 image_shape, checkpoint: str, step: int | None) -> dict:
  """Writes the state_dict of ``state`` to ``out_dir``; returns the ``model.json`` record.

  ``num_batches_tracked`` is the step of a trained checkpoint, or for a re-exported PyTorch
  file (``checkpoint`` its path, ``step`` None) the count that file carries."""
  os.makedirs(out_dir, exist_ok=True)
  tracked = step
  if step is None and runs.is_torch_file(checkpoint) and os.path.exists(checkpoint):
    tracked = interchange.batches_tracked(interchange.load_torch_file(checkpoint))
  state_dict = interchange.to_torch_state_dict(state.params, state.batch_stats,
                                               num_batches_tracked=tracked or 0)
  files = {'safetensors': os.path.join(out_dir, 'model.safetensors')}
  interchange.save_safetensors(files['safetensors'], state_dict)
  if importlib.util.find_spec('torch') is not None:
    files['pt'] = os.path.join(out_dir, 'model.pt')
    interchange.save_torch(files['pt'], state_dict)
  model = ml_collections.ConfigDict({k: config.model[k] for k in ('name', 'base_width', 'width')})
  info = {
      'model': model.to_dict(), 'num_classes': num_classes, 'image_shape': list(image_shape),
      'input': 'NCHW float32 in [0, 1], no normalisation', 'data': config.data.name,
      'eps': float(config.eps), 'eval_eps': config_lib.eval_eps(config), 'checkpoint': checkpoint,
      'step': step,
      'num_parameters': int(sum(v.size for k, v in state_dict.items()
                                if not k.endswith(('running_mean', 'running_var',
                                                   'num_batches_tracked')))),
      'torch': torch_constructors(model, num_classes, int(image_shape[-1])),
      'files': {kind: {'path': os.path.basename(p), 'sha256': _sha256(p)}
                for kind, p in files.items()},
      'git_commit': reports.git_commit(),
  }
  reports.write_json(os.path.join(out_dir, 'model.json'), info)
  return info


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = 'auto',
                      out_dir: str | None = None) -> dict:
  """Exports checkpoint ``which`` of ``workdir`` (auto | best | latest, or a PyTorch file to
  re-export; ``WHICH:ema`` the EMA weights) to ``out_dir`` (default ``WORKDIR/export``,
  ``WORKDIR/export_ema`` for the EMA)."""
  ds, state, store = runs.restore_for_evaluation(config, workdir, which)
  try:
    state, label = runs.select_checkpoint(config, state, store, which)
  finally:
    store.close()
  imported = runs.is_torch_file(which)
  weights = runs.parse_checkpoint(which)[1]
  out_dir = out_dir or os.path.join(workdir, 'export' + (f'_{weights}' if weights else ''))
  info = write_export(out_dir, state, config, ds.num_classes, ds.image_shape, label,
                      None if imported else int(state.step))
  print(f'exported {label} checkpoint ({info["num_parameters"]:,} parameters) to '
        f'{os.path.abspath(out_dir)}: ' + ', '.join(f['path'] for f in info['files'].values()))
  return info
