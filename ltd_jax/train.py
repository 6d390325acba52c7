"""The one training loop: ``train_and_evaluate(config, workdir)``.

Every method runs through the same jit-compiled ``train_step``: augment on device, build the
method's adversarial examples with the model in eval mode, differentiate the method's loss in
train mode, apply the optax update and accumulate per-class risks. The step is a pure
function of the TrainState and the batch; the batch is a pure function of (seed, step), so a
run that is killed and restarted from a checkpoint ends with the same parameters. SIGTERM and
SIGINT stop the loop between steps with a checkpoint (``preemption.StopRequest``); a
non-finite loss or parameter stops it before anything after it is saved.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from ltd_jax import awp
from ltd_jax import config_lib
from ltd_jax import data
from ltd_jax import datasets
from ltd_jax import evaluate
from ltd_jax import generated
from ltd_jax import input_pipeline
from ltd_jax import methods
from ltd_jax import parallel
from ltd_jax import preemption
from ltd_jax import reports
from ltd_jax import runs
from ltd_jax import teacher as teacher_lib
from ltd_jax import weight_average
from ltd_jax.errors import CheckpointError, ConfigError, Preempted, TrainingError
from ltd_jax.state import TrainState, learning_rate_schedule


# Loss terms a method's loss may report beside the loss (averaged into every train record).
LOSS_TERMS = ('loss_natural', 'loss_robust', 'teacher_entropy')


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, teacher_variables=None,
               teacher_logits=None, *, method: methods.Method, config, augment_kind: str,
               num_classes: int, steps_per_epoch: int, teacher_apply_fn=None,
               return_inputs: bool = False):
  """One optimisation step of ``method`` on a uint8 batch; returns (state, summed metrics).

  Distillation methods get the frozen teacher's eval-mode logits on the same augmented
  images, from ``teacher_variables`` or precomputed in ``teacher_logits``. With
  ``return_inputs`` the metrics also hold what the loss was differentiated on: the augmented
  images ``x`` and the attack's ``x_adv`` (when the method has an adversary); tests feed them to
  a reference step, so that the reference sees the in-step attack's own result rather than
  another compilation's.

  ``optim.accumulation_steps = k > 1`` splits the augmented batch into k micro-batches of B / k,
  run one after another (``lax.scan``): each builds its own adversarial examples and its own
  gradient, with BatchNorm on the micro-batch's statistics and the running statistics moving k
  times, as in a PyTorch loop that accumulates; the method's per-step state (ABSLD's per-class
  risks) counts every micro-batch; the mean of the k gradients makes one update. The data order
  and the lr schedule are those of the run without accumulation.
  """
  aug_rng, attack_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  x = data.augment(aug_rng, images, augment_kind)
  if teacher_logits is not None:
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  teacher_fn = None
  if method.teacher_on_inputs:
    teacher_fn = lambda z: teacher_apply_fn(teacher_variables, z, train=False).astype(jnp.float32)

  def micro_step(batch_stats, method_state, x, labels, teacher_logits, rng):
    """Gradient, loss, aux and running statistics of one (micro-)batch."""
    if method.needs_teacher and teacher_logits is None:
      teacher_logits = jax.lax.stop_gradient(
          teacher_apply_fn(teacher_variables, x, train=False).astype(jnp.float32))
    inputs = methods.MethodInputs(x, labels, rng, state.method_state, teacher_logits, teacher_fn,
                                  epoch=state.step // steps_per_epoch)
    student = methods.AttackStudent(state.apply_fn, state.params, batch_stats,
                                    config.attack.bn_mode)
    x_adv = method.adversary(student, inputs, config)
    start_stats = student.batch_stats  # moved by a train-mode attack

    def loss_fn(params):
      forward = methods.TrainForward(state.apply_fn, params, start_stats)
      loss, aux = method.loss(forward, inputs, x_adv, config)
      return loss, (aux, forward.batch_stats)

    if method.uses_awp(config):
      warm = awp.is_active(state.step, config.awp.warmup_epochs, steps_per_epoch)
      proxy_loss = method.awp_proxy_loss or method.loss

      def proxy_loss_fn(params):
        forward = methods.TrainForward(state.apply_fn, params, start_stats)
        return proxy_loss(forward, inputs, x_adv, config)[0]

      # Computed every step and zeroed during the warm-up rather than skipped with lax.cond:
      # XLA:CPU ran the convolutions inside a conditional ~9x slower (benchmarks/README.md), and
      # the warm-up is a few epochs of hundreds.
      delta = awp.weight_perturbation(proxy_loss_fn, state.params,
                                      proxy_lr=config.awp.proxy_lr, gamma=config.awp.gamma)
      delta = jax.tree_util.tree_map(lambda d: jnp.where(warm, d, 0.0), delta)
      at = awp.add(state.params, delta)
    else:
      at = state.params
    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(at)
    if config.reference_bn_passes and method.reference_bn_passes:
      # Statistics-only forwards (no gradient) so that the running statistics are the reference
      # code's, which runs more train-mode forwards than the loss needs.
      replay = methods.TrainForward(state.apply_fn, jax.lax.stop_gradient(at), batch_stats)
      for name in method.reference_bn_passes:
        replay(x if name == 'x' else x_adv)
      batch_stats = jax.lax.stop_gradient(replay.batch_stats)
    if method.accumulate is not None:
      method_state = method.accumulate(method_state, aux, labels, num_classes)
    return grads, loss, aux, batch_stats, method_state, at, x_adv

  k = config.optim.accumulation_steps
  if k == 1:
    grads, loss, aux, batch_stats, method_state, at, x_adv = micro_step(
        state.batch_stats, state.method_state, x, labels, teacher_logits, attack_rng)
    step_metrics = _step_metrics(aux, labels)
  else:
    # Micro-batch i holds rows i, i + k, i + 2k, ...: every device keeps its share of each one
    # (the batch is split along ``data`` in contiguous blocks of B / devices rows).
    split = lambda a: None if a is None else a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
    merge = lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[2:])

    def body(carry, micro):
      batch_stats, method_state, grad_sum = carry
      i, xs, ys, ts = micro
      grads, loss, aux, batch_stats, method_state, _, x_adv = micro_step(
          batch_stats, method_state, xs, ys, ts, jax.random.fold_in(attack_rng, i))
      grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
      return (batch_stats, method_state, grad_sum), (loss, _step_metrics(aux, ys), x_adv)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (batch_stats, method_state, grad_sum), (losses, micro_metrics, x_adv) = jax.lax.scan(
        body, (state.batch_stats, state.method_state, zeros),
        (jnp.arange(k), split(x), split(labels), split(teacher_logits)))
    grads = jax.tree_util.tree_map(lambda g: g / k, grad_sum)
    loss, at = jnp.mean(losses), state.params
    step_metrics = {key: (jnp.sum(v) if key.startswith('correct_') else jnp.mean(v))
                    for key, v in micro_metrics.items()}
    x_adv = jax.tree_util.tree_map(merge, x_adv)

  updates, opt_state = state.tx.update(grads, state.opt_state, at)
  params = optax.apply_updates(state.params, updates)  # AWP: the perturbation is restored exactly
  if config.reference_bn_passes and method.post_update_bn_passes:
    replay = methods.TrainForward(state.apply_fn, jax.lax.stop_gradient(params), batch_stats)
    for name in method.post_update_bn_passes:
      replay(x if name == 'x' else x_adv)
    batch_stats = jax.lax.stop_gradient(replay.batch_stats)

  new = dict(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  finite = [jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves((params, batch_stats))]
  metrics = {'loss': loss, 'count': jnp.float32(labels.shape[0]),
             'params_finite': jnp.all(jnp.stack(finite)), **step_metrics}
  if method.accumulate is not None:
    new['method_state'] = method_state
  if weight_average.rule(method, config) == weight_average.EMA:
    method_state = new.get('method_state', state.method_state)
    average = weight_average.ema_update(method_state[weight_average.SLOT], params, state.step + 1,
                                        config, config.num_epochs * steps_per_epoch)
    new['method_state'] = {**method_state, weight_average.SLOT: average}
  if return_inputs:
    metrics['x'] = x
    if x_adv is not None:
      metrics['x_adv'] = x_adv
  return state.replace(**new), metrics


def _step_metrics(aux, labels) -> dict:
  """Correct predictions (summed) and the loss terms (averaged) a loss reports."""
  metrics = {}
  for kind in ('adv', 'clean'):
    if f'logits_{kind}' in aux:
      predictions = jnp.argmax(aux[f'logits_{kind}'], axis=-1)
      metrics[f'correct_{kind}'] = jnp.sum(predictions == labels).astype(jnp.float32)
  for key in LOSS_TERMS:
    if key in aux:
      metrics[key] = aux[key]
  return metrics


def end_of_epoch(state: TrainState, epochs_completed, validation=None, *,
                 method: methods.Method, config) -> TrainState:
  """The method's epoch-end update of its state (ABSLD's temperatures), if it has one; a method
  with ``validation`` also gets the validation split's accuracies and the weights. An EMA
  (``weight_average``) takes the epoch's running BatchNorm statistics first."""
  if weight_average.rule(method, config) == weight_average.EMA:
    ms = state.method_state
    state = state.replace(method_state={**ms, weight_average.SLOT: weight_average.ema_epoch_end(
        ms[weight_average.SLOT], state.batch_stats)})
  if method.epoch_end is None:
    return state
  if method.validation is None:
    return state.replace(method_state=method.epoch_end(state.method_state, epochs_completed,
                                                       config))
  return state.replace(method_state=method.epoch_end(state.method_state, epochs_completed, config,
                                                     validation, state.variables))


