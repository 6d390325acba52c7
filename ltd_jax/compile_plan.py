"""``--mode=compile``: a config's steps compiled for an accelerator that is not here.

"Will this config fit on my card, and how long will it take?" before renting one. The trainer's
own train step (``train.make_train_step_fn``) and evaluation step (``evaluate.make_eval_step``)
are lowered over a mesh of compile-only devices (``targets.compile_only_devices``) with
shape-only state, teacher and data (``jax.eval_shape``, sharded ``jax.ShapeDtypeStruct``s) and
compiled by the target's XLA (XLA:GPU: cuDNN convolutions, Triton fusions, ptxas). For each
stage of the run (the teacher stage when the config trains one, then the student) the report
gives:

* compile seconds and XLA's memory analysis of each step per device: arguments, outputs
  (aliased into the donated arguments), temporaries;
* whether ``need = arguments + temporaries + unaliased outputs + workspace margin`` fits in
  ``compile.memory_fraction`` (JAX's default ``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75) of the
  device memory; the margin stands for the cuDNN workspaces that a compile without autotuning
  does not see;
* FLOPs per image from XLA's cost analysis of the unoptimised step lowered for the local CPU with
  every attack written out (a loop body counts once), against the method's minimal pass count;
* the time of the stage as the config runs it (train steps, periodic and final evaluations) at
  the target's peak and at ``compile.mfu`` of it: bfloat16 at the bfloat16 peak, float32 at the
  TF32 peak;
* with ``compile.max_batch``, the largest global batch whose train step fits (a bracketed
  search of compiles, interpolating on the measured memory, to one batch per device).

What a compile without the device cannot know: the autotuned convolution algorithms and their
workspaces, and the achieved fraction of the peak (docs/gpu_plan.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from ltd_jax import config_lib
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import generated
from ltd_jax import methods
from ltd_jax import models
from ltd_jax import parallel
from ltd_jax import reports
from ltd_jax import state as state_lib
from ltd_jax import targets
from ltd_jax import teacher as teacher_lib
from ltd_jax import train
from ltd_jax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass
class Compiled:
  """One step compiled for the target: seconds, XLA's memory analysis per device (bytes) and
  the optimised HLO text."""
  seconds: float
  arguments: int
  outputs: int
  alias: int
  temp: int
  hlo: str = dataclasses.field(repr=False, default='')

  def need(self, margin: int) -> int:
    """Device bytes the step needs while it runs: arguments, temporaries, the outputs not
    aliased into donated arguments, and the workspace margin."""
    return self.arguments + self.temp + max(0, self.outputs - self.alias) + margin

  def summary(self) -> dict:
    return {'compile_s': round(self.seconds, 2), 'arguments_gib': self.arguments / GIB,
            'outputs_gib': self.outputs / GIB, 'alias_gib': self.alias / GIB,
            'temp_gib': self.temp / GIB}


def compile_lowered(lowered) -> Compiled:
  t0 = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  return Compiled(seconds, m.argument_size_in_bytes, m.output_size_in_bytes,
                  m.alias_size_in_bytes, m.temp_size_in_bytes, compiled.as_text())


@dataclasses.dataclass
class Stage:
  """One training stage of a run (the teacher stage or the student), shapes only."""
  config: ml_collections.ConfigDict
  name: str
  num_classes: int
  image_shape: tuple
  num_train: int
  num_test: int
  streaming: bool

  @property
  def method(self) -> methods.Method:
    return methods.get_method(self.config.method)

  def steps_per_epoch(self, batch_size: int) -> int:
    d = self.config.data
    if d.get('generated_path') or d.get('generated_required'):  # the mixed epoch
      return generated.steps_per_epoch(self.num_train, batch_size)
    return self.num_train // batch_size

  def total_steps(self, batch_size: int) -> int:
    total = self.config.num_epochs * self.steps_per_epoch(batch_size)
    return min(total, self.config.max_steps) if self.config.max_steps else total

  def evaluation_epochs(self) -> int:
    """Periodic evaluations as the loop runs them (every evaluation epoch and the last)."""
    n = self.config.num_epochs
    return sum(1 for e in range(1, n + 1)
               if evaluate.is_evaluation_epoch(e, self.config.eval) or e == n)

  def periodic_images(self) -> int:
    c = self.config
    split = c.data.val_size if c.eval.selection_split == 'val' else self.num_test
    return min(c.eval.subset_size, split) if c.eval.subset_size else split

  def final_images(self) -> int:
    c = self.config
    return min(c.eval.final_subset_size, self.num_test) if c.eval.final_subset_size else self.num_test


def make_stage(config: ml_collections.ConfigDict, name: str) -> Stage:
  spec = datasets.get(config.data.name)
  shape = spec.image_shape
  if spec.streaming and config.data.image_size:
    shape = (config.data.image_size, config.data.image_size, shape[2])
  return Stage(config, name, spec.num_classes, tuple(shape), spec.train_size - config.data.val_size,
               spec.test_size, spec.streaming)


def run_stages(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages ``--mode=train`` runs: the teacher stage (``teacher.source=train``), the student."""
  stages = []
  if methods.get_method(config.method).needs_teacher and config.teacher.source == 'train':
    stages.append(make_stage(teacher_lib.teacher_stage_config(config), 'teacher stage'))
  return stages + [make_stage(config, 'student' if stages else 'train')]


