"""--mode=compile: steps built for compile-only GPU devices (XLA:GPU without a GPU).

The GPU tests need the CUDA plugin of the installed jax (``jax-cuda12-plugin``, which .ci/run
installs) and skip without it; the rest runs anywhere.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import ROOT
from ltd_jax import compile_plan
from ltd_jax import config_lib
from ltd_jax import methods
from ltd_jax import parallel
from ltd_jax import state as state_lib
from ltd_jax import targets
from ltd_jax import train
from ltd_jax.errors import ConfigError

def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


HAS_CUDA_PLUGIN = _has_cuda_plugin()
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                                       reason='jax-cuda12-plugin not installed')


def small_config(method='trades', **overrides):
  """A small CNN on 16 x 16 CIFAR-shaped images is too slow; digits' 8 x 8 keeps compiles short."""
  c = config_lib.default_config()
  c.method = method
  c.data.name = 'digits'
  c.model.name = 'small_cnn'
  c.model.width = 8
  c.batch_size = 16
  c.eval.batch_size = 32
  c.attack.steps = 3
  c.eval.pgd_steps = 2
  c.eval.cw_steps = 2
  c.num_epochs = 2
  c.awp.warmup_epochs = 0
  if methods.get_method(method).needs_teacher:
    c.teacher.source = 'torch'
    c.teacher.path = 'teacher.safetensors'  # never read: only its architecture is
    c.teacher.model.name = 'small_cnn'
    c.teacher.model.width = 16
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  config_lib.validate(c)
  return c