def make_train_step_fn(mesh, **step_kwargs):
  """``train_step`` compiled once over ``mesh``: ``(state, batch, device_data, teacher_variables)
  -> (state, metrics)``. ``batch`` holds either the global batch (``images``, ``labels``,
  optional ``teacher_logits``) or only its ``index`` into ``device_data``, the training set kept
  on the devices. The state's buffers are donated (updated in place) and every output is
  replicated. Backend-dependent defaults (the attack's loop form) follow the mesh's platform,
  which may be that of compile-only devices (``--mode=compile``), not the local backend."""
  step_kwargs['config'] = config_lib.for_platform(step_kwargs['config'], parallel.platform(mesh))

  def step(state, batch, device_data, teacher_variables):
    if 'index' in batch:
      batch = {k: v[batch['index']] for k, v in device_data.items()}
    return train_step(state, batch['images'], batch['labels'], teacher_variables,
                      batch.get('teacher_logits'), **step_kwargs)
  return jax.jit(step, donate_argnums=(0,), out_shardings=parallel.replicated(mesh))


class _MetricBuffer:
  """Device metrics kept until a log point, so the hot loop never waits for the host."""

  def __init__(self):
    self.items, self.start = [], time.perf_counter()

  def add(self, metrics):
    self.items.append(metrics)

  def flush(self, step: int, last_checkpoint: Callable[[], str] = lambda: 'none') -> dict | None:
    """Averages the buffered metrics; a non-finite loss or parameter raises TrainingError
    naming the first bad step and ``last_checkpoint()``, the last good one."""
    if not self.items:
      return None
    fetched = jax.device_get(self.items)
    elapsed = time.perf_counter() - self.start
    count = sum(m['count'] for m in fetched)
    out = {'loss': float(np.mean([m['loss'] for m in fetched])),
           'images_per_sec': count / max(elapsed, 1e-9)}
    for key in LOSS_TERMS:
      if key in fetched[0]:
        out[key] = float(np.mean([m[key] for m in fetched]))
    for kind in ('clean', 'adv'):
      if f'correct_{kind}' in fetched[0]:
        out[f'acc_{kind}'] = sum(m[f'correct_{kind}'] for m in fetched) / count
    self.items, self.start = [], time.perf_counter()
    for i, m in enumerate(fetched):
      if not np.isfinite(m['loss']) or not m['params_finite']:
        what = 'loss at' if not np.isfinite(m['loss']) else 'parameters after'
        raise TrainingError(
            f'non-finite {what} step {step - len(fetched) + i + 1}: training stopped, no '
            f'checkpoint written after it (last good: {last_checkpoint()}); lower '
            f'--config.optim.lr or check the data, then rerun to resume from it')
    return out


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """Whether an action of period ``every`` steps (0: never) runs after ``step`` steps, and
  always after the last (``total``): big_vision's ``utils.itstime``."""
  return (every > 0 and step % every == 0) or step == total


