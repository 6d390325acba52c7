"""Runs configs x seeds and tabulates mean +- std of average, worst-class and NSD accuracy.

The ABSLD paper's Tables 1 and 6 on digits, every row (3 seeds, with AutoAttack):

    python scripts/compare_methods.py --rows=configs/absld_table_digits.py --autoattack \
        --seeds=0,1,2 --out=docs/comparison_digits_absld_table.md

    python scripts/compare_methods.py --out=docs/comparison_digits.md --seeds=0,1,2 \
        --run absld=configs/absld_digits.py --run rslad=configs/absld_digits.py:method=rslad

Each ``--run NAME=CONFIG[:VARIANT][:key=value,...]`` is a config (a bundled name or a file), the argument of its
get_config (``configs/absld_cifar10.py:subset``) and overrides. Every run of a seed uses
that seed's teacher: an earlier plain run of the teacher's config (a TRADES baseline, say), else
the first run that trains it (in WORKDIR/seedS/NAME/teacher); later runs of the seed reuse it.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import train  # pylint: disable=g-import-not-at-top

ATTACKS = ('clean', 'fgsm', 'pgd20', 'cw')  # the ABSLD tables' columns, then AutoAttack
HEADERS = {'clean': 'Clean', 'fgsm': 'FGSM', 'pgd20': 'PGD-20', 'cw': 'CW', 'autoattack': 'AA'}


def parse_run(spec: str):
  name, rest = spec.split('=', 1)
  path, arg = config_lib.split_config_spec(rest)
  parts = arg.split(':') if arg else []
  if parts:
    variant, _, more = parts[0].partition(',')
    if '=' not in variant:  # the config file's variant (if any), before any overrides
      path += ':' + variant if variant else ''
      parts[0] = more
  overrides = ','.join(filter(None, parts))
  config = config_lib.load_config_file(path)
  for item in filter(None, overrides.split(',')):
    key, value = item.split('=', 1)
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    current = node[leaf]
    node[leaf] = (value.lower() == 'true') if isinstance(current, bool) else type(current)(value)
  return name, path, overrides, config  # overrides: comma-separated key=value


def environment_line() -> str:
  """The machine (benchmarks/common.py's name for it) and the versions the table was measured with."""
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  return f'{common.machine_name()}; jax {jax.__version__}, Python {platform.python_version()}'


def seed_table(results: dict[str, list[dict]], seeds, attacks=ATTACKS) -> list[str]:
  """Markdown lines: per method, mean +- std over seeds (ddof 1) of each attack's avg, worst
  class and NSD, from ``results[method]``, one ``results.json`` per seed."""
  classes = max(len(r['attacks'][a].get('per_class', ())) for per_seed in results.values()
                for r in per_seed for a in r['attacks'])
  worst = 'worst10' if classes >= 100 else 'worst'  # the ABSLD paper: worst 10% on CIFAR-100
  lines = [f'Seeds {list(seeds)}; test split; each cell mean +- std over seeds (percent; NSD '
           f'unitless); worst: the {"worst 10% of classes" if worst == "worst10" else "worst class"}.',
           '',
           '| method | ' + ' | '.join(f'{HEADERS.get(a, a)} avg | {HEADERS.get(a, a)} worst | '
                                      f'{HEADERS.get(a, a)} NSD' for a in attacks) + ' |',
           '|---|' + '---:|' * (3 * len(attacks))]
  for name, per_seed in results.items():
    cells = []
    for a in attacks:
      for key, scale in (('avg', 100), (worst, 100), ('nsd', 1)):
        v = np.array([r['attacks'][a][key] for r in per_seed if a in r['attacks']]) * scale
        if not len(v):
          cells.append('-')
          continue
        std = v.std(ddof=1) if len(v) > 1 else 0
        cells.append(f'{v.mean():.2f} +- {std:.2f}' if scale == 100 else
                     f'{v.mean():.3f} +- {std:.3f}')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Per seed (PGD-20 avg / worst):', '']
  for name, per_seed in results.items():
    vals = ', '.join(f"{100 * r['attacks']['pgd20']['avg']:.2f} / "
                     f"{100 * r['attacks']['pgd20']['worst']:.2f}" for r in per_seed)
    lines.append(f'- {name}: {vals}')
  return lines


def _has_autoattack(workdir: str) -> bool:
  """Whether the run's results.json already holds AutoAttack's row (a rerun of the comparison
  re-attacks only the runs it retrained)."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return 'autoattack' in json.load(f)['attacks']


def table_rows(path: str) -> tuple[str, ...]:
  """The ``ROWS`` a table's config file defines (its get_config variants)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('ltd_jax_table',
                                                config_lib.resolve_config_spec(path)[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tuple(module.ROWS)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--run', action='append', default=[])
  p.add_argument('--rows', default='',
                 help='a config file whose ROWS each run as NAME=FILE:NAME (the ABSLD table: '
                      'configs/absld_table_digits.py)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--workdir', default='workdirs/compare')
  p.add_argument('--out', required=True)
  p.add_argument('--set', action='append', default=[], help='key=value applied to every run')
  p.add_argument('--autoattack', action='store_true',
                 help='also run the official AutoAttack on every run (needs the torch extra)')
  args = p.parse_args()
  if args.rows:
    args.run += [f'{row}={args.rows}:{row}' for row in table_rows(args.rows)]
  if not args.run:
    p.error('name the runs: --run NAME=CONFIG or --rows=CONFIG')
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [r + (',' if ':' in r else ':') + ','.join(args.set) for r in args.run]
  results = {parse_run(r)[0]: [] for r in runs}
  for seed in seeds:
    teachers = {}  # teacher config -> work directory of this seed that trains or trained it
    for spec in runs:
      name, path, overrides, config = parse_run(spec)
      config.seed, config.progress_bar = seed, False
      workdir = os.path.join(args.workdir, f'seed{seed}', name)
      # A stage trains on its student's data (split included): a run serves as another run's
      # teacher or warm start only when it trained the same config on the same data.
      data = json.dumps(config.data.to_dict(), sort_keys=True)
      if not overrides.strip(','):
        teachers.setdefault((os.path.normpath(path), data), workdir)  # a plain run can serve
      for section, subdir in (('teacher', 'teacher'), ('init', 'init')):  # teacher, warm start
        stage = config[section]
        if stage.source == 'train':
          key = (os.path.normpath(stage.config), data)
          if key in teachers:
            stage.source, stage.path = 'workdir', teachers[key]
          else:
            teachers[key] = os.path.join(workdir, subdir)
      train.train_and_evaluate(config, workdir)  # returns at once when already complete
      if args.autoattack and not _has_autoattack(workdir):
        from ltd_jax import autoattack  # pylint: disable=g-import-not-at-top
        autoattack.autoattack_checkpoint(config, workdir)
      with open(os.path.join(workdir, 'results.json')) as f:
        results[name].append(json.load(f))

  lines = seed_table(results, seeds, ATTACKS + (('autoattack',) if args.autoattack else ()))
  lines += ['', f'Machine: {environment_line()}']
  cmd = 'python scripts/compare_methods.py ' + ' '.join(sys.argv[1:])
  text = '\n'.join(lines) + f'\n\nCommand: `{cmd}`\n'
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
