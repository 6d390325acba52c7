"""The documentation site: ``mkdocs build --strict`` (never with -q, which hides the warnings
strict mode counts) passes on the docs as they are, and fails
on a broken link and on a page missing from the navigation (so CI's build guards both); the
README keeps what a newcomer reads first and links every page."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def build(root) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-d',
                         str(root / 'site')], cwd=str(root), capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.fixture
def site_copy(tmp_path):
  for name in ('docs', 'ltd_jax'):
    shutil.copytree(os.path.join(ROOT, name), tmp_path / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(ROOT, 'mkdocs.yml'), tmp_path / 'mkdocs.yml')
  return tmp_path


def test_the_site_builds_strictly_and_the_api_page_renders_docstrings(site_copy):
  proc = build(site_copy)
  assert proc.returncode == 0, proc.stderr
  api = (site_copy / 'site' / 'api' / 'index.html').read_text()
  assert 'resolve_config_spec' in api and 'bundled' in api  # from config_lib's docstrings


def test_a_broken_link_fails_the_build(site_copy):
  with open(site_copy / 'docs' / 'data.md', 'a') as f:
    f.write('\nSee [the missing page](no_such_page.md).\n')
  proc = build(site_copy)
  assert proc.returncode != 0 and 'no_such_page.md' in proc.stderr


def test_a_page_missing_from_the_navigation_fails_the_build(site_copy):
  (site_copy / 'docs' / 'orphan.md').write_text('# Orphan\n')
  proc = build(site_copy)
  assert proc.returncode != 0 and 'orphan.md' in proc.stderr


def nav_files(nav) -> list[str]:
  out = []
  for item in nav:
    for value in item.values():
      out += nav_files(value) if isinstance(value, list) else [value]
  return out


def test_every_page_is_in_the_navigation_and_linked_from_the_readme():
  config = yaml.safe_load(open(os.path.join(ROOT, 'mkdocs.yml')))
  pages = sorted(f for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
  assert sorted(nav_files(config['nav'])) == pages
  readme = open(os.path.join(ROOT, 'README.md')).read()
  linked = set(re.findall(r'\]\(docs/([a-z0-9_]+\.md)\)', readme))
  topics = {'running.md', 'methods.md', 'evaluation.md', 'interchange.md', 'data.md',
            'devices.md', 'trust.md', 'extending.md', 'fidelity.md', 'comparisons.md',
            'testing.md', 'api.md'}
  assert topics <= linked, topics - linked
  assert all(os.path.exists(os.path.join(ROOT, 'docs', p)) for p in linked)
  assert len(readme.splitlines()) < 150  # the rest lives on its page


def test_the_devices_page_says_why_jit_over_a_mesh_rather_than_pmap():
  text = open(os.path.join(ROOT, 'docs', 'devices.md')).read()
  assert '## Why one `jax.jit` over a mesh, not `pmap`' in text
  assert 'A `pmap` user keeps' in text and 'global* batch' in text
