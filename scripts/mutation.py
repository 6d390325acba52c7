"""Mutation run over the modules that hold the maths, and its report (docs/mutation.md).

    pip install mutmut==3.8.1
    python scripts/mutation.py --modules=attacks,losses --workdir=/tmp/mut_a   # one part
    python scripts/mutation.py --report-only --workdir=none                    # the report

mutmut (https://github.com/boxed/mutmut) writes every mutant of the named modules into a copy of
the repository and runs, for each mutant, the fast tests that execute the mutated function
(forked from a server that has imported the test modules; 16-28 mutants a minute on 2 cores).
The copy lives in ``--workdir``, so the checkout is never touched.

The whole run is too long for one sitting, so it is run in parts (``--modules``): each part
stores its modules' results in ``benchmarks/results/mutation_parts.json`` (commit, machine,
counts, every mutant not killed), replacing what those modules had, and the report is written
from all stored parts. Survivors are classified with ``scripts/mutation_equivalents.json``: for
a surviving mutant whose changed line (before -> after) is listed there, the reason it cannot
change what the program computes (an equivalent mutant) or why it is left (a named gap). The
score is killed / (mutants - equivalent). Not part of CI: it is a measurement, like benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
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
# Each module's latest part: commit, machine, counts and every mutant not killed.
PARTS = os.path.join(ROOT, 'benchmarks', 'results', 'mutation_parts.json')
# The report's text below this line is written by hand and kept when it is rewritten.
NOTES_MARKER = '<!-- notes below: written by hand, kept by scripts/mutation.py -->'


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


def cpu_name() -> str:
  """The processor's model name (/proc/cpuinfo), else the architecture."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def mutmut_version() -> str:
  try:
    return importlib.metadata.version('mutmut')
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def load_parts() -> dict:
  if not os.path.exists(PARTS):
    return {}
  with open(PARTS) as f:
    return json.load(f)


def record_parts(rows, commit: str, seconds: float, selection, continuing: bool = False) -> list[str]:
  """Stores in PARTS each module of ``rows`` that was checked: its commit, machine, counts, every
  mutant not killed (killed ones are only counted) and, for a part stopped early, the names of
  those not reached (``not_checked``). A later part replaces the modules it ran; the others keep
  theirs. With ``continuing`` (``--unreached``: a part over a stopped part's unreached mutants,
  the module's source unchanged) the mutants it checked are added to the stored part instead,
  with the sitting listed under ``continued``. Returns the modules recorded."""
  parts, recorded = load_parts(), []
  modules = sorted({module_of(r[0]) for r in rows}, key=MODULES.index)
  machine = (f'{cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}, '
             f'mutmut {mutmut_version()}')
  for m in modules:
    module_rows = [r for r in rows if module_of(r[0]) == m]
    if continuing:
      part = parts[m]
      waiting = set(part.get('not_checked', ()))
      checked = [r for r in module_rows if r[0] in waiting and r[1] != 'not checked']
      if not checked:
        continue
      done = {r[0] for r in checked}
      part['checked'] += len(checked)
      part['killed'] += sum(r[1] in KILLED for r in checked)
      part['not_killed'] += [list(r) for r in checked if r[1] not in KILLED]
      part['not_checked'] = [n for n in part['not_checked'] if n not in done]
      if not part['not_checked']:
        del part['not_checked']
      part.setdefault('continued', []).append({
          'commit': commit, 'date': datetime.date.today().isoformat(), 'machine': machine,
          'part_minutes': round(seconds / 60), 'checked': len(checked)})
      recorded.append(m)
      continue
    checked = [r for r in module_rows if r[1] != 'not checked']
    if not checked:
      continue
    parts[m] = {
        'commit': commit, 'date': datetime.date.today().isoformat(), 'machine': machine,
        'part_minutes': round(seconds / 60), 'part_modules': modules, 'tests': list(selection),
        'mutants': len(module_rows), 'checked': len(checked),
        'killed': sum(r[1] in KILLED for r in checked),
        'not_killed': [list(r) for r in checked if r[1] not in KILLED]}
    unreached = [r[0] for r in module_rows if r[1] == 'not checked']
    if unreached:
      parts[m]['not_checked'] = unreached
    recorded.append(m)
  with open(PARTS, 'w') as f:
    json.dump({m: parts[m] for m in MODULES if m in parts}, f, indent=1, ensure_ascii=False)
    f.write('\n')
  return recorded