def _teacher(stage: Stage):
  """(apply_fn, shape-only variables) of the stage's frozen teacher, or (None, None)."""
  config = stage.config
  if not stage.method.needs_teacher or config.teacher.cache_logits:
    return None, None
  tc = teacher_lib.teacher_model_config(config)
  model = state_lib.build_model(tc, stage.num_classes)
  params, batch_stats = jax.eval_shape(
      lambda r: models.init_variables(model, r, stage.image_shape), jax.random.PRNGKey(0))
  return model.apply, {'params': params, 'batch_stats': batch_stats}


def train_step_lowered(stage: Stage, mesh, batch_size: int, config=None):
  """The trainer's train step at global ``batch_size`` lowered over ``mesh``, every input
  shape-only: the TrainState and teacher replicated, the training set on the devices (its batch
  as indices) or the batch itself sharded along ``data``."""
  config = config or stage.config
  num_classes, shape = stage.num_classes, stage.image_shape
  steps_per_epoch = max(1, stage.steps_per_epoch(batch_size))
  model = state_lib.build_model(config, num_classes)
  state = jax.eval_shape(lambda: state_lib.create_train_state(config, model, shape, num_classes,
                                                              steps_per_epoch))
  state = parallel.abstract_replicated(state, mesh)
  teacher_apply, teacher_variables = _teacher(stage)
  if teacher_variables is not None:
    teacher_variables = parallel.abstract_replicated(teacher_variables, mesh)
  sds = jax.ShapeDtypeStruct
  rows = lambda n: {'images': sds((n, *shape), jnp.uint8), 'labels': sds((n,), jnp.int32),
                    **({'teacher_logits': sds((n, num_classes), jnp.float32)}
                       if config.teacher.cache_logits else {})}
  if not stage.streaming and config.data.on_device:
    device_data = parallel.abstract_replicated(rows(stage.num_train), mesh)
    batch = parallel.abstract_batch({'index': sds((batch_size,), jnp.int32)}, mesh)
  else:
    device_data, batch = None, parallel.abstract_batch(rows(batch_size), mesh)
  augment = (datasets.default_augmentation(config.data.name) if config.data.augment == 'auto'
             else config.data.augment)
  step = train.make_train_step_fn(mesh, method=stage.method, config=config, augment_kind=augment,
                                  num_classes=num_classes, steps_per_epoch=steps_per_epoch,
                                  teacher_apply_fn=teacher_apply)
  return step.lower(state, batch, device_data, teacher_variables)


def eval_step_lowered(stage: Stage, mesh, attack_names, config=None):
  """The evaluation step of ``attack_names`` on one evaluation batch, lowered over ``mesh``."""
  config = config or stage.config
  model = state_lib.build_model(config, stage.num_classes)
  params, batch_stats = jax.eval_shape(
      lambda r: models.init_variables(model, r, stage.image_shape), jax.random.PRNGKey(0))
  variables = parallel.abstract_replicated({'params': params, 'batch_stats': batch_stats}, mesh)
  batch = parallel.round_up_to_devices(config.eval.batch_size, mesh)
  sds = jax.ShapeDtypeStruct
  images, labels = parallel.abstract_batch(
      (sds((batch, *stage.image_shape), jnp.uint8), sds((batch,), jnp.int32)), mesh)
  rng = parallel.abstract_replicated(sds((2,), jnp.uint32), mesh)
  step = evaluate.make_eval_step(model.apply, tuple(attack_names), eps=config_lib.eval_eps(config),
                                 eval_config=config.eval, platform=parallel.platform(mesh))
  return step.lower(variables, images, labels, rng), batch