def train_batches(ds, config, mesh, start_step: int, total_steps: int, host_data, device_data):
  """The sharded global batch of every step from ``start_step``: this host's rows of a streamed
  dataset or of a mixture with generated images (``generated.batch_plan``), or in-memory rows
  (their indices only when the data lives on the devices). Batch ``s`` is a pure function of
  (seed, s)."""
  if ds.streaming:
    for images, labels in input_pipeline.train_batches(ds, config.batch_size, config.seed,
                                                       start_step, total_steps):
      yield parallel.shard_process_batch({'images': images, 'labels': labels}, mesh)
    return
  if ds.generated is not None:  # this host reads its rows of the real and generated images
    rows = parallel.process_slice(config.batch_size)
    for step in range(start_step, total_steps):
      is_generated, index = generated.batch_plan(ds.num_train, len(ds.generated),
                                                 config.batch_size, config.data.generated_fraction,
                                                 config.seed, step)
      images, labels = generated.load_rows(ds.train_images, ds.train_labels, ds.generated,
                                           is_generated[rows], index[rows])
      yield parallel.shard_process_batch({'images': images, 'labels': labels}, mesh)
    return
  for step in range(start_step, total_steps):
    idx = data.train_batch_indices(ds.num_train, config.batch_size, config.seed, step)
    if device_data is not None:
      yield parallel.shard_global_batch({'index': idx.astype(np.int32)}, mesh)
    else:
      yield parallel.shard_global_batch({k: v[idx] for k, v in host_data.items()}, mesh)


