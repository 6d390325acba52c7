"""Runs ABSLD's epoch 2 (after an lr milestone) over a device mesh on unbalanced classes, and
recomputes its temperature update independently.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/absld_epoch_worker.py OUT.json

The steps run sharded over every device, as training does. Before each step the expected
per-sample cross-entropies are computed here, unsharded, from the state's weights: the
student's train-mode logits on the clean and the (parameter-independent) adversarial batch.
Their per-class means over the epoch, Eq. 10 with beta decayed once and the clip, are done in
float64 NumPy and written beside the temperatures the library ends the epoch with.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import conftest  # pylint: disable=g-import-not-at-top
from ltd_jax import data  # pylint: disable=g-import-not-at-top
from ltd_jax import methods  # pylint: disable=g-import-not-at-top
from ltd_jax import parallel  # pylint: disable=g-import-not-at-top
from ltd_jax import state as state_lib  # pylint: disable=g-import-not-at-top
from ltd_jax import train  # pylint: disable=g-import-not-at-top

# Class 7 never appears; class 0 has 20x the samples of class 9.
COUNTS = (40, 30, 25, 20, 18, 15, 12, 0, 30, 2)
STEPS, BATCH, EPOCH = 3, 64, 2


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def eq10(tau, risk_sum, count, beta_t, lo, hi):
  seen = count > 0
  risk = np.where(seen, risk_sum / np.maximum(count, 1), 0.0)
  gap = np.where(seen, risk - risk[seen].mean(), 0.0)
  return np.clip(tau - beta_t * gap / np.abs(gap).max(), lo, hi)


def main(out_path):
  c = conftest.make_tiny_config()
  c.method = 'absld'
  c.batch_size = BATCH
  c.attack.steps, c.attack.init, c.eps = 0, 'uniform', 0.3  # x_adv = clip(x + U(-0.3, 0.3))
  c.absld.beta, c.absld.tau_min, c.absld.tau_max = 4.0, 0.5, 5.0
  c.optim.lr_boundaries_epochs, c.optim.lr_decay = (1,), 0.1  # epoch 2 is past the milestone
  ds = data.load_digits()
  rng = np.random.default_rng(0)
  index = np.concatenate([rng.choice(np.flatnonzero(ds.train_labels == k), n, replace=False)
                          for k, n in enumerate(COUNTS)])
  index = rng.permutation(index)
  images, labels = ds.train_images[index], ds.train_labels[index]
  teacher_logits = rng.normal(size=(len(labels), 10)).astype(np.float32) * 3.0

  mesh = parallel.make_mesh()
  method = methods.get_method('absld')
  model = state_lib.build_model(c, 10)
  state = state_lib.create_train_state(c, model, ds.image_shape, 10, STEPS)
  state = state.replace(step=np.int32(STEPS * (EPOCH - 1)), method_state={
      **state.method_state, 'tau_adv': np.linspace(1.0, 4.5, 10, dtype=np.float32),
      'tau_clean': np.linspace(4.0, 0.8, 10, dtype=np.float32)})
  step_fn = train.make_train_step_fn(mesh, method=method, config=c, augment_kind='none',
                                     num_classes=10, steps_per_epoch=STEPS)
  state = parallel.replicate(state, mesh)
  sums = {'adv': np.zeros(10), 'clean': np.zeros(10)}
  counts = np.zeros(10)
  for i in range(STEPS):
    sl = slice(i * BATCH, (i + 1) * BATCH)
    host = jax.device_get(state)
    _, attack_rng = jax.random.split(jax.random.fold_in(host.rng, host.step))
    x = np.asarray(data.to_float(images[sl]))
    inputs = methods.MethodInputs(x, labels[sl], attack_rng, host.method_state,
                                  teacher_logits[sl])
    x_adv = np.asarray(method.adversary(methods.AttackStudent.of(host), inputs, c))
    assert np.abs(x_adv - x).max() > 0.1
    for kind, batch in (('clean', x), ('adv', x_adv)):
      logits, _ = model.apply(host.variables, batch, train=True, mutable=['batch_stats'])
      ce = -log_softmax64(logits)[np.arange(BATCH), labels[sl]]
      np.add.at(sums[kind], labels[sl], ce)
    np.add.at(counts, labels[sl], 1.0)
    batch = parallel.shard_global_batch(
        {'images': images[sl], 'labels': labels[sl], 'teacher_logits': teacher_logits[sl]}, mesh)
    state, _ = step_fn(state, batch, None, None)
  before = jax.device_get(state)
  after = jax.device_get(train.end_of_epoch(state, EPOCH, method=method, config=c))
  beta_t = c.absld.beta * c.optim.lr_decay
  result = {'devices': jax.device_count(), 'counts': counts.tolist()}
  for kind in ('adv', 'clean'):
    tau = np.float64(before.method_state[f'tau_{kind}'])
    result[kind] = {
        'library_sum': np.asarray(before.method_state[f'risk_{kind}_sum']).tolist(),
        'library_count': np.asarray(before.method_state[f'risk_{kind}_count']).tolist(),
        'expected_sum': sums[kind].tolist(),
        'tau_before': tau.tolist(),
        'tau_after': np.asarray(after.method_state[f'tau_{kind}']).tolist(),
        'expected': eq10(tau, sums[kind], counts, beta_t, c.absld.tau_min, c.absld.tau_max).tolist(),
        # What a wrong update would give: beta not decayed, per-class sums instead of means.
        'undecayed': eq10(tau, sums[kind], counts, c.absld.beta, c.absld.tau_min,
                          c.absld.tau_max).tolist(),
        'by_sums': eq10(tau, sums[kind], (counts > 0).astype(float), beta_t, c.absld.tau_min,
                        c.absld.tau_max).tolist(),
    }
  with open(out_path, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main(sys.argv[1])