@pytest.fixture(autouse=True, scope='module')
def no_persistent_cache():
  """Executables of compile-only devices cannot be cached (nor read back) by JAX's persistent
  compilation cache: compile them without it."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  yield
  jax.config.update('jax_enable_compilation_cache', before)


def h200_mesh(devices=1, hosts=1):
  return parallel.make_mesh(targets.compile_only_devices(targets.get('h200'), devices, hosts))


# --- anywhere -------------------------------------------------------------------------------

def test_platform_defaults_of_the_attack_loop():
  c = config_lib.default_config()
  cpu, gpu = config_lib.for_platform(c, 'cpu'), config_lib.for_platform(c, 'gpu')
  assert (cpu.attack.unroll, cpu.eval.unroll) == (True, False)
  assert (gpu.attack.unroll, gpu.eval.unroll) == (False, False)
  assert c.attack.unroll is None  # the caller's config is not changed
  c.attack.unroll, c.eval.unroll = False, True
  assert config_lib.for_platform(c, 'cpu') is c  # set values win over every platform


def test_largest_batch_search_against_brute_force():
  """The bracketed search returns what a scan of every multiple of the unit returns, for memory
  curves that are linear, convex and stepped, in fewer calls than the scan; on a linear curve in
  four at most (the extrapolation through two fitting batches lands on the answer)."""
  curves = [lambda b: 100 + 7 * b, lambda b: 50 + b * b // 40, lambda b: 300 + 64 * (b // 24)]
  for i, curve in enumerate(curves):
    for budget in (150, 900, 4000):
      for start, unit, limit in ((16, 8, 1000), (128, 8, 1000), (8, 4, 64)):
        calls = []

        def fits(b, curve=curve, budget=budget):
          calls.append(b)
          return curve(b) <= budget, curve(b)
        fits.budget = budget
        best, tried = compile_plan.largest_batch(fits, start, unit, limit)
        scan = [b for b in range(unit, limit // unit * unit + 1, unit) if curve(b) <= budget]
        assert best == (max(scan) if scan else 0), (budget, start, unit)
        assert len(calls) == len(set(calls)) == len(tried) <= (4 if i == 0 else 12)


def test_collective_parser_on_hand_written_hlo():
  hlo = '\n'.join([
      '%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {',
      '  %ar = f32[4]{0} all-reduce(%x), channel_id=1, to_apply=%add',
      '}',
      'ENTRY %main.2 (a: f32[3,5]) -> f32[3,5] {',
      '  %w = (s32[], f32[4]) while(%t), condition=%cond.1, body=%body.1',
      '  %s = f32[3,5]{1,0} all-reduce-start(%a), channel_id=2, to_apply=%add',
      '  %d = f32[3,5]{1,0} all-reduce-done(%s)',
      '  %g = f32[8,5]{1,0} all-gather(%a), dimensions={0}',
      '  ROOT %r = f32[3,5]{1,0} add(%d, %d)',
      '}'])
  ops = compile_plan.collectives(hlo)
  assert [(o['op'], o['elements'], o['computation']) for o in ops] == [
      ('all-reduce', 4, 'body.1'), ('all-reduce', 15, 'main.2'), ('all-gather', 40, 'main.2')]
  assert compile_plan.loop_computations(hlo) == {'body.1'}
  summary = compile_plan.collective_summary(hlo)
  assert summary == {'ops': 3, 'elements': {'all-reduce': 19, 'all-gather': 40}, 'in_loops': 1}


def test_compile_mode_rejects_an_unknown_target_in_one_line():
  out = subprocess.run([sys.executable, 'run.py', '--config=configs/natural_digits.py',
                        '--mode=compile', '--config.compile.target=h900'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'h900' in lines[0] and 'h200' in lines[0], out.stderr


# --- XLA:GPU without a GPU ------------------------------------------------------------------

@needs_cuda_plugin
def test_h200_step_loops_the_attack_and_the_cpu_step_unrolls_it():
  stage = compile_plan.make_stage(small_config(), 'train')
  gpu = compile_plan.compile_lowered(compile_plan.train_step_lowered(stage, h200_mesh(), 16))
  cpu = compile_plan.compile_lowered(
      compile_plan.train_step_lowered(stage, parallel.make_mesh(jax.local_devices()[:1]), 16))
  # The training attack's 3 steps: one loop of 3 on the GPU, written out on the CPU (whose RNG
  # has small loops of its own).
  assert 3 in compile_plan.while_trip_counts(gpu.hlo)
  assert 3 not in compile_plan.while_trip_counts(cpu.hlo)
  assert compile_plan.attack_form(gpu.hlo, [3]) == 'loop'
  assert compile_plan.attack_form(cpu.hlo, [3]) == 'unrolled'
  assert re.search(r'custom_call_target="__cudnn\$conv', gpu.hlo)  # XLA:GPU's convolutions


@needs_cuda_plugin
def test_memory_report_is_xla_memory_analysis():
  c = small_config('natural', **{'compile.flops': False})
  stage = compile_plan.make_stage(c, 'train')
  mesh = h200_mesh()
  direct = compile_plan.train_step_lowered(stage, mesh, 16).compile().memory_analysis()
  target = targets.get('h200')
  report = compile_plan.plan_stage(stage, target, mesh, c)
  st = report['train_step']
  gib = compile_plan.GIB
  assert st['arguments_gib'] * gib == direct.argument_size_in_bytes
  assert st['temp_gib'] * gib == direct.temp_size_in_bytes
  assert st['outputs_gib'] * gib == direct.output_size_in_bytes
  need = (direct.argument_size_in_bytes + direct.temp_size_in_bytes
          + max(0, direct.output_size_in_bytes - direct.alias_size_in_bytes) + gib)
  assert st['need_gib'] * gib == need and st['fits']
  # The donated state is aliased: the outputs are mostly the arguments' buffers.
  assert direct.alias_size_in_bytes > 0
  # The training set lives on the device: its bytes are among the arguments.
  assert direct.argument_size_in_bytes >= stage.num_train * 8 * 8 * 1


@needs_cuda_plugin
def test_largest_batch_on_a_small_model_against_direct_memory_analysis():
  c = small_config('natural')
  stage = compile_plan.make_stage(c, 'train')
  mesh = h200_mesh()
  needs = {}

  def need(b):
    if b not in needs:
      needs[b] = compile_plan.compile_lowered(
          compile_plan.train_step_lowered(stage, mesh, b)).need(0)
    return needs[b]
  budget = (need(256) + need(512)) // 2  # between two batches: the answer is 256 .. 504
  fits = compile_plan._Fits(stage, mesh, budget, 0)  # pylint: disable=protected-access
  best, tried = compile_plan.largest_batch(fits, 256, 8, stage.num_train)
  assert 256 <= best < 512 and len(tried) <= 10
  assert all(tried[b] == need(b) for b in (256, 512) if b in tried)
  assert need(best) <= budget < need(best + 8)


@needs_cuda_plugin
@pytest.mark.parametrize('method,overrides', [
    ('natural', {}), ('pgd_at', {}), ('trades', {}), ('trades', {'reference_bn_passes': True}),
    ('awp', {}), ('ltd', {}), ('ltd', {'ltd.base': 'awp'}), ('rslad', {}), ('absld', {}),
    ('soft_label_natural', {})])
def test_flops_per_image_match_the_hand_counted_passes(method, overrides):
  """XLA's FLOPs of the unrolled step over (passes x forward FLOPs): the step does every pass
  the method needs and no more (convolutions dominate; elementwise work adds a little)."""
  c = small_config(method, **overrides)
  stage = compile_plan.make_stage(c, 'train')
  f = compile_plan.stage_flops(stage, 16)
  k = c.attack.steps
  hand = {'natural': 3, 'pgd_at': 2 * k + 3, 'trades': 2 * k + 7, 'awp': 2 * k + 13,
          'ltd': 2 * k + 7, 'rslad': 2 * k + 6, 'absld': 2 * k + 6, 'soft_label_natural': 3}[method]
  hand += (6 if overrides.get('ltd.base') == 'awp' else 0) + (1 if overrides else 0) * (
      method == 'trades')
  teacher = 0.0
  if methods.get_method(method).needs_teacher:
    tc = config_lib.default_config()
    tc.model.name, tc.model.width = 'small_cnn', 16
    teacher = compile_plan.forward_flops(tc, stage) / compile_plan.forward_flops(c, stage)
    assert teacher > 2  # the teacher is twice as wide: its forward costs more than the student's
  assert f['minimal_passes'] == pytest.approx(hand + teacher)
  assert 0.9 < f['flops_per_minimal'] < 1.1, f
  # Evaluation: clean 1, FGSM 2 + 1, PGD-2 2 x 2 + 1, CW-2 2 x 2 + 1 forward passes per image.
  assert f['final_eval_gflop_per_image'] / f['forward_gflop_per_image'] == pytest.approx(
      1 + 3 + 5 + 5, rel=0.1)


@needs_cuda_plugin
@pytest.mark.parametrize('method,overrides', [
    ('natural', {}), ('pgd_at', {}), ('trades', {'reference_bn_passes': True}), ('awp', {}),
    ('ltd', {}), ('ltd', {'ltd.base': 'awp'}), ('rslad', {}), ('absld', {}),
    ('soft_label_natural', {}), ('absld', {'dtype': 'bfloat16'})])
def test_every_method_compiles_for_sm_90(method, overrides):
  """Each method's train step and evaluation step through XLA:GPU for an H200 (sm_90a):
  a change that breaks GPU compilation fails here, on a machine without a GPU."""
  c = small_config(method, **{'compile.flops': False, **overrides})
  report = compile_plan.plan_stage(compile_plan.make_stage(c, 'train'), targets.get('h200'),
                                   h200_mesh(), c)
  assert report['train_step']['fits'] and report['eval_step']['fits']
  assert report['train_step']['attack_loop'] == ('unrolled' if method in (
      'natural', 'soft_label_natural') else 'loop')
  assert report['eval_step']['attack_loop'] == 'loop'
  assert report['train_step']['temp_gib'] > 0


def _param_shapes(c, stage):
  model = state_lib.build_model(c, stage.num_classes)
  st = jax.eval_shape(lambda: state_lib.create_train_state(c, model, stage.image_shape,
                                                           stage.num_classes, 10))
  leaves = jax.tree_util.tree_leaves_with_path(st.params)
  return [(jax.tree_util.keystr(p), tuple(x.shape)) for p, x in leaves]


@needs_cuda_plugin
def test_two_hosts_of_eight_gpus_compile_one_data_parallel_step():
  """16 devices over 2 processes: the step compiles, its only collectives are all-reduces outside
  the attack loop, and the per-device batch halves the 8-GPU step's activations."""
  stage = compile_plan.make_stage(small_config('pgd_at'), 'train')
  two = compile_plan.compile_lowered(compile_plan.train_step_lowered(stage, h200_mesh(8, 2), 64))
  summary = compile_plan.collective_summary(two.hlo)
  assert set(summary['elements']) == {'all-reduce'} and summary['in_loops'] == 0
  assert 3 in compile_plan.while_trip_counts(two.hlo)
  one = compile_plan.compile_lowered(compile_plan.train_step_lowered(stage, h200_mesh(8, 1), 64))
  assert two.temp < one.temp


