"""Faults a long run meets: preemption signals, kills at random points, corrupt checkpoints.

Each test provokes the fault and checks that nothing is lost: the run stops at a step boundary
with a checkpoint, or falls back to the previous good checkpoint, and finishes with the same
parameters as a run that was never disturbed.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ltd_jax import checkpoints
from ltd_jax import runs
from ltd_jax import train
from ltd_jax.errors import Preempted
from tests.conftest import ROOT, run_in_process


def _leaves(state):
  return jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state, state.step,
                                    state.rng, state.method_state))


def _assert_same_state(a, b):
  """Bit-identical, by construction: every run executes the same compiled step program on the
  same state and batches (the batch is a pure function of (seed, step)), and checkpoints
  restore every bit."""
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(autouse=True)
def default_signal_handlers():
  """Python's own handlers, also where the suite runs as a background job (SIGINT ignored)."""
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)


def _default_signals_in_child():
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its KeyboardInterrupt


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An undisturbed 3-epoch run (15 steps, checkpoints at 5, 10, 15) and its config."""
  from tests.conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  config = make_tiny_config()
  config.num_epochs = 3
  config.eval.final = ('clean', 'pgd20')
  workdir = str(tmp_path_factory.mktemp('reference'))
  return config, train.train_and_evaluate(config, workdir), workdir


@pytest.fixture(scope='module')
def two_epochs(reference, tmp_path_factory):
  """The reference config stopped after 2 of its 3 epochs (checkpoints at 5 and 10)."""
  config = reference[0].copy_and_resolve_references()
  config.num_epochs = 2
  workdir = str(tmp_path_factory.mktemp('two_epochs'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes(reference, tmp_path, signum):
  config, full, _ = reference
  workdir = str(tmp_path)

  def send_at_7(step):
    if step == 7:  # mid-epoch 2, two steps after the epoch-1 checkpoint
      os.kill(os.getpid(), signum)
  with pytest.raises(Preempted, match=rf'{signal.Signals(signum).name} received: stopped after '
                                      rf'step 7 of 15, checkpoint in .*checkpoints/7;') as e:
    train.train_and_evaluate(config, workdir, step_hook=send_at_7)
  assert e.value.step == 7 and e.value.signum == signum
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int) == ['5', '7']
  report = open(os.path.join(workdir, 'report.md')).read()
  assert f'Status: stopped: {signal.Signals(signum).name} received: stopped after step 7' in report
  _assert_same_state(full, train.train_and_evaluate(config, workdir))


def test_a_signal_ignored_at_start_stays_ignored(reference, tmp_path):
  config, full, _ = reference
  signal.signal(signal.SIGINT, signal.SIG_IGN)

  def ctrl_c(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
  _assert_same_state(full, train.train_and_evaluate(config, str(tmp_path), step_hook=ctrl_c))
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_second_sigint_stops_at_once(reference, tmp_path):
  config, _, _ = reference

  def twice(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path), step_hook=twice)


def _corrupt_data_file(step_dir, how):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)]
  target = max(files, key=os.path.getsize)
  size = os.path.getsize(target)
  with open(target, 'r+b') as f:
    if how == 'truncate':
      f.truncate(size // 2)
    else:  # overwrite the middle third: Orbax alone restores such bytes without complaint
      f.seek(size // 3)
      inverted = bytes(255 - b for b in f.read(size // 3))
      f.seek(size // 3)
      f.write(inverted)


CORRUPTIONS = {
    'truncated data': lambda d: _corrupt_data_file(d, 'truncate'),
    'overwritten data': lambda d: _corrupt_data_file(d, 'overwrite'),
    'truncated metadata': lambda d: open(os.path.join(d, 'state', '_METADATA'), 'r+b').truncate(20),
    'missing state': lambda d: shutil.rmtree(os.path.join(d, 'state')),
}


@pytest.mark.parametrize('how', list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_reported_moved_and_the_previous_used(
    reference, two_epochs, tmp_path, capfd, how):
  config, full, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_epochs, workdir)  # checkpoints at 5 and 10
  capfd.readouterr()
  CORRUPTIONS[how](os.path.join(workdir, 'checkpoints', '10'))
  resumed = train.train_and_evaluate(config, workdir)
  err = capfd.readouterr().err
  assert f'checkpoint {workdir}/checkpoints/10 is corrupt' in err and 'using the previous' in err
  assert os.listdir(os.path.join(workdir, 'corrupt'))[0].startswith('checkpoints-10-')
  _assert_same_state(full, resumed)  # resumed from step 5 and trained 10 steps again
  # The next run meets no corrupt checkpoint: no warning, no crash loop.
  train.train_and_evaluate(config, workdir)
  assert 'corrupt' not in capfd.readouterr().err


def test_corrupt_best_checkpoint_falls_back_to_the_latest(reference, tmp_path, capfd):
  config, _, ref_dir = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  best_step = os.listdir(os.path.join(workdir, 'best'))[0]
  _corrupt_data_file(os.path.join(workdir, 'best', best_step), 'overwrite')
  results = runs.evaluate_checkpoint(config, workdir, 'auto')
  assert results['checkpoint'] == 'latest' and results['step'] == 15
  assert f'checkpoint {workdir}/best/{best_step} is corrupt' in capfd.readouterr().err


def test_digest_names_the_changed_array(tmp_path):
  tree = {'a': np.arange(4.0), 'b': {'c': np.ones(3, np.float32)}}
  digest = checkpoints.state_digest(tree)
  tree['b']['c'][1] = 2
  changed = [k for k, v in checkpoints.state_digest(tree).items() if digest[k] != v]
  assert changed == ["['b']['c']"]


def _cli(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, 'run.py'), '--config=configs/trades_digits.py',
          f'--workdir={workdir}', '--config.model.width=4', '--config.num_epochs=2',
          '--config.batch_size=64', '--config.attack.steps=2', '--config.checkpoint.every_steps=1',
          '--config.eval.final=("clean",)', '--config.eval.subset_size=50',
          '--config.eval.pgd_steps=2', '--config.progress_bar=False', '--config.report.plots=False',
          *extra]


def _train_step_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l)['step'] for l in f if '"train"' in l]


def test_random_kills_sigkill_included_end_with_the_uninterrupted_parameters(tmp_path):
  """The command-line run, killed at random steps (a few ms after a random checkpoint: mid-step
  or mid-save) by SIGKILL, SIGTERM and SIGINT and rerun after each kill, ends with the
  parameters, results and metrics records of a run that was never killed."""
  ref_dir, workdir = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  ref = subprocess.run(_cli(ref_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr
  rng = np.random.default_rng(0)
  kills = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL]
  # Kill once the run has checkpointed a random step of its 44 (and at least one of its own,
  # so that it is past start-up), then after a random few ms: mid-step or mid-save.
  targets = np.sort(rng.choice(np.arange(3, 40), size=len(kills), replace=False))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  latest = lambda: max([int(d) for d in os.listdir(ckpt_dir) if d.isdigit()], default=0) \
      if os.path.isdir(ckpt_dir) else 0
  log = []
  for signum, target in zip(kills, targets):
    start = latest()
    proc = subprocess.Popen(_cli(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals_in_child)
    while proc.poll() is None and latest() < max(target, start + 1):
      time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    log.append((signal.Signals(signum).name, int(target), proc.returncode))
    if proc.returncode == 0:
      break  # finished before the signal came
    if signum == signal.SIGKILL:
      assert proc.returncode == -signal.SIGKILL
    else:
      assert proc.returncode == 128 + signum, err
      line = err.strip().splitlines()[-1]
      assert f'{signal.Signals(signum).name} received: stopped after step' in line, err
      stopped = int(line.split('after step ')[1].split()[0])
      assert str(stopped) in os.listdir(ckpt_dir)
  assert sum(code != 0 for _, _, code in log) >= 3, log
  final = subprocess.run(_cli(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert final.returncode == 0, final.stderr
  results = [json.load(open(os.path.join(d, 'results.json'))) for d in (ref_dir, workdir)]
  assert results[0]['attacks'] == results[1]['attacks'], log
  ref_state = _restore_latest(ref_dir)
  killed_state = _restore_latest(workdir)
  assert int(killed_state.step) == 44, log
  _assert_same_state(ref_state, killed_state)
  steps = _train_step_records(workdir)
  assert steps == sorted(set(steps)) == _train_step_records(ref_dir), log  # each step once


def _restore_latest(workdir):
  from ltd_jax import teacher  # pylint: disable=g-import-not-at-top
  config = teacher.load_workdir_config(workdir)
  _, state, store = runs.restore_for_evaluation(config, workdir, 'latest')
  store.close()
  return state


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(monkeypatch, capfd, tmp_path):
  def interrupted(config, workdir):
    raise KeyboardInterrupt
  monkeypatch.setattr(train, 'train_and_evaluate', interrupted)
  capfd.readouterr()
  code = run_in_process('--config=configs/trades_digits.py', f'--workdir={tmp_path}')
  lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert code == 130 and len(lines) == 1 and lines[0].startswith('interrupted (SIGINT)')
