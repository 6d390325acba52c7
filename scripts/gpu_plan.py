"""The table of docs/gpu_plan.md: every paper config compiled for every target, without a device.

    python scripts/gpu_plan.py --out=docs/gpu_plan_table.md [--configs=a,b] [--targets=h200,...]
        [--max_batch] [--json=benchmarks/results/gpu_plan.json]

For each config (``configs/*.py`` except the digits ones, which are the embedded default's) and
target it runs what ``--mode=compile`` runs (``compile_plan.compile_plan``), FLOPs and the time
estimate included, and with ``--max_batch`` the largest-batch search of every stage's train step.
FLOPs do not depend on the target: they are counted once per config. Needs the CUDA plugin
(``pip install "jax[cuda12]==<the installed jax>"``) and, for TPU targets, ``libtpu``.
"""

import argparse
import glob
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from ltd_jax import compile_plan  # pylint: disable=g-import-not-at-top
from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import reports  # pylint: disable=g-import-not-at-top
from ltd_jax import runs  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paper_configs() -> list[str]:
  names = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')))
  return [n for n in names if n != '__init__' and not n.endswith('_digits')]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--configs', default='')
  parser.add_argument('--targets', default='h100,h200,a100,rtx3090')
  parser.add_argument('--max_batch', action='store_true')
  parser.add_argument('--out', default='')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  compile_plan.enable_deviceless()
  names = args.configs.split(',') if args.configs else paper_configs()
  results = json.load(open(args.json)) if args.json and os.path.exists(args.json) else {}
  stage_cache = {}
  for name in names:
    flops_by_stage = None
    for target in args.targets.split(','):
      key = f'{name}@{target}'
      if key in results and (not args.max_batch or all(
          'max_batch' in s for s in results[key].get('stages', []))):
        continue
      config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
      config.compile.target = target
      config.compile.max_batch = args.max_batch
      config.compile.flops = flops_by_stage is None
      t0 = time.perf_counter()
      try:
        report = compile_plan.compile_plan(config, stage_cache)
      except Exception as e:  # pylint: disable=broad-except
        results[key] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'}
        traceback.print_exc()
      else:
        if flops_by_stage is None:
          flops_by_stage = [s['flops'] for s in report['stages']]
        else:
          compile_plan.add_time(report, flops_by_stage, config)
        report['title'] = runs.run_title(config)
        report['wall_s'] = time.perf_counter() - t0
        results[key] = report
      print(f'{key}: {time.perf_counter() - t0:.0f} s', flush=True)
      if args.json:
        reports.write_json(args.json, results)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table(results, names, args.targets.split(',')))


def table(results: dict, names, target_names) -> str:
  lines = ['| config | target | stage | batch | train step GiB (args + temp) | fits | largest '
           'batch | GFLOP/image | FLOPs / minimal | compile s | time at peak | at 40% |',
           '|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|']
  for name in names:
    for target in target_names:
      r = results.get(f'{name}@{target}')
      if r is None:
        continue
      if 'error' in r:
        lines.append(f'| {name} | {target} | error: {r["error"]} | | | | | | | | | |')
        continue
      for s in r['stages']:
        t, f, st = s['time'], s['flops'], s['train_step']
        largest = s['max_batch']['batch_size'] if 'max_batch' in s else ''
        lines.append(
            f'| {name} | {target} | {s["stage"]} ({s["method"]}, {s["model"]}, {s["dtype"]}) | '
            f'{s["batch_size"]} | {st["arguments_gib"] + st["temp_gib"]:.2f} | '
            f'{"yes" if st["fits"] else "no"} | {largest} | {f["train_gflop_per_image"]:.1f} | '
            f'{f.get("flops_per_minimal", float("nan")):.2f} | {st["compile_s"]:.0f} | '
            f'{compile_plan.duration(t["hours_at_peak"])} | '
            f'{compile_plan.duration(t["hours_at_mfu"])} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
