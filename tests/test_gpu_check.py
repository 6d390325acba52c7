"""scripts/gpu_check.sh: its stages run independently under their budgets, and its dry run goes
through every stage on this CPU (tiny sizes) and leaves the files the GPU machine returns."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT, shared_path

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import gpu_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_stage_kills_a_command_at_its_budget_and_skips_what_no_longer_fits(tmp_path):
  log = str(tmp_path / 'stage.log')
  stage = gpu_check.Stage('x', budget_s=5.0, log_path=log, flag='--budgetX')
  fails = [sys.executable, '-c', 'import sys; print("bad"); sys.exit(3)']
  assert stage.run('fails', fails) is False
  assert stage.run('sleeps', [sys.executable, '-c', 'import time; time.sleep(60)'],
                   timeout_s=2.0) is False
  both = [('a', [sys.executable, '-c', 'print("a")'], None),
          ('b', [sys.executable, '-c', 'import os; print("b" * int(os.environ["X"]))'], {'X': '1'})]
  assert stage.run_parallel(both) == [True, True]
  assert stage.run('late', [sys.executable, '-c', 'import time; time.sleep(60)']) is False
  assert stage.run('never', [sys.executable, '-c', 'print(1)']) is False
  status = [s.split(',')[0] for s in stage.status]
  assert status == ['fails: failed (exit 3)', 'sleeps: timed out (raise --budgetX)', 'a: ok',
                    'b: ok', 'late: timed out (raise --budgetX)',
                    'never: skipped (stage budget spent; raise --budgetX)']
  text = open(log).read()
  assert 'bad' in text and '===== a: exit 0' in text and text.index('\na\n') < text.index('\nb\n')
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.part')]


def test_a_stage_without_budget_sets_no_wall_clock_limit(tmp_path):
  """The dry run's stages: a command's own timeout is a share of a budget there is none of."""
  stage = gpu_check.Stage('x', budget_s=float('inf'), log_path=str(tmp_path / 'log'))
  assert stage.run('slow', [sys.executable, '-c', 'import time; time.sleep(3)'], timeout_s=1.0)
  assert stage.status[0].startswith('slow: ok')


def test_dry_run_goes_through_every_stage(tmp_path):
  shared_path('data', 'cifar-10-subset')
  out, work = tmp_path / 'out', tmp_path / 'work'
  proc = subprocess.run(
      ['bash', 'scripts/gpu_check.sh', '--dry-run', f'--out={out}', f'--work={work}'], cwd=ROOT,
      env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  files = sorted(os.listdir(out))
  assert files == ['benchmarks.md', 'comparison.md', 'runs.tar.gz', 'stage1_tests.log',
                   'stage2_benchmarks.log', 'stage3_training.log', 'summary.md']
  summary = (out / 'summary.md').read_text()
  assert summary.count('(no budget, ') == 3  # no stage of the dry run is timed but by CI
  for label in ('pytest', 'small_cnn_f32', 'attack_loop', 'teacher (TRADES)', 'absld seed 0',
                'rslad seed 0', 'autoattack absld seed 0', 'autoattack rslad seed 0'):
    assert f'  - {label}: ok' in summary, summary
  # The dry run's pytest stage runs tests/test_losses.py: all of it, none failing.
  import re  # pylint: disable=g-import-not-at-top
  collected = subprocess.run([sys.executable, '-m', 'pytest', '-q', '--collect-only',
                              'tests/test_losses.py'], cwd=ROOT, capture_output=True, text=True)
  count = int(re.search(r'(\d+) tests? collected', collected.stdout).group(1))
  assert 'JAX backend cpu' in summary and f'{count} passed in' in summary and 'failed' not in summary

  bench = (out / 'benchmarks.md').read_text()
  row = next(line for line in bench.splitlines() if line.startswith('| absld |'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert len(cells) == 19 and '-' not in cells  # JAX, PyTorch eager and torch.compile measured
  assert "attacks.UNROLL_DEFAULTS for 'cpu' from this run" in bench

  comparison = (out / 'comparison.md').read_text()
  for method in ('absld', 'rslad'):
    row = next(line for line in comparison.splitlines() if line.startswith(f'| {method} | '))
    assert len(row.strip('|').split('|')) in (10, 11) and ' - ' not in row  # clean, PGD-20, AA

  with tarfile.open(out / 'runs.tar.gz') as tar:
    names = tar.getnames()
    assert not [n for n in names if '/checkpoints/' in n or '/best/' in n or '/export/' in n]
    results = json.load(tar.extractfile('absld_seed0/results.json'))
    metrics = tar.extractfile('absld_seed0/metrics.jsonl').read().decode().splitlines()
  assert results['num_examples'] == 40 and results['autoattack']['num_examples'] == 10
  assert results['attacks']['autoattack']['num_examples'] == 10
  assert results['autoattack']['parity_rel_error'] <= 1e-3
  assert any(json.loads(m)['kind'] == 'temperatures' for m in metrics)  # ABSLD's epoch end ran
  assert 'teacher/results.json' in names and 'rslad_seed0/results.json' in names


@pytest.mark.parametrize('dry_run', [True, False])
def test_stage3_runs_the_paper_configs_with_one_selection(dry_run):
  args = gpu_check.argparse.Namespace(dry_run=dry_run, teacher_epochs=10, student_epochs=12)
  over = gpu_check.run_overrides(args, '/data')
  assert '--config.eval.selection=fair' in over['student']  # RSLAD selected as ABSLD is
  assert '--config.teacher.source=workdir' in over['student']
  assert '--config.data.dir=/data' in over['teacher'] and '--config.data.dir=/data' in over['student']
  if not dry_run:
    assert '--config.optim.lr_boundaries_epochs=(9,10,11)' in over['student']  # 215/260/285 of 300
