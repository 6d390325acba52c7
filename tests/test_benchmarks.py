"""The train step of every method does no more work than its minimal pass count: the
benchmark's FLOP accounting (XLA cost analysis of the unrolled step) on a small CNN."""

import argparse

import pytest

from benchmarks import train_step as bench
from ltd_jax import parallel


@pytest.mark.parametrize('method', ['trades', 'awp', 'absld', 'ltd'])
def test_train_step_flops_are_the_minimal_pass_count(method):
  # K = 2 attack steps: one extra forward pass would be 1/11 (TRADES) to 1/17 (AWP) too many;
  # measured ratios are 0.985-0.99 (elementwise work XLA counts beside the convolutions).
  args = argparse.Namespace(model='small_cnn', teacher_model='', batch=8, image=32,
                            attack_steps=2, steps=1, dtype='float32', loop_attack=False)
  row = bench.bench_jax(args, method, parallel.make_mesh())
  assert row['min_passes'] == bench.minimal_passes(method, 2, 1.0)
  assert row['flop_ratio'] == pytest.approx(1.0, abs=0.04), row
