"""Trains the tiny TRADES config in a fresh process and saves the final parameters.

    python tests/train_worker.py WORKDIR OUT.npz [--config.key=value ...]

Tests run it under different XLA_FLAGS (device counts) or as one of several processes; with
LTD_TEST_SIGTERM_AT_STEP=N the process sends itself SIGTERM after step N and, once preempted,
records the step it stopped at in OUT.npz.<process index>.preempted.json and exits 143; with
LTD_TEST_LATE_FIRST_STEP_S=S it starts its first step S seconds late, as a host whose compilation
is slower would.
"""

import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import conftest  # pylint: disable=g-import-not-at-top
from ltd_jax import errors  # pylint: disable=g-import-not-at-top
from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
from ltd_jax import train  # pylint: disable=g-import-not-at-top


def _typed(config, key: str, text: str):
  """The override ``text`` as the type of the config's current value at ``key``."""
  current = config
  for part in key.split('.'):
    current = current[part]
  return text == 'True' if isinstance(current, bool) else type(current)(text)


def _start_first_step_late(seconds: float) -> None:
  make_step = train.make_train_step_fn

  def late_make_step(*args, **kwargs):
    step_fn, calls = make_step(*args, **kwargs), []

    def late_step(*step_args):
      if not calls:
        time.sleep(seconds)
      calls.append(1)
      return step_fn(*step_args)
    return late_step
  train.make_train_step_fn = late_make_step


def main(workdir, out, *overrides):
  config = conftest.make_tiny_config()
  config.max_steps = 6
  config.eval.final = ('clean', 'pgd20')
  pairs = [item[len('--config.'):].split('=', 1) for item in overrides]
  conftest.apply_overrides(config, {k: _typed(config, k, v) for k, v in pairs})
  parallel.initialize_distributed(config)
  if os.environ.get('LTD_TEST_LATE_FIRST_STEP_S'):
    _start_first_step_late(float(os.environ['LTD_TEST_LATE_FIRST_STEP_S']))
  hook = None
  if os.environ.get('LTD_TEST_SIGTERM_AT_STEP'):  # this process alone receives SIGTERM then
    at = int(os.environ['LTD_TEST_SIGTERM_AT_STEP'])
    hook = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == at else None
  try:
    state = train.train_and_evaluate(config, workdir, step_hook=hook)
  except errors.Preempted as e:
    with open(f'{out}.{jax.process_index()}.preempted.json', 'w') as f:
      json.dump({'step': e.step, 'signum': e.signum}, f)
    sys.exit(128 + e.signum)
  leaves = jax.tree_util.tree_leaves_with_path(
      {'params': state.params, 'batch_stats': state.batch_stats})
  if parallel.is_primary():
    np.savez(out, device_count=jax.device_count(), process_count=jax.process_count(),
             **{jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves})


if __name__ == '__main__':
  main(*sys.argv[1:])