class _Progress:
  """One tqdm bar per epoch (primary process, ``progress_bar``)."""

  def __init__(self, config, steps_per_epoch: int):
    self.config, self.steps_per_epoch, self.bar = config, steps_per_epoch, None

  def update(self, step: int) -> None:
    """Counts step ``step`` (1-indexed); the bar of its epoch starts where a resume left it."""
    if self.bar is None:
      self.bar = tqdm(total=self.steps_per_epoch, initial=(step - 1) % self.steps_per_epoch,
                      leave=False, unit='step',
                      desc=f'epoch {(step - 1) // self.steps_per_epoch + 1}/{self.config.num_epochs}',
                      disable=not self.config.progress_bar or not parallel.is_primary())
    self.bar.update(1)

  def show(self, record: dict) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: f'{v:.3g}' for k, v in record.items()
                            if k not in ('loss_natural', 'teacher_entropy')})

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.bar = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       step_hook: Callable[[int], None] | None = None) -> TrainState:
  """Trains ``config.method`` (resuming from the latest checkpoint in ``workdir``), evaluates
  periodically, keeps the best checkpoint, then evaluates the selected one with every attack.

  ``step_hook(step)`` is called after every step (tests use it to interrupt a run).
  """
  ds, state, store, steps_per_epoch = runs.setup(config, workdir)
  try:
    restored = store.restore(state)
  except CheckpointError:
    store.close()
    raise
  if restored is None and config.init.source != 'none':
    state = _warm_start(state, config, workdir, ds)
  if restored is not None:
    state = restored
    if parallel.is_primary():
      print(f'resumed from step {int(state.step)} of {_total_steps(config, steps_per_epoch)} '
            f'({os.path.abspath(workdir)})', flush=True)
  if parallel.is_primary():
    reports.write_run_info(workdir, config)
    reports.rewind_metrics(workdir, int(state.step))  # drop records a killed run made after it
  writer = reports.MetricWriter(workdir) if parallel.is_primary() else reports.NullWriter()
  method = methods.get_method(config.method)
  teacher = None
  if method.needs_teacher:
    teacher = teacher_lib.prepare_teacher(config, workdir, ds, train_and_evaluate)
  if config.teacher.cache_logits and ds.streaming:
    raise ConfigError(f'teacher.cache_logits needs an in-memory dataset, not the streamed '
                      f'{ds.name}: set --config.teacher.cache_logits=False')
  cached_logits = (teacher_lib.precompute_logits(teacher, ds.train_images)
                   if teacher is not None and config.teacher.cache_logits else None)
  augment_kind = (datasets.default_augmentation(ds.name) if config.data.augment == 'auto'
                  else config.data.augment)
  mesh = parallel.make_mesh()
  parallel.connect_hosts(mesh)
  state = parallel.replicate(state, mesh)
  teacher_variables = (parallel.replicate(teacher.variables, mesh)
                       if teacher is not None and cached_logits is None else None)
  host_data = device_data = None
  if not ds.streaming:
    host_data = {'images': ds.train_images, 'labels': ds.train_labels}
    if cached_logits is not None:
      host_data['teacher_logits'] = cached_logits
    device_data = (parallel.replicate(host_data, mesh)
                   if config.data.on_device and ds.generated is None else None)
  step_fn = make_train_step_fn(
      mesh, method=method, config=config, augment_kind=augment_kind,
      num_classes=ds.num_classes, steps_per_epoch=steps_per_epoch,
      teacher_apply_fn=teacher.apply_fn if teacher is not None else None)
  epoch_end_fn = jax.jit(functools.partial(end_of_epoch, method=method, config=config),
                         out_shardings=parallel.replicated(mesh))

  validation = None
  if method.validation is not None:
    val_images, val_labels = ds.split('val')
    val_step = evaluate.make_attack_eval_step(state.apply_fn, method.validation(config))
    validation = lambda st, epoch: _validate(val_step, st, val_images, val_labels, ds.num_classes,
                                             config, epoch, mesh, writer, epoch * steps_per_epoch)
  sel_images, sel_labels = ds.split(config.eval.selection_split)
  subset = evaluate.stratified_subset(sel_labels, config.eval.subset_size, config.seed)
  periodic_eval = evaluate.make_eval_step(state.apply_fn, config.eval.during_training,
                                          eps=config_lib.eval_eps(config),
                                          eval_config=config.eval,
                                          platform=parallel.platform(mesh))
  eval_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

  total_steps = _total_steps(config, steps_per_epoch)
  step = int(state.step)
  profile = _Profile(config.profile.steps, os.path.join(workdir, 'profile'))
  batches = train_batches(ds, config, mesh, step, total_steps, host_data, device_data)
  progress = _Progress(config, steps_per_epoch)
  records = _TrainRecords(writer, store, progress, config.optim, steps_per_epoch,
                          config.num_epochs)
  stop = preemption.StopRequest(sync_every=config.log_every_steps)
  try:
    with stop:
      if restored is None and method.validate_before_training:  # for the weights it starts from
        state = _run_epoch_end(state, 0, 0, method, epoch_end_fn, writer, validation)
      while step < total_steps:
        if stop.requested(step):
          records.flush(step)
          store.save_latest(step, state)
          store.wait()
          raise Preempted(f'{stop.name} received: stopped after step {step} of {total_steps}, '
                          f'checkpoint in {records.last_checkpoint()}; rerun the same command '
                          f'to resume', stop.signum, step)
        profile.before_step(step)
        state, metrics = step_fn(state, next(batches), device_data, teacher_variables)
        step += 1
        profile.after_step(step, state)
        records.add(metrics)
        progress.update(step)
        epoch, end_of_an_epoch = step // steps_per_epoch, step % steps_per_epoch == 0
        save = end_of_an_epoch or itstime(step, config.checkpoint.every_steps, total_steps)
        if itstime(step, config.log_every_steps):
          records.flush(step)
        if step_hook is not None:
          step_hook(step)
        if save:
          records.flush(step)
        if end_of_an_epoch:
          progress.close()
          state = _run_epoch_end(state, epoch, step, method, epoch_end_fn, writer, validation)
        if end_of_an_epoch and (evaluate.is_evaluation_epoch(epoch, config.eval)
                                or step == total_steps):
          evs = {name: evaluate.evaluate(periodic_eval, variables, sel_images[subset],
                                         sel_labels[subset], ds.num_classes,
                                         config.eval.batch_size,
                                         jax.random.fold_in(eval_rng, epoch), mesh=mesh)
                 for name, variables in weight_average.weight_sets(method, config, state)}
          _record_evaluation(evs, state, step, epoch, config, store, writer)
        elif end_of_an_epoch:
          _console(f'epoch {epoch}/{config.num_epochs} step {step}: {records.summary()}')
        if save:
          store.save_latest(step, state)
    if runs.trained_steps_in_results(workdir) == total_steps:
      _console(f'training and final evaluation already complete in {os.path.abspath(workdir)}')
    else:
      runs.final_evaluation(config, workdir, state, ds, store, trained_steps=step)
  except (Preempted, TrainingError) as e:
    if parallel.is_primary():
      kind = 'stopped' if isinstance(e, Preempted) else 'failed'
      reports.write_report(workdir, status=f'{kind}: {e}')
    raise
  finally:
    profile.close()
    progress.close()
    writer.close()
    store.close()
  return state


