"""The installable package: pyproject.toml agrees with requirements*.txt, and the wheel it builds
installs an ``ltd-jax`` command that runs from anywhere."""

import glob
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile

from tests.conftest import ROOT


def requirement_lines(name: str) -> list[str]:
  lines = [l.split('#')[0].strip() for l in open(os.path.join(ROOT, name))]
  return [l for l in lines if l and not l.startswith('-r')]


def test_pyproject_agrees_with_the_requirements_files():
  project = tomllib.load(open(os.path.join(ROOT, 'pyproject.toml'), 'rb'))['project']
  assert project['dependencies'] == requirement_lines('requirements.txt')
  extras = project['optional-dependencies']
  assert extras['torch'] == requirement_lines('requirements-torch.txt')
  assert extras['dev'] == ['ltd-jax[torch]'] + requirement_lines('requirements-dev.txt')
  assert any(r.startswith('jax[cuda12]') for r in extras['cuda12'])
  assert project['scripts'] == {'ltd-jax': 'ltd_jax.cli:run'}
  assert 'chex' not in ' '.join(project['dependencies'])


def test_wheel_installs_the_ltd_jax_command(tmp_path):
  """Built and installed as a user would, then run from an empty directory: bundled configs by
  name and by absolute path, a user's config importing a bundled one and its neighbour, and
  ABSLD's teacher stage."""
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                  '-w', str(tmp_path / 'dist'), ROOT], check=True, capture_output=True, timeout=300)
  wheel = glob.glob(str(tmp_path / 'dist' / 'ltd_jax-*.whl'))[0]
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith('METADATA'))).decode()
    entry = z.read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
  assert 'ltd_jax/cli.py' in names and 'ltd_jax/train.py' in names
  assert 'ltd_jax/configs/absld_digits.py' in names and 'ltd_jax/configs/__init__.py' in names
  assert re.search(r'ltd-jax\s*=\s*ltd_jax\.cli:run', entry)
  for extra in ('torch', 'dev', 'cuda12'):
    assert f'Provides-Extra: {extra}' in meta
  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q',
                  '--target', str(site), wheel], check=True, capture_output=True, timeout=300)
  env = dict(os.environ, PYTHONPATH=str(site))
  proc = subprocess.run([str(site / 'bin' / 'ltd-jax'), '--help'], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'temperature_search' in proc.stdout and '--workdir' in proc.stdout
  where = subprocess.run([sys.executable, '-c', 'import ltd_jax.cli; print(ltd_jax.cli.__file__)'],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert where.stdout.strip().startswith(str(site))  # the installed copy, not the checkout
  empty = tmp_path / 'empty'
  empty.mkdir()
  command = [str(site / 'bin' / 'ltd-jax')]
  env = dict(env, JAX_PLATFORMS='cpu')

  def ltd_jax(*args):
    proc = subprocess.run(command + list(args), cwd=str(empty), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  listed = ltd_jax('--list-configs').stdout
  assert 'absld_digits' in listed and 'ltd_awp_cifar10' in listed
  ltd_jax('--config=natural_digits', '--config.max_steps=3', '--config.report.plots=False',
          '--workdir=by_name')
  bundled = site / 'ltd_jax' / 'configs' / 'natural_digits.py'
  ltd_jax(f'--config={bundled}', '--config.max_steps=3', '--config.report.plots=False',
          '--workdir=by_path')
  for run in ('by_name', 'by_path'):
    assert json.load(open(empty / run / 'results.json'))['title'].startswith('natural / small_cnn')
  # A user's own files beside each other: a config importing a bundled one and a neighbour.
  (empty / 'my_teacher.py').write_text(
      'from ltd_jax.configs import trades_digits\n\n\ndef get_config():\n'
      '  c = trades_digits.get_config()\n  c.max_steps = 3\n  return c\n')
  (empty / 'my_absld.py').write_text(
      'import my_teacher\nfrom ltd_jax.configs import absld_digits\n\n\ndef get_config():\n'
      '  c = absld_digits.get_config()\n  assert my_teacher.get_config().max_steps == 3\n'
      '  c.teacher.config = "my_teacher.py"\n  c.max_steps = 3\n  return c\n')
  ltd_jax('--config=my_absld.py', '--workdir=absld')
  ltd_jax('--config=absld_digits', f'--config.teacher.config={empty / "my_teacher.py"}',
          '--config.max_steps=3', '--config.report.plots=False', '--workdir=absld_bundled')
  # matplotlib from the installed package draws the plots; none where they are turned off (3 steps
  # end no epoch, so ABSLD has no temperature record to plot).
  for png in ('training_curves.png', 'per_class_accuracy.png'):
    assert (empty / 'absld' / png).exists() and not (empty / 'absld_bundled' / png).exists()
  for run in ('absld', 'absld_bundled'):
    results = json.load(open(empty / run / 'results.json'))
    assert results['title'].startswith('absld / small_cnn / digits')
    assert json.load(open(empty / run / 'teacher' / 'results.json'))['title'].startswith('trades')
    assert glob.glob(str(empty / run / '**' / 'events.out.tfevents*'), recursive=True)
    assert glob.glob(str(empty / run / 'teacher' / '**' / 'events.out.tfevents*'), recursive=True)
  proc = subprocess.run(command + ['--config=absld_digit'], cwd=str(empty), env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and 'did you mean absld_digits?' in proc.stderr