def unreached_mutants(modules) -> list[str]:
  """The stored ``not_checked`` mutants of ``modules``, for a part that continues theirs
  (``--unreached``); refused where a module has none stored or changed since its part."""
  parts, names = load_parts(), []
  for m in modules:
    if not parts.get(m, {}).get('not_checked'):
      sys.exit(f'no unreached mutants stored for {m}: run its part in full (--modules={m})')
    if source_changed_since(m, parts[m]['commit']):
      sys.exit(f'ltd_jax/{m}.py changed since its part at {parts[m]["commit"]}: run the part again '
               f'in full (--modules={m}), a continuation would mix two versions')
    names += parts[m]['not_checked']
  return names


def write_report(path: str, parts: dict, equivalents: dict) -> tuple:
  """docs/mutation.md from the stored ``parts`` (one per module); mutants not checked (a part
  stopped early) are counted apart and left out of the score."""
  cell = lambda text: text.replace('|', '\\|')  # a table cell
  total = killed = unchecked = mutants = 0
  equivalent, gaps, per_module = [], [], {}
  for m in MODULES:
    if m not in parts:
      continue
    part = parts[m]
    eq = 0
    for name, status, before, after in part['not_killed']:
      reason = equivalents.get(f'{before} -> {after}')
      if reason and reason.startswith('equivalent'):
        equivalent.append((name, before, after, reason))
        eq += 1
      else:
        gaps.append((name, status, before, after, reason or 'not yet classified'))
    per_module[m] = (part['checked'], part['killed'], eq, part['mutants'] - part['checked'])
    total += part['checked']
    killed += part['killed']
    mutants += part['mutants']
    unchecked += part['mutants'] - part['checked']
  score = 100.0 * killed / max(total - len(equivalent), 1)
  runs = {}
  for m, part in parts.items():
    key = (part['commit'], part['date'], part['machine'], part['part_minutes'])
    runs.setdefault(key, []).append(m)
  selections = sorted({tuple(p['tests']) for p in parts.values()}, key=len)
  lines = [
      '# Mutation testing of the core modules', '',
      'Written by `scripts/mutation.py` from `benchmarks/results/mutation_parts.json`, where each '
      'part of the run stores its modules\' results (a later part replaces the modules it ran):',
      '']
  for (commit, date, machine, minutes), ms in runs.items():
    lines.append(f'- `--modules={",".join(ms)}` at commit `{commit}`, {date}, on {machine}; '
                 f'the part took {minutes} min')
    for m in ms:
      for c in parts[m].get('continued', []):
        lines.append(f'  - `{m}` continued (`--unreached`) at commit `{c["commit"]}`, {c["date"]}, '
                     f'on {c["machine"]} (the module unchanged): {c["checked"]} more mutants '
                     f'checked in {c["part_minutes"]} min')
      for r in parts[m].get('rechecks', []):
        lines.append(f'  - `{m}`: its {r["rechecked"]} surviving non-equivalent mutants run again '
                     f'with the tests of commit `{r["commit"]}` ({r["date"]}, {r["machine"]}; '
                     f'the module unchanged): {len(r["killed"])} killed')
  lines += ['', '    python scripts/mutation.py --modules=A,B --workdir=/tmp/mut_AB   # one part',
            '    python scripts/mutation.py --modules=A --unreached --workdir=/tmp/mut_A2  '
            '# the rest of a stopped part',
            '    python scripts/mutation.py --report-only --workdir=none           # this page', '',
            'Tests run for each mutant: those of ' +
            ', '.join(f'`{t}`' for t in selections[-1]) +
            ' (not slow) that execute the mutated function.', '',
            f'**{total} mutants checked, {killed} killed, {len(equivalent)} equivalent, '
            f'{len(gaps)} surviving non-equivalent: {score:.1f}% of non-equivalent mutants '
            f'killed.**' + (f' {unchecked} of the {mutants} mutants were not checked: a part was '
                            f'stopped before it reached them.' if unchecked else ''), '',
            '| module | commit | mutants checked | killed | equivalent | killed / non-equivalent '
            '| not checked |', '|---|---|---:|---:|---:|---:|---:|']
  for m, (n, k, e, u) in per_module.items():
    lines.append(f'| {m} | `{parts[m]["commit"]}` | {n} | {k} | {e} | '
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
            for n, b, a, r in equivalent]
  if os.path.exists(path):  # the hand-written notes below the marker are kept
    with open(path) as f:
      previous = f.read()
    if NOTES_MARKER in previous:
      lines += ['', NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1].rstrip('\n')]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return total, killed, len(equivalent), len(gaps), score