def _total_steps(config, steps_per_epoch: int) -> int:
  total = config.num_epochs * steps_per_epoch
  return min(total, config.max_steps) if config.max_steps else total


def _console(line: str) -> None:
  """One line of the run's progress on stdout (primary process)."""
  if parallel.is_primary():
    print(line, flush=True)


class _Profile:
  """A JAX profiler trace of steps [start, stop) into ``directory`` (``profile.steps``;
  TensorBoard's profile plugin or Perfetto read it)."""

  def __init__(self, steps, directory: str):
    self.start, self.stop = (tuple(steps) + (None, None))[:2] if steps else (None, None)
    self.directory, self.active = directory, False

  def before_step(self, step: int) -> None:
    if step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step == self.stop:
      jax.block_until_ready(state)
      self.close()
      _console(f'profiler trace of steps {self.start}-{self.stop} in {self.directory}')

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class _TrainRecords:
  """The 'train' records of metrics.jsonl: step metrics averaged at each flush."""

  def __init__(self, writer, store, progress: _Progress, optim, steps_per_epoch: int,
               num_epochs: int):
    self.writer, self.store, self.progress = writer, store, progress
    self.steps_per_epoch = steps_per_epoch
    self.lr_schedule = learning_rate_schedule(optim, steps_per_epoch, num_epochs)
    self.buffer = _MetricBuffer()
    self.last = None

  def summary(self) -> str:
    """The last train record in words: loss, train accuracies, images/s."""
    if self.last is None:
      return 'no train record yet'
    parts = [f"loss {self.last['loss']:.4g}"]
    parts += [f"train {kind} acc {100 * self.last[f'acc_{kind}']:.2f}%" for kind in ('clean', 'adv')
              if f'acc_{kind}' in self.last]
    return ', '.join(parts + [f"{self.last['images_per_sec']:.0f} images/s"])

  def add(self, metrics) -> None:
    self.buffer.add(metrics)

  def last_checkpoint(self) -> str:
    self.store.wait()
    latest = self.store.latest_step()
    return 'none' if latest is None else os.path.join(self.store.latest.directory, str(latest))

  def flush(self, step: int) -> None:
    out = self.buffer.flush(step, self.last_checkpoint) if self.buffer.items else None
    if out is not None:
      self.writer.write('train', step, epoch=step / self.steps_per_epoch,
                        lr=float(self.lr_schedule(step - 1)), **out)
      self.progress.show(out)
      self.last = out