def _unrolled(config):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.attack.unroll = True
    c.eval.unroll = True
  return c


def _cpu_mesh():
  return parallel.make_mesh(jax.local_devices(backend='cpu')[:1])


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def forward_flops(config, stage: Stage) -> float:
  """XLA's FLOPs of one eval-mode forward pass of ``config.model`` per image."""
  model = state_lib.build_model(config, stage.num_classes)
  variables = jax.eval_shape(lambda r: dict(zip(('params', 'batch_stats'), models.init_variables(
      model, r, stage.image_shape))), jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((8, *stage.image_shape), jnp.float32)
  return _flops(jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)) / 8


def stage_flops(stage: Stage, batch_size: int) -> dict:
  """FLOPs per image of the train step and of each evaluation step (attacks written out), and
  the train step's ratio to the method's minimal passes (``Method.minimal_passes``; the
  teacher's forward in student-forward units)."""
  c, mesh = _unrolled(stage.config), _cpu_mesh()
  train_flops = _flops(train_step_lowered(stage, mesh, batch_size, c)) / batch_size
  out = {'train_gflop_per_image': train_flops / 1e9}
  for key, names in (('periodic', c.eval.during_training), ('final', c.eval.final)):
    lowered, batch = eval_step_lowered(stage, mesh, names, c)
    out[f'{key}_eval_gflop_per_image'] = _flops(lowered) / batch / 1e9
  student = forward_flops(c, stage)
  out['forward_gflop_per_image'] = student / 1e9
  if stage.method.minimal_passes is not None:
    passes = stage.method.minimal_passes(c)
    if stage.method.needs_teacher and not c.teacher.cache_logits:
      passes += forward_flops(teacher_lib.teacher_model_config(c), stage) / student
    out['minimal_passes'] = passes
    out['flops_per_minimal'] = train_flops / (passes * student)
  return out


def stage_time(stage: Stage, flops: dict, batch_size: int, target: targets.Target,
               n_devices: int, mfu: float) -> dict:
  """Seconds of the stage at the target's peak (and at ``mfu`` of it): the train steps, the
  periodic evaluations and the final evaluation."""
  steps = stage.total_steps(batch_size)
  train = flops['train_gflop_per_image'] * 1e9 * steps * batch_size
  periodic = (flops['periodic_eval_gflop_per_image'] * 1e9 * stage.evaluation_epochs()
              * stage.periodic_images())
  final = flops['final_eval_gflop_per_image'] * 1e9 * stage.final_images()
  peak = target.peak_flops[stage.config.dtype] * n_devices
  total = train + periodic + final
  return {'steps': steps, 'evaluations': stage.evaluation_epochs(),
          'total_pflop': total / 1e15, 'train_pflop': train / 1e15,
          'eval_pflop': (periodic + final) / 1e15,
          'hours_at_peak': total / peak / 3600, 'hours_at_mfu': total / (peak * mfu) / 3600}


# --- collectives in the compiled HLO -------------------------------------------------------

_SHAPE = re.compile(r'(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([0-9,]*)\]')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast')


def _elements(shape_text: str) -> int:
  total = 0
  for _, dims in _SHAPE.findall(shape_text):
    total += math.prod(int(d) for d in dims.split(',') if d) if dims else 1
  return total


def collectives(hlo: str) -> list[dict]:
  """Every cross-device op of an optimised HLO module: ``{'op', 'elements', 'computation'}``
  (an async ``*-start`` counted once, its ``*-done`` not; elements of the result)."""
  out, computation = [], None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      computation = header.group(1)
      continue
    m = re.match(r'^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z\-]+)\(', line)
    if not m:
      continue
    op = m.group(2)
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base in COLLECTIVES and not op.endswith('-done'):
      shape = m.group(1)
      if op.endswith('-start') and shape.startswith('('):
        # async start: ((operands), (results), ...) for some ops; count the results once
        parts = shape.strip('()').split('), (')
        shape = parts[1] if len(parts) > 1 else parts[0]
      out.append({'op': base, 'elements': _elements(shape), 'computation': computation})
  return out


def loop_computations(hlo: str) -> set[str]:
  """Names of the computations that are bodies of a ``while`` (the attack loops)."""
  return set(re.findall(r'while\(.*?body=%?([\w.\-]+)', hlo))


def while_trip_counts(hlo: str) -> list[int]:
  """The known trip counts of the module's ``while`` loops (XLA's annotation; -1 if unknown)."""
  counts = []
  for line in hlo.splitlines():
    if re.search(r' while\(', line):
      m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      counts.append(int(m.group(1)) if m else -1)
  return counts