def mutmut_env(workdir: str, repo: str) -> dict:
  """mutmut's environment: the CPU, the workdir's compilation cache, and the durations of the
  test-to-function map, from which tests/conftest.py runs each mutant's fastest tests first (the
  clean run mutmut makes before the mutants runs in that order too, so an order the tests cannot
  take stops the part there)."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, 'xla_cache'),
              LTD_JAX_TEST_DURATIONS=os.path.join(repo, 'mutants', 'mutmut-stats.json'))


def source_changed_since(module: str, commit: str) -> bool:
  """Whether ltd_jax/MODULE.py differs between ``commit`` and the working tree."""
  return subprocess.run(['git', 'diff', '--quiet', commit, '--', f'ltd_jax/{module}.py'],
                        cwd=ROOT).returncode != 0


def recheck(workdir: str, modules, selection, max_children: int) -> None:
  """Runs again only the stored non-equivalent survivors of ``modules`` (their source unchanged
  since their part), with the tests as they are now, and moves those now killed to the killed
  count of their part. In the part's own workdir its test-to-function map is reused (mutmut
  maps only the new tests); elsewhere a fresh copy is mapped with ``selection``."""
  parts = load_parts()
  with open(EQUIVALENTS) as f:
    equivalents = json.load(f)
  names = {}
  for m in modules:
    if m not in parts:
      sys.exit(f'no stored part for {m}: run it first (--modules={m})')
    if source_changed_since(m, parts[m]['commit']):
      sys.exit(f'ltd_jax/{m}.py changed since its part at {parts[m]["commit"]}: run the part again '
               f'(--modules={m}), a recheck of its survivors would mix two versions')
    names[m] = [n for n, _, b, a in parts[m]['not_killed']
                if not equivalents.get(f'{b} -> {a}', '').startswith('equivalent')]
  todo = [n for m in modules for n in names[m]]
  if not todo:
    print('no surviving non-equivalent mutants to recheck')
    return
  repo = os.path.join(workdir, 'repo')
  if os.path.isdir(os.path.join(repo, 'mutants')):  # the part's workdir: refresh the tests only
    shutil.rmtree(os.path.join(repo, 'tests'))
    files = subprocess.run(['git', 'ls-files', '-z', 'tests'], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split('\0')
    for f in filter(None, files):
      os.makedirs(os.path.dirname(os.path.join(repo, f)), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, f), os.path.join(repo, f))
  else:
    repo = copy_tree(workdir)
    write_config(repo, modules, selection)
  env = mutmut_env(workdir, repo)
  subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(max_children),
                  *todo], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
  status = {name: s for name, s, _, _ in collect(repo, sys.executable, modules)}
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  for m in modules:
    part = parts[m]
    killed_now = [n for n in names[m] if status.get(n) in KILLED]
    part['killed'] += len(killed_now)
    part['not_killed'] = [r for r in part['not_killed'] if r[0] not in killed_now]
    part.setdefault('rechecks', []).append({
        'commit': head, 'date': datetime.date.today().isoformat(),
        'machine': f'{cpu_name()} ({os.cpu_count()} cores), mutmut {mutmut_version()}',
        'rechecked': len(names[m]), 'killed': killed_now})
    print(f'{m}: {len(killed_now)} of {len(names[m])} survivors killed now')
  with open(PARTS, 'w') as f:
    json.dump(parts, f, indent=1, ensure_ascii=False)
    f.write('\n')


def part_seconds(workdir: str) -> float:
  """A part's length: what a finished part wrote, or for one stopped early, from its start (the
  mutmut config it wrote) to the last result of any module, a package's modules included."""
  seconds_file = os.path.join(workdir, 'seconds')
  if os.path.exists(seconds_file):
    with open(seconds_file) as f:
      return float(f.read())
  repo = os.path.join(workdir, 'repo')
  metas = glob.glob(os.path.join(repo, 'mutants', 'ltd_jax', '**', '*.meta'), recursive=True)
  if not metas:
    sys.exit(f'{workdir} holds no mutmut results (mutants/ltd_jax/**/*.meta): nothing to store')
  return max(map(os.path.getmtime, metas)) - os.path.getmtime(os.path.join(repo, 'setup.cfg'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/ltd_jax_mutation',
                      help='with --report-only, the comma-separated runs whose results are '
                           'stored (a later one replaces the modules it ran), or none')
  parser.add_argument('--report', default=os.path.join(ROOT, 'docs', 'mutation.md'))
  parser.add_argument('--max-children', type=int, default=2)
  parser.add_argument('--modules', default=','.join(MODULES))
  parser.add_argument('--report-only', action='store_true',
                      help='store the results already in --workdir (if any) and rewrite the '
                           'report from all stored parts')
  parser.add_argument('--recheck', action='store_true',
                      help="run again only the stored survivors of --modules with today's tests")
  parser.add_argument('--unreached', action='store_true',
                      help="run only the mutants of --modules that their stored parts, stopped "
                           "early, did not reach, and add the results to those parts")
  parser.add_argument('--tests', default=','.join(TESTS),
                      help='the test files of the selection (a recheck may narrow it)')
  args = parser.parse_args()
  modules = args.modules.split(',')
  start = datetime.datetime.now()
  if args.recheck:
    recheck(args.workdir, modules, args.tests.split(','), args.max_children)
    args.workdir = 'none'
  elif not args.report_only:
    names = unreached_mutants(modules) if args.unreached else []  # refused before any copy
    repo = copy_tree(args.workdir)
    write_config(repo, modules, args.tests.split(','))
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    with open(os.path.join(args.workdir, 'commit'), 'w') as f:
      f.write(head)
    with open(os.path.join(args.workdir, 'tests'), 'w') as f:
      f.write('\n'.join(args.tests.split(',')))
    env = mutmut_env(args.workdir, repo)
    if args.unreached:
      with open(os.path.join(args.workdir, 'unreached'), 'w') as f:
        f.write('\n'.join(names))
    subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(args.max_children),
                    *names], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.workdir, 'seconds'), 'w') as f:
      f.write(str((datetime.datetime.now() - start).total_seconds()))
  for workdir in filter(lambda w: w != 'none', args.workdir.split(',')):
    repo = os.path.join(workdir, 'repo')
    with open(os.path.join(workdir, 'commit')) as f:  # the commit the run copied
      commit = f.read().strip()
    selection = TESTS
    if os.path.exists(os.path.join(workdir, 'tests')):
      with open(os.path.join(workdir, 'tests')) as f:
        selection = f.read().split()
    seconds = part_seconds(workdir)
    ran = [m for m in modules
           if os.path.exists(os.path.join(repo, 'mutants', 'ltd_jax', f'{m}.py.meta'))]
    continuing = os.path.exists(os.path.join(workdir, 'unreached'))  # an --unreached part
    recorded = record_parts(collect(repo, sys.executable, ran), commit, seconds, selection,
                            continuing)
    print(f'{workdir}: stored {", ".join(recorded) or "nothing"} (commit {commit})')
  with open(EQUIVALENTS) as f:
    equivalents = json.load(f)
  total, killed, equivalent, gaps, score = write_report(args.report, load_parts(), equivalents)
  print(f'{total} mutants, {killed} killed, {equivalent} equivalent, {gaps} surviving: '
        f'{score:.1f}% of non-equivalent killed -> {args.report}')


if __name__ == '__main__':
  main()