def _validate(val_step, state, images, labels, num_classes: int, config, epoch: int, mesh, writer,
              step: int) -> dict:
  """The validation split's per-class accuracies under the method's validation attacks, written
  as a 'validation' record; ``{name: {'per_class': [C], 'avg': scalar}}`` for its epoch end."""
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 3), epoch)
  ev = evaluate.evaluate(val_step, state.variables, images, labels, num_classes,
                         config.eval.batch_size, rng, mesh=mesh)
  writer.write('validation', step, epoch=epoch,
               **{f'{a}/{k}': v for a, r in ev.items() for k, v in r.items()})
  return {a: {'per_class': jnp.asarray(r['per_class'], jnp.float32),
              'avg': jnp.asarray(r['avg'], jnp.float32)} for a, r in ev.items()}


def _warm_start(state: TrainState, config, workdir: str, ds) -> TrainState:
  """The student's weights from ``init`` (a stage trained in WORKDIR/init, or ``init.path``)."""
  variables = teacher_lib.warm_start_variables(config, workdir, ds, train_and_evaluate)
  shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
  if shapes(variables) != shapes(state.variables):
    raise ConfigError(f'the warm start in {teacher_lib.warm_start_dir(config, workdir)} is not a '
                      f'{config.model.name} with these widths: set --config.init.config (or '
                      f'init.path) to a run of the same model')
  if parallel.is_primary():
    print(f'warm start from {teacher_lib.warm_start_dir(config, workdir)}', flush=True)
  method_state = state.method_state
  if isinstance(method_state, dict) and 'average' in method_state:  # a weight average starts here
    method_state = {**method_state, 'average': jax.tree_util.tree_map(jnp.copy, variables)}
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                       method_state=method_state)


