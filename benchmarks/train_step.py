"""Benchmarks the train step of every method against its minimal cost and a PyTorch reference.

    python benchmarks/train_step.py --model=resnet18 --batch=128 --out=benchmarks/results/NAME.md

For each method it compiles the trainer's own step (``train.make_train_step_fn``: the state
donated, the training set on the devices, the batch sharded over every device) and prints:
  * compile s, step ms and images/s (median of the timed steps, after one warm-up step);
  * GFLOP/image from XLA's cost analysis of the step (attack loop unrolled, since XLA counts a
    loop body once), the minimal pass count of the method in forward-pass units and the ratio
    of the two (1.00: no wasted forward or backward pass);
  * achieved TFLOP/s and its share of the matrix-multiply peak measured on this machine;
  * memory: XLA's compiled estimate of the step (arguments + outputs + temporaries) and the
    device's peak bytes in use where it reports them (GPU/TPU; peak since the process started);
  * with ``--predict=TARGET`` (h200, h100, ...), the same step compiled for compile-only devices
    of that target, as ``--mode=compile`` does without a GPU: its compile seconds and memory
    estimate beside the device's, which calibrates docs/gpu_plan.md on the first lent GPU;
  * the same step in PyTorch (``benchmarks/torch_reference.py``), eager and / or with
    ``torch.compile`` (``--torch=eager,compile``), measured in the same run: images/s, the first
    (compiling) step's seconds and the JAX / PyTorch images/s ratio.

Pass counts (forward = 1, backward to the input only = 1, backward to the weights = 2, K
attack steps, T = teacher forward / student forward): natural 3, pgd_at 2K+3, trades 2K+7
(27 at K=10), awp 2K+13, rslad and absld 2K+6+T, ltd 2K+7+T.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import methods  # pylint: disable=g-import-not-at-top
from ltd_jax import models  # pylint: disable=g-import-not-at-top
from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
from ltd_jax import state as state_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import train  # pylint: disable=g-import-not-at-top

ALL_METHODS = ('natural', 'pgd_at', 'trades', 'awp', 'rslad', 'absld', 'ltd')


def minimal_passes(config, teacher_ratio: float) -> float:
  """Forward-pass equivalents a method cannot do without (``Method.minimal_passes``, plus the
  teacher's forward in student-forward units)."""
  m = methods.get_method(config.method)
  return m.minimal_passes(config) + (teacher_ratio if m.needs_teacher else 0.0)


def matmul_peak(dtype, n: int, reps: int = 5) -> float:
  """Best FLOP/s of an n x n matrix product in ``dtype`` on the first device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def make_config(args, method: str):
  c = config_lib.default_config()
  c.method, c.model.name, c.dtype = method, args.model, args.dtype
  c.attack.steps = args.attack_steps
  c.batch_size = args.batch
  c.awp.warmup_epochs = 0
  c.attack.unroll = not args.loop_attack
  return c  # not validated: the benchmark builds the distillation teacher itself


def forward_flops(model, variables, batch, image) -> float:
  """XLA's FLOPs of one eval-mode forward pass per image."""
  x = jnp.zeros((batch, image, image, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  return lowered.cost_analysis()['flops'] / batch


def bench_jax(args, method: str, mesh) -> dict:
  c = make_config(args, method)
  model = state_lib.build_model(c, 10)
  shape = (args.image, args.image, 3)
  state = state_lib.create_train_state(c, model, shape, 10, steps_per_epoch=100)
  rng = np.random.default_rng(0)
  n_data = 4 * args.batch
  device_data = parallel.replicate(
      {'images': rng.integers(0, 256, (n_data, *shape), dtype=np.uint8),
       'labels': (np.arange(n_data) % 10).astype(np.int32)}, mesh)
  m = methods.get_method(method)
  teacher_apply, teacher_vars, teacher_ratio = None, None, 0.0
  student_fwd = forward_flops(model, state.variables, args.batch, args.image)
  if m.needs_teacher:
    tmodel = models.create_model(args.teacher_model or args.model, 10, model.dtype)
    tparams, tstats = models.init_variables(tmodel, jax.random.PRNGKey(1), shape)
    teacher_vars = parallel.replicate({'params': tparams, 'batch_stats': tstats}, mesh)
    teacher_apply = tmodel.apply
    teacher_ratio = forward_flops(tmodel, teacher_vars, args.batch, args.image) / student_fwd
  kwargs = dict(method=m, augment_kind='crop_flip', num_classes=10, steps_per_epoch=100,
                teacher_apply_fn=teacher_apply)
  state = parallel.replicate(state, mesh)
  batch_of = lambda i: parallel.shard_global_batch(
      {'index': ((np.arange(args.batch) + i * args.batch) % n_data).astype(np.int32)}, mesh)

  t0 = time.perf_counter()
  lowered = train.make_train_step_fn(mesh, config=c, **kwargs).lower(
      state, batch_of(0), device_data, teacher_vars)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if not c.attack.unroll:  # XLA counts a loop body once: count FLOPs on the unrolled step
    unrolled = c.copy_and_resolve_references()
    unrolled.attack.unroll = True
    lowered = train.make_train_step_fn(mesh, config=unrolled, **kwargs).lower(
        state, batch_of(0), device_data, teacher_vars)
  step_flops = lowered.cost_analysis()['flops']
  mem = compiled.memory_analysis()
  xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
               + mem.temp_size_in_bytes - mem.alias_size_in_bytes) if mem is not None else None
  state, metrics = compiled(state, batch_of(0), device_data, teacher_vars)
  jax.block_until_ready(metrics)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch_of(i + 1), device_data, teacher_vars)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  predicted = predict(args, c, kwargs, state, batch_of(0), device_data, teacher_vars, mesh)
  stats = jax.devices()[0].memory_stats() or {}
  step_s = statistics.median(times)
  passes = minimal_passes(c, teacher_ratio)
  return {
      'method': method, 'compile_s': compile_s, 'step_ms': 1000 * step_s,
      'images_per_s': args.batch / step_s,
      'gflop_per_image': step_flops / args.batch / 1e9,
      'min_passes': passes, 'flop_ratio': step_flops / (passes * student_fwd * args.batch),
      'tflops': step_flops / step_s / 1e12,
      'xla_mib': xla_bytes / 2**20 if xla_bytes else float('nan'),
      # The device's peak since the process started (JAX cannot reset it): an upper bound for
      # every method after the first in one run.
      'device_peak_mib': stats['peak_bytes_in_use'] / 2**20 if 'peak_bytes_in_use' in stats
                         else float('nan'),
      'loss': float(metrics['loss']),
      **predicted,
  }


def predict(args, config, kwargs, state, batch, device_data, teacher_vars, mesh) -> dict:
  """The step compiled for ``args.predict``'s compile-only devices (as many as ``mesh`` has):
  compile seconds and XLA's memory estimate (MiB), as ``--mode=compile`` predicts them."""
  if not getattr(args, 'predict', ''):  # benchmarks/attack_loop.py's args have no --predict
    return {}
  from ltd_jax import compile_plan  # pylint: disable=g-import-not-at-top
  from ltd_jax import targets  # pylint: disable=g-import-not-at-top
  target_mesh = parallel.make_mesh(targets.compile_only_devices(
      targets.get(args.predict), mesh.devices.size))
  as_abstract = lambda tree, sharded: (
      parallel.abstract_batch if sharded else parallel.abstract_replicated)(
          jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree),
          target_mesh)
  lowered = train.make_train_step_fn(target_mesh, config=config, **kwargs).lower(
      as_abstract(state, False), as_abstract(batch, True), as_abstract(device_data, False),
      as_abstract(teacher_vars, False) if teacher_vars is not None else None)
  compiled = compile_plan.compile_lowered(lowered)
  return {'predicted_compile_s': compiled.seconds,
          'predicted_mib': compiled.need(0) / 2**20}


