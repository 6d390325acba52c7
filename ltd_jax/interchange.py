"""PyTorch interchange: state_dict names and layouts, export, import (METHODS.md section 4).

Flax module names are the PyTorch ones with ``.N`` written ``_N``; parameters map
kernel -> weight (conv HWIO -> OIHW, dense [in, out] -> [out, in]), BatchNorm
scale/bias/mean/var -> weight/bias/running_mean/running_var, plus ``num_batches_tracked``.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import zipfile

import jax
import numpy as np
import safetensors
import safetensors.numpy

from ltd_jax.errors import CheckpointError

_INDEXED = re.compile(r'^(.*)_(\d+)$')
_PARAM_NAMES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight'}
_STAT_NAMES = {'mean': 'running_mean', 'var': 'running_var'}


def torch_module_name(flax_path) -> str:
  """('block1', 'layer_0', 'bn1') -> 'block1.layer.0.bn1': a trailing '_N' is an index, except
  after a double underscore, which stands for one underscore ('batchnorm__0' -> 'batchnorm_0')."""
  parts = []
  for name in flax_path:
    m = _INDEXED.match(name)
    if '__' in name:
      parts.append(name.replace('__', '_'))
    else:
      parts += [m.group(1), m.group(2)] if m and m.group(1) else [name]
  return '.'.join(parts)


def torch_shape(flax_name: str, shape) -> tuple[int, ...]:
  shape = tuple(shape)
  if flax_name == 'kernel' and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if flax_name == 'kernel' and len(shape) == 2:
    return shape[::-1]
  return shape


def _path_names(path):
  return [getattr(k, 'key', str(k)) for k in path]


def torch_state_dict_shapes(params, batch_stats) -> dict[str, tuple[int, ...]]:
  """The PyTorch state_dict keys and shapes that ``params`` and ``batch_stats`` export to."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    *modules, name = _path_names(path)
    out[f'{torch_module_name(modules)}.{_PARAM_NAMES[name]}'] = torch_shape(name, leaf.shape)
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch_stats):
    *modules, name = _path_names(path)
    module = torch_module_name(modules)
    out[f'{module}.{_STAT_NAMES[name]}'] = tuple(leaf.shape)
    out[f'{module}.num_batches_tracked'] = ()
  return out


def read_torch_keys(path: str) -> dict[str, tuple[int, ...]]:
  """Parses a ``shared/spec/torch_keys`` file: ``key<TAB>[d0, d1, ...]`` per line."""
  out = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        key, shape = line.rstrip('\n').split('\t')
        dims = shape.strip('[] ')
        out[key] = tuple(int(d) for d in dims.split(',')) if dims else ()
  return out


# ---------------------------------------------------------------------------------------------
# Arrays: Flax variables <-> PyTorch state_dict (numpy only; torch is needed only for .pt files)

def _flax_leaf_to_torch(name: str, leaf) -> np.ndarray:
  a = np.asarray(leaf, np.float32)
  if name == 'kernel' and a.ndim == 4:
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if name == 'kernel' and a.ndim == 2:
    return np.ascontiguousarray(a.T)
  return np.ascontiguousarray(a)


def _torch_leaf_to_flax(name: str, a: np.ndarray) -> np.ndarray:
  if name == 'kernel' and a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  if name == 'kernel' and a.ndim == 2:
    return a.T
  return a


def _torch_keys(params, batch_stats):
  """(collection, flax path, leaf name, torch key) for every Flax leaf."""
  for collection, tree, names in (('params', params, _PARAM_NAMES),
                                  ('batch_stats', batch_stats, _STAT_NAMES)):
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
      *modules, name = _path_names(path)
      yield collection, path, name, f'{torch_module_name(modules)}.{names[name]}'