@needs_cuda_plugin
def test_eight_gpus_reduce_gradients_once_and_batchnorm_per_forward():
  """Data parallelism on 8 GPUs (and 2 hosts of 8): every weight's gradient is all-reduced
  once, BatchNorm's batch statistics (mean, mean of squares) once per train-mode forward of each
  BatchNorm layer, the attack loop crosses no device, and no other collective appears. The
  default program combines all-reduces (losing their origin); the attribution compiles the same
  step with XLA's all-reduce combiner off."""
  c = small_config('trades')
  stage = compile_plan.make_stage(c, 'train')
  mesh = h200_mesh(8)
  lowered = compile_plan.train_step_lowered(stage, mesh, 64)
  combined = compile_plan.compile_lowered(lowered)
  summary = compile_plan.collective_summary(combined.hlo)
  assert set(summary['elements']) == {'all-reduce'} and summary['in_loops'] == 0
  assert 3 in compile_plan.while_trip_counts(combined.hlo)  # the attack loop, crossing no device
  hlo = lowered.compile(
      compiler_options={'xla_gpu_all_reduce_combine_threshold_bytes': 0}).as_text()
  ops = []
  for line in hlo.splitlines():
    m = re.match(r'^\s*(?:ROOT )?%\S+ = (\S+) all-reduce(?:-start)?\(', line)
    if m:
      name = re.search(r'op_name="([^"]*)"', line)
      dims = re.search(r'\[([0-9,]*)\]', m.group(1)).group(1)
      ops.append((tuple(int(d) for d in dims.split(',') if d), name.group(1) if name else ''))
  params = _param_shapes(c, stage)
  bn_layers = [p for p, s in params if p.endswith("'scale']")]
  forward = [(s, n) for s, n in ops if 'transpose(' not in n and '/bn' in n]
  backward = [(s, n) for s, n in ops if 'transpose(' in n]
  scalars = [(s, n) for s, n in ops if 'transpose(' not in n and '/bn' not in n]
  train_forwards = 2  # TRADES: f(x) and f(x_adv) in train mode
  assert len(forward) == 2 * len(bn_layers) * train_forwards
  assert all(s == () for s, _ in scalars) and len(scalars) <= 6  # loss and metric sums
  kernels = [s for p, s in params if len(s) >= 2]
  for shape in kernels:  # each weight's gradient: one all-reduce of its shape (layouts aside)
    assert sum(1 for s, _ in backward if sorted(s) == sorted(shape)) == 1, shape
  channels = sum(s[0] for p, s in params if p.endswith("'scale']"))
  non_bn = sum(math.prod(s) for p, s in params
               if not p.endswith("'scale']") and not p.endswith("'bias']") or len(s) >= 2)
  biases = sum(math.prod(s) for p, s in params if p.endswith("'bias']") and len(s) == 1)
  elements = sum(math.prod(s) for s, _ in backward)
  # Weights, biases, and per BatchNorm channel per train forward at most four vectors: the
  # backward of the two statistics and the scale / bias gradients of that forward.
  assert elements <= non_bn + biases + 4 * channels * train_forwards
  assert elements >= sum(math.prod(s) for s in kernels)