def attack_form(hlo: str, steps) -> str:
  """'loop' when a ``while`` of one of the attacks' step counts (or one XLA gives no trip count,
  as XLA:TPU does) is in the program, else 'unrolled' (written out; the RNG's own small loops
  of known count aside)."""
  counts = while_trip_counts(hlo)
  return 'loop' if -1 in counts or any(s in counts for s in steps if s > 1) else 'unrolled'


def collective_summary(hlo: str) -> dict:
  ops = collectives(hlo)
  loops = loop_computations(hlo)
  by_op = {}
  for o in ops:
    by_op[o['op']] = by_op.get(o['op'], 0) + o['elements']
  return {'ops': len(ops), 'elements': by_op,
          'in_loops': sum(1 for o in ops if o['computation'] in loops)}


# --- the plan -------------------------------------------------------------------------------

def target_mesh(config):
  """The mesh of ``compile.hosts`` x ``compile.devices_per_host`` compile-only devices of
  ``compile.target`` (a TPU target: the chips of its topology)."""
  target = targets.get(config.compile.target)
  devices = targets.compile_only_devices(target, config.compile.devices_per_host,
                                         config.compile.hosts)
  return target, parallel.make_mesh(devices)


def _budget(config, target) -> tuple[int, int]:
  return (int(config.compile.memory_fraction * target.memory_bytes),
          int(config.compile.workspace_margin_gib * GIB))


