"""Times the shared train step: compile time and images/s per method on this machine.

    python benchmarks/train_step.py --model=resnet18 --methods=natural,pgd_at,trades --batch=128

Prints a Markdown table naming the device, the architecture and the configuration.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from ltd_jax import config_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import methods  # pylint: disable=g-import-not-at-top
from ltd_jax import train  # pylint: disable=g-import-not-at-top


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='resnet18')
  p.add_argument('--methods', default='natural,pgd_at,trades')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--image', type=int, default=32)
  p.add_argument('--attack_steps', type=int, default=10)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--dtype', default='float32')
  args = p.parse_args()

  rows = []
  for name in args.methods.split(','):
    c = config_lib.default_config()
    c.method, c.model.name, c.dtype = name, args.model, args.dtype
    c.attack.steps = args.attack_steps
    config_lib.validate(c)
    model = train.build_model(c, 10)
    shape = (args.image, args.image, 3)
    state = train.create_train_state(c, model, shape, 10, steps_per_epoch=100)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *shape), dtype=np.uint8)
    labels = np.arange(args.batch, dtype=np.int32) % 10
    step = jax.jit(lambda s, x, y, m=methods.get_method(name), c=c: train.train_step(
        s, x, y, method=m, config=c, augment_kind='crop_flip', num_classes=10))
    t0 = time.perf_counter()
    state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - t0) / args.steps
    rows.append((name, compile_s, per_step, args.batch / per_step))

  dev = jax.devices()[0]
  print(f'device: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}')
  print(f'model: {args.model}, batch {args.batch}, {args.image}x{args.image}, '
        f'attack steps {args.attack_steps}, dtype {args.dtype}, timed steps {args.steps}\n')
  print('| method | compile s | step ms | images/s |')
  print('|---|---:|---:|---:|')
  for name, compile_s, per_step, ips in rows:
    print(f'| {name} | {compile_s:.1f} | {1000 * per_step:.1f} | {ips:.1f} |')


if __name__ == '__main__':
  main()
