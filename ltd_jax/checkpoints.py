"""Orbax checkpoints of the whole TrainState: the latest N in ``checkpoints/``, the best in ``best/``.

Each step holds two items: ``state`` (the TrainState's arrays) and ``digest`` (the CRC-32 of
every array). Orbax writes a step into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints valid; the digest catches what the
rename cannot (a file truncated or overwritten later: Orbax restores garbled bytes without
complaint). A checkpoint that cannot be read or fails its digest is reported, moved to
``corrupt/`` and skipped, so that the next older one is used and a rerun never meets it again.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.experimental import multihost_utils

from ltd_jax.errors import CheckpointError


def _to_tree(state):
  return serialization.to_state_dict(state)


# Layout 1 (before methods owned their state) kept ABSLD's arrays as top-level TrainState
# fields, for every method; layout 2 holds them in ``method_state``.
LAYOUT_1_FIELDS = ('tau_adv', 'tau_clean', 'risk_adv_sum', 'risk_adv_count', 'risk_clean_sum',
                   'risk_clean_count')


def _is_layout_1(stored, template) -> bool:
  return isinstance(stored, dict) and 'tau_adv' in stored and 'tau_adv' not in template


def _layout_1_template(template, stored):
  """``template`` as a layout-1 checkpoint holds it: without method_state, with its fields."""
  old = {k: v for k, v in template.items() if k != 'method_state'}
  old.update({k: np.zeros(tuple(stored[k].shape), np.float32) for k in LAYOUT_1_FIELDS})
  return old


def _from_layout_1(restored, template, path: str):
  """A restored layout-1 tree in the layout of ``template``: its fields become the method's
  state when the method keeps exactly those (ABSLD), and are dropped when it keeps none."""
  old = {k: restored.pop(k) for k in LAYOUT_1_FIELDS}
  wanted = template.get('method_state') or {}
  if set(wanted) - set(old):
    raise CheckpointError(f'checkpoint {path} has layout 1 (written before method_state), which '
                          f'holds no {sorted(set(wanted) - set(old))[0]}: retrain in another '
                          f'--workdir')
  restored['method_state'] = {k: old[k] for k in wanted}
  return restored


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(k): tuple(getattr(v, 'shape', ()) or ())
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def state_digest(tree) -> dict[str, int]:
  """``{leaf path: CRC-32 of its bytes}`` of a state tree (arrays fetched to the host)."""
  host = jax.device_get(tree)
  return {jax.tree_util.keystr(k): zlib.crc32(np.ascontiguousarray(v).tobytes())
          for k, v in jax.tree_util.tree_leaves_with_path(host)}


def describe_mismatch(template, stored) -> str:
  """'' when ``stored`` (arrays or Orbax metadata) has the keys and shapes of ``template``."""
  want, have = _shapes(template), _shapes(stored)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing (e.g. {missing[0]})')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]})')
  if shapes:
    parts.append(f'{len(shapes)} of another shape (e.g. {shapes[0]}: stored {have[shapes[0]]}, '
                 f'configured {want[shapes[0]]})')
  return '; '.join(parts)


class CorruptCheckpoint(Exception):
  """A checkpoint whose files cannot be read back as they were written."""


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:160]}' if text else type(e).__name__


def _manager(directory: str, keep: int, barrier: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True,
          # Both managers may save the same step: distinct barrier names across hosts.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=barrier),
          **options),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'digest': ocp.JsonCheckpointHandler()})


class CheckpointStore:
  """Latest-N and best-by-score checkpoint managers for one work directory: ``best/`` for the
  trained weights, ``best_<name>/`` for another weight set (``best_ema/``: the EMA's best)."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self.latest = _manager(os.path.join(self.workdir, 'checkpoints'), keep, 'latest')
    self._bests = {'': self._best_manager('')}

  def _best_manager(self, name: str) -> ocp.CheckpointManager:
    folder = 'best' if not name else f'best_{name}'
    return _manager(os.path.join(self.workdir, folder), 1, folder,
                    best_fn=lambda m: m['score'], best_mode='max')

  def best_manager(self, name: str = '') -> ocp.CheckpointManager:
    if name not in self._bests:
      self._bests[name] = self._best_manager(name)
    return self._bests[name]

  @property
  def best(self) -> ocp.CheckpointManager:
    return self._bests['']

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self, name: str = '') -> int | None:
    if name and not os.path.isdir(os.path.join(self.workdir, f'best_{name}')):
      return None
    return self.best_manager(name).best_step()

  @staticmethod
  def _save_args(state):
    tree = _to_tree(state)
    return ocp.args.Composite(state=ocp.args.StandardSave(tree),
                              digest=ocp.args.JsonSave({'crc32': state_digest(tree)}))

  def save_latest(self, step: int, state) -> None:
    if step not in self.latest.all_steps():
      self.latest.save(step, args=self._save_args(state), force=True)

  def save_best(self, step: int, state, score: float, name: str = '') -> bool:
    """Saves ``state`` if ``score`` beats the stored best of weight set ``name``; returns
    whether it did."""
    manager = self.best_manager(name)
    manager.wait_until_finished()  # the previous best's metrics are readable only once saved
    if step in manager.all_steps():
      return False
    best_score = self.best_score(name)
    if best_score is not None and score <= best_score:
      return False
    manager.save(step, args=self._save_args(state), metrics={'score': float(score)}, force=True)
    return True

  def best_score(self, name: str = '') -> float | None:
    manager = self.best_manager(name)
    step = manager.best_step()
    metrics = manager.metrics(step) if step is not None else None
    return float(metrics['score']) if metrics else None

  def restore(self, state, which: str = 'latest', name: str = ''):
    """The newest readable checkpoint of ``which`` (latest or best; the best of weight set
    ``name``) restored into the structure of ``state``; None when there is none. One that does
    not fit the configured model raises CheckpointError; unreadable ones are reported, moved to
    ``corrupt/`` and skipped."""
    manager = self.latest if which == 'latest' else self.best_manager(name)
    template = _to_tree(state)
    steps = sorted(manager.all_steps(), reverse=True)
    if which == 'best' and steps:  # one kept; its score may be unreadable if it is corrupt
      best = manager.best_step()
      steps = [best] if best is not None else steps[:1]
    for step in steps:
      try:
        restored = self._restore_step(manager, step, template)
      except CorruptCheckpoint as e:
        self._quarantine(manager, step, str(e))
        continue
      return serialization.from_state_dict(state, restored)
    return None

  def _restore_step(self, manager, step: int, template):
    path = os.path.join(manager.directory, str(step))
    try:
      meta = manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f'metadata unreadable, {_reason(e)}') from e
    if meta is None:
      raise CorruptCheckpoint('no state item')
    stored = getattr(meta, 'tree', meta)
    layout_1 = _is_layout_1(stored, template)
    target = _layout_1_template(template, stored) if layout_1 else template
    detail = describe_mismatch(target, stored)
    if detail:
      raise CheckpointError(
          f'checkpoint {path} does not fit the configured model ({detail}): use the config it '
          f'was written with (config.json in its work directory) or another --workdir')
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), digest=ocp.args.JsonRestore()))
      restored, digest = jax.tree_util.tree_map(np.asarray, out['state']), out['digest']
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f'unreadable, {_reason(e)}') from e
    want = (digest or {}).get('crc32', {})
    bad = sorted(k for k, v in state_digest(restored).items() if want.get(k) != v)
    if bad:
      raise CorruptCheckpoint(f'{len(bad)} arrays differ from their CRC-32 at save time '
                              f'(e.g. {bad[0]})')
    return _from_layout_1(restored, template, path) if layout_1 else restored

  def _quarantine(self, manager, step: int, reason: str) -> None:
    """Moves an unreadable step to ``corrupt/`` (kept for inspection) and reports it."""
    src = os.path.join(manager.directory, str(step))
    stamp = time.strftime('%Y%m%d-%H%M%S')
    dest = os.path.join(self.workdir, 'corrupt',
                        f'{os.path.basename(manager.directory)}-{step}-{stamp}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(src, dest)
      print(f'warning: checkpoint {src} is corrupt ({reason}): moved to {dest}; using the '
            f'previous one', file=sys.stderr)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantine {src}')
    manager.reload()

  def wait(self) -> None:
    self.latest.wait_until_finished()
    for manager in self._bests.values():
      manager.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    for manager in self._bests.values():
      manager.close()
