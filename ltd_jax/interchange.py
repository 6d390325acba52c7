"""Names and layouts shared with PyTorch state_dicts (METHODS.md section 4).

Flax module names are the PyTorch ones with ``.N`` written ``_N``; parameters map
kernel -> weight (conv HWIO -> OIHW, dense [in, out] -> [out, in]), BatchNorm
scale/bias/mean/var -> weight/bias/running_mean/running_var, plus ``num_batches_tracked``.
"""

from __future__ import annotations

import re

import jax

_INDEXED = re.compile(r'^(.*)_(\d+)$')
_PARAM_NAMES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight'}
_STAT_NAMES = {'mean': 'running_mean', 'var': 'running_var'}


def torch_module_name(flax_path) -> str:
  """('block1', 'layer_0', 'bn1') -> 'block1.layer.0.bn1'."""
  parts = []
  for name in flax_path:
    m = _INDEXED.match(name)
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
