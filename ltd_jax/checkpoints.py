"""Orbax checkpoints of the whole TrainState: the latest N under ``checkpoints/``, the best under ``best/``.

Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves the previous checkpoints valid and the partial one ignored.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from ltd_jax.errors import CheckpointError


def _to_tree(state):
  return serialization.to_state_dict(state)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(k): tuple(getattr(v, 'shape', ()) or ())
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


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


class CheckpointStore:
  """Latest-N and best-by-score checkpoint managers for one work directory."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
        os.path.join(self.workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix='latest')),
        item_handlers=ocp.StandardCheckpointHandler())
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m['score'], best_mode='max',
            # Both managers may save the same step: distinct barrier names across hosts.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix='best')),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.best_step()

  def save_latest(self, step: int, state) -> None:
    if step not in self.latest.all_steps():
      self.latest.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=True)

  def save_best(self, step: int, state, score: float) -> bool:
    """Saves ``state`` if ``score`` beats the stored best; returns whether it did."""
    self.best.wait_until_finished()  # the previous best's metrics are readable only once saved
    if step in self.best.all_steps():
      return False
    best_score = self.best_score()
    if best_score is not None and score <= best_score:
      return False
    self.best.save(step, args=ocp.args.StandardSave(_to_tree(state)),
                   metrics={'score': float(score)}, force=True)
    return True

  def best_score(self) -> float | None:
    step = self.best.best_step()
    metrics = self.best.metrics(step) if step is not None else None
    return float(metrics['score']) if metrics else None

  def restore(self, state, which: str = 'latest', step: int | None = None):
    """Restores into the structure of ``state``; None when there is no checkpoint."""
    manager = self.latest if which == 'latest' else self.best
    if step is None:
      step = manager.latest_step() if which == 'latest' else manager.best_step()
    if step is None:
      return None
    template = _to_tree(state)
    path = os.path.join(manager.directory, str(step))
    meta = manager.item_metadata(step)
    detail = describe_mismatch(template, getattr(meta, 'tree', meta))
    if not detail:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except (ValueError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if detail:
      raise CheckpointError(
          f'checkpoint {path} does not fit the configured model ({detail}): use the config it '
          f'was written with (config.json in its work directory) or another --workdir')
    restored = jax.tree_util.tree_map(np.asarray, restored)
    return serialization.from_state_dict(state, restored)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