@needs_cuda_plugin
def test_compile_mode_end_to_end_and_a_step_that_cannot_fit(tmp_path):
  cmd = [sys.executable, 'run.py', '--config=configs/trades_digits.py', '--config.method=pgd_at', '--mode=compile',
         f'--workdir={tmp_path}', '--config.compile.target=rtx3090', '--config.attack.steps=2',
         '--config.model.width=8', '--config.eval.final=("clean","pgd20")']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'GeForce RTX 3090' in out.stdout and '| loop |' in out.stdout
  report = __import__('json').load(open(tmp_path / 'compile_rtx3090.json'))
  assert report['stages'][0]['train_step']['fits'] and report['environment']['git_commit']
  assert report['hours_at_mfu'] == pytest.approx(report['hours_at_peak'] / 0.4)
  out = subprocess.run(cmd + ['--config.compile.memory_fraction=0.001',
                              '--config.compile.flops=False'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'one image per device' in lines[0], out.stderr[-2000:]


def test_targets_render_the_pinned_xla_fields():
  text = targets.gpu_target_config(targets.get('rtx3090'))
  assert 'core_count: 82' in text and 'major: 8 minor: 6' in text
  assert 'ACCELERATED' in targets.gpu_target_config(targets.get('h100'))
  with pytest.raises(ConfigError, match='tpu-v5e'):
    targets.get('v100')


@needs_cuda_plugin
def test_remat_lowers_the_gpu_memory_of_the_backward_and_of_the_train_step():
  """XLA:GPU's memory analysis: a DM WRN's loss gradient keeps less with ``model.remat`` (the
  'nothing' policy least, 'convs' between), and so does the whole TRADES train step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ltd_jax import models  # pylint: disable=g-import-not-at-top
  mesh = h200_mesh()
  x = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32, sharding=parallel.batch_sharded(mesh))
  y = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=parallel.batch_sharded(mesh))
  temps = {}
  for policy in ('', 'convs', 'nothing'):
    model = models.create_model('dm-wrn-16-2', 10, remat=policy)
    variables = parallel.abstract_replicated(jax.eval_shape(
        lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)),
        mesh)

    def loss_fn(params, batch_stats, x, y, model=model):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(64), y]), updates['batch_stats']
    compiled = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
        variables['params'], variables['batch_stats'], x, y).compile()
    temps[policy] = compiled.memory_analysis().temp_size_in_bytes
  assert temps['nothing'] < temps['convs'] < 0.8 * temps['']
  steps = {}
  for remat in (False, True):
    c = small_config('trades', **{'compile.flops': False, 'model.name': 'dm-wrn-10-2',
                                  'data.name': 'cifar10', 'model.remat': remat,
                                  'batch_size': 64})
    stage = compile_plan.make_stage(c, 'train')
    steps[remat] = compile_plan.train_step_lowered(stage, mesh, 64).compile().memory_analysis()
  assert steps[True].temp_size_in_bytes < 0.8 * steps[False].temp_size_in_bytes


@needs_cuda_plugin
def test_the_leaderboard_recipe_trains_wrn_70_16_at_batch_512_on_80gb_only_with_remat():
  """trades_cifar10_generated with DeepMind's WRN-70-16 at its batch of 512 on one H100 80GB:
  XLA:GPU's memory analysis of the TRADES step needs more than JAX's 75% of the card without
  rematerialisation and fits with it (docs/gpu_plan.md, 'Leaderboard scale')."""
  mesh = parallel.make_mesh(targets.compile_only_devices(targets.get('h100'), 1, 1))
  need = {}
  for remat in (False, True):
    c = config_lib.load_config_file('trades_cifar10_generated')
    c.model.name, c.model.remat = 'dm-wrn-70-16', remat
    c.compile.target, c.compile.flops = 'h100', False
    stage = compile_plan.make_stage(c, 'train')
    compiled = compile_plan.compile_lowered(compile_plan.train_step_lowered(stage, mesh, 512))
    need[remat] = compiled.need(int(c.compile.workspace_margin_gib * compile_plan.GIB))
  budget = compile_plan._budget(c, targets.get('h100'))[0]  # pylint: disable=protected-access
  assert need[False] > budget > need[True], (need, budget)