def _run_epoch_end(state, epoch: int, step: int, method: methods.Method, epoch_end_fn, writer,
                   validation=None):
  """The method's epoch-end update, and its record (ABSLD: risks and temperatures); a method with
  validation attacks first evaluates the validation split."""
  # A weight average (Method.weight_average) is a copy of the model: records never read it, so
  # it stays on the devices.
  recordable = lambda ms: ({k: v for k, v in ms.items() if k != 'average'}
                           if isinstance(ms, dict) else ms)
  before = jax.device_get(recordable(state.method_state)) if method.epoch_record else None
  if validation is not None:
    state = epoch_end_fn(state, epoch, validation(state, epoch))
  else:
    state = epoch_end_fn(state, epoch)
  if method.epoch_record is not None:
    kind, values = method.epoch_record(before, jax.device_get(recordable(state.method_state)))
    writer.write(kind, step, epoch=epoch, **values)
  return state


def _record_evaluation(evs: dict, state, step: int, epoch: int, config, store, writer) -> None:
  """Writes the periodic evaluation's record of every weight set (``{name: results}``: '' the
  trained weights, 'ema' the EMA, its keys prefixed ``ema_``; per-class accuracies included),
  keeps each set's best checkpoint, and prints one line."""
  record, line = {}, []
  for name, ev in evs.items():
    prefix = f'{name}_' if name else ''
    record.update({f'{prefix}{a}/{k}': v for a, r in ev.items() for k, v in r.items()})
    line += [f'{name.upper() + " " if name else ""}{a} {100 * r["avg"]:.2f}% '
             f'(worst class {100 * r["worst"]:.2f}%)' for a, r in ev.items()]
    if config.eval.selection != 'last':
      score = evaluate.selection_score(ev, config.eval.selection)
      record[f'{prefix}selection_score'] = score
      record[f'{prefix}is_best'] = store.save_best(step, state, score, name=name)
      line.append(f'{config.eval.selection} score {score:.4f}'
                  + (', new best' if record[f'{prefix}is_best'] else ''))
  writer.write('eval', step, epoch=epoch, split=config.eval.selection_split, **record)
  _console(f'epoch {epoch}/{config.num_epochs} step {step} ({config.eval.selection_split}): '
           + ', '.join(line))
