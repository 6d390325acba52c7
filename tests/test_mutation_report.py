"""scripts/mutation.py's bookkeeping: parts stored per module, the report's counts by hand."""

import json
import os
import sys
import types

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import mutation  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_mutants_module_includes_the_package_of_the_methods():
  assert mutation.module_of('ltd_jax.losses.x_cross_entropy__mutmut_3') == 'losses'
  assert mutation.module_of('ltd_jax.methods.base.x_make__mutmut_1') == 'methods/base'
  assert mutation.module_of('ltd_jax.generated.xǁGeneratedImagesǁimages__mutmut_3') == 'generated'


def test_a_later_part_replaces_only_the_modules_it_ran(tmp_path, monkeypatch):
  monkeypatch.setattr(mutation, 'PARTS', str(tmp_path / 'parts.json'))
  first = [('ltd_jax.losses.x_f__mutmut_1', 'killed', '', ''),
           ('ltd_jax.losses.x_f__mutmut_2', 'survived', 'a + b', 'a - b'),
           ('ltd_jax.awp.x_g__mutmut_1', 'timeout', '', ''),
           ('ltd_jax.awp.x_g__mutmut_2', 'not checked', '', '')]
  assert mutation.record_parts(first, 'aaa', 600, ['test_losses.py']) == ['losses', 'awp']
  second = [('ltd_jax.awp.x_g__mutmut_1', 'killed', '', ''),
            ('ltd_jax.awp.x_g__mutmut_2', 'no tests', 'x', 'None'),
            ('ltd_jax.evaluate.x_h__mutmut_1', 'not checked', '', '')]  # nothing checked: not kept
  assert mutation.record_parts(second, 'bbb', 60, ['test_awp.py']) == ['awp']
  with open(tmp_path / 'parts.json') as f:
    parts = json.load(f)
  assert list(parts) == ['losses', 'awp']  # MODULES order
  losses, awp = parts['losses'], parts['awp']
  assert (losses['commit'], losses['mutants'], losses['checked'], losses['killed']) == ('aaa', 2, 2, 1)
  assert losses['not_killed'] == [['ltd_jax.losses.x_f__mutmut_2', 'survived', 'a + b', 'a - b']]
  assert losses['part_minutes'] == 10 and losses['part_modules'] == ['losses', 'awp']
  assert (awp['commit'], awp['mutants'], awp['checked'], awp['killed']) == ('bbb', 2, 2, 1)
  assert awp['tests'] == ['test_awp.py'] and awp['part_minutes'] == 1


def test_the_report_counts_equivalents_apart_and_keeps_the_hand_written_notes(tmp_path):
  part = lambda commit, mutants, checked, killed, not_killed: {
      'commit': commit, 'date': '2026-12-03', 'machine': 'cpu (2 cores)', 'part_minutes': 5,
      'part_modules': ['losses', 'awp'], 'tests': ['test_losses.py'], 'mutants': mutants,
      'checked': checked, 'killed': killed, 'not_killed': not_killed}
  parts = {
      'losses': part('aaa', 12, 10, 7, [['m1', 'survived', 'a + b', 'a - b'],
                                        ['m2', 'survived', 'x', 'None'],
                                        ['m3', 'no tests', 'y', 'z']]),
      'awp': part('aaa', 4, 4, 4, [])}
  equivalents = {'a + b -> a - b': 'equivalent: b is 0 here', 'y -> z': 'survives: a GPU path'}
  path = tmp_path / 'mutation.md'
  path.write_text('old text\n' + mutation.NOTES_MARKER + '\nkept by hand\n')
  total, killed, eq, gaps, score = mutation.write_report(str(path), parts, equivalents)
  assert (total, killed, eq, gaps) == (14, 11, 1, 2)
  assert score == 100.0 * 11 / 13
  text = path.read_text()
  assert '| losses | `aaa` | 10 | 7 | 1 | 77.8% | 2 |' in text  # 7 / (10 - 1)
  assert '| awp | `aaa` | 4 | 4 | 0 | 100.0% | 0 |' in text
  assert '| `m2` | survived | `x` | `None` | not yet classified |' in text
  assert '| `m3` | no tests | `y` | `z` | survives: a GPU path |' in text
  assert '| `m1` | `a + b` | `a - b` | b is 0 here |' in text
  assert '2 of the 16 mutants were not checked' in text
  assert 'old text' not in text and text.endswith(mutation.NOTES_MARKER + '\nkept by hand\n')


def test_a_stopped_parts_length_reaches_the_last_result_of_a_packages_module(tmp_path):
  """No 'seconds' file (the part was stopped): from the config it wrote to the newest .meta, a
  result of ltd_jax/methods/ included; a finished part's own 'seconds' wins."""
  repo = tmp_path / 'repo'
  (repo / 'mutants' / 'ltd_jax' / 'methods').mkdir(parents=True)
  (repo / 'setup.cfg').write_text('[mutmut]\n')
  top = repo / 'mutants' / 'ltd_jax' / 'losses.py.meta'
  nested = repo / 'mutants' / 'ltd_jax' / 'methods' / 'base.py.meta'
  for path in (top, nested):
    path.write_text('{}')
  start = os.path.getmtime(repo / 'setup.cfg')
  os.utime(top, (start + 60, start + 60))
  os.utime(nested, (start + 600, start + 600))
  assert mutation.part_seconds(str(tmp_path)) == 600
  (tmp_path / 'seconds').write_text('42.5')
  assert mutation.part_seconds(str(tmp_path)) == 42.5