def to_torch_state_dict(params, batch_stats, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (float32 numpy arrays, int64 ``num_batches_tracked``) of a model."""
  out = {}
  trees = {'params': params, 'batch_stats': batch_stats}
  for collection, path, name, key in _torch_keys(params, batch_stats):
    leaf = functools.reduce(lambda t, k: t[getattr(k, 'key', k)], path, trees[collection])
    out[key] = _flax_leaf_to_torch(name, leaf)
    if collection == 'batch_stats':
      out[key.rsplit('.', 1)[0] + '.num_batches_tracked'] = np.array(num_batches_tracked, np.int64)
  return out


def _listing(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def from_torch_state_dict(state_dict: dict, params, batch_stats, source: str = 'state_dict',
                          model_name: str = 'the model'):
  """Flax ``(params, batch_stats)`` shaped like the templates, filled from a PyTorch state_dict.

  Every expected key must be present with its PyTorch shape; ``num_batches_tracked`` may be
  absent (it does not change an eval-mode forward). Anything missing, unexpected or of another
  shape raises CheckpointError listing the keys.
  """
  expected = {}
  for collection, path, name, key in _torch_keys(params, batch_stats):
    expected[key] = (collection, path, name)
  template = {'params': params, 'batch_stats': batch_stats}
  want_shapes = torch_state_dict_shapes(params, batch_stats)
  optional = {k for k in want_shapes if k.endswith('.num_batches_tracked')}
  missing = set(want_shapes) - set(state_dict) - optional
  unexpected = set(state_dict) - set(want_shapes)
  misshaped = [f'{k} {tuple(np.shape(state_dict[k]))} != {want_shapes[k]}'
               for k in sorted(set(want_shapes) & set(state_dict))
               if k not in optional and tuple(np.shape(state_dict[k])) != want_shapes[k]]
  if missing or unexpected or misshaped:
    parts = [f'{len(missing)} missing: {_listing(missing)}' if missing else '',
             f'{len(unexpected)} unexpected: {_listing(unexpected)}' if unexpected else '',
             f'{len(misshaped)} of another shape: {_listing(misshaped, 4)}' if misshaped else '']
    raise CheckpointError(f'{source} does not fit {model_name} (' + '; '.join(p for p in parts if p)
                          + '): pick the architecture it was saved from (--config.model.name, '
                          'teacher.model.name) or another checkpoint')
  out = {}
  for key, (collection, path, name) in expected.items():
    value = _torch_leaf_to_flax(name, np.asarray(state_dict[key], np.float32))
    out[(collection, tuple(_path_names(path)))] = value
  rebuilt = {c: jax.tree_util.tree_map_with_path(
      lambda p, leaf, c=c: out[(c, tuple(_path_names(p)))].astype(leaf.dtype),
      template[c]) for c in template}
  return rebuilt['params'], rebuilt['batch_stats']


# ---------------------------------------------------------------------------------------------
# Files

WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict')


def canonical_state_dict(obj) -> dict:
  """Unwraps ``{'state_dict': sd}`` / ``{'model': sd}``, strips DataParallel's ``module.`` and
  drops the unused ``sub_block1`` copy of TRADES' released WRN-34-10."""
  if not isinstance(obj, dict):
    raise CheckpointError(f'expected a state_dict (a dict of tensors), found {type(obj).__name__}')
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  out = {}
  for key, value in obj.items():
    key = str(key)
    while key.startswith('module.'):
      key = key[len('module.'):]
    if not key.startswith('sub_block1.'):
      out[key] = value
  return out


def load_torch_file(path: str) -> dict:
  """The state_dict in a ``.safetensors`` file (no torch needed) or a pickled ``.pt``/``.pth``
  file (``torch.load(weights_only=True)``: code-carrying pickles are refused), as numpy arrays."""
  if not os.path.isfile(path):
    raise CheckpointError(f'PyTorch checkpoint {os.path.abspath(path)} not found: pass the path '
                          f'of a .pt, .pth or .safetensors file')
  if path.endswith('.safetensors'):
    try:
      return canonical_state_dict(safetensors.numpy.load_file(path))
    except (safetensors.SafetensorError, ValueError, TypeError, OSError) as e:
      raise CheckpointError(f'cannot read {path} as safetensors ({_first_line(e)}): the file is '
                            f'truncated or not a safetensors checkpoint') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f'reading {path} needs PyTorch: pip install -r requirements-torch.txt, '
                          f'or use the .safetensors export') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f'{path} holds more than tensors and torch.load(weights_only=True) '
                          f'refused it ({_first_line(e)}); it was not unpickled: re-save only '
                          f'the state_dict, or convert it to .safetensors') from e
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'cannot read {path} ({_first_line(e)}): the file is truncated or not '
                          f'a PyTorch checkpoint') from e
  state_dict = canonical_state_dict(obj)
  return {k: _tensor_to_numpy(v) for k, v in state_dict.items()}


def _tensor_to_numpy(value):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return value


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def save_safetensors(path: str, state_dict: dict[str, np.ndarray]) -> None:
  # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make num_batches_tracked [1]).
  safetensors.numpy.save_file({k: np.require(v, requirements='C') for k, v in state_dict.items()},
                              path,
                              metadata={'format': 'pt'})


def batches_tracked(state_dict: dict) -> int | None:
  """The ``num_batches_tracked`` of a PyTorch state_dict (its largest), or None without one."""
  counts = [int(np.asarray(v).reshape(-1)[0]) for k, v in state_dict.items()
            if k.endswith('num_batches_tracked') and np.asarray(v).size]
  return max(counts) if counts else None


def save_torch(path: str, state_dict: dict[str, np.ndarray]) -> None:
  """A raw ``.pt`` state_dict (``torch.save`` of tensors; loads with ``weights_only=True``)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
