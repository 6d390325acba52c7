"""Data parallelism: 1, 8 and 2x2 (two processes) CPU devices train the same model.

Each run is a fresh process (``tests/train_worker.py``), since the device count is fixed when
JAX starts: ``--xla_force_host_platform_device_count`` splits the CPU into N devices, and two
processes joined by ``jax.distributed.initialize`` form one 4-device mesh.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ltd_jax import parallel
from ltd_jax.errors import ConfigError
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'train_worker.py')
LATE_FIRST_STEP_S = 40


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(f'--xla_force_host_platform_device_count={devices}')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Final parameters of each run, all launched at once (the preempted pair's rerun as soon as
  it stopped): {name: {key: array}}."""
  root = tmp_path_factory.mktemp('parallel')
  procs = {}

  def launch(name, devices, *overrides, process_id=None, env=None):
    out = root / f'{name}.npz'
    cmd = [sys.executable, WORKER, str(root / name), str(out), *overrides]
    log = open(root / f'{name}{"" if process_id is None else process_id}.log', 'a')
    procs[(name, process_id)] = (subprocess.Popen(cmd, env={**_env(devices), **(env or {})},
                                                  stdout=log, stderr=subprocess.STDOUT), log, out)

  def two_processes(name, sigterm_at=None, late_first_step_s=None):
    port = _free_port()
    for pid in (0, 1):
      env = {}
      if pid == 1 and sigterm_at:
        env['LTD_TEST_SIGTERM_AT_STEP'] = str(sigterm_at)
      if pid == 1 and late_first_step_s:
        env['LTD_TEST_LATE_FIRST_STEP_S'] = str(late_first_step_s)
      launch(name, 2, '--config.method=natural', '--config.distributed.initialize=True',
             f'--config.distributed.coordinator_address=localhost:{port}',
             '--config.distributed.num_processes=2', f'--config.distributed.process_id={pid}',
             process_id=pid, env=env)

  def wait(names, expected_rc=None):
    for (name, pid), (proc, log, out) in list(procs.items()):
      if name not in names:
        continue
      rc = proc.wait(timeout=600)
      log.close()
      assert rc == (expected_rc or {}).get(name, 0), \
          f'{name} exited {rc}:\n{open(log.name).read()[-3000:]}'
      if rc == 0 and pid in (None, 0):
        with np.load(out) as f:
          results[name] = dict(f)
      del procs[(name, pid)]

  results = {}
  two_processes('natural_2x2_preempted', sigterm_at=3)  # process 1 alone gets SIGTERM
  # Process 1 starts its first step 40 s after process 0, as a host that compiles more slowly
  # would: longer than the 30 s the CPU backend waits when it first connects the hosts.
  two_processes('natural_2x2', late_first_step_s=LATE_FIRST_STEP_S)
  for method in ('natural', 'trades'):
    launch(f'{method}_1', 1, f'--config.method={method}')
    launch(f'{method}_8', 8, f'--config.method={method}')
  wait({'natural_2x2_preempted'}, {'natural_2x2_preempted': 143})
  results['preempted_at'] = [
      json.load(open(root / f'natural_2x2_preempted.npz.{i}.preempted.json')) for i in (0, 1)]
  two_processes('natural_2x2_preempted')  # rerun, while the others run: resumes on both hosts
  wait({name for name, _ in procs})
  results['root'] = root
  return results


def _max_diff(a, b):
  return max(float(np.abs(a[k] - b[k]).max()) for k in a if k.startswith('['))


def test_runs_used_the_devices_asked_for(runs):
  assert runs['natural_1']['device_count'] == 1
  assert runs['natural_8']['device_count'] == 8
  assert runs['natural_2x2']['device_count'] == 4
  assert runs['natural_2x2']['process_count'] == 2


def test_eight_devices_train_the_same_model_as_one(runs):
  # Natural training is a smooth function of the data: only summation order differs.
  assert _max_diff(runs['natural_1'], runs['natural_8']) < 1e-5
  assert _max_diff(runs['natural_1'], runs['natural_1']) == 0.0


def test_eight_devices_trades_agree_within_sign_flips(runs):
  # PGD's sign(grad) turns ~1e-7 gradient differences into an occasional alpha-sized pixel
  # change, so TRADES agrees to ~1e-3 rather than to float precision.
  diff = _max_diff(runs['trades_1'], runs['trades_8'])
  assert diff < 3e-3
  assert _max_diff(runs['trades_1'], runs['natural_1']) > 100 * diff  # the tolerance is tight


def test_two_processes_train_the_same_model_as_one_device(runs):
  # natural_2x2's process 1 started its first step LATE_FIRST_STEP_S late: process 0 waited.
  assert _max_diff(runs['natural_1'], runs['natural_2x2']) < 1e-5


def test_two_processes_write_one_results_table_equal_to_one_devices(runs):
  """Only process 0 writes the records and results; they are those of the 1-device run (the
  parameters agree within 1e-5, so every evaluated prediction does)."""
  one, two = runs['root'] / 'natural_1', runs['root'] / 'natural_2x2'
  r1, r2 = (json.load(open(d / 'results.json')) for d in (one, two))
  assert r2['attacks'] == r1['attacks'] and set(r1['attacks']) >= {'clean', 'pgd20'}
  assert (r2['step'], r2['num_examples']) == (r1['step'], r1['num_examples'])
  table = lambda d: [l for l in (d / 'results.md').read_text().splitlines() if l.startswith('|')]
  assert table(two) == table(one) and len(table(one)) >= 4
  records = lambda d: [json.loads(l) for l in open(d / 'metrics.jsonl')]
  kinds = lambda rs: [(r['kind'], r.get('step')) for r in rs]
  assert kinds(records(two)) == kinds(records(one))  # one line per record, not one per process


def test_sigterm_on_one_host_stops_every_host_at_the_same_step_and_resumes(runs):
  # Process 1 got SIGTERM after step 3; the hosts compare flags every log_every_steps (2), so
  # both finished step 4, wrote its checkpoint together and exited 143; the rerun resumed.
  assert runs['preempted_at'] == [{'step': 4, 'signum': 15}] * 2
  assert _max_diff(runs['natural_1'], runs['natural_2x2_preempted']) < 1e-5


def test_indivisible_batch_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'run.py'), '--config=configs/trades_digits.py',
       '--config.batch_size=100', f'--workdir={tmp_path}'],
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('error: batch_size=100 does not divide over the 8 devices')
  assert 'multiple of 8' in lines[-1]


def test_check_batch_size_and_process_slice():
  mesh = parallel.make_mesh([jax.devices()[0]] * 1)
  parallel.check_batch_size(7, mesh)
  assert parallel.round_up_to_devices(7, mesh) == 7
  assert parallel.process_slice(12) == slice(0, 12)
  with pytest.raises(ConfigError, match='eval.batch_size=5 does not divide'):
    mesh4 = parallel.make_mesh(np.array(jax.devices() * 4))
    parallel.check_batch_size(5, mesh4, 'eval.batch_size')


def test_replicate_gives_every_leaf_its_own_buffer():
  shared = jax.numpy.ones((3,))
  tree = parallel.replicate({'a': shared, 'b': shared, 'n': np.arange(4)}, parallel.make_mesh())
  assert tree['a'].unsafe_buffer_pointer() != tree['b'].unsafe_buffer_pointer()
  assert tree['a'].sharding.is_fully_replicated
  np.testing.assert_array_equal(tree['n'], np.arange(4))
