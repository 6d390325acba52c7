"""Mutation run over the modules that hold the maths, and its report (docs/mutation.md).

    pip install mutmut==3.8.1
    python scripts/mutation.py --report=docs/mutation.md

mutmut (https://github.com/boxed/mutmut) writes every mutant of the named modules into a copy of
the repository and runs, for each mutant, the fast tests that execute the mutated function
(forked from a server that has imported the test modules: about 2-6 mutants a second on 2 cores).
The copy lives in ``--workdir``, so the checkout is never touched.

Survivors are classified with ``scripts/mutation_equivalents.json``: for a surviving mutant
whose changed line (before -> after) is listed there, the reason it cannot change what the
program computes (an equivalent mutant) or why it is left (a named gap). The score is
killed / (mutants - equivalent). Not part of CI: it is a measurement, like benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = ('losses', 'methods/base', 'methods/adversarial', 'methods/distillation',
           'methods/fairness', 'attacks', 'temperatures', 'awp', 'evaluate', 'interchange',
           'weight_average', 'generated')
# The fast tests (seconds each) that exercise those modules in-process. Whole training runs
# (test_train, test_teacher, test_audit) are left out: each would run for every surviving
# mutant of every function it touches.
TESTS = ('test_losses.py', 'test_distillation.py', 'test_attacks.py', 'test_evaluate.py',
         'test_interchange.py', 'test_reference_parity.py', 'test_mixed_precision.py',
         'test_fairness.py', 'test_weight_average.py', 'test_generated.py', 'test_recipe.py',
         'test_accumulation.py')
EQUIVALENTS = os.path.join(ROOT, 'scripts', 'mutation_equivalents.json')


def copy_tree(workdir: str) -> str:
  """Tracked files of the working tree (committed or not) into workdir/repo; shared/ beside."""
  repo = os.path.join(workdir, 'repo')
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(repo)
  files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode().split('\0')
  for f in filter(None, files):
    src = os.path.join(ROOT, f)
    if os.path.islink(src):  # configs/ -> ltd_jax/configs: a link stays a link
      os.makedirs(os.path.dirname(os.path.join(repo, f)) or repo, exist_ok=True)
      os.symlink(os.readlink(src), os.path.join(repo, f))
    elif os.path.exists(src):
      os.makedirs(os.path.dirname(os.path.join(repo, f)) or repo, exist_ok=True)
      shutil.copy2(src, os.path.join(repo, f))
  shared = os.path.join(os.path.dirname(ROOT), 'shared')
  if os.path.isdir(shared):  # tests find ../shared from the repo and from repo/mutants
    os.symlink(shared, os.path.join(workdir, 'shared'))
    os.symlink(shared, os.path.join(repo, 'shared'))
  return repo


def write_config(repo: str, modules, tests) -> None:
  lines = ['[mutmut]', 'source_paths = ltd_jax/',
           'only_mutate = ' + '\n    '.join(f'ltd_jax/{m}.py' for m in modules),
           'pytest_add_cli_args_test_selection = ' + '\n    '.join(f'tests/{t}' for t in tests),
           'pytest_add_cli_args = -p no:cacheprovider\n    -m\n    not slow',
           'process_isolation = forkserver',
           'also_copy = configs/\n    run.py\n    benchmarks/\n    scripts/']
  with open(os.path.join(repo, 'setup.cfg'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def changed_line(diff: str) -> tuple[str, str]:
  """The (before, after) source line of a one-line mutant, stripped."""
  minus = [l[1:].strip() for l in diff.splitlines() if l.startswith('-') and not l.startswith('---')]
  plus = [l[1:].strip() for l in diff.splitlines() if l.startswith('+') and not l.startswith('+++')]
  return ' / '.join(minus), ' / '.join(plus)


def collect(repo: str, python: str, modules=MODULES):
  """[(name, status, before, after)] for every mutant of ``modules`` run in ``repo``."""
  from mutmut.stats import status_by_exit_code  # pylint: disable=g-import-not-at-top
  out = []
  for module in modules:
    meta = os.path.join(repo, 'mutants', 'ltd_jax', f'{module}.py.meta')
    if not os.path.exists(meta):
      continue
    with open(meta) as f:
      codes = json.load(f)['exit_code_by_key']
    for name, code in sorted(codes.items(), key=lambda kv: (kv[0].rsplit('_', 1)[0],
                                                             int(kv[0].rsplit('_', 1)[1]))):
      status = status_by_exit_code[code]
      before = after = ''
      if status not in KILLED and status != 'not checked':
        diff = subprocess.run([python, '-m', 'mutmut', 'show', name], cwd=repo,
                              capture_output=True, text=True).stdout
        before, after = changed_line(diff)
      out.append((name, status, before, after))
  return out


KILLED = ('killed', 'timeout', 'segfault')  # a timeout or crash is a detected mutant


def module_of(mutant: str) -> str:
  """The module of a mutant's name: 'ltd_jax.losses.x_f__mutmut_1' -> 'losses',
  'ltd_jax.methods.base.x_f__mutmut_1' -> 'methods/base' (a package's module)."""
  parts = mutant.split('.')
  return f'{parts[1]}/{parts[2]}' if f'{parts[1]}/{parts[2]}' in MODULES else parts[1]


def write_report(path: str, rows, equivalents: dict, commit: str, seconds: float, tests,
                 commits: dict | None = None) -> tuple:
  """docs/mutation.md from ``rows``; mutants not checked (a run stopped early) are counted apart
  and left out of the score."""
  checked = [r for r in rows if r[1] != 'not checked']
  total, unchecked = len(checked), len(rows) - len(checked)
  killed = sum(s in KILLED for _, s, _, _ in checked)
  equivalent, gaps = [], []
  for name, status, before, after in checked:
    if status in KILLED:
      continue
    reason = equivalents.get(f'{before} -> {after}')
    (equivalent if reason and reason.startswith('equivalent') else gaps).append(
        (name, status, before, after, reason or 'not yet classified'))
  score = 100.0 * killed / max(total - len(equivalent), 1)
  cell = lambda text: text.replace('|', '\\|')  # a table cell
  per_module = {}
  for name, status, *_ in rows:
    k = per_module.setdefault(module_of(name), [0, 0, 0, 0])
    k[0] += status != 'not checked'
    k[1] += status in KILLED
    k[3] += status == 'not checked'
  for name, *_ in equivalent:
    per_module[module_of(name)][2] += 1
  import mutmut  # pylint: disable=g-import-not-at-top
  lines = [
      '# Mutation testing of the core modules', '',
      f'Measured {datetime.date.today().isoformat()} at commit `{commit}` with mutmut '
      f'{mutmut.__version__} on {platform.processor() or platform.machine()} '
      f'({os.cpu_count()} cores), Python {platform.python_version()}; {seconds / 60:.0f} min.', '',
      f'    python scripts/mutation.py --report={os.path.relpath(path, ROOT)}', '',
      'Tests run for each mutant: those of ' + ', '.join(f'`{t}`' for t in tests) +
      ' (not slow) that execute the mutated function.', '',
      f'**{total} mutants checked, {killed} killed, {len(equivalent)} equivalent, '
      f'{len(gaps)} surviving non-equivalent: {score:.1f}% of non-equivalent mutants killed.**'
      + (f' {unchecked} of the {len(rows)} mutants were not checked: the run was stopped before '
         f'it reached them.' if unchecked else ''), '',
      '| module | commit | mutants checked | killed | equivalent | killed / non-equivalent | not checked |',
      '|---|---|---:|---:|---:|---:|---:|']
  for m in MODULES:
    if m in per_module:
      n, k, e, u = per_module[m]
      lines.append(f'| {m} | `{(commits or {}).get(m, commit)}` | {n} | {k} | {e} | '
                   f'{100.0 * k / max(n - e, 1):.1f}% | {u} |')
  lines += ['', '## Surviving non-equivalent mutants', '']
  if gaps:
    lines += ['| mutant | status | line | mutated to | why it survives |', '|---|---|---|---|---|']
    lines += [f'| `{n}` | {s} | `{cell(b)}` | `{cell(a)}` | {r} |' for n, s, b, a, r in gaps]
  else:
    lines.append('None.')
  lines += ['', '## Equivalent mutants', '',
            'Mutants that cannot change a result the library computes (reason per changed line, '
            'from `scripts/mutation_equivalents.json`).', '',
            '| mutant | line | mutated to | why it is equivalent |', '|---|---|---|---|']
  lines += [f'| `{n}` | `{cell(b)}` | `{cell(a)}` | {r[len("equivalent: "):]} |'
            for n, _, b, a, r in equivalent]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return total, killed, len(equivalent), len(gaps), score


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/ltd_jax_mutation',
                      help='with --report-only, several comma-separated runs may be merged: a '
                           'later one replaces the modules it ran')
  parser.add_argument('--report', default=os.path.join(ROOT, 'docs', 'mutation.md'))
  parser.add_argument('--max-children', type=int, default=2)
  parser.add_argument('--modules', default=','.join(MODULES))
  parser.add_argument('--report-only', action='store_true',
                      help='re-classify the results already in --workdir')
  args = parser.parse_args()
  modules = args.modules.split(',')
  start = datetime.datetime.now()
  if not args.report_only:
    repo = copy_tree(args.workdir)
    write_config(repo, modules, TESTS)
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    with open(os.path.join(args.workdir, 'commit'), 'w') as f:
      f.write(head)
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               JAX_COMPILATION_CACHE_DIR=os.path.join(args.workdir, 'xla_cache'))
    subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(args.max_children)],
                   cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.workdir, 'seconds'), 'w') as f:
      f.write(str((datetime.datetime.now() - start).total_seconds()))
  by_module, commits, seconds = {}, {}, 0.0
  for workdir in args.workdir.split(','):
    repo = os.path.join(workdir, 'repo')
    with open(os.path.join(workdir, 'commit')) as f:  # the commit the run copied
      commit = f.read().strip()
    seconds_file = os.path.join(workdir, 'seconds')
    if os.path.exists(seconds_file):
      with open(seconds_file) as f:
        seconds += float(f.read())
    else:  # stopped early: from its start to the last result it wrote
      metas = glob.glob(os.path.join(repo, 'mutants', 'ltd_jax', '*.meta'))
      seconds += max(map(os.path.getmtime, metas)) - os.path.getmtime(os.path.join(repo, 'setup.cfg'))
    ran = [m for m in modules
           if os.path.exists(os.path.join(repo, 'mutants', 'ltd_jax', f'{m}.py.meta'))]
    rows = collect(repo, sys.executable, ran)
    for m in ran:
      module_rows = [r for r in rows if module_of(r[0]) == m]
      if any(r[1] != 'not checked' for r in module_rows) or m not in by_module:
        by_module[m], commits[m] = module_rows, commit
  rows = [r for m in MODULES if m in by_module for r in by_module[m]]
  with open(EQUIVALENTS) as f:
    equivalents = json.load(f)
  label = ', '.join(sorted(set(commits.values())))
  total, killed, equivalent, gaps, score = write_report(
      args.report, rows, equivalents, label, seconds, TESTS, commits)
  print(f'{total} mutants, {killed} killed, {equivalent} equivalent, {gaps} surviving: '
        f'{score:.1f}% of non-equivalent killed -> {args.report}')


if __name__ == '__main__':
  main()
