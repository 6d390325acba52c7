"""The installable package: pyproject.toml agrees with requirements*.txt, and the wheel it builds
installs an ``ltd-jax`` command that runs from anywhere."""

import glob
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
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                  '-w', str(tmp_path / 'dist'), ROOT], check=True, capture_output=True, timeout=300)
  wheel = glob.glob(str(tmp_path / 'dist' / 'ltd_jax-*.whl'))[0]
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith('METADATA'))).decode()
    entry = z.read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
  assert 'ltd_jax/cli.py' in names and 'ltd_jax/train.py' in names
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