def bench_torch(args, method: str, compile: bool = False) -> dict | None:
  """The PyTorch reference step (eager, or ``torch.compile`` of its networks): median images/s
  of the timed steps and the first (warm-up, compiling) step's seconds; None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  if compile:
    torch._dynamo.reset()  # pylint: disable=protected-access  (each method compiles afresh)
  step = torch_reference.TorchStep(method, args.model, 10, steps=args.attack_steps,
                                   teacher_model=args.teacher_model, device=device,
                                   channels_last=device == 'cuda', compile=compile)
  autocast = args.dtype == 'bfloat16'
  x = torch.rand(args.batch, 3, args.image, args.image, device=device)
  y = torch.arange(args.batch, device=device) % 10
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.steps + 1):
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      step(x, y)
    sync()
    times.append(time.perf_counter() - t0)
  peak = torch.cuda.max_memory_allocated() / 2**20 if device == 'cuda' else float('nan')
  return {'images_per_s': args.batch / statistics.median(times[1:]), 'first_step_s': times[0],
          'peak_mib': peak}


def table_lines(args, rows, peak, torch_modes) -> list[str]:
  """The Markdown table of ``rows`` (one per method) under the machine header."""
  peak_key = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  lines = common.header_lines() + [
      f'model: {args.model} (teacher {args.teacher_model or args.model}), global batch '
      f'{args.batch}, {args.image}x{args.image}, attack steps {args.attack_steps}, dtype '
      f'{args.dtype}, attack loop {"lax.fori_loop" if args.loop_attack else "unrolled"}, '
      f'median of {args.steps} timed steps',
      f'matmul peak (measured, one device): float32 {peak[jnp.float32] / 1e12:.2f} TFLOP/s, '
      f'bfloat16 {peak[jnp.bfloat16] / 1e12:.2f} TFLOP/s',
      '',
  ]
  head = ('| method | compile s | step ms | images/s | GFLOP/image | min passes | FLOPs / minimal '
          '| TFLOP/s | % of matmul peak | XLA MiB | device peak MiB |')
  if getattr(args, 'predict', ''):
    head += f' {args.predict} deviceless compile s | {args.predict} deviceless MiB |'
  for mode in torch_modes:
    name = 'PyTorch' if mode == 'eager' else 'torch.compile'
    head += f' {name} images/s | {name} first step s | {name} peak MiB | JAX / {name} |'
  lines += [head, '|---|' + '---:|' * (10 + 2 * bool(getattr(args, 'predict', ''))
                                         + 4 * len(torch_modes))]
  for r in rows:
    pct = 100 * r['tflops'] * 1e12 / peak[peak_key] / jax.device_count()
    line = (f'| {r["method"]} | {r["compile_s"]:.1f} | {r["step_ms"]:.1f} | '
            f'{r["images_per_s"]:.1f} | {r["gflop_per_image"]:.2f} | {r["min_passes"]:.1f} '
            f'| {r["flop_ratio"]:.2f} | {r["tflops"]:.3f} | {pct:.0f} '
            f'| {r["xla_mib"]:.0f} | {r["device_peak_mib"]:.0f} |')
    if getattr(args, 'predict', ''):
      line += f' {r["predicted_compile_s"]:.1f} | {r["predicted_mib"]:.0f} |'
    for mode in torch_modes:
      t = r.get(f'torch_{mode}')
      line += (' - | - | - | - |' if t is None else
               f' {t["images_per_s"]:.1f} | {t["first_step_s"]:.1f} | {t["peak_mib"]:.0f} | '
               f'{r["images_per_s"] / t["images_per_s"]:.2f} |')
    lines.append(line)
  return lines


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='resnet18')
  p.add_argument('--teacher_model', default='', help='distillation teacher (default: --model)')
  p.add_argument('--methods', default=','.join(ALL_METHODS))
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--image', type=int, default=32)
  p.add_argument('--attack_steps', type=int, default=10)
  p.add_argument('--steps', type=int, default=3, help='timed steps (after one warm-up)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--loop_attack', action='store_true',
                 help='time the attack as a lax.fori_loop (config.attack.unroll=False)')
  p.add_argument('--torch', default='eager',
                 help='PyTorch references to time beside JAX: eager, compile (torch.compile), '
                      'both as eager,compile, or none')
  p.add_argument('--no_torch', action='store_true', help='same as --torch=none')
  p.add_argument('--predict', default='', help='also compile each step for compile-only '
                 'devices of this target (ltd_jax/targets.py) and report its memory estimate')
  p.add_argument('--out', default='', help='also write the table to this Markdown file '
                 '(rewritten after every method, so a run cut short keeps its rows)')
  args = p.parse_args()
  torch_modes = [] if args.no_torch or args.torch == 'none' else args.torch.split(',')

  mesh = parallel.make_mesh()
  parallel.check_batch_size(args.batch, mesh, 'batch')
  on_cpu = jax.devices()[0].platform == 'cpu'
  peak = {d: matmul_peak(d, 2048 if on_cpu else 8192) for d in (jnp.float32, jnp.bfloat16)}
  rows = []
  for name in args.methods.split(','):
    rows.append(bench_jax(args, name, mesh))
    for mode in [None] + torch_modes:  # the table is rewritten after every measurement
      if mode is not None:
        rows[-1][f'torch_{mode}'] = bench_torch(args, name, compile=mode == 'compile')
      if args.out:
        common.write_table(table_lines(args, rows, peak, torch_modes), args.out)
    torch_note = ', '.join(f'torch {m} {rows[-1][f"torch_{m}"]["images_per_s"]:.1f}'
                           for m in torch_modes if rows[-1][f'torch_{m}'] is not None)
    print(f'{name}: {rows[-1]["images_per_s"]:.1f} images/s ({torch_note or "no torch"})',
          file=sys.stderr, flush=True)
  common.emit_table(table_lines(args, rows, peak, torch_modes), args.out)


if __name__ == '__main__':
  main()
