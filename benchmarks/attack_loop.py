"""The attack written out (unrolled) against the attack as a ``lax.fori_loop``, on this backend.

    python benchmarks/attack_loop.py --model=resnet18 --batch=128 --out=benchmarks/results/NAME.md

For the training step (``--method``, ``attack.unroll``) and the evaluation step (clean + PGD-20
+ CW-30, ``eval.unroll``) it compiles both forms and prints compile s, ms per step or batch and
the ratio, and the choice that ``attacks.UNROLL_DEFAULTS`` should hold for this backend: the
faster form when it saves more time than its extra compile costs over ``--horizon_steps``
steps (training) or batches (one evaluation of 10,000 images per epoch over a 300-epoch run).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from benchmarks import train_step as bench_train  # pylint: disable=g-import-not-at-top
from ltd_jax import evaluate  # pylint: disable=g-import-not-at-top
from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
from ltd_jax import state as state_lib  # pylint: disable=g-import-not-at-top


def bench_eval(args, unroll: bool, mesh) -> dict:
  """Compile s and median ms of one evaluation batch (clean + PGD-20 + CW) of random weights."""
  c = bench_train.make_config(args, 'natural')
  model = state_lib.build_model(c, 10)
  shape = (args.image, args.image, 3)
  state = state_lib.create_train_state(c, model, shape, 10, steps_per_epoch=100)
  eval_config = ml_collections.ConfigDict({
      'alpha': 2 / 255, 'pgd_steps': args.pgd_steps, 'cw_steps': args.cw_steps,
      'cw_kappa': 50.0, 'unroll': unroll})
  step = evaluate.make_eval_step(state.apply_fn, ('clean', 'pgd20', 'cw'), eps=8 / 255,
                                 eval_config=eval_config)
  variables = parallel.replicate(state.variables, mesh)
  rng = np.random.default_rng(0)
  x, y = parallel.shard_global_batch(
      (rng.integers(0, 256, (args.batch, *shape), dtype=np.uint8),
       (np.arange(args.batch) % 10).astype(np.int32)), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(variables, x, y, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, x, y, jax.random.PRNGKey(0)))
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, x, y, jax.random.PRNGKey(i + 1)))
    times.append(time.perf_counter() - t0)
  return {'compile_s': compile_s, 'ms': 1000 * statistics.median(times)}


def choice(loop: dict, unrolled: dict, horizon: int) -> bool:
  """Whether unrolling pays: its time saved over ``horizon`` steps exceeds its extra compile."""
  saved = (loop['ms'] - unrolled['ms']) / 1000 * horizon
  return saved > unrolled['compile_s'] - loop['compile_s']


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='resnet18')
  p.add_argument('--method', default='trades', help='the training step to time')
  p.add_argument('--teacher_model', default='')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--image', type=int, default=32)
  p.add_argument('--attack_steps', type=int, default=10)
  p.add_argument('--pgd_steps', type=int, default=20)
  p.add_argument('--cw_steps', type=int, default=30)
  p.add_argument('--steps', type=int, default=3, help='timed steps (after one warm-up)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--train_horizon_steps', type=int, default=390 * 300,
                 help='training steps over which an extra compile is paid back')
  p.add_argument('--eval_horizon_batches', type=int, default=40 * 300,
                 help='evaluation batches over which an extra compile is paid back')
  p.add_argument('--out', default='')
  args = p.parse_args()
  args.loop_attack = False
  mesh = parallel.make_mesh()
  parallel.check_batch_size(args.batch, mesh, 'batch')

  rows, decisions = [], {}
  for use in ('train', 'eval'):
    timed = {}
    for unroll in (False, True):
      if use == 'train':
        args.loop_attack = not unroll
        r = bench_train.bench_jax(args, args.method, mesh)
        timed[unroll] = {'compile_s': r['compile_s'], 'ms': r['step_ms']}
      else:
        timed[unroll] = bench_eval(args, unroll, mesh)
      print(f'{use} unroll={unroll}: {timed[unroll]}', file=sys.stderr, flush=True)
    horizon = args.train_horizon_steps if use == 'train' else args.eval_horizon_batches
    decisions[use] = choice(timed[False], timed[True], horizon)
    what = (f'{args.method} step, {args.attack_steps}-step attack' if use == 'train' else
            f'evaluation batch, clean + PGD-{args.pgd_steps} + CW-{args.cw_steps}')
    rows.append(f'| {use} ({what}) | {timed[False]["compile_s"]:.1f} | {timed[False]["ms"]:.1f} '
                f'| {timed[True]["compile_s"]:.1f} | {timed[True]["ms"]:.1f} '
                f'| {timed[False]["ms"] / timed[True]["ms"]:.2f} | {decisions[use]} |')
  backend = jax.default_backend()
  lines = common.header_lines() + [
      f'model: {args.model}, global batch {args.batch}, dtype {args.dtype}, median of '
      f'{args.steps} timed steps; backend {backend}',
      '',
      '| use | loop compile s | loop ms | unrolled compile s | unrolled ms | loop / unrolled '
      '| unroll pays |',
      '|---|---:|---:|---:|---:|---:|---|',
      *rows,
      '',
      f"attacks.UNROLL_DEFAULTS for '{backend}' from this run: train {decisions['train']}, "
      f"eval {decisions['eval']} (horizon {args.train_horizon_steps} training steps, "
      f'{args.eval_horizon_batches} evaluation batches)',
  ]
  common.emit_table(lines, args.out)


if __name__ == '__main__':
  main()