def largest_batch(fits, start: int, unit: int, limit: int, max_compiles: int = 40):
  """The largest multiple of ``unit`` up to ``limit`` for which ``fits(b) -> (ok, need)``
  holds, from a first guess ``start``: to a bracket by doubling, then by extrapolating ``need``
  linearly through the two largest batches that fit (memory grows about linearly with the
  batch), then steps that alternate linear interpolation and bisection, until the bracket is one
  ``unit`` wide. Returns (batch or 0, {batch: need} of every compile)."""
  tried: dict[int, tuple[bool, int]] = {}

  def test(b):
    if b not in tried:
      if len(tried) >= max_compiles:
        raise ConfigError(f'the largest-batch search used {max_compiles} compiles without '
                          f'converging: set --config.compile.max_batch=False')
      tried[b] = fits(b)
    return tried[b][0]

  round_down = lambda b: max(unit, (b // unit) * unit)
  limit = round_down(limit)
  lo, hi = 0, None
  b = min(round_down(start), limit)
  while True:  # bracket: lo fits, hi does not (or hi = limit + unit)
    if test(b):
      lo = b
      if b >= limit:
        hi = limit + unit
        break
      b = 2 * b
      fitting = sorted((k, v[1]) for k, v in tried.items() if v[0])
      if len(fitting) >= 2 and fitting[-1][1] > fitting[-2][1]:
        (b1, n1), (b2, n2) = fitting[-2:]
        b = round_down(int(b2 + (fits.budget - n2) * (b2 - b1) / (n2 - n1)))
      b = min(max(b, lo + unit), limit)
    else:
      hi = b
      break
  if lo == 0 and hi > unit:  # the first guess failed: look below it
    lo_b = unit
    if not test(lo_b):
      return 0, {k: v[1] for k, v in tried.items()}
    lo = lo_b
  interpolate = True
  while hi - lo > unit:
    mid = round_down((lo + hi) // 2)
    if interpolate and hi in tried:
      (_, need_lo), (_, need_hi) = tried[lo], tried[hi]
      budget = fits.budget
      if need_hi > need_lo:
        guess = lo + (budget - need_lo) * (hi - lo) / (need_hi - need_lo)
        mid = round_down(int(guess))
    mid = min(max(mid, lo + unit), hi - unit)
    interpolate = not interpolate
    if test(mid):
      lo = mid
    else:
      hi = mid
  return lo, {k: v[1] for k, v in tried.items()}


class _Fits:
  """``fits(batch) -> (ok, need)`` for a stage's train step on the target."""

  def __init__(self, stage, mesh, budget, margin):
    self.stage, self.mesh, self.budget, self.margin = stage, mesh, budget, margin

  def __call__(self, batch):
    compiled = compile_lowered(train_step_lowered(self.stage, self.mesh, batch))
    need = compiled.need(self.margin)
    return need <= self.budget, need


def plan_stage(stage: Stage, target, mesh, config) -> dict:
  """The report of one stage (see the module docstring)."""
  c = stage.config
  n = mesh.devices.size
  budget, margin = _budget(config, target)
  batch = c.batch_size
  parallel.check_batch_size(batch, mesh)
  if batch > stage.num_train:
    raise ConfigError(f'batch_size={batch} exceeds the {stage.num_train} training images of '
                      f'{c.data.name}: lower --config.batch_size')
  t0 = time.perf_counter()
  step = compile_lowered(train_step_lowered(stage, mesh, batch))
  lower_and_compile_s = time.perf_counter() - t0
  ev_lowered, eval_batch = eval_step_lowered(stage, mesh, c.eval.final)
  ev = compile_lowered(ev_lowered)
  out = {
      'stage': stage.name, 'method': c.method, 'model': c.model.name, 'dtype': c.dtype,
      'data': c.data.name, 'batch_size': batch, 'per_device_batch': batch // n,
      'eval_batch_size': eval_batch,
      'train_step': {**step.summary(), 'lower_and_compile_s': round(lower_and_compile_s, 2),
                     'need_gib': step.need(margin) / GIB,
                     'fits': step.need(margin) <= budget,
                     'attack_loop': attack_form(step.hlo, [c.attack.steps]),
                     'collectives': collective_summary(step.hlo)},
      'eval_step': {**ev.summary(), 'need_gib': ev.need(margin) / GIB,
                    'fits': ev.need(margin) <= budget,
                    'attack_loop': attack_form(ev.hlo, [c.eval.pgd_steps, c.eval.cw_steps])},
  }
  if not out['train_step']['fits']:
    fits = _Fits(stage, mesh, budget, margin)
    ok, need = fits(n)
    if not ok:
      raise ConfigError(
          f'the {stage.name} train step ({c.method}, {c.model.name}, {c.dtype}) needs '
          f'{need / GIB:.2f} GiB per device at one image per device (batch {n}), more than '
          f'{budget / GIB:.1f} GiB ({config.compile.memory_fraction:.0%} of the '
          f'{target.name}\'s {target.memory_bytes / GIB:.0f} GiB): use a smaller model, '
          f'--config.dtype=bfloat16 or a larger target')
  if config.compile.max_batch:
    fits = _Fits(stage, mesh, budget, margin)
    best, tried = largest_batch(fits, batch, n, stage.num_train)
    out['max_batch'] = {'batch_size': best, 'compiles': len(tried),
                        'need_gib': {str(k): v / GIB for k, v in sorted(tried.items())}}
  if config.compile.flops:
    out['flops'] = stage_flops(stage, batch)
  return out


def _cached_stage(cache, stage, target, mesh, config) -> dict:
  """``plan_stage``, reused from ``cache`` for a stage of the same config already planned for
  the same target (the TRADES WRN-34-10 teacher stage of several configs)."""
  if cache is None:
    return plan_stage(stage, target, mesh, config)
  key = (json.dumps(stage.config.to_dict(), sort_keys=True, default=str), target.name,
         int(mesh.devices.size), config.compile.max_batch, config.compile.flops)
  if key not in cache:
    cache[key] = plan_stage(stage, target, mesh, config)
  return {**copy.deepcopy(cache[key]), 'stage': stage.name}


def compile_plan(config: ml_collections.ConfigDict, stage_cache: dict | None = None) -> dict:
  """The report of every stage of ``config``'s run on ``compile.target`` (``stage_cache``: see
  ``_cached_stage``)."""
  config_lib.validate(config)
  target, mesh = target_mesh(config)
  report = {
      'target': target.name, 'device': target.description, 'source': target.source,
      'devices': int(mesh.devices.size), 'hosts': config.compile.hosts,
      'memory_gib': target.memory_bytes / GIB,
      'budget_gib': _budget(config, target)[0] / GIB,
      'workspace_margin_gib': config.compile.workspace_margin_gib,
      'memory_fraction': config.compile.memory_fraction,
      'dtype': config.dtype, 'peak_tflops': target.peak_flops[config.dtype] / 1e12,
      'mfu': config.compile.mfu,
      'stages': [_cached_stage(stage_cache, s, target, mesh, config) for s in run_stages(config)],
  }
  if config.compile.flops:
    add_time(report, [s['flops'] for s in report['stages']], config)
  return report


def add_time(report: dict, flops_by_stage: list[dict], config) -> None:
  """Adds each stage's FLOPs (which do not depend on the target) and time, and the run's."""
  target = targets.get(report['target'])
  for s, stage, flops in zip(report['stages'], run_stages(config), flops_by_stage):
    s['flops'] = flops
    s['time'] = stage_time(stage, flops, s['batch_size'], target, report['devices'],
                           config.compile.mfu)
  report['hours_at_peak'] = sum(s['time']['hours_at_peak'] for s in report['stages'])
  report['hours_at_mfu'] = sum(s['time']['hours_at_mfu'] for s in report['stages'])


def duration(hours: float) -> str:
  """Hours in the unit that reads best: s, min, h or days."""
  s = hours * 3600
  return (f'{s:.0f} s' if s < 90 else f'{s / 60:.0f} min' if s < 5400 else
          f'{hours:.1f} h' if hours < 48 else f'{hours / 24:.1f} days')


def format_report(report: dict, title: str = '') -> str:
  """The report as Markdown: one table row per stage and step."""
  lines = [f'# {title} compiled for {report["devices"]} x {report["device"]}'
           if title else f'# compiled for {report["devices"]} x {report["device"]}', '',
           f'memory {report["memory_gib"]:.1f} GiB per device, budget '
           f'{report["budget_gib"]:.1f} GiB ({report["memory_fraction"]:.0%}); need = arguments '
           f'+ temporaries + outputs not aliased to donated arguments + a '
           f'{report["workspace_margin_gib"]:g} GiB margin (cuDNN workspaces, which a compile '
           f'without the device does not see); peak {report["peak_tflops"]:.1f} TFLOP/s per '
           f'device for {report["dtype"]} (target facts: {report["source"]})', '',
           '| stage | step | batch | compile s | args GiB | temp GiB | need GiB | fits | attack |'
           ' largest batch | GFLOP/image | FLOPs / minimal |',
           '|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|']
  for s in report['stages']:
    f = s.get('flops', {})
    for key, label in (('train_step', 'train'), ('eval_step', 'eval (final attacks)')):
      st = s[key]
      largest = s['max_batch']['batch_size'] if key == 'train_step' and 'max_batch' in s else ''
      gflop = (f.get('train_gflop_per_image') if key == 'train_step'
               else f.get('final_eval_gflop_per_image'))
      ratio = f.get('flops_per_minimal', '') if key == 'train_step' else ''
      lines.append(
          f'| {s["stage"]} ({s["method"]}, {s["model"]}, {s["dtype"]}) | {label} | '
          f'{s["batch_size"] if key == "train_step" else s["eval_batch_size"]} | '
          f'{st["compile_s"]:.1f} | {st["arguments_gib"]:.2f} | {st["temp_gib"]:.2f} | '
          f'{st["need_gib"]:.2f} | {"yes" if st["fits"] else "no"} | {st["attack_loop"]} | '
          f'{largest} | {"" if gflop is None else f"{gflop:.2f}"} | '
          f'{ratio if ratio == "" else f"{ratio:.2f}"} |')
  if 'hours_at_peak' in report:
    lines += ['']
    for s in report['stages']:
      t = s['time']
      lines.append(f'- {s["stage"]}: {t["steps"]} steps and {t["evaluations"]} periodic '
                   f'evaluations, {t["total_pflop"]:.4g} PFLOP: {duration(t["hours_at_peak"])} '
                   f'at peak, {duration(t["hours_at_mfu"])} at {report["mfu"]:.0%} of peak')
    lines.append(f'- whole run: {duration(report["hours_at_peak"])} at peak, '
                 f'{duration(report["hours_at_mfu"])} at {report["mfu"]:.0%} of peak, on '
                 f'{report["devices"]} device(s)')
  return '\n'.join(lines) + '\n'


def compile_and_report(config: ml_collections.ConfigDict, workdir: str, title: str) -> dict:
  """``--mode=compile``: prints the report and writes it to ``workdir/compile_TARGET.{json,md}``
  with the config and environment (git commit, library versions)."""
  report = compile_plan(config)
  text = format_report(report, title)
  print(text, end='', flush=True)
  os.makedirs(workdir, exist_ok=True)
  stem = os.path.join(workdir, f'compile_{config.compile.target}')
  reports.write_json(stem + '.json', {**report, 'config': config.to_dict(),
                                      'environment': reports.environment()})
  with open(stem + '.md', 'w') as f:
    f.write(text)
  return report


def enable_deviceless() -> None:
  """Keeps the local backend on the CPU (before any backend starts) so that the CUDA plugin
  and libtpu are only used for compile-only devices: without a GPU their device check would
  fail, and the compile needs none."""
  jax.config.update('jax_platforms', 'cpu')