def test_a_workdir_without_results_is_refused_by_name(tmp_path):
  (tmp_path / 'repo').mkdir()
  with pytest.raises(SystemExit, match='holds no mutmut results'):
    mutation.part_seconds(str(tmp_path))


def test_a_continued_part_adds_the_unreached_mutants_it_checked(tmp_path, monkeypatch):
  """A stopped part stores the names it did not reach; an ``--unreached`` part checks those only
  and adds them to it (counts, survivors, one 'continued' sitting) instead of replacing it."""
  monkeypatch.setattr(mutation, 'PARTS', str(tmp_path / 'parts.json'))
  name = lambda i: f'ltd_jax.methods.base.x_pgd__mutmut_{i}'
  stopped = [(name(1), 'killed', '', ''), (name(2), 'survived', 'a', 'b'),
             (name(3), 'not checked', '', ''), (name(4), 'not checked', '', ''),
             (name(5), 'not checked', '', '')]
  assert mutation.record_parts(stopped, 'aaa', 7200, ['test_attacks.py']) == ['methods/base']
  assert mutation.load_parts()['methods/base']['not_checked'] == [name(3), name(4), name(5)]
  monkeypatch.setattr(mutation, 'source_changed_since', lambda m, c: False)
  assert mutation.unreached_mutants(['methods/base']) == [name(3), name(4), name(5)]

  # The continuation's copy lists every mutant; only 3 and 4 were reached there.
  later = [(name(1), 'not checked', '', ''), (name(2), 'not checked', '', ''),
           (name(3), 'timeout', '', ''), (name(4), 'survived', 'c', 'd'),
           (name(5), 'not checked', '', '')]
  assert mutation.record_parts(later, 'bbb', 600, ['test_attacks.py'], continuing=True) == \
      ['methods/base']
  part = mutation.load_parts()['methods/base']
  assert (part['commit'], part['mutants'], part['checked'], part['killed']) == ('aaa', 5, 4, 2)
  assert part['not_killed'] == [[name(2), 'survived', 'a', 'b'], [name(4), 'survived', 'c', 'd']]
  assert part['not_checked'] == [name(5)] and part['part_minutes'] == 120
  assert [(c['commit'], c['checked'], c['part_minutes']) for c in part['continued']] == [('bbb', 2, 10)]
  last = [(name(5), 'killed', '', '')]
  mutation.record_parts(last, 'ccc', 60, ['test_attacks.py'], continuing=True)
  part = mutation.load_parts()['methods/base']
  assert 'not_checked' not in part and part['checked'] == 5 and part['killed'] == 3
  path = tmp_path / 'mutation.md'
  mutation.write_report(str(path), mutation.load_parts(), {})
  text = path.read_text()
  assert '`methods/base` continued (`--unreached`) at commit `bbb`' in text
  assert '2 more mutants checked in 10 min' in text and 'were not checked' not in text


def test_a_continuation_is_refused_without_unreached_mutants_or_after_a_change(tmp_path, monkeypatch):
  monkeypatch.setattr(mutation, 'PARTS', str(tmp_path / 'parts.json'))
  mutation.record_parts([('ltd_jax.losses.x_f__mutmut_1', 'killed', '', ''),
                         ('ltd_jax.awp.x_g__mutmut_1', 'not checked', '', ''),
                         ('ltd_jax.awp.x_g__mutmut_2', 'killed', '', '')], 'aaa', 60, ['t.py'])
  monkeypatch.setattr(mutation, 'source_changed_since', lambda m, c: m == 'awp')
  with pytest.raises(SystemExit, match='no unreached mutants stored for losses'):
    mutation.unreached_mutants(['losses'])
  with pytest.raises(SystemExit, match=r'ltd_jax/awp.py changed since its part at aaa'):
    mutation.unreached_mutants(['awp'])
  with pytest.raises(SystemExit, match='no unreached mutants stored for evaluate'):
    mutation.unreached_mutants(['evaluate'])


def test_a_mutation_run_takes_each_modules_fastest_tests_first_and_keeps_modules_together():
  from tests import conftest  # pylint: disable=g-import-not-at-top
  item = lambda path, name: types.SimpleNamespace(path=path, nodeid=f'tests/{path}::{name}')
  items = [item('test_a.py', 'slow'), item('test_a.py', 'quick'), item('test_a.py', 'unmapped'),
           item('test_b.py', 'mid'), item('test_b.py', 'fast'), item('test_c.py', 'only')]
  durations = {'tests/test_a.py::slow': 30.0, 'tests/test_a.py::quick': 2.0,
               'tests/test_b.py::mid': 5.0, 'tests/test_b.py::fast': 1.0,
               'tests/test_c.py::only': 3.0}
  conftest.fastest_first(items, durations)
  assert [i.nodeid.split('/', 1)[1] for i in items] == [
      'test_b.py::fast', 'test_b.py::mid', 'test_a.py::quick', 'test_a.py::slow',
      'test_a.py::unmapped', 'test_c.py::only']


def test_mutmut_runs_with_the_durations_of_its_own_map(tmp_path):
  env = mutation.mutmut_env(str(tmp_path), str(tmp_path / 'repo'))
  assert env['LTD_JAX_TEST_DURATIONS'] == str(tmp_path / 'repo' / 'mutants' / 'mutmut-stats.json')
  assert env['JAX_PLATFORMS'] == 'cpu' and env['JAX_COMPILATION_CACHE_DIR'] == str(tmp_path / 'xla_cache')
